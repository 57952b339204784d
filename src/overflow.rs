//! Which input made an exact count overflow: an overflow deep in a layer ("aten::mm
//! would overflow 64-bit integers") does not say whether `hidden_size`, `--seq-len` or
//! `--new-tokens` is to blame. [`explain`] finds out by lowering inputs: it lowers every
//! size the analysis takes to a small valid value, then raises them back one at a time;
//! those that cannot be raised without the overflow returning are named. The inputs
//! named are a minimal set whose lowering removes the overflow.
//!
//! Workload inputs are named as the command-line options both binaries share
//! (`--batch`, `--seq-len`, `--context-len`, `--new-tokens`); config inputs by their
//! `config.json` field.

use crate::config::{MlpKind, ModelConfig};
use crate::error::Error;
use crate::workload::{Phase, Workload};

/// What an analysis is computed from.
#[derive(Clone, Debug)]
pub struct Inputs {
    pub config: ModelConfig,
    pub workload: Workload,
    /// Decode steps of a whole generation (`--new-tokens`), if asked for.
    pub new_tokens: Option<u64>,
}

/// One input that can be lowered: its name, a typical value (DeepSeek-OCR's, or the
/// `dsocr-standard-v1` workload's), its value (`None` when it does not apply) and how to
/// lower it.
struct Knob {
    name: &'static str,
    reference: u64,
    option: bool,
    value: fn(&Inputs) -> Option<u64>,
    lower: fn(&mut Inputs),
}

fn moe_value(inputs: &Inputs, f: fn(&crate::config::MoeConfig) -> u64) -> Option<u64> {
    inputs.config.moe.as_ref().map(f)
}

fn lower_moe(inputs: &mut Inputs, f: fn(&mut crate::config::MoeConfig)) {
    if let Some(moe) = inputs.config.moe.as_mut() {
        f(moe);
    }
}

fn mla_value(inputs: &Inputs, f: fn(&crate::mla_config::MlaConfig) -> Option<u64>) -> Option<u64> {
    inputs.config.mla.as_ref().and_then(f)
}

fn lower_mla(inputs: &mut Inputs, f: fn(&mut crate::mla_config::MlaConfig)) {
    if let Some(mla) = inputs.config.mla.as_mut() {
        f(mla);
    }
}

/// The knobs, lowered in this order: where one's lowest value depends on another's
/// (heads on KV heads, experts on experts per token), the dependency comes first.
const KNOBS: &[Knob] = &[
    Knob {
        name: "num_key_value_heads",
        reference: 10,
        option: false,
        value: |i| Some(i.config.num_key_value_heads),
        lower: |i| i.config.num_key_value_heads = 1,
    },
    Knob {
        name: "num_attention_heads",
        reference: 10,
        option: false,
        value: |i| Some(i.config.num_attention_heads),
        lower: |i| i.config.num_attention_heads = i.config.num_key_value_heads,
    },
    Knob {
        name: "hidden_size",
        reference: 1280,
        option: false,
        value: |i| Some(i.config.hidden_size),
        lower: |i| i.config.hidden_size = 1,
    },
    Knob {
        name: "head_dim",
        reference: 128,
        option: false,
        value: |i| Some(i.config.head_dim),
        lower: |i| i.config.head_dim = 2,
    },
    Knob {
        name: "intermediate_size",
        reference: 6848,
        option: false,
        value: |i| Some(i.config.intermediate_size),
        lower: |i| i.config.intermediate_size = 1,
    },
    Knob {
        name: "vocab_size",
        reference: 129280,
        option: false,
        value: |i| Some(i.config.vocab_size),
        lower: |i| i.config.vocab_size = 1,
    },
    Knob {
        name: "num_hidden_layers",
        reference: 12,
        option: false,
        value: |i| Some(i.config.num_hidden_layers),
        lower: |i| {
            // One layer of each feed-forward kind the config has, in its order.
            let mut kinds: Vec<MlpKind> = Vec::new();
            for k in &i.config.layer_kinds {
                if !kinds.contains(k) {
                    kinds.push(*k);
                }
            }
            i.config.num_hidden_layers = kinds.len() as u64;
            i.config.layer_kinds = kinds;
        },
    },
    Knob {
        name: "num_experts_per_tok",
        reference: 6,
        option: false,
        value: |i| moe_value(i, |m| m.num_experts_per_tok),
        lower: |i| lower_moe(i, |m| m.num_experts_per_tok = 1),
    },
    Knob {
        name: "n_routed_experts",
        reference: 64,
        option: false,
        value: |i| moe_value(i, |m| m.n_routed_experts),
        lower: |i| lower_moe(i, |m| m.n_routed_experts = m.num_experts_per_tok),
    },
    Knob {
        name: "moe_intermediate_size",
        reference: 896,
        option: false,
        value: |i| moe_value(i, |m| m.moe_intermediate_size),
        lower: |i| lower_moe(i, |m| m.moe_intermediate_size = 1),
    },
    Knob {
        name: "n_shared_experts",
        reference: 2,
        option: false,
        value: |i| moe_value(i, |m| m.n_shared_experts),
        lower: |i| lower_moe(i, |m| m.n_shared_experts = m.n_shared_experts.min(1)),
    },
    // MLA (DeepSeek-V2/V3 attention). Lowered values stay valid: d_r even, d_v ≤ d_qk
    // (the flash form pads values to d_qk) and d_qk a multiple of 8 (the fused SDPA
    // kernels' head dims), so a probe fails only by overflowing.
    Knob {
        name: "q_lora_rank",
        reference: 1536,
        option: false,
        value: |i| mla_value(i, |m| m.q_lora_rank),
        lower: |i| lower_mla(i, |m| m.q_lora_rank = m.q_lora_rank.map(|_| 1)),
    },
    Knob {
        name: "kv_lora_rank",
        reference: 512,
        option: false,
        value: |i| mla_value(i, |m| Some(m.kv_lora_rank)),
        lower: |i| lower_mla(i, |m| m.kv_lora_rank = 1),
    },
    Knob {
        name: "v_head_dim",
        reference: 128,
        option: false,
        value: |i| mla_value(i, |m| Some(m.v_head_dim)),
        lower: |i| lower_mla(i, |m| m.v_head_dim = 1),
    },
    Knob {
        name: "qk_rope_head_dim",
        reference: 64,
        option: false,
        value: |i| mla_value(i, |m| Some(m.qk_rope_head_dim)),
        lower: |i| lower_mla(i, |m| m.qk_rope_head_dim = 2),
    },
    Knob {
        name: "qk_nope_head_dim",
        reference: 128,
        option: false,
        value: |i| mla_value(i, |m| Some(m.qk_nope_head_dim)),
        // After d_v and d_r (this order): the least d_n ≥ 1 with d_n + d_r ≥ d_v and a
        // multiple of 8 (left as it is where that sum would overflow).
        lower: |i| {
            lower_mla(i, |m| {
                let least = m.v_head_dim.max(m.qk_rope_head_dim.saturating_add(1));
                if let Some(d_qk) = least.checked_next_multiple_of(8) {
                    m.qk_nope_head_dim = d_qk - m.qk_rope_head_dim;
                }
            })
        },
    },
    Knob {
        name: "--batch",
        reference: 1,
        option: true,
        value: |i| Some(i.workload.batch),
        lower: |i| i.workload.batch = 1,
    },
    Knob {
        name: "--seq-len",
        reference: 512,
        option: true,
        value: |i| match i.workload.phase {
            Phase::Prefill { seq_len } => Some(seq_len),
            Phase::Decode { .. } => None,
        },
        lower: |i| {
            if let Phase::Prefill { seq_len } = &mut i.workload.phase {
                *seq_len = 1;
            }
        },
    },
    Knob {
        name: "--context-len",
        reference: 512,
        option: true,
        value: |i| match i.workload.phase {
            Phase::Decode { context_len } => Some(context_len),
            Phase::Prefill { .. } => None,
        },
        lower: |i| {
            if let Phase::Decode { context_len } = &mut i.workload.phase {
                *context_len = 1;
            }
        },
    },
    Knob {
        name: "--new-tokens",
        reference: 512,
        option: true,
        value: |i| i.new_tokens,
        lower: |i| i.new_tokens = i.new_tokens.map(|n| n.min(1)),
    },
];

/// `inputs` with the knobs marked in `lowered` lowered, in [`KNOBS`] order.
fn with_lowered(inputs: &Inputs, knobs: &[&Knob], lowered: &[bool]) -> Inputs {
    let mut out = inputs.clone();
    for (knob, low) in knobs.iter().zip(lowered) {
        if *low {
            (knob.lower)(&mut out);
        }
    }
    out
}

/// The inputs that make `fails` true: a minimal set whose lowering makes it false, as
/// `(name, value, is an option)`; `None` when lowering everything does not help (the
/// failure is not a matter of sizes).
///
/// Inputs are raised back from the most ordinary (closest to its typical value) to the
/// most extreme, so that of two inputs that overflow only together, the extreme one is
/// named (`hidden_size = 10^15`, not the default `--seq-len = 512`). When the overflow
/// is within one layer, the probes run with one layer of each kind (fast, whatever
/// `num_hidden_layers` is), and the layer count is not named.
pub fn culprits(
    inputs: &Inputs,
    mut fails: impl FnMut(&Inputs) -> bool,
) -> Option<Vec<(&'static str, u64, bool)>> {
    // Only knobs that apply and that lowering changes, each lowered after the knobs
    // before it (its dependencies: heads lowered to KV heads change nothing while the KV
    // heads are as large, and equal counts are the usual case).
    let mut low = inputs.clone();
    let knobs: Vec<&Knob> = KNOBS
        .iter()
        .filter(|k| {
            (k.lower)(&mut low);
            (k.value)(inputs).is_some() && (k.value)(inputs) != (k.value)(&low)
        })
        .collect();
    let excess = |k: &Knob| (k.value)(inputs).unwrap_or(0) as f64 / k.reference.max(1) as f64;
    let mut order: Vec<usize> = (0..knobs.len()).collect();
    order.sort_by(|a, b| excess(knobs[*a]).total_cmp(&excess(knobs[*b])));
    // The layer count, kept lowered when one layer of each kind already overflows.
    let layers = knobs.iter().position(|k| k.name == "num_hidden_layers");
    let pinned = layers.filter(|&i| {
        let only = (0..knobs.len()).map(|j| j == i).collect::<Vec<_>>();
        fails(&with_lowered(inputs, &knobs, &only))
    });
    let mut lowered = vec![true; knobs.len()];
    if fails(&with_lowered(inputs, &knobs, &lowered)) {
        return None;
    }
    for i in order.into_iter().filter(|i| Some(*i) != pinned) {
        lowered[i] = false;
        if fails(&with_lowered(inputs, &knobs, &lowered)) {
            lowered[i] = true;
        }
    }
    let named: Vec<(&'static str, u64, bool)> = (0..knobs.len())
        .filter(|i| lowered[*i] && Some(*i) != pinned)
        .filter_map(|i| Some((knobs[i].name, (knobs[i].value)(inputs)?, knobs[i].option)))
        .collect();
    (!named.is_empty()).then_some(named)
}

/// `error` with the inputs that cause it named, when it is an overflow and lowering
/// sizes removes it (see [`culprits`]); a config field a layer cannot take with this
/// workload (`v_head_dim` wider than SDPA's padded head) is said to come from the config
/// file, as the config's own checks say; any other error is returned as it is. `fails`
/// reruns the analysis on other inputs and says whether it still fails.
pub fn explain(error: Error, inputs: &Inputs, fails: impl FnMut(&Inputs) -> bool) -> Error {
    explain_as(error, inputs, fails, str::to_string)
}

/// [`explain`], with each input named as `shown_as` spells its name (`--seq-len`,
/// `hidden_size`): `modelmeter sweep` names an option it varies as `--vary seq-len`.
pub fn explain_as(
    error: Error,
    inputs: &Inputs,
    fails: impl FnMut(&Inputs) -> bool,
    shown_as: impl Fn(&'static str) -> String,
) -> Error {
    let Error::Overflow { what } = &error else {
        return match error {
            Error::Unsupported { ref field, .. }
                if crate::config_reader::LANGUAGE_FIELDS.contains(&field.as_str()) =>
            {
                error.in_config(&inputs.config.name)
            }
            error => error,
        };
    };
    let Some(named) = culprits(inputs, fails) else {
        return error;
    };
    let shown: Vec<String> = named
        .iter()
        .map(|(name, value, _)| format!("{} = {value}", shown_as(name)))
        .collect();
    let from_config = named.iter().any(|(_, _, option)| !option);
    let source = if from_config {
        format!(" (config {})", inputs.config.name)
    } else {
        String::new()
    };
    let verb = if named.len() == 1 { "is" } else { "are" };
    let names: Vec<String> = named.iter().map(|(name, _, _)| shown_as(name)).collect();
    Error::OverflowFrom {
        inputs: format!("{}{source} {verb} too large", shown.join(" and ")),
        what: what.clone(),
        names: names.join(" and "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::AttentionImpl;
    use crate::report::analyze;

    fn analysis(inputs: &Inputs) -> crate::Result<()> {
        analyze(
            &inputs.config,
            &inputs.workload,
            AttentionImpl::Sdpa,
            inputs.new_tokens,
        )
        .map(drop)
    }

    fn explained(inputs: &Inputs) -> String {
        let e = analysis(inputs).unwrap_err();
        explain(e, inputs, |i| analysis(i).is_err()).to_string()
    }

    fn inputs(workload: Workload) -> Inputs {
        Inputs {
            config: ModelConfig::deepseek_ocr(),
            workload,
            new_tokens: None,
        }
    }

    /// A config field a layer refuses at this workload is said to come from the config;
    /// an option's refusal (the attention) is left as it is.
    #[test]
    fn an_unsupported_config_field_names_the_config() {
        let unsupported = |field: &str| Error::Unsupported {
            field: field.into(),
            value: "256".into(),
            reason: "why".into(),
        };
        let i = inputs(Workload::prefill(1, 8).unwrap());
        let e = explain(unsupported("v_head_dim"), &i, |_| false).to_string();
        assert!(
            e.starts_with("v_head_dim = 256 (config deepseek-ocr-v1-base) is not supported"),
            "{e}"
        );
        let e = explain(unsupported("attention"), &i, |_| false).to_string();
        assert!(e.starts_with("attention = 256 is not supported"), "{e}");
    }

    /// A config field and an option named together: the config is named, since one of
    /// the two lives in it. (The fail predicate is the test's: both sizes must be lowered.)
    #[test]
    fn a_field_and_an_option_together_name_the_config() {
        let mut i = inputs(Workload::prefill(1024, 512).unwrap());
        i.config.hidden_size = 1 << 20;
        let e = explain(Error::overflow("x"), &i, |i| {
            i.workload.batch > 1 || i.config.hidden_size > 1280
        })
        .to_string();
        assert!(
            e.starts_with(
                "hidden_size = 1048576 and --batch = 1024 (config deepseek-ocr-v1-base) are too large"
            ),
            "{e}"
        );
    }

    #[test]
    fn the_option_or_field_that_overflows_is_named() {
        let e = explained(&inputs(Workload::prefill(1, 10_000_000_000).unwrap()));
        assert!(
            e.starts_with("--seq-len = 10000000000 is too large: ")
                && e.ends_with("lower --seq-len"),
            "{e}"
        );
        let e = explained(&inputs(Workload::prefill(100_000_000_000, 512).unwrap()));
        assert!(e.starts_with("--batch = 100000000000 is too large"), "{e}");
        let mut i = inputs(Workload::prefill(1, 512).unwrap());
        i.new_tokens = Some(1_000_000_000);
        let e = explained(&i);
        assert!(
            e.starts_with("--new-tokens = 1000000000 is too large"),
            "{e}"
        );
        let mut i = inputs(Workload::prefill(1, 512).unwrap());
        i.config.vocab_size = u64::MAX;
        let e = explained(&i);
        assert!(
            e.starts_with(
                "vocab_size = 18446744073709551615 (config deepseek-ocr-v1-base) is too large"
            ),
            "{e}"
        );
        // Overflowing only with the default --seq-len: the extreme input is named.
        let mut i = inputs(Workload::prefill(1, 512).unwrap());
        i.config.hidden_size = 1_000_000_000_000_000;
        i.config.head_dim = 2;
        let e = explained(&i);
        assert!(
            e.starts_with(
                "hidden_size = 1000000000000000 (config deepseek-ocr-v1-base) is too large"
            ),
            "{e}"
        );
    }

    #[test]
    fn heads_as_many_as_the_kv_heads_are_named_not_the_workload() {
        // Equal counts (DeepSeek-OCR's, V2's, V3's, and any config without
        // num_key_value_heads): lowering the heads to the KV heads alone changes nothing,
        // so both counts are named, never the default --seq-len.
        let mut i = inputs(Workload::prefill(1, 512).unwrap());
        i.config.num_attention_heads = 1 << 33;
        i.config.num_key_value_heads = 1 << 33;
        let e = explained(&i);
        assert!(
            e.starts_with(
                "num_key_value_heads = 8589934592 and num_attention_heads = 8589934592 \
                 (config deepseek-ocr-v1-base) are too large"
            ),
            "{e}"
        );
        // Fewer KV heads: the heads alone.
        i.config.num_key_value_heads = 1;
        let e = explained(&i);
        assert!(
            e.starts_with("num_attention_heads = 8589934592 (config"),
            "{e}"
        );
    }

    #[test]
    fn mla_fields_that_overflow_are_named() {
        let v2_lite = || ModelConfig::builtin("deepseek-v2-lite").unwrap().unwrap();
        let with = |f: fn(&mut crate::mla_config::MlaConfig)| {
            let mut config = v2_lite();
            f(config.mla.as_mut().unwrap());
            Inputs {
                config,
                workload: Workload::prefill(1, 512).unwrap(),
                new_tokens: None,
            }
        };
        for (inputs, named) in [
            (
                with(|m| m.kv_lora_rank = 1 << 62),
                "kv_lora_rank = 4611686018427387904",
            ),
            (
                with(|m| m.kv_lora_rank = 1 << 40),
                "kv_lora_rank = 1099511627776",
            ),
            (
                with(|m| m.q_lora_rank = Some(1 << 63)),
                "q_lora_rank = 9223372036854775808",
            ),
            (
                with(|m| m.qk_rope_head_dim = 1 << 50),
                "qk_rope_head_dim = 1125899906842624",
            ),
            (
                with(|m| m.qk_nope_head_dim = 1 << 50),
                "qk_nope_head_dim = 1125899906842624",
            ),
        ] {
            let e = explained(&inputs);
            assert!(
                e.starts_with(&format!("{named} (config deepseek-v2-lite) is too large")),
                "{named}: {e}"
            );
        }
    }

    #[test]
    fn feed_forward_fields_that_overflow_are_named_not_the_layer_count() {
        // Each overflows inside one decoder layer: the probes run one layer of each kind,
        // and the count of layers is never the culprit.
        for (set, named) in [
            (
                (|c: &mut ModelConfig| c.intermediate_size = 1 << 50) as fn(&mut ModelConfig),
                "intermediate_size = 1125899906842624",
            ),
            (
                |c| c.moe.as_mut().unwrap().moe_intermediate_size = 1 << 50,
                "moe_intermediate_size = 1125899906842624",
            ),
            (
                |c| c.moe.as_mut().unwrap().n_shared_experts = 1 << 50,
                "n_shared_experts = 1125899906842624",
            ),
        ] {
            let mut i = inputs(Workload::prefill(1, 512).unwrap());
            set(&mut i.config);
            let e = explained(&i);
            assert!(
                e.starts_with(&format!(
                    "{named} (config deepseek-ocr-v1-base) is too large"
                )),
                "{named}: {e}"
            );
            assert!(!e.contains("num_hidden_layers"), "{e}");
        }
    }

    #[test]
    fn of_two_that_each_would_do_the_one_furthest_above_its_typical_value_is_named() {
        // B = 2^16 and S = 2^24 overflow together; lowering either one is enough. The
        // batch is 2^16 times its typical 1, the prompt 2^15 times its typical 512: the
        // batch is named. At B = 2^12, S = 2^30, the prompt.
        for (batch, seq_len, named) in [
            (1 << 16, 1 << 24, "--batch = 65536 is too large"),
            (1 << 12, 1 << 30, "--seq-len = 1073741824 is too large"),
        ] {
            let e = explained(&inputs(Workload::prefill(batch, seq_len).unwrap()));
            assert!(e.starts_with(named), "{e}");
            assert_eq!(e.matches("too large").count(), 1, "{e}");
        }
    }

    #[test]
    fn other_errors_are_left_alone() {
        let i = inputs(Workload::prefill(1, 512).unwrap());
        let e = explain(Error::invalid("x", 1, "y"), &i, |_| true);
        assert_eq!(e.to_string(), "x = 1 is invalid: expected y");
        let e = explain(Error::overflow("z"), &i, |_| true);
        assert!(e.to_string().starts_with("z would overflow"), "{e}");
    }
}
