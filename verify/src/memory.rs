//! The memory pre-check, before anything runs: by the analytic model, the largest layer
//! of the plan must fit in the device's free memory: its weights, the peak of its live
//! activations with the temporaries ops hold while they run (the liveness model's
//! allocator peak, [`modelmeter::liveness::Peak::allocator_peak_bytes`]: a bf16 softmax
//! in fp32 converts its scores first; on CUDA in the caching allocator's blocks), the KV
//! cache a decode step finds, and the device's reserve ([`device_reserve`]). The decode
//! step of a layer with a KV cache (the attention and the decoder layers) finds its cache
//! filled by an uncounted prefill of `context_len` tokens that verify-decoder runs first,
//! so that prefill must fit too; the other layers run the step alone.
//!
//! An overflow names the option or config field that causes it, like `modelmeter
//! analyze` does ([`modelmeter::overflow::explain`]), so the two tools give the same
//! verdict on the same workload: a decode step that `analyze` costs is never refused
//! here as an overflow because of the prefill that fills its cache.

use modelmeter::overflow::{self, Inputs};
use modelmeter::{units, Phase, Workload};
use modelmeter_reference::Error;

use crate::device::{DeviceInfo, DeviceSpec};
use crate::model::ModelPlan;
use crate::plan::Plan;
use modelmeter::layers::{DeepseekV2Decoder, Layer, StackPart};

/// What a device holds beyond the tensors the analytic model names: on CUDA, 64 MiB for
/// the cuBLAS workspace (torch 2.11 sizes it at 32 MiB on Hopper, less on older GPUs)
/// and cuDNN's attention workspace; nothing on the CPU. An allowance, not a measurement.
pub fn device_reserve(device: tch::Device) -> u64 {
    if device.is_cuda() {
        64 << 20
    } else {
        0
    }
}

/// What the harness puts on the device before a forward: the hidden states (a layer) or
/// the token ids (`model`), the position ids, and the eager path's additive causal mask
/// `[B, 1, S_q, S_kv]` (built once, outside the layers).
fn input_bytes(plan: &Plan, workload: &Workload, model: bool) -> modelmeter::Result<u64> {
    let w = workload;
    let size = w.dtype.size_bytes().unwrap_or(4);
    let rows = w.batch.saturating_mul(w.query_len());
    let first = if model {
        rows.saturating_mul(8)
    } else {
        rows.saturating_mul(plan.config.hidden_size)
            .saturating_mul(size)
    };
    let positions = rows.saturating_mul(8);
    let mask = match plan.attention {
        modelmeter::layers::AttentionImpl::Eager => {
            rows.saturating_mul(w.key_len()?).saturating_mul(size)
        }
        modelmeter::layers::AttentionImpl::Sdpa => 0,
    };
    Ok(first.saturating_add(positions).saturating_add(mask))
}

/// What one layer of a plan needs.
#[derive(Clone, Debug, Default)]
struct Need {
    /// Weights + peak activations (+ the KV cache a decode step starts from, bounded by
    /// the cache after the step) + the inputs + the device's reserve.
    bytes: u64,
    /// The layer's name.
    layer: String,
    /// The part no smaller workload removes: the layer's weights and the device's reserve.
    fixed_bytes: u64,
}

/// The need of each of the plan's layers at `workload` ([`Need`]), in the plan's order.
fn needs(plan: &Plan, workload: &Workload) -> Result<Vec<Need>, Error> {
    let inputs = input_bytes(plan, workload, false)?;
    let mut needs = Vec::with_capacity(plan.layers.len());
    for kind in &plan.layers {
        let layer = kind.analytic(&plan.config, workload, plan.attention)?;
        let cost = modelmeter::metrics::sums_only(|| layer.cost())?;
        let m = cost.metrics;
        let peak = cost.peak_on(plan.device.is_cuda()).allocator_peak_bytes;
        let cache_before = match workload.phase {
            Phase::Prefill { .. } => 0,
            Phase::Decode { .. } => m.kv_cache_bytes,
        };
        let bytes = m
            .weight_bytes
            .saturating_add(peak)
            .saturating_add(cache_before)
            .saturating_add(inputs)
            .saturating_add(device_reserve(plan.device));
        needs.push(Need {
            bytes,
            layer: kind.name(plan.attention).to_string(),
            fixed_bytes: m.weight_bytes.saturating_add(device_reserve(plan.device)),
        });
    }
    Ok(needs)
}

/// Whether the plan's layer `i` runs a decode step after an uncounted prefill that fills
/// its KV cache ([`modelmeter_reference::ModuleKind::uses_positions`]); a layer whose
/// module the config lacks never runs.
fn fills_cache_first(plan: &Plan, i: usize) -> bool {
    plan.layers[i]
        .module(&plan.config)
        .is_ok_and(|kind| kind.uses_positions())
}

/// The prefill that fills a decode step's KV cache, if the plan is a decode step
/// ([`Workload::cache_prefill`]).
fn cache_prefill(workload: &Workload) -> Option<Result<Workload, String>> {
    workload
        .cache_prefill()
        .map(|prefill| prefill.map_err(|e| e.to_string()))
}

/// `error` with the input that overflowed named, when it is an overflow.
fn explained(error: Error, plan: &Plan) -> String {
    let Error::Model(error) = error else {
        return error.to_string();
    };
    let inputs = Inputs {
        config: plan.config.clone(),
        workload: plan.workload.clone(),
        new_tokens: None,
    };
    let error = overflow::explain(error, &inputs, |i| {
        let probe = Plan {
            config: i.config.clone(),
            workload: i.workload.clone(),
            ..plan.clone()
        };
        needs(&probe, &probe.workload).is_err()
    });
    error.to_string()
}

/// The options that make the workload smaller.
fn smaller(workload: &Workload) -> &'static str {
    match workload.phase {
        Phase::Prefill { .. } => "lower --batch or --seq-len",
        Phase::Decode { .. } => "lower --batch or --context-len",
    }
}

/// What the plan needs: each layer's [`Need`] (for a decode step, the larger of the step's
/// and the prefill's that fills its cache), and why that prefill could not be costed, if
/// it could not.
struct Estimate {
    needs: Vec<Need>,
    prefill_overflow: Option<String>,
}

impl Estimate {
    /// The largest need (the first of equals), what a run must have room for.
    fn worst(&self) -> Need {
        self.needs.iter().fold(Need::default(), |worst, n| {
            if n.bytes > worst.bytes {
                n.clone()
            } else {
                worst
            }
        })
    }
}

fn estimate_plan(plan: &Plan) -> Result<Estimate, String> {
    let w = &plan.workload;
    let mut estimate = Estimate {
        needs: needs(plan, w).map_err(|e| explained(e, plan))?,
        prefill_overflow: None,
    };
    // The prefill that fills the cache of the layers that have one (the others' decode
    // step runs alone): its own counts may overflow where the decode step's do not (its
    // attention scores grow with the square of the context).
    let filled: Vec<usize> = (0..plan.layers.len())
        .filter(|&i| fills_cache_first(plan, i))
        .collect();
    if filled.is_empty() {
        return Ok(estimate);
    }
    if let Some(prefill) = cache_prefill(w) {
        let filling = Plan {
            layers: filled.iter().map(|&i| plan.layers[i]).collect(),
            ..plan.clone()
        };
        match needs(&filling, &prefill?) {
            Ok(prefill) => {
                for (&i, prefill) in filled.iter().zip(prefill) {
                    if prefill.bytes > estimate.needs[i].bytes {
                        estimate.needs[i] = prefill;
                    }
                }
            }
            Err(Error::Model(e)) => estimate.prefill_overflow = Some(e.to_string()),
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(estimate)
}

/// The largest memory one layer of the plan needs, estimated from the analytic model
/// (weights + peak activations + KV cache + inputs + the device's reserve; for a decode
/// step also the prefill that fills the
/// cache, where that prefill can be costed), with the layer's name. An error, naming the
/// input to lower, when the plan's own counts overflow 64 bits.
pub fn estimate(plan: &Plan) -> Result<(u64, String), String> {
    estimate_plan(plan).map(|e| {
        let worst = e.worst();
        (worst.bytes, worst.layer)
    })
}

/// What can help when the plan's `needs` exceed `available` bytes: a smaller workload,
/// except for the layers whose weights alone do not fit, every one of them named (not
/// only the largest, so that one run says all there is to leave out).
fn advice(needs: &[Need], available: u64, w: &Workload) -> String {
    let (too_heavy, too_large): (Vec<&Need>, Vec<&Need>) = needs
        .iter()
        .filter(|n| n.bytes > available)
        .partition(|n| n.fixed_bytes > available);
    // A smaller dtype helps only where there is one.
    let dtype = match w.dtype {
        modelmeter::Dtype::F32 => "a smaller --dtype (bf16 halves fp32's weights) or ",
        _ => "",
    };
    if too_heavy.is_empty() {
        smaller(w).to_string()
    } else if too_heavy.len() == needs.len() {
        // Every layer asked for: leaving them out leaves nothing to run.
        format!(
            "the weights and the device reserve alone of every layer asked for are more than that (the smallest {}), so no smaller workload fits: use {dtype}a device with more free memory",
            units::bytes(too_heavy.iter().map(|n| n.fixed_bytes).min().unwrap_or(0))
        )
    } else {
        let names: Vec<&str> = too_heavy.iter().map(|n| n.layer.as_str()).collect();
        let sizes: Vec<String> = too_heavy
            .iter()
            .map(|n| format!("{} {}", n.layer, units::bytes(n.fixed_bytes)))
            .collect();
        let rest: Vec<&str> = too_large.iter().map(|n| n.layer.as_str()).collect();
        let also = match rest.as_slice() {
            [] => String::new(),
            _ => format!("; for {} also {}", rest.join(", "), smaller(w)),
        };
        format!(
            "the weights and the device reserve alone are more than that ({}), so no smaller workload fits: leave {} out (--layers), use {dtype}a device with more free memory{also}",
            sizes.join(", "),
            names.join(", "),
        )
    }
}

/// Checks that the plan can run on the device: its analytic counts fit in 64 bits (an
/// overflow names its cause) and its largest layer fits in free memory. Without a
/// memory figure for the device, the memory part is skipped with a warning.
pub fn check(plan: &Plan, spec: DeviceSpec, info: &DeviceInfo) -> Result<(), String> {
    let w = &plan.workload;
    let estimate = estimate_plan(plan)?;
    let need = estimate.worst();
    let fits = match &info.memory_bytes {
        Ok(available) if need.bytes > *available => Err(*available),
        Ok(_) => Ok(()),
        Err(why) => {
            // Not silent: the run goes on, and says that nothing was checked.
            eprintln!("verify-decoder: warning: memory pre-check skipped on {spec}: {why}");
            Ok(())
        }
    };
    if let Err(available) = fits {
        // Without the prefill, the decode step's own need is a lower bound.
        let about = if estimate.prefill_overflow.is_some() {
            "at least"
        } else {
            "about"
        };
        let advice = advice(&estimate.needs, available, w);
        return Err(format!(
            "the workload ({}) needs {about} {} for {} (weights + peak activations with the ops' temporaries + KV cache + inputs + device reserve, from the analytic model) \
             but {spec} has {}; {advice}{}",
            w.describe(),
            units::bytes(need.bytes),
            need.layer,
            info.free_text(available),
            info.raise_hint(),
        ));
    }
    if let (Some(why), Phase::Decode { context_len }) = (estimate.prefill_overflow, w.phase) {
        return Err(format!(
            "--context-len = {context_len} is too large to verify: verify-decoder fills the KV cache by running a prefill of {context_len} tokens first, and costing that prefill fails ({why}); lower --context-len (modelmeter analyze costs the decode step alone)"
        ));
    }
    Ok(())
}

/// What a whole-model run (`--model`) needs, by the analytic model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelNeed {
    /// Weights of every part (embedding, the layers run, norm, lm_head).
    pub weight_bytes: u64,
    /// The part of `weight_bytes` that no `--num-layers` removes: embedding and lm_head.
    pub vocab_weight_bytes: u64,
    /// The KV cache of every layer at its final length (prompt + new tokens).
    pub kv_cache_bytes: u64,
    /// The largest call's working memory: the prefill's peak (its new KV cache
    /// included), or the last decode step's cache before it plus its peak, whichever is
    /// larger; plus the inputs (ids, positions, the eager mask).
    pub working_bytes: u64,
    /// The device's reserve ([`device_reserve`]).
    pub reserve_bytes: u64,
}

impl ModelNeed {
    pub fn total(&self) -> u64 {
        self.weight_bytes
            .saturating_add(self.working_bytes)
            .saturating_add(self.reserve_bytes)
    }
}

/// The memory a `--model` run needs, from the analytic generation. An overflow names the
/// input to lower.
pub fn model_need(plan: &Plan, model: &ModelPlan) -> Result<ModelNeed, String> {
    let generation = model.generation(plan)?;
    let inputs = Inputs {
        config: plan.config.clone(),
        workload: plan.workload.clone(),
        new_tokens: Some(model.new_tokens),
    };
    let cuda = plan.device.is_cuda();
    let costed = |g: &modelmeter::layers::Generation| -> modelmeter::Result<ModelNeed> {
        let total = g.metrics()?.total;
        // The generation's own prefill, not the plan's: an overflow's probe lowers its
        // batch and prompt, and the culprit is the input whose lowering makes this succeed.
        let prefill = g.workload(Phase::Prefill {
            seq_len: g.prefill_len,
        })?;
        let stack = DeepseekV2Decoder::new(&g.config, &prefill, g.attention);
        let stack_peak = |w: &Workload| -> modelmeter::Result<(u64, u64)> {
            let cost = modelmeter::metrics::sums_only(|| {
                DeepseekV2Decoder::new(&g.config, w, g.attention).cost()
            })?;
            Ok((
                cost.peak_on(cuda).allocator_peak_bytes,
                cost.metrics.kv_cache_bytes,
            ))
        };
        let mut working = stack_peak(&prefill)?.0;
        if g.new_tokens > 0 {
            let context_len = g.prefill_len.saturating_add(g.new_tokens - 1);
            let last = g.workload(Phase::Decode { context_len })?;
            // The cache after the step bounds the cache it starts from.
            let (peak, cache) = stack_peak(&last)?;
            working = working.max(cache.saturating_add(peak));
        }
        let working = working.saturating_add(input_bytes(plan, &prefill, true)?);
        let mut vocab_weight_bytes = 0;
        for part in StackPart::all(&g.config) {
            let m = modelmeter::metrics::sums_only(|| stack.part_cost(part))?.metrics;
            if matches!(part, StackPart::EmbedTokens | StackPart::LmHead) {
                vocab_weight_bytes = modelmeter::checked::sum(
                    "weight_bytes",
                    &[vocab_weight_bytes, m.weight_bytes],
                )?;
            }
        }
        Ok(ModelNeed {
            weight_bytes: total.weight_bytes,
            vocab_weight_bytes,
            kv_cache_bytes: total.kv_cache_bytes,
            working_bytes: working,
            reserve_bytes: device_reserve(plan.device),
        })
    };
    costed(&generation).map_err(|e| {
        overflow::explain(e, &inputs, |i| {
            // The inputs with some sizes lowered: still a prefill.
            modelmeter::layers::Generation::after_prefill(
                &i.config,
                &i.workload,
                i.new_tokens.unwrap_or(0),
                generation.attention,
            )
            .map_or(true, |probe| costed(&probe).is_err())
        })
        .to_string()
    })
}

/// Checks that a `--model` run fits in the device's free memory: all weights, the largest
/// call's KV cache and peak activations (with the ops' temporaries), the inputs and the
/// device's reserve. A refusal
/// names what dominates and the option to lower.
pub fn check_model(
    plan: &Plan,
    model: &ModelPlan,
    spec: DeviceSpec,
    info: &DeviceInfo,
) -> Result<(), String> {
    let need = model_need(plan, model)?;
    let available = match &info.memory_bytes {
        Ok(available) => *available,
        Err(why) => {
            eprintln!("verify-decoder: warning: memory pre-check skipped on {spec}: {why}");
            return Ok(());
        }
    };
    if need.total() <= available {
        return Ok(());
    }
    let lower = if need.vocab_weight_bytes > available {
        format!(
            "the embedding and lm_head alone need {}: no --num-layers fits (a config with a smaller vocab_size or hidden_size would)",
            units::bytes(need.vocab_weight_bytes)
        )
    } else if need.weight_bytes > available {
        "lower --num-layers".to_string()
    } else {
        "lower --new-tokens, --seq-len or --batch".to_string()
    };
    Err(format!(
        "the model ({} of {} layers, {}, {} new tokens) needs about {} (weights {}, the largest call's KV cache, peak activations with the ops' temporaries and inputs {} — the KV cache alone is {} at {} tokens —, device reserve {}; from the analytic model) but {spec} has {}; {lower}{}",
        model.num_layers,
        model.config_layers,
        plan.workload.describe(),
        model.new_tokens,
        units::bytes(need.total()),
        units::bytes(need.weight_bytes),
        units::bytes(need.working_bytes),
        units::bytes(need.kv_cache_bytes),
        plan.workload.query_len().saturating_add(model.new_tokens),
        units::bytes(need.reserve_bytes),
        info.free_text(available),
        info.raise_hint(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelmeter::layers::AttentionImpl;
    use modelmeter::layers::LayerId;
    use modelmeter::{MlaForm, ModelConfig};

    /// A tiny attention layer: the decode step's cache stays small while the prefill
    /// that fills it (scores grow with the square of the context) overflows.
    fn plan(context_len: u64) -> Plan {
        let config = ModelConfig::from_json_str(
            "tiny",
            r#"{"hidden_size": 2, "num_attention_heads": 1, "head_dim": 2,
                "intermediate_size": 2, "num_hidden_layers": 1, "vocab_size": 2}"#,
        )
        .unwrap();
        Plan {
            attention: AttentionImpl::Eager,
            layers: vec![crate::pairing::Pairing {
                layer: LayerId::Attention,
            }],
            ..Plan::on_cpu(config, Workload::decode(1, context_len).unwrap())
        }
    }

    /// DeepSeek-OCR in fp32 at `workload`, with `layers` in `attention`.
    fn ocr_fp32(workload: Workload, layers: &[LayerId], attention: AttentionImpl) -> Plan {
        Plan {
            config: ModelConfig::deepseek_ocr(),
            workload: workload.with_dtype(modelmeter::Dtype::F32).unwrap(),
            layers: layers
                .iter()
                .map(|&layer| crate::pairing::Pairing { layer })
                .collect(),
            attention,
            ..plan(1)
        }
    }

    /// One layer's need, by hand, for an eager decode step of the DeepSeek-OCR attention
    /// in fp32 (B = 2, C = 30): weights + the layer's peak + the cache the step starts
    /// from + the harness's inputs (hidden states, position ids, and the additive mask
    /// over every key: [2, 1, 1, 31] fp32) + no CPU reserve.
    #[test]
    fn a_decode_steps_need_adds_its_cache_and_a_mask_over_every_key() {
        let plan = ocr_fp32(
            Workload::decode(2, 30).unwrap(),
            &[LayerId::Attention],
            AttentionImpl::Eager,
        );
        let need = &needs(&plan, &plan.workload).unwrap()[0];
        let layer = LayerId::Attention
            .build(&plan.config, &plan.workload, AttentionImpl::Eager)
            .unwrap()
            .cost()
            .unwrap();
        let (b, rows, keys, h) = (2, 2, 31, 1280);
        let hidden = rows * h * 4;
        let positions = rows * 8;
        let mask = b * keys * 4;
        // The cache after the step (31 keys) bounds the one it starts from (30).
        let cache = 2 * b * keys * h * 4;
        assert_eq!(layer.metrics.kv_cache_bytes, cache);
        // fp32 scores need no conversion for the fp32 softmax: no temporary.
        assert_eq!(layer.peak.allocator_peak_bytes, layer.peak.peak_bytes);
        assert_eq!(
            need.bytes,
            layer.metrics.weight_bytes + layer.peak.peak_bytes + cache + hidden + positions + mask
        );
        assert_eq!(need.fixed_bytes, layer.metrics.weight_bytes);
    }

    /// An eager bf16 prefill's softmax in fp32 converts the scores first: the need holds
    /// that temporary on top of the op outputs' peak. B = 3, H = 2, S = 1024: at the
    /// softmax the masked bf16 scores, the fp32 copy and the fp32 probabilities are live
    /// (2 + 4 + 4 bytes per score) where the outputs' peak, at the cast back, holds 2 + 4
    /// + 2: 2·B·H·S² bytes more, what the CPU allocator was seen to need beyond the peak.
    #[test]
    fn an_eager_bf16_prefill_needs_its_converted_scores() {
        let config = ModelConfig::from_json_str(
            "tiny",
            r#"{"hidden_size": 16, "num_attention_heads": 2, "num_key_value_heads": 1,
                "intermediate_size": 8, "num_hidden_layers": 1, "vocab_size": 100}"#,
        )
        .unwrap();
        let p = Plan {
            workload: Workload::prefill(3, 1024)
                .unwrap()
                .with_dtype(modelmeter::Dtype::Bf16)
                .unwrap(),
            ..Plan { config, ..plan(1) }
        };
        let layer = LayerId::Attention
            .build(&p.config, &p.workload, AttentionImpl::Eager)
            .unwrap()
            .cost()
            .unwrap();
        let (b, h, s) = (3, 2, 1024);
        assert_eq!(
            layer.peak.allocator_peak_bytes - layer.peak.peak_bytes,
            2 * b * h * s * s
        );
        // The hidden states [3, 1024, 16] bf16, the position ids, the bf16 mask.
        let inputs = b * s * 16 * 2 + b * s * 8 + b * s * s * 2;
        let need = &needs(&p, &p.workload).unwrap()[0];
        assert_eq!(
            need.bytes,
            layer.metrics.weight_bytes + layer.peak.allocator_peak_bytes + inputs
        );
    }

    /// Exactly the memory a plan needs is enough; a byte less is not.
    #[test]
    fn a_plan_fits_in_exactly_its_need() {
        let plan = ocr_fp32(
            Workload::prefill(1, 16).unwrap(),
            &[LayerId::Mlp],
            AttentionImpl::Sdpa,
        );
        let (need, _) = estimate(&plan).unwrap();
        assert!(check(&plan, DeviceSpec::Cpu, &device(need)).is_ok());
        assert!(check(&plan, DeviceSpec::Cpu, &device(need - 1)).is_err());
    }

    /// Of two layers that need the same, the first in the plan's order is named (the
    /// refusal names one layer; which one must not depend on how ties are broken today).
    #[test]
    fn the_worst_need_is_the_first_of_equals() {
        let estimate = Estimate {
            needs: vec![
                need("a", 3, 0),
                need("b", 5, 0),
                need("c", 5, 0),
                need("d", 4, 0),
            ],
            prefill_overflow: None,
        };
        let worst = estimate.worst();
        assert_eq!((worst.bytes, worst.layer.as_str()), (5, "b"));
    }

    fn device(memory_bytes: u64) -> DeviceInfo {
        DeviceInfo {
            name: "test".into(),
            memory_bytes: Ok(memory_bytes),
            memory_bound: None,
        }
    }

    #[test]
    fn a_prefill_that_cannot_be_costed_is_named_not_called_an_overflow_of_the_step() {
        let p = plan(5_000_000_000);
        assert!(estimate(&p).is_ok(), "the decode step itself is costed");
        let e = check(&p, DeviceSpec::Cpu, &device(u64::MAX)).unwrap_err();
        assert!(
            e.starts_with("--context-len = 5000000000 is too large to verify")
                && e.contains("prefill of 5000000000 tokens")
                && e.contains("modelmeter analyze costs the decode step alone"),
            "{e}"
        );
        let e = check(&p, DeviceSpec::Cpu, &device(1 << 30)).unwrap_err();
        assert!(
            e.contains("needs at least") && e.ends_with("lower --batch or --context-len"),
            "{e}"
        );
    }

    /// A `--model` run of DeepSeek-OCR's first two layers in fp32 (eager attention): a
    /// prompt of `seq_len` tokens, then `new_tokens` generated.
    fn two_layer_model(seq_len: u64, new_tokens: u64) -> (Plan, ModelPlan) {
        let p = Plan {
            config: ModelConfig::deepseek_ocr().first_layers(2).unwrap(),
            workload: Workload::prefill(1, seq_len)
                .unwrap()
                .with_dtype(modelmeter::Dtype::F32)
                .unwrap(),
            ..plan(1)
        };
        let model = ModelPlan {
            num_layers: 2,
            config_layers: 12,
            new_tokens,
            verbose: false,
        };
        (p, model)
    }

    #[test]
    fn a_model_that_cannot_fit_names_what_to_lower() {
        let (p, model) = two_layer_model(64, 8);
        let need = model_need(&p, &model).unwrap();
        // fp32 parameters: embedding + lm_head, a dense and a MoE layer, the final norm.
        let vocab = 4 * 2 * 165_478_400;
        assert_eq!(need.vocab_weight_bytes, vocab);
        assert_eq!(
            need.weight_bytes,
            vocab + 4 * (32_852_480 + 233_720_320 + 1280)
        );
        // Two layers' caches at 64 + 8 tokens: 2·H·d per token, fp32.
        assert_eq!(need.kv_cache_bytes, 2 * (2 * 10 * 72 * 128 * 4));
        let cpu = DeviceSpec::Cpu;
        assert!(check_model(&p, &model, cpu, &device(need.total())).is_ok());
        // Each advice from one byte below its bound; at the bound itself, the next.
        for (available, advice) in [
            (need.total() - 1, "lower --new-tokens, --seq-len or --batch"),
            (
                need.weight_bytes,
                "lower --new-tokens, --seq-len or --batch",
            ),
            (need.weight_bytes - 1, "lower --num-layers"),
            (vocab, "lower --num-layers"),
            (vocab - 1, "no --num-layers fits"),
        ] {
            let e = check_model(&p, &model, cpu, &device(available)).unwrap_err();
            assert!(e.contains("needs about") && e.contains(advice), "{e}");
        }
    }

    #[test]
    fn the_pre_check_counts_the_peak_not_every_allocation() {
        // The dense MLP, B=1, S=512, fp32: its five outputs sum to 4·N·i + N·h elements,
        // but Python frees gate before up_proj runs: the peak is 3·N·i (docs/memory.md).
        let p = ocr_fp32(
            Workload::prefill(1, 512).unwrap(),
            &[LayerId::Mlp],
            AttentionImpl::Sdpa,
        );
        let (n, h, i) = (512u64, 1280u64, 6848u64);
        let weights = 4 * 3 * h * i;
        // The input [1, 512, 1280] fp32 and the position ids [1, 512] int64.
        let inputs = 4 * n * h + 8 * n;
        let (need, layer) = estimate(&p).unwrap();
        assert_eq!(layer, "DeepseekV2MLP");
        assert_eq!(need, weights + 4 * 3 * n * i + inputs);
        let unfused = weights + 4 * (4 * n * i + n * h) + inputs;
        assert!(check(&p, DeviceSpec::Cpu, &device(unfused - 1)).is_ok());
        assert!(check(&p, DeviceSpec::Cpu, &device(need - 1)).is_err());
        // On CUDA the device's reserve, 64 MiB for cuBLAS's and cuDNN's workspaces, is
        // added to the same peak (every tensor here is a whole number of 512-byte blocks).
        let cuda = Plan {
            device: tch::Device::Cuda(0),
            ..p
        };
        assert_eq!(estimate(&cuda).unwrap().0, need + (64 << 20));
    }

    /// A long generation from a short prompt: its largest call is the last decode step,
    /// which starts from a cache of S + n − 1 tokens (and writes the last one), not the
    /// prefill. S = 1, n = 1000, two layers of DeepSeek-OCR in fp32, eager attention.
    #[test]
    fn a_long_generations_last_step_bounds_the_models_working_memory() {
        let (p, model) = two_layer_model(1, 1000);
        let need = model_need(&p, &model).unwrap();
        let cost = |w: &Workload| {
            modelmeter::metrics::sums_only(|| {
                DeepseekV2Decoder::new(&p.config, w, p.attention).cost()
            })
            .unwrap()
        };
        let last = cost(
            &Workload::decode(1, 1 + 1000 - 1)
                .unwrap()
                .with_dtype(modelmeter::Dtype::F32)
                .unwrap()
                .on(p.workload.platform),
        );
        // Two layers' caches after the last step, 1 + 1000 tokens: 2·H·d per token, fp32.
        let cache = 2 * (2 * 10 * 1001 * 128 * 4);
        assert_eq!(last.metrics.kv_cache_bytes, cache);
        assert_eq!(need.kv_cache_bytes, cache);
        let prefill = cost(&p.workload);
        assert!(cache + last.peak.peak_bytes > prefill.peak.peak_bytes);
        // The prompt's ids and positions (int64) and the eager mask [1, 1, 1, 1] fp32.
        let inputs = 8 + 8 + 4;
        assert_eq!(need.working_bytes, cache + last.peak.peak_bytes + inputs);
    }

    /// In bf16 with eager attention the model's working memory holds the converted
    /// scores of the largest call's softmax: the stack's allocator peak, not its outputs'.
    /// Two dense layers of 8 heads and a vocabulary of 100, a prompt of 256 tokens: the
    /// scores outweigh every other activation.
    #[test]
    fn a_bf16_models_working_memory_holds_the_softmaxs_temporaries() {
        let config = ModelConfig::from_json_str(
            "eight heads",
            r#"{"hidden_size": 64, "num_attention_heads": 8, "intermediate_size": 32,
                "num_hidden_layers": 2, "vocab_size": 100}"#,
        )
        .unwrap();
        let s = 256;
        let p = Plan {
            config,
            workload: Workload::prefill(1, s)
                .unwrap()
                .with_dtype(modelmeter::Dtype::Bf16)
                .unwrap(),
            ..plan(1)
        };
        let model = ModelPlan {
            num_layers: 2,
            config_layers: 2,
            new_tokens: 0,
            verbose: false,
        };
        let need = model_need(&p, &model).unwrap();
        let stack = modelmeter::metrics::sums_only(|| {
            DeepseekV2Decoder::new(&p.config, &p.workload, p.attention).cost()
        })
        .unwrap();
        // The fp32 copy of the [1, 8, S, S] scores, less what is freed by then.
        assert!(stack.peak.allocator_peak_bytes > stack.peak.peak_bytes);
        // The prompt's ids and positions (int64) and the eager mask [1, 1, S, S] bf16.
        let inputs = s * 8 + s * 8 + s * s * 2;
        assert_eq!(need.working_bytes, stack.peak.allocator_peak_bytes + inputs);
    }

    #[test]
    fn the_advice_says_when_no_smaller_workload_fits() {
        let p = plan(64);
        let need = needs(&p, &p.workload).unwrap().remove(0);
        assert!(need.fixed_bytes > 0 && need.fixed_bytes < need.bytes);
        // Room for the weights but not the activations: a smaller workload helps.
        let e = check(&p, DeviceSpec::Cpu, &device(need.bytes - 1)).unwrap_err();
        assert!(e.ends_with("lower --batch or --context-len"), "{e}");
        // Not even for the weights: say so, and what can help instead (not leaving out
        // the plan's only layer).
        let e = check(&p, DeviceSpec::Cpu, &device(need.fixed_bytes - 1)).unwrap_err();
        assert!(
            e.contains("weights and the device reserve alone of every layer asked for")
                && e.contains("no smaller workload fits")
                && !e.contains("--layers")
                && !e.contains("lower --batch"),
            "{e}"
        );
    }

    #[test]
    fn every_layer_whose_weights_alone_do_not_fit_is_named_at_once() {
        // DeepSeek-OCR in fp32: the MLP's weights (105 MB) and the MoE's (~900 MB) each
        // exceed 100 MB; the norm's and the attention's do not, their activations at
        // S = 4096 do.
        let p = ocr_fp32(
            Workload::prefill(1, 4096).unwrap(),
            &[
                LayerId::Mlp,
                LayerId::RmsNorm,
                LayerId::MoE,
                LayerId::Attention,
            ],
            AttentionImpl::Eager,
        );
        let e = check(&p, DeviceSpec::Cpu, &device(100_000_000)).unwrap_err();
        assert!(
            e.contains("for DeepseekV2MoE")
                && e.contains("leave DeepseekV2MLP, DeepseekV2MoE out (--layers)")
                && e.contains("(DeepseekV2MLP 100.3 MiB, DeepseekV2MoE ")
                && e.ends_with(
                    "; for DeepseekV2RMSNorm, LlamaAttention also lower --batch or --seq-len"
                ),
            "{e}"
        );
    }

    #[test]
    fn an_absorbed_decode_step_is_judged_by_an_absorbed_prefill() {
        // The harness fills an absorbed step's cache in the absorbed form, whose prefill
        // (scores over the latent rank) needs far more than the naive one: the estimate
        // took the naive prefill and let a run through that the device could not hold.
        let lite = ModelConfig::builtin("deepseek-v2-lite").unwrap().unwrap();
        let step = Workload::decode(64, 4000)
            .unwrap()
            .on(modelmeter::Platform::Cpu)
            .with_mla(MlaForm::Absorb);
        let p = Plan {
            config: lite,
            workload: step.clone(),
            layers: vec![crate::pairing::Pairing {
                layer: LayerId::Attention,
            }],
            attention: AttentionImpl::Sdpa,
            ..plan(1)
        };
        let naive_prefill = Workload {
            mla: MlaForm::Naive,
            ..step.cache_prefill().unwrap().unwrap()
        };
        let naive = needs(&p, &naive_prefill).unwrap()[0].bytes;
        let merged = estimate_plan(&p).unwrap().needs[0].bytes;
        assert!(merged > 10 * naive, "absorbed {merged} vs naive {naive}");
    }

    #[test]
    fn a_decode_step_is_judged_by_the_prefill_that_fills_its_cache_layer_by_layer() {
        // DeepSeek-OCR fp32, a decode step over 8,192 cached tokens: the eager attention's
        // step needs little, the prefill that fills its cache (S² scores) far more than
        // the MoE with its weights. Each layer keeps the larger of its two needs.
        let decode = ocr_fp32(
            Workload::decode(1, 8192).unwrap(),
            &[LayerId::Attention, LayerId::MoE],
            AttentionImpl::Eager,
        );
        let step = needs(&decode, &decode.workload).unwrap();
        let prefill = needs(&decode, &cache_prefill(&decode.workload).unwrap().unwrap()).unwrap();
        let merged = estimate_plan(&decode).unwrap().needs;
        assert!(
            prefill[0].bytes > step[0].bytes,
            "the attention's prefill is larger"
        );
        assert_eq!(merged[0].bytes, prefill[0].bytes);
        // The MoE keeps no cache: its step runs alone, no prefill before it.
        assert!(
            prefill[1].bytes > step[1].bytes,
            "a prefill of the MoE is larger"
        );
        assert_eq!(merged[1].bytes, step[1].bytes);
        // Room for the MoE's weights and the step, not for the attention's prefill: only
        // the attention is named, with the decode step's advice.
        let available = merged[1].bytes.max(step[0].bytes);
        assert!(merged[0].bytes > available);
        let e = check(&decode, DeviceSpec::Cpu, &device(available)).unwrap_err();
        assert!(
            e.contains("for LlamaAttention") && e.ends_with("lower --batch or --context-len"),
            "{e}"
        );
    }

    #[test]
    fn layers_without_a_cache_are_not_judged_by_a_prefill_they_do_not_run() {
        // A decode step over 10¹² cached tokens: costing their prefill overflows (and would
        // need terabytes), but the MLP and the norm run the step over the new token alone.
        let alone = ocr_fp32(
            Workload::decode(1, 1_000_000_000_000).unwrap(),
            &[LayerId::Mlp, LayerId::RmsNorm],
            AttentionImpl::Sdpa,
        );
        assert!(cache_prefill(&alone.workload).is_some());
        let step = needs(&alone, &alone.workload).unwrap();
        let estimate = estimate_plan(&alone).unwrap();
        assert_eq!(estimate.prefill_overflow, None);
        let needs: Vec<u64> = estimate.needs.iter().map(|n| n.bytes).collect();
        assert_eq!(needs, step.iter().map(|n| n.bytes).collect::<Vec<_>>());
        assert!(check(&alone, DeviceSpec::Cpu, &device(1 << 30)).is_ok());
        // With the attention, which fills its cache first, the run is refused for it.
        let with_cache = ocr_fp32(
            alone.workload.clone(),
            &[LayerId::Mlp, LayerId::Attention],
            AttentionImpl::Sdpa,
        );
        let e = check(&with_cache, DeviceSpec::Cpu, &device(u64::MAX)).unwrap_err();
        assert!(
            e.starts_with("--context-len = 1000000000000 is too large"),
            "{e}"
        );
    }

    /// A need of `bytes`, of which `fixed` are weights and reserve, for `layer`.
    fn need(layer: &str, bytes: u64, fixed: u64) -> Need {
        Need {
            bytes,
            layer: layer.into(),
            fixed_bytes: fixed,
        }
    }

    #[test]
    fn the_advice_draws_its_lines_at_exactly_the_free_memory() {
        let bf16 = Workload::prefill(1, 8).unwrap();
        let fp32 = bf16.clone().with_dtype(modelmeter::Dtype::F32).unwrap();
        // Weights of exactly the free memory fit: a smaller workload helps.
        assert_eq!(
            advice(&[need("a", 20, 10)], 10, &bf16),
            "lower --batch or --seq-len"
        );
        // A layer needing exactly the free memory is not named among those that do not
        // fit; one layer left out, none left to lower.
        let needs = [need("a", 10, 5), need("b", 20, 15), need("c", 3, 1)];
        assert_eq!(
            advice(&needs, 10, &bf16),
            "the weights and the device reserve alone are more than that (b 15 B), so no smaller workload fits: leave b out (--layers), use a device with more free memory"
        );
        // In fp32, a smaller dtype helps too.
        assert!(advice(&needs, 10, &fp32)
            .contains("use a smaller --dtype (bf16 halves fp32's weights) or a device"));
        assert!(advice(&[need("b", 20, 15)], 10, &fp32).ends_with(
            "use a smaller --dtype (bf16 halves fp32's weights) or a device with more free memory"
        ));
    }

    #[test]
    fn an_overflow_of_the_plan_names_the_option_to_lower() {
        // 2^31 × 2^31 = 2^62 rows: the tiny attention's projections overflow 64 bits; the
        // probes find that a shorter prompt alone would fit.
        let huge = Plan {
            workload: Workload::prefill(1 << 31, 1 << 31).unwrap(),
            ..plan(1)
        };
        let e = estimate(&huge).unwrap_err();
        assert!(
            e.starts_with("--seq-len = 2147483648 is too large: ")
                && e.ends_with("lower --seq-len"),
            "{e}"
        );
    }

    #[test]
    fn an_overflow_of_the_config_names_its_field() {
        let mut huge = plan(1);
        huge.config.hidden_size = 1 << 62;
        let e = estimate(&huge).unwrap_err();
        assert_eq!(
            e,
            "hidden_size = 4611686018427387904 (config tiny) is too large: aten::mm would overflow 64-bit integers; lower hidden_size"
        );
    }

    #[test]
    fn each_layer_that_fills_its_cache_is_judged_by_its_own_prefill() {
        // The MLP runs before the attention and needs more at the prefill's length: the
        // attention's need must be its own prefill's, not the MLP's.
        let p = ocr_fp32(
            Workload::decode(1, 512).unwrap(),
            &[LayerId::Mlp, LayerId::Attention],
            AttentionImpl::Sdpa,
        );
        let prefill = p.workload.cache_prefill().unwrap().unwrap();
        let filled = needs(&p, &prefill).unwrap();
        assert!(
            filled[0].bytes > filled[1].bytes,
            "the MLP's prefill is larger"
        );
        let estimate = estimate_plan(&p).unwrap();
        let step = needs(&p, &p.workload).unwrap();
        assert_eq!(
            estimate.needs[0].bytes, step[0].bytes,
            "the MLP runs the step alone"
        );
        assert_eq!(
            (estimate.needs[1].layer.as_str(), estimate.needs[1].bytes),
            (filled[1].layer.as_str(), filled[1].bytes.max(step[1].bytes))
        );
    }

    #[test]
    fn a_workload_that_fits_passes_and_one_that_does_not_is_refused() {
        let p = plan(64);
        assert!(check(&p, DeviceSpec::Cpu, &device(1 << 30)).is_ok());
        let e = check(&p, DeviceSpec::Cpu, &device(16)).unwrap_err();
        assert!(e.contains("needs about") && e.contains("16 B free"), "{e}");
    }
}
