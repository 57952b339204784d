//! The whole decoder stack (`DeepseekV2ForCausalLM`): token embedding, every decoder
//! layer, the final norm and `lm_head`, for a prefill or one decode step; and a
//! [`Generation`]: a prefill followed by greedy decode steps.

use serde::Serialize;

use crate::checked::product;
use crate::config::{MlpKind, ModelConfig};
use crate::conventions::TensorMeta;
use crate::dtype::Dtype;
use crate::error::Error;
use crate::error::Result;
use crate::layers::attention::AttentionImpl;
use crate::layers::decoder_layer::DeepseekV2DecoderLayer;
use crate::layers::rms_norm::DeepseekV2RMSNorm;
use crate::layers::vendor_ops::{bytes_of, t};
use crate::layers::Layer;
use crate::metrics::{Cost, CostBuilder, Metric, Metrics};
use crate::workload::{MlaForm, Phase, Platform, Workload};

/// One part of the stack, in the order `DeepseekV2ForCausalLM` runs them: the token
/// embedding, each decoder layer by index, the final norm, and `lm_head` with the logits'
/// `.float()`. The one list both the analytic stack and the reference model walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StackPart {
    EmbedTokens,
    /// `model.layers[i]`.
    Layer(u64),
    Norm,
    LmHead,
}

impl StackPart {
    /// Every part of `config`'s stack, in the order they run.
    pub fn all(config: &ModelConfig) -> Vec<StackPart> {
        std::iter::once(StackPart::EmbedTokens)
            .chain((0..config.num_hidden_layers).map(StackPart::Layer))
            .chain([StackPart::Norm, StackPart::LmHead])
            .collect()
    }

    /// The vendor module path (`embed_tokens`, `layers.3`, `norm`, `lm_head`).
    pub fn path(self) -> String {
        match self {
            StackPart::EmbedTokens => "embed_tokens".into(),
            StackPart::Layer(i) => format!("layers.{i}"),
            StackPart::Norm => "norm".into(),
            StackPart::LmHead => "lm_head".into(),
        }
    }
}

/// `DeepseekV2ForCausalLM` for one forward call.
#[derive(Clone, Debug, PartialEq)]
pub struct DeepseekV2Decoder {
    config: ModelConfig,
    workload: Workload,
    attention: AttentionImpl,
}

impl DeepseekV2Decoder {
    /// The stack for `workload` (a prefill, or one decode step).
    pub fn new(
        config: &ModelConfig,
        workload: &Workload,
        attention: AttentionImpl,
    ) -> DeepseekV2Decoder {
        DeepseekV2Decoder {
            config: config.clone(),
            workload: workload.clone(),
            attention,
        }
    }

    /// The cost of one part of the stack (a decoder layer's node is named
    /// `layers.i (DeepseekV2DecoderLayer_dense)`).
    pub fn part_cost(&self, part: StackPart) -> Result<Cost> {
        let (c, w) = (&self.config, &self.workload);
        let (batch, sq, h, vocab) = (w.batch, w.query_len(), c.hidden_size, c.vocab_size);
        let rows = t(&[batch, sq, h], w.dtype);
        let table = product("embedding parameters", &[vocab, h])?;
        Ok(match part {
            StackPart::EmbedTokens => {
                let mut embed = CostBuilder::new(part.path(), w.allow_tf32);
                let ids = t(&[batch, sq], Dtype::I64);
                // `embedding(weight, input_ids)`: a gather, which reads the rows it
                // writes (and the ids), not the whole table (`Reads::Gathered`).
                let weight = t(&[vocab, h], w.dtype);
                embed.copy(
                    "embedding(input_ids)",
                    "aten::embedding",
                    [&weight, &ids],
                    rows.clone(),
                )?;
                embed.weights(bytes_of("embedding", table, w.dtype)?)?;
                embed.finish()
            }
            StackPart::Layer(index) => {
                let layer = self.layer_cost(index)?;
                layer.renamed(&stack_name(part, &layer))
            }
            StackPart::Norm => DeepseekV2RMSNorm::new(c, w).cost_as(&part.path())?,
            StackPart::LmHead => {
                let mut head = CostBuilder::new(part.path(), w.allow_tf32);
                let logits = head.linear("lm_head", &rows, vocab, false)?;
                // The vendor `DeepseekV2ForCausalLM.forward`: `logits = logits.float()`
                // (the reassignment frees the model-dtype logits).
                let float = head.cast("logits.float()", &logits, Dtype::F32)?;
                head.returns(&[&float]);
                if !c.tie_word_embeddings {
                    head.weights(bytes_of("lm_head", table, w.dtype)?)?;
                }
                head.finish()
            }
        })
    }
}

impl DeepseekV2Decoder {
    /// Decoder layer `index` under its class name (`DeepseekV2DecoderLayer_moe`).
    fn layer_cost(&self, index: u64) -> Result<Cost> {
        DeepseekV2DecoderLayer::new(&self.config, &self.workload, index, self.attention)?.cost()
    }
}

/// A decoder layer's node name in the stack: `layers.3 (DeepseekV2DecoderLayer_moe)`.
fn stack_name(part: StackPart, layer: &Cost) -> String {
    format!("{} ({})", part.path(), layer.name)
}

impl Layer for DeepseekV2Decoder {
    fn name(&self) -> String {
        "DeepseekV2ForCausalLM".into()
    }

    fn cost(&self) -> Result<Cost> {
        let w = &self.workload;
        let mut b = CostBuilder::new(self.name(), w.allow_tf32);
        // `hidden_states = layer_outputs[0]`: each part's output replaces the previous,
        // except the embedding's, which `inputs_embeds` holds until the model returns.
        // Not modelled: the eager path's 4-D causal mask, built outside every part.
        let rows = t(&[w.batch, w.query_len(), self.config.hidden_size], w.dtype);
        let mut previous: Option<TensorMeta> = None;
        // Decoder layers of one kind run the same op list at the same workload (a layer
        // keeps nothing of its index but its kind: `DeepseekV2DecoderLayer::new`): each
        // kind is costed once, then named per layer. A test checks every child against
        // the part costed alone.
        let mut by_kind: Vec<(MlpKind, Cost)> = Vec::with_capacity(2);
        for part in StackPart::all(&self.config) {
            let cost = match part {
                StackPart::Layer(index) => {
                    let kind = self.config.layer_kind(index)?;
                    let at = match by_kind.iter().position(|(k, _)| *k == kind) {
                        Some(at) => at,
                        None => {
                            by_kind.push((kind, self.layer_cost(index)?));
                            by_kind.len() - 1
                        }
                    };
                    let layer = &by_kind[at].1;
                    layer.renamed(&stack_name(part, layer))
                }
                _ => self.part_cost(part)?,
            };
            let [out] = b.call(cost, [&rows])?;
            if let Some(p) = previous.take() {
                b.release(&[&p])?;
            }
            if part != StackPart::EmbedTokens {
                previous = Some(out);
            }
        }
        Ok(b.finish())
    }
}

/// A prefill of `prefill_len` tokens followed by `new_tokens` greedy decode steps
/// (step t attends over `prefill_len + t + 1` keys).
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    pub config: ModelConfig,
    pub batch: u64,
    pub prefill_len: u64,
    pub new_tokens: u64,
    pub dtype: Dtype,
    pub allow_tf32: bool,
    /// The backend whose kernels run it.
    pub platform: Platform,
    pub attention: AttentionImpl,
    /// How MLA layers run (ignored by multi-head attention).
    pub mla: MlaForm,
}

/// Metrics of a whole generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct GenerationMetrics {
    pub prefill: Metrics,
    /// All decode steps: FLOPs and bytes moved summed; weights, peak activation and the
    /// KV cache as after the last step.
    pub decode: Metrics,
    /// Prefill and decode together, with the same rules.
    pub total: Metrics,
}

impl Generation {
    /// The generation that starts with the prefill `prefill` (its batch, prompt, dtype,
    /// TF32 setting, platform and MLA form) and decodes `new_tokens` more; `None` when
    /// `prefill` is a decode step (a generation starts with a prefill). A measured routing
    /// (`Workload::expert_rows`) is not carried: each call of the generation routes as
    /// the analytic default does.
    pub fn after_prefill(
        config: &ModelConfig,
        prefill: &Workload,
        new_tokens: u64,
        attention: AttentionImpl,
    ) -> Option<Generation> {
        let Phase::Prefill { seq_len } = prefill.phase else {
            return None;
        };
        Some(Generation {
            config: config.clone(),
            batch: prefill.batch,
            prefill_len: seq_len,
            new_tokens,
            dtype: prefill.dtype,
            allow_tf32: prefill.allow_tf32,
            platform: prefill.platform,
            attention,
            mla: prefill.mla,
        })
    }

    /// The workload of one call of the generation: its batch, dtype, TF32 setting,
    /// platform and MLA form, in `phase`.
    pub fn workload(&self, phase: Phase) -> Result<Workload> {
        Workload::with_settings(
            self.batch,
            phase,
            self.dtype,
            self.allow_tf32,
            self.platform,
            self.mla,
        )
    }

    fn stack(&self, phase: Phase) -> Result<Metrics> {
        let workload = self.workload(phase)?;
        DeepseekV2Decoder::new(&self.config, &workload, self.attention).metrics()
    }

    /// The metrics of the prefill, the decode steps and both.
    ///
    /// A decode step's metrics are affine in its context length (only the attention core,
    /// the KV cache and its concatenation grow with it), so the steps are summed in closed
    /// form — checked, not assumed: three consecutive steps must differ by the same amount.
    pub fn metrics(&self) -> Result<GenerationMetrics> {
        let prefill = self.stack(Phase::Prefill {
            seq_len: self.prefill_len,
        })?;
        let n = self.new_tokens;
        if n == 0 {
            return Ok(GenerationMetrics {
                prefill,
                decode: Metrics::default(),
                total: prefill,
            });
        }
        let step = |t: u64| -> Result<Metrics> {
            let context_len = crate::checked::sum("decode context", &[self.prefill_len, t])?;
            self.stack(Phase::Decode { context_len })
        };
        let (m0, m1, m2) = (step(0)?, step(1)?, step(2)?);
        let mut decode = Metrics::default();
        let mut last = Metrics::default();
        for metric in Metric::ALL {
            let name = metric.name();
            let (a, b, c) = (metric.get(&m0), metric.get(&m1), metric.get(&m2));
            let growth = b
                .checked_sub(a)
                .filter(|g| c.checked_sub(b) == Some(*g))
                .ok_or_else(|| {
                    Error::op_shape(
                        "decode steps",
                        format!("{name} is not affine in the context length"),
                    )
                })?;
            // Σ_{t<n} (a + t·growth) = n·a + growth·n(n−1)/2; the last step is a + (n−1)·growth.
            let pairs = if n % 2 == 0 {
                product(name, &[n / 2, n - 1])?
            } else {
                product(name, &[n, (n - 1) / 2])?
            };
            let summed = crate::checked::sum(
                name,
                &[product(name, &[n, a])?, product(name, &[growth, pairs])?],
            )?;
            let final_step = crate::checked::sum(name, &[a, product(name, &[growth, n - 1])?])?;
            metric.set(&mut decode, summed);
            metric.set(&mut last, final_step);
        }
        // State is what the last step leaves; the activation peak is the largest call's.
        decode.weight_bytes = last.weight_bytes;
        decode.kv_cache_bytes = last.kv_cache_bytes;
        decode.activation_bytes = last.activation_bytes;
        let total = accumulate(&prefill, &decode)?;
        Ok(GenerationMetrics {
            prefill,
            decode,
            total,
        })
    }
}

/// Two successive calls: work adds up, state (weights, KV cache) is the later one's,
/// activation memory is the larger peak. (Parts of one call add up instead:
/// [`Metrics::checked_add`].)
pub fn accumulate(earlier: &Metrics, later: &Metrics) -> Result<Metrics> {
    // Only the work is summed: state that would overflow if added is not an overflow.
    let state = Metrics {
        weight_bytes: 0,
        kv_cache_bytes: 0,
        activation_bytes: 0,
        ..*later
    };
    let work = earlier.checked_add(&state)?;
    Ok(Metrics {
        weight_bytes: later.weight_bytes,
        kv_cache_bytes: later.kv_cache_bytes,
        activation_bytes: earlier.activation_bytes.max(later.activation_bytes),
        ..work
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stack_sums_layers_norm_and_head() {
        let c = ModelConfig::deepseek_ocr();
        let w = Workload::prefill(1, 512).unwrap();
        let stack = DeepseekV2Decoder::new(&c, &w, AttentionImpl::Sdpa)
            .cost()
            .unwrap();
        assert_eq!(stack.children.len(), 1 + 12 + 1 + 1);
        let dense = 34_980_495_360 + 65_536;
        let moe = 36_322_672_640 + 65_536;
        let head = 2 * 512 * 1280 * 129_280;
        assert_eq!(stack.metrics.matmul_flops, dense + 11 * moe + head);
        // KV cache: 61,440 bytes per token over the 12 layers (bf16).
        assert_eq!(stack.metrics.kv_cache_bytes, 61_440 * 512);
        // Parameters: embedding + lm_head + 1 dense + 11 MoE layers + 25 norms' worth.
        let params = 2 * 165_478_400 + 32_852_480 + 11 * 233_720_320 + 1280;
        assert_eq!(stack.metrics.weight_bytes, params * 2);
    }

    /// What the stack holds under each part, by hand: the embedding's output (the
    /// vendor's `inputs_embeds`, alive until the forward returns) from the first layer on,
    /// the previous part's output (the hidden states, freed once the next part returns)
    /// from the second layer on, and the KV caches of the layers before; every part's peak
    /// sits on top of that.
    #[test]
    fn the_embedding_stays_live_under_every_later_part() {
        let c = ModelConfig::deepseek_ocr().first_layers(3).unwrap();
        let w = Workload::prefill(2, 40).unwrap();
        let stack = DeepseekV2Decoder::new(&c, &w, AttentionImpl::Sdpa)
            .cost()
            .unwrap();
        let hidden = 2 * 40 * 1280 * 2; // [B, S, h] bf16
        let cache = 2 * hidden; // keys and values: 10 heads of 128, as wide as h
        let peak = |i: usize| stack.children[i].peak.peak_bytes;
        // Children: embed_tokens, layers.0 .. layers.2, norm, lm_head.
        let layers_before = |i: usize| (i.saturating_sub(1)).min(3) as u64;
        let expected = (0..stack.children.len())
            .map(|i| {
                let held = match i {
                    0 => 0,
                    1 => hidden,
                    _ => 2 * hidden,
                };
                held + layers_before(i) * cache + peak(i)
            })
            .max()
            .unwrap();
        assert_eq!(stack.peak.peak_bytes, expected);
        assert_eq!(stack.peak.kept_bytes, 3 * cache);
    }

    #[test]
    fn layers_costed_once_per_kind_are_the_parts_costed_one_by_one() {
        // The stack costs each kind of decoder layer once and names it per layer; every
        // layer child must be what `part_cost` builds for that part alone (tree, sums,
        // peaks). The embedding, norm and head children are `part_cost`'s own (the stack
        // calls it for them): for those the loop checks only the parts' order.
        let lite = ModelConfig::builtin("deepseek-v2-lite").unwrap().unwrap();
        for c in [ModelConfig::deepseek_ocr(), lite] {
            let c = c.first_layers(4).unwrap();
            for w in [
                Workload::prefill(2, 33).unwrap(),
                Workload::decode(1, 70).unwrap(),
                Workload::decode(1, 70).unwrap().with_mla(MlaForm::Absorb),
            ] {
                let stack = DeepseekV2Decoder::new(&c, &w, AttentionImpl::Sdpa);
                let cost = stack.cost().unwrap();
                let parts = StackPart::all(&c);
                assert_eq!(cost.children.len(), parts.len());
                for (child, part) in cost.children.iter().zip(parts) {
                    assert_eq!(child, &stack.part_cost(part).unwrap(), "{}", part.path());
                }
                assert_eq!(
                    cost.children[3].name,
                    "layers.2 (DeepseekV2DecoderLayer_moe)"
                );
            }
        }
    }

    #[test]
    fn parts_run_in_vendor_order_and_head_casts_logits_to_fp32() {
        let c = ModelConfig::deepseek_ocr().first_layers(2).unwrap();
        assert_eq!(
            StackPart::all(&c),
            [
                StackPart::EmbedTokens,
                StackPart::Layer(0),
                StackPart::Layer(1),
                StackPart::Norm,
                StackPart::LmHead
            ]
        );
        let names: Vec<String> = StackPart::all(&c).iter().map(|p| p.path()).collect();
        assert_eq!(
            names,
            ["embed_tokens", "layers.0", "layers.1", "norm", "lm_head"]
        );
        let ops = |dtype: Dtype| -> Vec<(String, Option<&'static str>)> {
            let w = Workload::decode(2, 5).unwrap().with_dtype(dtype).unwrap();
            DeepseekV2Decoder::new(&c, &w, AttentionImpl::Sdpa)
                .part_cost(StackPart::LmHead)
                .unwrap()
                .ops()
                .iter()
                .map(|o| (o.name.clone(), o.op))
                .collect()
        };
        // bf16 logits are copied to fp32; fp32 logits are already fp32 (`.float()` is free).
        assert_eq!(ops(Dtype::Bf16).len(), 2);
        assert_eq!(ops(Dtype::Bf16)[1].1, Some("aten::to"));
        assert_eq!(ops(Dtype::F32).len(), 1);
        let w = Workload::decode(2, 5).unwrap();
        let head = DeepseekV2Decoder::new(&c, &w, AttentionImpl::Sdpa)
            .part_cost(StackPart::LmHead)
            .unwrap();
        // 2·B·h·V for one token per sequence; V·h bf16 weights of its own (not tied).
        assert_eq!(head.metrics.matmul_flops, 2 * 2 * 1280 * 129_280);
        assert_eq!(head.metrics.weight_bytes, 2 * 1280 * 129_280);
        let mut tied = c.clone();
        tied.tie_word_embeddings = true;
        let head = DeepseekV2Decoder::new(&tied, &w, AttentionImpl::Sdpa)
            .part_cost(StackPart::LmHead)
            .unwrap();
        assert_eq!(head.metrics.weight_bytes, 0, "tied: the embedding holds it");
    }

    #[test]
    fn generation_adds_decode_steps_over_growing_context() {
        // Seven steps: more than the three the closed form in `Generation::metrics` is
        // fitted on, so a wrong slope or sum shows in steps four to seven.
        let c = ModelConfig::deepseek_ocr();
        let g = Generation {
            config: c.clone(),
            batch: 1,
            prefill_len: 8,
            new_tokens: 7,
            dtype: Dtype::Bf16,
            allow_tf32: false,
            platform: Platform::Cuda,
            attention: AttentionImpl::Sdpa,
            mla: MlaForm::Naive,
        };
        let m = g.metrics().unwrap();
        let step = |ctx| {
            DeepseekV2Decoder::new(&c, &Workload::decode(1, ctx).unwrap(), AttentionImpl::Sdpa)
                .metrics()
                .unwrap()
        };
        // Step t attends over 8 + t + 1 keys: contexts 8, 9, …, 14.
        let steps: Vec<Metrics> = (8..15).map(step).collect();
        assert_eq!(steps.len(), 7);
        let flops: u64 = steps.iter().map(|s| s.matmul_flops).sum();
        assert_eq!(m.decode.matmul_flops, flops);
        assert_eq!(m.total.matmul_flops, m.prefill.matmul_flops + flops);
        // KV cache: 61,440 bytes per token (bf16, 12 layers), as cached, not summed.
        for (n, s) in steps.iter().enumerate() {
            assert_eq!(s.kv_cache_bytes, 61_440 * (8 + n as u64 + 1), "step {n}");
        }
        assert_eq!(m.prefill.kv_cache_bytes, 61_440 * 8);
        assert_eq!(
            m.total.kv_cache_bytes,
            61_440 * 15,
            "8 + 7 tokens cached, not summed"
        );
        assert_eq!(m.decode.kv_cache_bytes, 61_440 * 15);
        assert_eq!(m.total.weight_bytes, m.prefill.weight_bytes);
        // Every metric of the closed form equals the steps combined by hand (not with
        // `accumulate`, which the closed form itself uses for the total).
        let work = |s: &Metrics| {
            [
                s.matmul_flops,
                s.elementwise_flops,
                s.tensor_core_flops,
                s.cuda_core_flops,
                s.io_bytes,
            ]
        };
        let mut summed = [0u64; 5];
        for s in &steps {
            for (acc, x) in summed.iter_mut().zip(work(s)) {
                *acc += x;
            }
        }
        let last = steps[6];
        let largest = steps.iter().map(|s| s.activation_bytes).max().unwrap();
        let by_hand = Metrics {
            matmul_flops: summed[0],
            elementwise_flops: summed[1],
            tensor_core_flops: summed[2],
            cuda_core_flops: summed[3],
            io_bytes: summed[4],
            weight_bytes: last.weight_bytes,
            activation_bytes: largest,
            kv_cache_bytes: last.kv_cache_bytes,
        };
        assert_eq!(m.decode, by_hand);
        // The total: prefill then decode, by the same rules.
        let mut total = [0u64; 5];
        for (acc, (p, d)) in total
            .iter_mut()
            .zip(work(&m.prefill).into_iter().zip(summed))
        {
            *acc = p + d;
        }
        assert_eq!(
            m.total,
            Metrics {
                matmul_flops: total[0],
                elementwise_flops: total[1],
                tensor_core_flops: total[2],
                cuda_core_flops: total[3],
                io_bytes: total[4],
                weight_bytes: last.weight_bytes,
                activation_bytes: m.prefill.activation_bytes.max(largest),
                kv_cache_bytes: 61_440 * 15,
            }
        );
    }

    #[test]
    fn accumulate_sums_work_keeps_later_state_and_larger_peak() {
        let earlier = Metrics {
            matmul_flops: 100,
            elementwise_flops: 20,
            tensor_core_flops: 90,
            cuda_core_flops: 30,
            io_bytes: 1_000,
            weight_bytes: 5_000,
            activation_bytes: 700,
            kv_cache_bytes: 64,
        };
        let later = Metrics {
            matmul_flops: 7,
            elementwise_flops: 3,
            tensor_core_flops: 6,
            cuda_core_flops: 4,
            io_bytes: 11,
            weight_bytes: 4_000,
            activation_bytes: 300,
            kv_cache_bytes: 128,
        };
        let expected = Metrics {
            matmul_flops: 107,
            elementwise_flops: 23,
            tensor_core_flops: 96,
            cuda_core_flops: 34,
            io_bytes: 1_011,
            weight_bytes: 4_000,
            activation_bytes: 700,
            kv_cache_bytes: 128,
        };
        assert_eq!(accumulate(&earlier, &later).unwrap(), expected);
        // The other order: state is still the later call's, the peak still the larger.
        let reversed = Metrics {
            weight_bytes: 5_000,
            kv_cache_bytes: 64,
            ..expected
        };
        assert_eq!(accumulate(&later, &earlier).unwrap(), reversed);
        // Work that overflows is an error, naming the metric.
        let huge = Metrics {
            io_bytes: u64::MAX,
            ..Metrics::default()
        };
        let e = accumulate(&huge, &later).unwrap_err().to_string();
        assert!(
            e.contains("io_bytes") && e.contains("would overflow"),
            "{e}"
        );
        // State is not summed, so state that would overflow if it were is no error.
        let full = Metrics {
            weight_bytes: u64::MAX,
            kv_cache_bytes: u64::MAX,
            activation_bytes: u64::MAX,
            ..Metrics::default()
        };
        let both = accumulate(&full, &full).unwrap();
        assert_eq!(
            (
                both.weight_bytes,
                both.kv_cache_bytes,
                both.activation_bytes
            ),
            (u64::MAX, u64::MAX, u64::MAX)
        );
    }

    #[test]
    fn absurd_generations_are_errors_not_hangs() {
        let g = Generation {
            config: ModelConfig::deepseek_ocr(),
            batch: 1,
            prefill_len: 8,
            new_tokens: u64::MAX,
            dtype: Dtype::Bf16,
            allow_tf32: false,
            platform: Platform::Cuda,
            attention: AttentionImpl::Sdpa,
            mla: MlaForm::Naive,
        };
        assert!(g
            .metrics()
            .unwrap_err()
            .to_string()
            .contains("would overflow"));
    }
}
