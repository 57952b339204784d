//! `RefDeepseekV2ForCausalLM`: the whole vendor causal LM — token embedding, every decoder
//! layer by index (dense or MoE as the config says), the final RMSNorm, `lm_head` and the
//! logits' `.float()` — and a greedy generation over it, counted part by part.
//!
//! ```python
//! inputs_embeds = self.embed_tokens(input_ids)            # DeepseekV2Model.forward
//! for decoder_layer in self.layers:
//!     hidden_states = decoder_layer(hidden_states, attention_mask, position_ids, past_key_value, ...)
//! hidden_states = self.norm(hidden_states)
//! logits = self.lm_head(hidden_states)                    # DeepseekV2ForCausalLM.forward
//! logits = logits.float()
//! ```
//!
//! Each part of each forward call runs in its own counter region ([`StackPart`]), so a
//! measured op belongs to exactly one part and one step. What runs between the parts is
//! not counted, as in the single-layer harness: the position ids and the eager path's
//! causal mask (built once per call, before the layers) and the greedy choice of the next
//! token (`argmax` of the last position's logits: `generate()`'s work, not the model's).

use modelmeter::layers::{AttentionImpl, StackPart};
use modelmeter::{Dtype, ModelConfig};
use tch::{Kind, Tensor};

use crate::attention::KvCache;
use crate::decoder_layer::RefDeepseekV2DecoderLayer;
use crate::error::{Error, Result};
use crate::ffi;
use crate::harness::{causal_positions, counted, LayerRun, ModuleKind};
use crate::rms_norm::RefDeepseekV2RMSNorm;
use crate::weights::{build_then_draw, dim, kind_of, seeded_ids, tensor_bytes, Init, Setup};
use crate::{prefixed, Parameters};

/// The vendor `DeepseekV2ForCausalLM` with seeded weights.
#[derive(Debug)]
pub struct RefDeepseekV2ForCausalLM {
    embed_tokens: Tensor,
    layers: Vec<RefDeepseekV2DecoderLayer>,
    norm: RefDeepseekV2RMSNorm,
    /// `None` when the config ties it to the embedding.
    lm_head: Option<Tensor>,
    config: ModelConfig,
    attention: AttentionImpl,
    dtype: Dtype,
    setup: Setup,
}

impl RefDeepseekV2ForCausalLM {
    /// Builds every part of `config` (all its `num_hidden_layers`) in `dtype` on
    /// `setup.device`, each parameter seeded by its vendor name
    /// (`model.layers.1.mlp.experts.3.up_proj.weight`); MLA layers run in `mla`'s form.
    pub fn new(
        config: &ModelConfig,
        attention: AttentionImpl,
        mla: modelmeter::MlaForm,
        dtype: Dtype,
        setup: &Setup,
    ) -> Result<RefDeepseekV2ForCausalLM> {
        // Every CPU parameter drawn in one pass once all are allocated.
        build_then_draw(&Init::new(setup, dtype)?, |root| {
            let model = root.sub("model");
            let vocab = dim(config.vocab_size, "vocab_size")?;
            let hidden = dim(config.hidden_size, "hidden_size")?;
            let layers = (0..config.num_hidden_layers)
                .map(|i| {
                    RefDeepseekV2DecoderLayer::new(
                        config,
                        i,
                        &model.sub("layers").sub(&i.to_string()),
                        attention,
                        mla,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let lm_head = match config.tie_word_embeddings {
                true => None,
                false => Some(root.linear("lm_head.weight", vocab, hidden)?),
            };
            Ok(RefDeepseekV2ForCausalLM {
                embed_tokens: model
                    .sub("embed_tokens")
                    .embedding("weight", vocab, hidden)?,
                layers,
                norm: RefDeepseekV2RMSNorm::new(config, &model.sub("norm"))?,
                lm_head,
                config: config.clone(),
                attention,
                dtype,
                setup: *setup,
            })
        })
    }

    /// A greedy generation from a seeded prompt of `prompt_len` tokens per sequence;
    /// `allow_tf32` is the workload's TF32 setting, applied to libtorch before each call.
    pub fn generate(
        &self,
        batch: u64,
        prompt_len: u64,
        allow_tf32: bool,
    ) -> Result<GreedyGeneration<'_>> {
        let ids = seeded_ids(
            self.setup.seed,
            "input_ids",
            &[dim(batch, "batch")?, dim(prompt_len, "seq_len")?],
            dim(self.config.vocab_size, "vocab_size")?,
        )?
        .f_to_device(self.setup.device)?;
        Ok(GreedyGeneration {
            model: self,
            caches: self.layers.iter().map(|_| KvCache::new()).collect(),
            input_ids: ids,
            position: 0,
            batch,
            allow_tf32,
        })
    }

    /// Bytes of one part's own parameters (`lm_head`: 0 when tied to the embedding).
    fn part_weight_bytes(&self, part: StackPart) -> u64 {
        match part {
            StackPart::EmbedTokens => tensor_bytes(&self.embed_tokens),
            StackPart::Layer(i) => self.layers[i as usize].weight_bytes(),
            StackPart::Norm => self.norm.weight_bytes(),
            StackPart::LmHead => self.lm_head.as_ref().map_or(0, tensor_bytes),
        }
    }

    fn head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }
}

impl Parameters for RefDeepseekV2ForCausalLM {
    fn parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.shallow_clone(),
        )];
        for (i, layer) in self.layers.iter().enumerate() {
            out.extend(prefixed(&format!("model.layers.{i}"), layer.parameters()));
        }
        out.extend(prefixed("model.norm", self.norm.parameters()));
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".into(), head.shallow_clone()));
        }
        out
    }
}

/// One counted forward call of the causal LM.
#[derive(Debug)]
pub struct StepRun {
    /// The position of the call's first token (0 for the prefill; S + t for decode step t).
    pub first_position: u64,
    /// Each part's run, in the order they ran ([`StackPart::all`]); its KV cache bytes are
    /// what that layer's cache holds after the call.
    pub parts: Vec<(StackPart, LayerRun)>,
    /// The greedy next token of each sequence (argmax of the last position's logits).
    pub next_tokens: Vec<i64>,
}

/// A prefill followed by greedy decode steps, one [`GreedyGeneration::step`] at a time,
/// with one KV cache per layer (a `DynamicCache`).
#[derive(Debug)]
pub struct GreedyGeneration<'m> {
    model: &'m RefDeepseekV2ForCausalLM,
    caches: Vec<KvCache>,
    /// The ids the next call feeds: the prompt, then each chosen token.
    input_ids: Tensor,
    position: u64,
    batch: u64,
    allow_tf32: bool,
}

impl GreedyGeneration<'_> {
    /// Runs the next forward call (the prefill first, then one decode step per call) with
    /// every part under the counter, and picks the next tokens.
    pub fn step(&mut self) -> Result<StepRun> {
        let model = self.model;
        let device = model.setup.device;
        ffi::set_tf32_matmul_allowed(self.allow_tf32)?;
        let len = self.input_ids.size().get(1).copied().unwrap_or(0) as u64;
        // The eager core and MLA's absorbed form add the causal mask.
        let needs_mask = model
            .layers
            .iter()
            .any(|layer| layer.needs_mask(model.attention));
        let (position_ids, mask) = causal_positions(
            self.batch,
            self.position,
            len,
            kind_of(model.dtype)?,
            device,
            needs_mask,
        )?;
        let mut parts = Vec::with_capacity(model.layers.len() + 3);
        let mut hidden = self.input_ids.shallow_clone();
        for part in StackPart::all(&model.config) {
            let caches = &mut self.caches;
            let input = &hidden;
            let output = counted(device, || match part {
                StackPart::EmbedTokens => Ok((
                    Tensor::f_embedding(&model.embed_tokens, input, -1, false, false)?,
                    None,
                )),
                StackPart::Layer(i) => model.layers[i as usize].forward_with_routing(
                    input,
                    &position_ids,
                    &mut caches[i as usize],
                    mask.as_ref(),
                ),
                StackPart::Norm => Ok((model.norm.forward(input)?, None)),
                StackPart::LmHead => Ok((
                    input
                        .f_linear(model.head_weight(), None::<&Tensor>)?
                        .f_to_kind(Kind::Float)?,
                    None,
                )),
            })
            .map_err(|e| in_part(e, part))?;
            let ((output, tokens_per_expert), counts, allocations) = output;
            let outputs = allocations.output_footprint(device, &counts.output_blocks);
            let kv_cache_bytes = match part {
                StackPart::Layer(i) => self.caches[i as usize].bytes(),
                _ => 0,
            };
            parts.push((
                part,
                LayerRun {
                    kind: module_kind(part),
                    name: part.path(),
                    output: output.shallow_clone(),
                    weight_bytes: model.part_weight_bytes(part),
                    kv_cache_bytes,
                    tokens_per_expert,
                    output_allocated_bytes: outputs.bytes,
                    output_peak_live_bytes: outputs.peak_live_bytes,
                    allocations: allocations.device(device),
                    allocation_errors: allocations.errors,
                    counts,
                    timings: Default::default(),
                },
            ));
            hidden = output;
        }
        // generate(): next_token = argmax(logits[:, -1, :]), fed back as the next input.
        let next = {
            let _no_grad = tch::no_grad_guard();
            hidden.f_select(1, -1)?.f_argmax(-1, false)?
        };
        let next_tokens: Vec<i64> = Vec::<i64>::try_from(&next.f_to_device(tch::Device::Cpu)?)?;
        let first_position = self.position;
        self.position += len;
        self.input_ids = next.f_view([-1, 1])?;
        Ok(StepRun {
            first_position,
            parts,
            next_tokens,
        })
    }
}

fn module_kind(part: StackPart) -> ModuleKind {
    match part {
        StackPart::EmbedTokens => ModuleKind::EmbedTokens,
        StackPart::Layer(i) => ModuleKind::DecoderLayer(i),
        StackPart::Norm => ModuleKind::RmsNorm,
        StackPart::LmHead => ModuleKind::LmHead,
    }
}

/// `error` with the part that raised it named (an out-of-memory error stays one), once:
/// libtorch's own prefix is not repeated inside it, nor its backtrace kept.
fn in_part(error: Error, part: StackPart) -> Error {
    match error {
        Error::Torch(e) => {
            let text = match &e {
                tch::TchError::Torch(message) => {
                    crate::error::without_backtrace(message).to_string()
                }
                other => crate::error::torch_text(other),
            };
            Error::Torch(tch::TchError::Torch(format!("{}: {text}", part.path())))
        }
        Error::Observer(e) => Error::Observer(format!("{}: {e}", part.path())),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_s_libtorch_error_names_it_once_without_the_backtrace() {
        let raised = Error::Torch(tch::TchError::Torch(
            "DefaultCPUAllocator: can't allocate memory\nException raised from f at a.cpp:1 \
             (most recent call first):\nframe #0: g"
                .into(),
        ));
        let e = in_part(raised, StackPart::Layer(0));
        assert_eq!(
            e.to_string(),
            "libtorch: Internal torch error: layers.0: DefaultCPUAllocator: can't allocate memory"
        );
        assert!(e.is_out_of_memory());
    }

    fn tiny() -> ModelConfig {
        ModelConfig::from_json_str(
            "tiny",
            r#"{"hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
                "head_dim": 8, "intermediate_size": 24, "moe_intermediate_size": 8,
                "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
                "num_hidden_layers": 3, "first_k_dense_replace": 2, "moe_layer_freq": 1,
                "vocab_size": 50, "tie_word_embeddings": true}"#,
        )
        .unwrap()
    }

    #[test]
    fn generation_counts_every_part_and_grows_each_cache_by_one_token() {
        let setup = Setup {
            device: tch::Device::Cpu,
            seed: 3,
        };
        let model = RefDeepseekV2ForCausalLM::new(
            &tiny(),
            AttentionImpl::Eager,
            modelmeter::MlaForm::Naive,
            Dtype::F32,
            &setup,
        )
        .unwrap();
        let mut generation = model.generate(2, 5, false).unwrap();
        let mut tokens = Vec::new();
        for (step, position) in [0u64, 5, 6].into_iter().enumerate() {
            let run = generation.step().unwrap();
            assert_eq!(run.first_position, position, "step {step}");
            let parts: Vec<StackPart> = run.parts.iter().map(|(p, _)| *p).collect();
            assert_eq!(parts, StackPart::all(&tiny()));
            for (part, r) in &run.parts {
                assert!(
                    r.counts.is_complete(),
                    "{part:?}: {:?}",
                    r.counts.unknown_ops
                );
            }
            // Each layer's cache: 2 (k, v) · B · H_kv · tokens · d · 4 bytes.
            let tokens_cached = if step == 0 { 5 } else { 5 + step as u64 };
            assert_eq!(run.parts[1].1.kv_cache_bytes, 2 * 2 * tokens_cached * 8 * 4);
            assert_eq!(run.parts[0].1.kv_cache_bytes, 0);
            // Tied: lm_head owns no weights; the embedding holds 50·16 fp32.
            assert_eq!(run.parts[0].1.weight_bytes, 50 * 16 * 4);
            assert_eq!(run.parts[5].1.weight_bytes, 0);
            assert_eq!(run.parts[5].1.output.kind(), Kind::Float);
            assert_eq!(
                run.next_tokens.len(),
                2,
                "one next token per sequence (B = 2)"
            );
            assert!(run.next_tokens.iter().all(|t| (0..50).contains(t)));
            tokens.push(run.next_tokens);
        }
        // The same seed generates the same tokens.
        let mut again = model.generate(2, 5, false).unwrap();
        assert_eq!(again.step().unwrap().next_tokens, tokens[0]);
        let total: u64 = model
            .parameters()
            .iter()
            .map(|(_, t)| tensor_bytes(t))
            .sum();
        assert_eq!(total, model.weight_bytes());
        assert!(model
            .parameters()
            .iter()
            .any(|(n, _)| n == "model.layers.2.mlp.experts.3.down_proj.weight"));
    }
}
