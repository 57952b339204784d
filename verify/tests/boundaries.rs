//! Boundary workloads, where ATen changes how it dispatches: one prompt token, one cached
//! token, one sequence, one head. A size-1 contraction in `einsum` becomes a `mul`, and
//! `matmul` folds or copies by which sizes are 1; random sweeps draw these corners rarely
//! (`--sweep 4000` found the one-token absorbed einsum in 10 of 4,000 cases). Every layer
//! of a small multi-head and a small MLA config, in every attention form, in fp32 and
//! bf16, at tolerance 0: each row must agree exactly (known gaps aside). The smallest
//! rotary width, d_r = 2, is a boundary of the config: the vendor's de-interleave
//! `reshape` is a view there, a copy at every larger width.

use modelmeter::layers::{AttentionImpl, LayerId};
use modelmeter::{Dtype, MlaForm, ModelConfig, Phase, Platform, Workload};
use modelmeter_verify::compare::Status;
use modelmeter_verify::hooks::TestHooks;
use modelmeter_verify::plan::{applicable_layers, Plan};
use modelmeter_verify::runner;
use serde_json::json;

/// A small config: multi-head with one head when `!mla`, else MLA with `heads` heads and
/// a rotary width of `d_r` (no q_lora_rank, V3 routing).
fn config(mla: bool, heads: u64, d_r: u64) -> ModelConfig {
    let mut c = json!({
        "model_type": "deepseek_v2",
        "hidden_size": 128,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
        "head_dim": 64,
        "intermediate_size": 96,
        "moe_intermediate_size": 32,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "num_hidden_layers": 2,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        "vocab_size": 1000,
        "use_mla": false,
        "torch_dtype": "bfloat16",
    });
    if mla {
        for (key, value) in [
            ("use_mla", json!(true)),
            ("num_attention_heads", json!(heads)),
            ("num_key_value_heads", json!(heads)),
            ("kv_lora_rank", json!(32)),
            ("qk_nope_head_dim", json!(16)),
            ("qk_rope_head_dim", json!(d_r)),
            ("v_head_dim", json!(16)),
            ("scoring_func", json!("sigmoid")),
            ("topk_method", json!("noaux_tc")),
            ("n_group", json!(4)),
            ("topk_group", json!(2)),
        ] {
            c[key] = value;
        }
    }
    let name = match mla {
        true => format!("small MLA, {heads} heads, d_r = {d_r}"),
        false => "small MHA, 1 head".to_string(),
    };
    ModelConfig::from_json_value(&name, &c).unwrap()
}

#[test]
fn one_token_one_key_one_sequence_agree_exactly_in_every_attention_form() {
    let mut failures = Vec::new();
    for (mla, heads, d_r) in [(false, 1, 0), (true, 1, 8), (true, 2, 8), (true, 2, 2)] {
        let config = config(mla, heads, d_r);
        let forms: &[MlaForm] = if mla {
            &[MlaForm::Naive, MlaForm::Absorb]
        } else {
            &[MlaForm::Naive]
        };
        for dtype in [Dtype::F32, Dtype::Bf16] {
            for batch in [1, 2] {
                for phase in [
                    Phase::Prefill { seq_len: 1 },
                    Phase::Prefill { seq_len: 2 },
                    Phase::Decode { context_len: 1 },
                ] {
                    for &form in forms {
                        for attention in [AttentionImpl::Sdpa, AttentionImpl::Eager] {
                            let workload = Workload::new(batch, phase, dtype)
                                .unwrap()
                                .on(Platform::Cpu)
                                .with_mla(form);
                            let plan = Plan {
                                layers: applicable_layers(&config),
                                config: config.clone(),
                                workload: workload.clone(),
                                attention,
                                device: tch::Device::Cpu,
                                tolerance: 0.0,
                                seed: 0,
                                hooks: TestHooks::default(),
                            };
                            let layers = runner::verify(&plan, &mut |_| {});
                            assert_eq!(layers.len(), 7, "{}: every layer ran", config.name);
                            for layer in layers {
                                let bad: Vec<String> = layer
                                    .metrics
                                    .iter()
                                    .filter(|r| matches!(r.status, Status::Fail | Status::Error))
                                    .map(|r| {
                                        format!("{:?} {} vs {}", r.metric, r.analytic, r.measured)
                                    })
                                    .collect();
                                if layer.status == Status::Error || !bad.is_empty() {
                                    failures.push(format!(
                                        "{} {} {attention:?}: {} {:?} {bad:?}",
                                        config.name,
                                        workload.describe(),
                                        layer.name,
                                        layer.error
                                    ));
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// An MoE whose experts' intermediates outweigh their outputs (m = 4·h) and whose busiest
/// expert runs last in index order (seed 1 routes [1, 1, 0, 2]): the measured peak holds
/// the earlier experts' outputs under the busiest one's intermediates, as the vendor loop
/// runs them. Both MoE layers, at tolerance 0.
#[test]
fn the_moe_peak_follows_the_experts_index_order() {
    let config = ModelConfig::from_json_str(
        "small MoE, m = 4·h",
        r#"{"hidden_size": 16, "num_attention_heads": 1, "head_dim": 2,
            "intermediate_size": 32, "moe_intermediate_size": 64,
            "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": null,
            "num_hidden_layers": 2, "first_k_dense_replace": 1, "vocab_size": 100}"#,
    )
    .unwrap();
    let layers = applicable_layers(&config)
        .into_iter()
        .filter(|p| matches!(p.layer, LayerId::MoE | LayerId::DecoderMoe))
        .collect::<Vec<_>>();
    assert_eq!(layers.len(), 2, "the MoE and the MoE decoder layer");
    let plan = Plan {
        layers,
        workload: Workload::new(2, Phase::Prefill { seq_len: 1 }, Dtype::F32)
            .unwrap()
            .on(Platform::Cpu),
        config,
        attention: AttentionImpl::Sdpa,
        device: tch::Device::Cpu,
        tolerance: 0.0,
        seed: 1,
        hooks: TestHooks::default(),
    };
    for layer in runner::verify(&plan, &mut |_| {}) {
        assert_eq!(
            layer.tokens_per_expert.as_deref(),
            Some(&[1, 1, 0, 2][..]),
            "{}: the routing this test is about",
            layer.name
        );
        let bad: Vec<String> = layer
            .metrics
            .iter()
            .filter(|r| matches!(r.status, Status::Fail | Status::Error))
            .map(|r| format!("{:?} {} vs {}", r.metric, r.analytic, r.measured))
            .collect();
        assert!(
            bad.is_empty() && layer.error.is_none(),
            "{}: {bad:?} {:?}",
            layer.name,
            layer.error
        );
    }
}
