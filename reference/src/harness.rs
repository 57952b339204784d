//! Runs one reference layer the way the verify runner needs it: seeded module and inputs
//! for a config and workload, and the forward call under the FLOP counter.

use modelmeter::layers::AttentionImpl;
use modelmeter::{Dtype, MlaForm, MlpKind, ModelConfig, Phase, Workload};
use std::rc::Rc;
use std::time::Instant;

use tch::{Kind, Tensor};

use crate::allocations::{self, DeviceAllocations};
use crate::attention::KvCache;
use crate::counter::{Counts, FlopCounter};
use crate::decoder_layer::RefDeepseekV2DecoderLayer;
use crate::error::{Error, Result};
use crate::ffi;
use crate::mlp::RefDeepseekV2MLP;
use crate::moe::RefDeepseekV2MoE;
use crate::moe_gate::RefMoEGate;
use crate::rms_norm::RefDeepseekV2RMSNorm;
use crate::self_attention::SelfAttention;
use crate::weights::{build_then_draw, dim, kind_of, seeded_normal, Init, Setup, WeightCache};
use crate::Parameters;

/// The reference modules this crate builds. Which analytic layer each is compared with
/// is verify's business (verify/src/pairing.rs), not this crate's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ModuleKind {
    RmsNorm,
    Mlp,
    MoEGate,
    MoE,
    Attention,
    /// The decoder layer at this index of the config (dense or MoE as the config says).
    DecoderLayer(u64),
    /// The token embedding of the causal LM (run by [`crate::model`] only).
    EmbedTokens,
    /// `lm_head` and the logits' `.float()` of the causal LM (run by [`crate::model`] only).
    LmHead,
}

impl ModuleKind {
    /// Whether the module takes position ids: the attention and the decoder layers around
    /// it, the modules with a KV cache. A decode step of one of them runs after an
    /// uncounted prefill of `context_len` tokens that fills its cache
    /// ([`Prepared::new`]); the other modules' decode step is their forward over the new
    /// token alone.
    pub fn uses_positions(self) -> bool {
        matches!(self, ModuleKind::Attention | ModuleKind::DecoderLayer(_))
    }

    /// A short name for messages and parity cases (`decoder_layer[1]`).
    pub fn label(self) -> String {
        match self {
            ModuleKind::RmsNorm => "rms_norm".into(),
            ModuleKind::Mlp => "mlp".into(),
            ModuleKind::MoEGate => "moe_gate".into(),
            ModuleKind::MoE => "moe".into(),
            ModuleKind::Attention => "attention".into(),
            ModuleKind::DecoderLayer(i) => format!("decoder_layer[{i}]"),
            ModuleKind::EmbedTokens => "embed_tokens".into(),
            ModuleKind::LmHead => "lm_head".into(),
        }
    }

    /// Whether this module, built by [`RefModule::build`], may draw the parameter `name`
    /// (named as inside a decoder layer): what a [`WeightCache`] keeps for it. A superset
    /// is harmless (a kept tensor it does not use is dropped after it is built).
    pub fn may_draw(self, config: &ModelConfig, name: &str) -> bool {
        let under = |prefix: &str| {
            name.strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with('.'))
        };
        let dense_mlp = || {
            ["gate_proj", "up_proj", "down_proj"]
                .iter()
                .any(|p| under(&format!("{MLP}.{p}")))
        };
        let moe = || {
            ["gate", "experts", "shared_experts"]
                .iter()
                .any(|p| under(&format!("{MLP}.{p}")))
        };
        match self {
            ModuleKind::RmsNorm => under(INPUT_LAYERNORM),
            ModuleKind::Mlp => dense_mlp(),
            ModuleKind::MoEGate => under(MOE_GATE),
            ModuleKind::MoE => moe(),
            ModuleKind::Attention => under(SELF_ATTN),
            ModuleKind::DecoderLayer(i) => {
                under(INPUT_LAYERNORM)
                    || under(SELF_ATTN)
                    || under(POST_ATTENTION_LAYERNORM)
                    || match config.layer_kinds.get(i as usize) {
                        Some(MlpKind::Moe) => moe(),
                        _ => dense_mlp(),
                    }
            }
            ModuleKind::EmbedTokens | ModuleKind::LmHead => false,
        }
    }

    /// True for the modules whose routing is reported (tokens per expert).
    pub fn has_experts(self, config: &ModelConfig) -> bool {
        match self {
            ModuleKind::MoE => true,
            ModuleKind::DecoderLayer(i) => {
                config.layer_kinds.get(i as usize) == Some(&MlpKind::Moe)
            }
            _ => false,
        }
    }
}

/// The names of a decoder layer's sub-modules (the vendor `DeepseekV2DecoderLayer`'s
/// attributes), under which standalone modules draw their parameters too.
pub const INPUT_LAYERNORM: &str = "input_layernorm";
pub const SELF_ATTN: &str = "self_attn";
pub const POST_ATTENTION_LAYERNORM: &str = "post_attention_layernorm";
pub const MLP: &str = "mlp";
/// The MoE's gate, inside the layer's `mlp`.
pub const MOE_GATE: &str = "mlp.gate";

/// A reference module of any kind.
#[derive(Debug)]
pub enum RefModule {
    RmsNorm(RefDeepseekV2RMSNorm),
    Mlp(RefDeepseekV2MLP),
    MoEGate(RefMoEGate),
    /// Boxed: far larger than the other variants.
    MoE(Box<RefDeepseekV2MoE>),
    /// Multi-head or MLA attention, as the config says.
    Attention(SelfAttention),
    Decoder(RefDeepseekV2DecoderLayer),
}

impl RefModule {
    /// The MLA rotary embedding whose tables persist between calls, if the module has
    /// one (MLA attention, alone or in a decoder layer).
    fn mla_rotary(&self) -> Option<&crate::mla_rotary::RefDeepseekV2RotaryEmbedding> {
        match self {
            RefModule::Attention(attention) => attention.mla_rotary(),
            RefModule::Decoder(layer) => layer.self_attn().mla_rotary(),
            _ => None,
        }
    }

    /// Builds the module of `kind` for `config` with seeded weights in `dtype`; MLA
    /// attention runs in `mla`'s form.
    pub fn build(
        kind: ModuleKind,
        config: &ModelConfig,
        attention: AttentionImpl,
        mla: MlaForm,
        dtype: Dtype,
        setup: &Setup,
    ) -> Result<RefModule> {
        RefModule::build_sharing(kind, config, attention, mla, dtype, setup, None)
    }

    /// [`RefModule::build`] with the parameters `cache` holds (if any) handed out instead
    /// of drawn again, and what it draws kept there (see [`WeightCache`]).
    pub fn build_sharing(
        kind: ModuleKind,
        config: &ModelConfig,
        attention: AttentionImpl,
        mla: MlaForm,
        dtype: Dtype,
        setup: &Setup,
        cache: Option<Rc<WeightCache>>,
    ) -> Result<RefModule> {
        let init = Init::sharing(setup, dtype, cache)?;
        build_then_draw(&init, |init| {
            RefModule::build_from(kind, config, attention, mla, init)
        })
    }

    /// Builds `kind` with its parameters named as inside a decoder layer (a standalone
    /// MLP's `mlp.gate_proj.weight`, the attention's `self_attn.q_proj.weight`): the same
    /// seed then gives a standalone module and its twin in a decoder layer the same
    /// weights, which a [`WeightCache`] can share.
    fn build_from(
        kind: ModuleKind,
        config: &ModelConfig,
        attention: AttentionImpl,
        mla: MlaForm,
        init: &Init,
    ) -> Result<RefModule> {
        let in_layer = |path: &str| path.split('.').fold(init.clone(), |i, part| i.sub(part));
        Ok(match kind {
            ModuleKind::RmsNorm => RefModule::RmsNorm(RefDeepseekV2RMSNorm::new(
                config,
                &in_layer(INPUT_LAYERNORM),
            )?),
            ModuleKind::Mlp => RefModule::Mlp(RefDeepseekV2MLP::new(
                config.hidden_size,
                config.intermediate_size,
                &in_layer(MLP),
            )?),
            ModuleKind::MoEGate => {
                RefModule::MoEGate(RefMoEGate::new(config, &in_layer(MOE_GATE))?)
            }
            ModuleKind::MoE => RefModule::MoE(Box::new(RefDeepseekV2MoE::new(
                config,
                &in_layer(MLP),
            )?)),
            ModuleKind::Attention => RefModule::Attention(SelfAttention::new(
                config,
                &in_layer(SELF_ATTN),
                attention,
                mla,
            )?),
            ModuleKind::DecoderLayer(index) => {
                if index >= config.layer_kinds.len() as u64 {
                    return Err(Error::Model(modelmeter::Error::invalid(
                        "decoder layer index",
                        index,
                        &format!("below num_hidden_layers = {}", config.layer_kinds.len()),
                    )));
                }
                RefModule::Decoder(RefDeepseekV2DecoderLayer::new(
                    config, index, init, attention, mla,
                )?)
            }
            ModuleKind::EmbedTokens | ModuleKind::LmHead => {
                return Err(Error::Model(modelmeter::Error::invalid(
                    "reference module",
                    kind.label(),
                    "a module that runs alone (embed_tokens and lm_head run inside the causal LM: model::RefDeepseekV2ForCausalLM)",
                )))
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

    /// True when the forward takes the additive causal mask (the eager core, and MLA's
    /// absorbed form whatever the implementation).
    fn needs_mask(&self, attention: AttentionImpl) -> bool {
        match self {
            RefModule::Attention(m) => m.needs_mask(attention),
            RefModule::Decoder(m) => m.needs_mask(attention),
            _ => false,
        }
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
            RefModule::Decoder(m) => {
                m.forward_with_routing(x, &inputs.position_ids, cache, inputs.mask.as_ref())?
            }
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
#[allow(clippy::too_many_arguments)]
pub fn step_inputs(
    config: &ModelConfig,
    setup: &Setup,
    dtype: Dtype,
    name: &str,
    batch: u64,
    start: u64,
    len: u64,
    eager_mask: bool,
) -> Result<StepInputs> {
    let kind = kind_of(dtype)?;
    let (b, s) = (dim(batch, "batch")?, dim(len, "seq_len")?);
    let h = dim(config.hidden_size, "hidden_size")?;
    let hidden = seeded_normal(setup.seed, name, &[b, s, h])?
        .f_to_device(setup.device)?
        .f_to_kind(kind)?;
    let (position_ids, mask) = causal_positions(batch, start, len, kind, setup.device, eager_mask)?;
    Ok(StepInputs {
        hidden,
        position_ids,
        mask,
    })
}

/// The position ids `[B, S_q]` of `len` tokens from position `start`, and for the eager
/// attention path the additive causal mask `[B, 1, S_q, start + len]` in `kind` (query i,
/// at position start + i, sees keys 0 ..= start + i; the others get the dtype's minimum),
/// as the vendor model builds them before its layers.
pub fn causal_positions(
    batch: u64,
    start: u64,
    len: u64,
    kind: Kind,
    device: tch::Device,
    eager_mask: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let (b, s0, s) = (
        dim(batch, "batch")?,
        dim(start, "context_len")?,
        dim(len, "seq_len")?,
    );
    let position_ids = Tensor::f_arange_start(s0, s0 + s, (Kind::Int64, device))?
        .f_unsqueeze(0)?
        .f_expand([b, s], false)?
        .f_contiguous()?;
    let mask = if eager_mask {
        let keys = Tensor::f_arange(s0 + s, (Kind::Int64, device))?.f_view([1, -1])?;
        let queries = Tensor::f_arange_start(s0, s0 + s, (Kind::Int64, device))?.f_view([-1, 1])?;
        let blocked = keys.f_gt_tensor(&queries)?;
        let min = match kind {
            Kind::BFloat16 => -3.389_531_389_251_535_5e38,
            Kind::Half => -65504.0,
            _ => f32::MIN as f64,
        };
        let mask = Tensor::f_zeros([s, s0 + s], (kind, device))?.f_masked_fill(&blocked, min)?;
        Some(
            mask.f_view([1, 1, s, s0 + s])?
                .f_expand([b, 1, s, s0 + s], false)?
                .f_contiguous()?,
        )
    } else {
        None
    };
    Ok((position_ids, mask))
}

/// Where a layer's run spent its wall time, in seconds (for `verify-decoder --timings`
/// and the benchmarks; never asserted on).
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct RunTimings {
    /// Building the module: drawing its weights.
    pub build_s: f64,
    /// Its inputs, and for a decode step the uncounted prefill that fills its KV cache.
    pub prepare_s: f64,
    /// The counted forward (the counter, the allocation observer, their parsing).
    pub forward_s: f64,
}

/// A reference layer that ran under the counter.
#[derive(Debug)]
pub struct LayerRun {
    pub kind: ModuleKind,
    pub name: String,
    /// The module's output (the gate: its top-k weights).
    pub output: Tensor,
    pub counts: Counts,
    /// Bytes of the module's parameters: numel × element size of each parameter tensor.
    pub weight_bytes: u64,
    /// Bytes of the KV cache the module holds after the forward (the prefill's and this
    /// call's keys and values): numel × element size of the cached tensors, their logical
    /// size; 0 without attention. A cached view pins all of its base's storage, which this
    /// does not see: MLA's eager prefill caches the values as a view of `kv_b_proj`'s
    /// output (docs/memory.md).
    pub kv_cache_bytes: u64,
    /// MoE only: tokens each routed expert received.
    pub tokens_per_expert: Option<Vec<i64>>,
    /// What libtorch's allocator reported on the module's device during the counted
    /// forward (allocations, frees, peak).
    pub allocations: DeviceAllocations,
    /// The part of `allocations.allocated_bytes` that holds the counted ops' outputs;
    /// the rest is transient inside ops (kernel scratch, wrapped scalars).
    pub output_allocated_bytes: u64,
    /// The high-water mark of the live bytes of those allocations during the forward:
    /// the measured `peak_activation_bytes` (scratch and wrapped scalars left out).
    pub output_peak_live_bytes: u64,
    /// Lost or inconsistent allocator reports; the allocation figures are complete only
    /// when this is empty.
    pub allocation_errors: Vec<String>,
    /// Where the run spent its time.
    pub timings: RunTimings,
}

impl LayerRun {
    /// MoE only: how many routed experts received tokens.
    pub fn experts_hit(&self) -> Option<u64> {
        let tokens = self.tokens_per_expert.as_ref()?;
        Some(tokens.iter().filter(|n| **n > 0).count() as u64)
    }

    /// `workload` under the routing this run measured ([`Workload::expert_rows`]: the
    /// rows each expert that received tokens processed): what the analytic side must cost
    /// to compare bytes; `workload` itself without routing.
    pub fn routed(&self, workload: &Workload) -> Workload {
        match &self.tokens_per_expert {
            Some(tokens) => workload.clone().with_expert_rows(
                tokens
                    .iter()
                    .filter(|n| **n > 0)
                    .map(|n| *n as u64)
                    .collect(),
            ),
            None => workload.clone(),
        }
    }
}

/// Runs `f` under the FLOP counter without autograd; the region is always closed.
pub fn measure<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Counts)> {
    let _no_grad = tch::no_grad_guard();
    let region = FlopCounter::start()?;
    let out = f();
    let counts = region.finish()?;
    Ok((out?, counts))
}

/// Runs `f` under the FLOP counter and the allocation observer on `device`, synchronised
/// before (so earlier work is finished and not counted) and after (so an asynchronous CUDA
/// failure is charged to this call, also when `f` failed).
pub(crate) fn counted<T>(
    device: tch::Device,
    f: impl FnOnce() -> Result<T>,
) -> Result<(T, Counts, allocations::Allocations)> {
    ffi::synchronize(device)?;
    let measured = measure(|| {
        let (out, allocations) = allocations::measure(f)?;
        Ok((out?, allocations))
    });
    let synced = ffi::synchronize(device);
    match (measured, synced) {
        (Ok(((out, allocations), counts)), Ok(())) => Ok((out, counts, allocations)),
        (Err(e), _) | (Ok(_), Err(e)) => Err(e),
    }
}

/// The inputs of the uncounted prefill that fills the KV cache before a decode step of
/// `module`, a `kind` (the seeded `context` tokens at positions 0 .. context_len), or
/// `None` when the workload is a prefill or the module has no attention
/// ([`ModuleKind::uses_positions`]). The same seed gives the same values, so the parity
/// export can hand them to transformers.
pub(crate) fn context_inputs(
    kind: ModuleKind,
    module: &RefModule,
    config: &ModelConfig,
    workload: &Workload,
    attention: AttentionImpl,
    setup: &Setup,
) -> Result<Option<StepInputs>> {
    match (workload.phase, kind.uses_positions()) {
        (Phase::Decode { context_len }, true) => Ok(Some(step_inputs(
            config,
            setup,
            workload.dtype,
            "context",
            workload.batch,
            0,
            context_len,
            module.needs_mask(attention),
        )?)),
        _ => Ok(None),
    }
}

/// A module with its inputs prepared (and, for a decode step, its KV cache filled by an
/// uncounted prefill of `context_len` tokens).
pub struct Prepared {
    pub kind: ModuleKind,
    pub name: String,
    pub module: RefModule,
    pub inputs: StepInputs,
    pub cache: KvCache,
    /// The workload's TF32 setting, applied to libtorch before the counted forward.
    pub allow_tf32: bool,
    /// How long building and preparing took ([`RunTimings::forward_s`] is 0 until run).
    pub timings: RunTimings,
}

impl Prepared {
    /// Builds the module and its inputs for `workload`, in the workload's dtype (the one
    /// source of the dtype: `setup` only says where and with which seed).
    pub fn new(
        kind: ModuleKind,
        config: &ModelConfig,
        workload: &Workload,
        attention: AttentionImpl,
        setup: &Setup,
    ) -> Result<Prepared> {
        Prepared::with_weights(kind, config, workload, attention, setup, None)
    }

    /// [`Prepared::new`], taking the parameters `cache` holds (if any) instead of drawing
    /// them again, and keeping what it draws there ([`WeightCache`]).
    pub fn with_weights(
        kind: ModuleKind,
        config: &ModelConfig,
        workload: &Workload,
        attention: AttentionImpl,
        setup: &Setup,
        cache: Option<Rc<WeightCache>>,
    ) -> Result<Prepared> {
        let setup = *setup;
        let dtype = workload.dtype;
        let start = Instant::now();
        let mla = workload.mla;
        let module =
            RefModule::build_sharing(kind, config, attention, mla, dtype, &setup, cache.clone())?;
        if let Some(cache) = cache {
            cache.drop_unused();
        }
        ffi::synchronize(setup.device)?;
        let built = Instant::now();
        let eager = module.needs_mask(attention);
        let mut cache = KvCache::new();
        if let Some(prefill) = context_inputs(kind, &module, config, workload, attention, &setup)? {
            let _no_grad = tch::no_grad_guard();
            let _ = module.forward(&prefill, &mut cache)?;
        }
        let inputs = step_inputs(
            config,
            &setup,
            dtype,
            "input",
            workload.batch,
            workload.first_position(),
            workload.query_len(),
            eager,
        )?;
        ffi::synchronize(setup.device)?;
        let timings = RunTimings {
            build_s: (built - start).as_secs_f64(),
            prepare_s: built.elapsed().as_secs_f64(),
            forward_s: 0.0,
        };
        Ok(Prepared {
            kind,
            name: kind.label(),
            module,
            inputs,
            cache,
            allow_tf32: workload.allow_tf32,
            timings,
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
        // The workload decides TF32; libtorch's process-wide switch is set from it, and
        // the counter reports the switch it saw.
        ffi::set_tf32_matmul_allowed(self.allow_tf32)?;
        let weight_bytes = self.module.weight_bytes();
        let device = self.inputs.hidden.device();
        let start = Instant::now();
        let ((output, tokens_per_expert), counts, allocations) = counted(device, || {
            self.module.forward(&self.inputs, &mut self.cache)
        })?;
        let outputs = allocations.output_footprint(device, &counts.output_blocks);
        let timings = RunTimings {
            forward_s: start.elapsed().as_secs_f64(),
            ..self.timings
        };
        Ok(LayerRun {
            kind: self.kind,
            name: self.name,
            output,
            counts,
            weight_bytes,
            kv_cache_bytes: self.cache.bytes(),
            tokens_per_expert,
            output_allocated_bytes: outputs.bytes,
            output_peak_live_bytes: outputs.peak_live_bytes,
            allocations: allocations.device(device),
            allocation_errors: allocations.errors,
            timings,
        })
    }
}

impl Prepared {
    /// [`Prepared::run`] as one profiler range of the `--hardware-counters` child under
    /// Nsight Compute (`--ncu-replay`: application range replay by default, where each
    /// range is one result row; range replay, the same in place; kernel replay, where the
    /// range bounds the kernels profiled). One uncounted warm-up forward comes first (on a
    /// fork of the KV cache, so the counted call sees the same cache): it fills libtorch's
    /// caching allocator, cuBLAS workspaces and cuDNN plans, so that the range holds only
    /// the layer's own work (and allocates no device memory, which range replay cannot
    /// replay in place). Then `cuProfilerStart`, the counted forward, `cuProfilerStop`
    /// (also when the forward failed).
    ///
    /// An error raised once `cuProfilerStart` succeeded (in the counted forward or in
    /// `cuProfilerStop`) is marked [`Error::InProfilerRange`]: ncu has a range for the
    /// layer, whose row the child's range list must pass over. One raised before (the
    /// warm-up, the synchronisation, opening the range) is not: no range was opened.
    ///
    /// On the CPU there is no range and no ncu, but the warm-up and the counted forward
    /// run the same way and an error from the counted forward is marked the same way, so
    /// the child's bookkeeping takes the path it takes on a GPU and can be tested without
    /// one. There the mark says where the error was raised, not that a range exists.
    ///
    /// A panic unwinds through without closing the range or being marked: the caller
    /// cannot tell whether it came before the range or inside it.
    pub fn run_in_profiler_range(self) -> Result<LayerRun> {
        ffi::set_tf32_matmul_allowed(self.allow_tf32)?;
        let device = self.inputs.hidden.device();
        {
            let _no_grad = tch::no_grad_guard();
            let mut cache = self.cache.fork();
            // The warm-up leaves no state behind: not the KV cache (forked) and not the
            // MLA rotary tables, which the counted forward would otherwise find built
            // and skip building (the vendor's first call, and a plain run, build them).
            let rotary = self.module.mla_rotary().map(|r| (r, r.save()));
            // Dropped at once: its blocks go back to the caching allocator for the
            // counted forward to reuse.
            let _warm = self.module.forward(&self.inputs, &mut cache)?;
            if let Some((r, state)) = rotary {
                r.restore(state);
            }
        }
        ffi::synchronize(device)?;
        let cuda = device.is_cuda();
        if cuda {
            ffi::cuda_profiler_start()?;
        }
        // From here on the range is open (on the CPU: would be). A panic in the forward
        // is held until the range is closed, so that it does not run on into the next
        // layer's range; then it goes on unwinding to the runner.
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run()));
        let stopped = if cuda {
            ffi::cuda_profiler_stop()
        } else {
            Ok(())
        };
        let run = run
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            .map_err(Error::in_profiler_range)?;
        stopped.map_err(Error::in_profiler_range)?;
        Ok(run)
    }
}

/// [`run_layer`] with the counted forward as one profiler range
/// ([`Prepared::run_in_profiler_range`]).
pub fn run_layer_in_profiler_range(
    kind: ModuleKind,
    config: &ModelConfig,
    workload: &Workload,
    attention: AttentionImpl,
    setup: &Setup,
) -> Result<LayerRun> {
    Prepared::new(kind, config, workload, attention, setup)?.run_in_profiler_range()
}

/// [`run_layer`] with the parameters `cache` holds handed out instead of drawn again
/// (see [`WeightCache`]); the counts are the same.
pub fn run_layer_sharing(
    kind: ModuleKind,
    config: &ModelConfig,
    workload: &Workload,
    attention: AttentionImpl,
    setup: &Setup,
    cache: Rc<WeightCache>,
) -> Result<LayerRun> {
    Prepared::with_weights(kind, config, workload, attention, setup, Some(cache))?.run()
}

/// Builds, prepares and runs one module under the counter, in the workload's dtype and
/// TF32 setting.
pub fn run_layer(
    kind: ModuleKind,
    config: &ModelConfig,
    workload: &Workload,
    attention: AttentionImpl,
    setup: &Setup,
) -> Result<LayerRun> {
    Prepared::new(kind, config, workload, attention, setup)?.run()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The norm of DeepSeek-OCR, prefill of 4 tokens, prepared on the CPU.
    fn norm() -> Prepared {
        let setup = Setup {
            device: tch::Device::Cpu,
            seed: 3,
        };
        let workload = Workload::prefill(1, 4).unwrap();
        let config = ModelConfig::deepseek_ocr();
        Prepared::new(
            ModuleKind::RmsNorm,
            &config,
            &workload,
            AttentionImpl::Sdpa,
            &setup,
        )
        .unwrap()
    }

    #[test]
    fn an_error_in_the_counted_forward_says_the_range_was_open() {
        let ran = norm().run_in_profiler_range().expect("runs");
        assert!(ran.counts.total_flops() > 0);
        // A counted region already open on this thread: the warm-up runs, the counted
        // forward cannot arm the counter, inside the range.
        let outer = FlopCounter::start().unwrap();
        let err = norm().run_in_profiler_range().unwrap_err();
        drop(outer);
        assert!(err.opened_profiler_range(), "{err:?}");
        assert!(err.to_string().contains("already open"), "{err}");
        // The same failure outside a profiler range is not marked.
        let outer = FlopCounter::start().unwrap();
        let plain = norm().run().unwrap_err();
        drop(outer);
        assert!(!plain.opened_profiler_range(), "{plain:?}");
    }

    #[test]
    fn an_error_before_the_range_does_not_say_it_was_open() {
        // Inputs of the wrong width: the warm-up forward fails, before the range.
        let mut prepared = norm();
        prepared.inputs.hidden = Tensor::zeros([1, 4, 3], (Kind::BFloat16, tch::Device::Cpu));
        let err = prepared.run_in_profiler_range().unwrap_err();
        assert!(!err.opened_profiler_range(), "{err:?}");
    }
}
