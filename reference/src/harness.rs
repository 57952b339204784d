//! Runs one reference layer the way the verify runner needs it: seeded module and inputs
//! for a config and workload, the forward call under the FLOP counter, and the analytic
//! layer it is compared with.

use modelmeter::layers::{AttentionImpl, Layer};
use modelmeter::{MlpKind, ModelConfig, Phase, Workload};
use tch::{Kind, Tensor};

use crate::attention::{KvCache, RefLlamaAttention};
use crate::counter::{Counts, FlopCounter};
use crate::decoder_layer::RefDeepseekV2DecoderLayer;
use crate::error::{Error, Result};
use crate::mlp::RefDeepseekV2MLP;
use crate::moe::RefDeepseekV2MoE;
use crate::moe_gate::RefMoEGate;
use crate::observer;
use crate::rms_norm::RefDeepseekV2RMSNorm;
use crate::weights::{dim, seeded_normal, Init, Setup};
use crate::Parameters;

/// The layers of the original ModelMeter verification, plus the attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayerKind {
    Mlp,
    MoEGate,
    MoE,
    RmsNorm,
    DecoderDense,
    DecoderMoe,
    Attention,
}

impl LayerKind {
    /// In report order.
    pub const ALL: [LayerKind; 7] = [
        LayerKind::Mlp,
        LayerKind::MoEGate,
        LayerKind::MoE,
        LayerKind::RmsNorm,
        LayerKind::DecoderDense,
        LayerKind::DecoderMoe,
        LayerKind::Attention,
    ];

    /// The report name (the vendor class; the attention's depends on the implementation).
    pub fn name(self, attention: AttentionImpl) -> &'static str {
        match self {
            LayerKind::Mlp => "DeepseekV2MLP",
            LayerKind::MoEGate => "MoEGate",
            LayerKind::MoE => "DeepseekV2MoE",
            LayerKind::RmsNorm => "DeepseekV2RMSNorm",
            LayerKind::DecoderDense => "DeepseekV2DecoderLayer_dense",
            LayerKind::DecoderMoe => "DeepseekV2DecoderLayer_moe",
            LayerKind::Attention => attention.class_name(),
        }
    }

    /// Parses a report name (either attention class name selects the attention).
    pub fn parse(name: &str) -> Option<LayerKind> {
        match name {
            "LlamaFlashAttention2" | "LlamaAttention" => Some(LayerKind::Attention),
            _ => LayerKind::ALL
                .into_iter()
                .find(|k| k.name(AttentionImpl::Sdpa) == name),
        }
    }

    /// The config's layer index this kind runs as (attention and norms: layer 0).
    pub fn layer_index(self, config: &ModelConfig) -> Option<u64> {
        match self {
            LayerKind::DecoderDense => config.first_layer_of(MlpKind::Dense),
            LayerKind::DecoderMoe => config.first_layer_of(MlpKind::Moe),
            LayerKind::MoEGate | LayerKind::MoE => config.moe.as_ref().map(|_| 0),
            _ => Some(0),
        }
    }

    /// The analytic layer this reference layer is compared with.
    pub fn analytic(
        self,
        config: &ModelConfig,
        workload: &Workload,
        attention: AttentionImpl,
    ) -> Result<Box<dyn Layer>> {
        // The analytic crate decides which layers a config has; take this one from it.
        let name = self.name(attention);
        modelmeter::report::layers(config, workload, attention)?
            .into_iter()
            .find(|layer| layer.name() == name)
            .ok_or_else(|| {
                Error::Model(modelmeter::Error::Missing {
                    field: "n_routed_experts".into(),
                    expected: format!("{name} needs a config with routed experts"),
                })
            })
    }
}

/// A reference module of any kind.
#[derive(Debug)]
pub enum RefModule {
    RmsNorm(RefDeepseekV2RMSNorm),
    Mlp(RefDeepseekV2MLP),
    MoEGate(RefMoEGate),
    MoE(RefDeepseekV2MoE),
    Attention(RefLlamaAttention),
    Decoder(RefDeepseekV2DecoderLayer),
}

impl RefModule {
    /// Builds the module of `kind` for `config` with seeded weights.
    pub fn build(
        kind: LayerKind,
        config: &ModelConfig,
        attention: AttentionImpl,
        setup: &Setup,
    ) -> Result<RefModule> {
        let init = Init::new(setup);
        Ok(match kind {
            LayerKind::RmsNorm => RefModule::RmsNorm(RefDeepseekV2RMSNorm::new(config, &init)?),
            LayerKind::Mlp => RefModule::Mlp(RefDeepseekV2MLP::new(
                config.hidden_size,
                config.intermediate_size,
                &init,
            )?),
            LayerKind::MoEGate => RefModule::MoEGate(RefMoEGate::new(config, &init)?),
            LayerKind::MoE => RefModule::MoE(RefDeepseekV2MoE::new(config, &init)?),
            LayerKind::Attention => {
                RefModule::Attention(RefLlamaAttention::new(config, &init, attention)?)
            }
            LayerKind::DecoderDense | LayerKind::DecoderMoe => {
                let index = kind.layer_index(config).ok_or_else(|| {
                    Error::Model(modelmeter::Error::invalid(
                        "layer",
                        kind.name(attention),
                        "a layer kind the config has",
                    ))
                })?;
                RefModule::Decoder(RefDeepseekV2DecoderLayer::new(
                    config, index, &init, attention,
                )?)
            }
        })
    }

    fn parameter_list(&self) -> Vec<(String, Tensor)> {
        match self {
            RefModule::RmsNorm(m) => m.parameters(),
            RefModule::Mlp(m) => m.parameters(),
            RefModule::MoEGate(m) => m.parameters(),
            RefModule::MoE(m) => m.parameters(),
            RefModule::Attention(m) => m.parameters(),
            RefModule::Decoder(m) => m.parameters(),
        }
    }

    fn uses_positions(&self) -> bool {
        matches!(self, RefModule::Attention(_) | RefModule::Decoder(_))
    }

    /// One forward call; returns the main output and, for MoE, tokens per expert.
    fn forward(
        &self,
        inputs: &StepInputs,
        cache: &mut KvCache,
    ) -> Result<(Tensor, Option<Vec<i64>>)> {
        let x = &inputs.hidden;
        Ok(match self {
            RefModule::RmsNorm(m) => (m.forward(x)?, None),
            RefModule::Mlp(m) => (m.forward(x)?, None),
            RefModule::MoEGate(m) => (m.forward(x)?.topk_weight, None),
            RefModule::MoE(m) => {
                let (y, routing) = m.forward_with_routing(x)?;
                (y, Some(routing))
            }
            RefModule::Attention(m) => (
                m.forward(x, &inputs.position_ids, cache, inputs.mask.as_ref())?,
                None,
            ),
            RefModule::Decoder(m) => (
                m.forward(x, &inputs.position_ids, cache, inputs.mask.as_ref())?,
                None,
            ),
        })
    }
}

impl Parameters for RefModule {
    fn parameters(&self) -> Vec<(String, Tensor)> {
        self.parameter_list()
    }
}

/// The inputs of one forward call.
#[derive(Debug)]
pub struct StepInputs {
    /// `[B, S_q, h]` in the model dtype.
    pub hidden: Tensor,
    /// `[B, S_q]` int64.
    pub position_ids: Tensor,
    /// The additive causal mask `[B, 1, S_q, S_kv]` of the eager attention path.
    pub mask: Option<Tensor>,
}

/// Seeded inputs for `batch` sequences of `len` tokens starting at position `start`,
/// attending over `start + len` keys.
pub fn step_inputs(
    config: &ModelConfig,
    setup: &Setup,
    name: &str,
    batch: u64,
    start: u64,
    len: u64,
    eager_mask: bool,
) -> Result<StepInputs> {
    let kind = setup.kind()?;
    let (b, s0, s) = (
        dim(batch, "batch")?,
        dim(start, "context_len")?,
        dim(len, "seq_len")?,
    );
    let h = dim(config.hidden_size, "hidden_size")?;
    let hidden = seeded_normal(setup.seed, name, &[b, s, h])?
        .f_to_device(setup.device)?
        .f_to_kind(kind)?;
    let position_ids = Tensor::f_arange_start(s0, s0 + s, (Kind::Int64, setup.device))?
        .f_unsqueeze(0)?
        .f_expand([b, s], false)?
        .f_contiguous()?;
    let mask = if eager_mask {
        // Query i (at position s0 + i) sees keys 0 ..= s0 + i; others get dtype's min.
        let keys = Tensor::f_arange(s0 + s, (Kind::Int64, setup.device))?.f_view([1, -1])?;
        let queries =
            Tensor::f_arange_start(s0, s0 + s, (Kind::Int64, setup.device))?.f_view([-1, 1])?;
        let blocked = keys.f_gt_tensor(&queries)?;
        let min = match kind {
            Kind::BFloat16 => -3.389_531_389_251_535_5e38,
            Kind::Half => -65504.0,
            _ => f32::MIN as f64,
        };
        let mask =
            Tensor::f_zeros([s, s0 + s], (kind, setup.device))?.f_masked_fill(&blocked, min)?;
        Some(
            mask.f_view([1, 1, s, s0 + s])?
                .f_expand([b, 1, s, s0 + s], false)?
                .f_contiguous()?,
        )
    } else {
        None
    };
    Ok(StepInputs {
        hidden,
        position_ids,
        mask,
    })
}

/// A reference layer that ran under the counter.
#[derive(Debug)]
pub struct LayerRun {
    pub kind: LayerKind,
    pub name: String,
    /// The module's output (the gate: its top-k weights).
    pub output: Tensor,
    pub counts: Counts,
    /// Bytes of the module's parameters, as allocated.
    pub weight_bytes: u64,
    /// MoE only: tokens each routed expert received.
    pub tokens_per_expert: Option<Vec<i64>>,
}

/// Runs `f` under the FLOP counter without autograd; the region is always closed.
pub fn measure<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Counts)> {
    let _no_grad = tch::no_grad_guard();
    let region = FlopCounter::start()?;
    let out = f();
    let counts = region.finish()?;
    Ok((out?, counts))
}

/// A module with its inputs prepared (and, for a decode step, its KV cache filled by an
/// uncounted prefill of `context_len` tokens).
pub struct Prepared {
    pub kind: LayerKind,
    pub name: String,
    pub module: RefModule,
    pub inputs: StepInputs,
    pub cache: KvCache,
}

impl Prepared {
    /// Builds the module and its inputs for `workload`.
    pub fn new(
        kind: LayerKind,
        config: &ModelConfig,
        workload: &Workload,
        attention: AttentionImpl,
        setup: &Setup,
    ) -> Result<Prepared> {
        let setup = Setup {
            dtype: workload.dtype,
            ..*setup
        };
        let module = RefModule::build(kind, config, attention, &setup)?;
        let eager = attention == AttentionImpl::Eager && module.uses_positions();
        let mut cache = KvCache::new();
        if let (Phase::Decode { context_len }, true) = (workload.phase, module.uses_positions()) {
            let prefill = step_inputs(
                config,
                &setup,
                "context",
                workload.batch,
                0,
                context_len,
                eager,
            )?;
            let _no_grad = tch::no_grad_guard();
            let _ = module.forward(&prefill, &mut cache)?;
        }
        let inputs = step_inputs(
            config,
            &setup,
            "input",
            workload.batch,
            workload.first_position(),
            workload.query_len(),
            eager,
        )?;
        Ok(Prepared {
            kind,
            name: kind.name(attention).to_string(),
            module,
            inputs,
            cache,
        })
    }

    /// The forward call without the counter: the output and, for MoE, tokens per expert.
    pub fn forward(&mut self) -> Result<(Tensor, Option<Vec<i64>>)> {
        self.module.forward(&self.inputs, &mut self.cache)
    }

    /// The counted forward call. On CUDA the device is synchronised before counting
    /// (so the uncounted preparation is finished) and after it, outside the counted
    /// region and also when the forward failed, so an asynchronous CUDA error is charged
    /// to this layer.
    pub fn run(mut self) -> Result<LayerRun> {
        let weight_bytes = self.module.weight_bytes();
        let device = self.inputs.hidden.device();
        observer::synchronize(device)?;
        let measured = measure(|| self.module.forward(&self.inputs, &mut self.cache));
        let synced = observer::synchronize(device);
        let ((output, tokens_per_expert), counts) = match (measured, synced) {
            (Ok(m), Ok(())) => m,
            (Err(e), _) | (Ok(_), Err(e)) => return Err(e),
        };
        Ok(LayerRun {
            kind: self.kind,
            name: self.name,
            output,
            counts,
            weight_bytes,
            tokens_per_expert,
        })
    }
}

/// Builds, prepares and runs one layer under the counter.
pub fn run_layer(
    kind: LayerKind,
    config: &ModelConfig,
    workload: &Workload,
    attention: AttentionImpl,
    setup: &Setup,
) -> Result<LayerRun> {
    Prepared::new(kind, config, workload, attention, setup)?.run()
}
