//! The allocator's peak, witnessed by libtorch's own allocator: an eager attention in bf16
//! or fp16 runs `softmax(scores, dtype=float32)`, which converts the scores to fp32 before
//! the softmax (a temporary the size of its output, no op output, so outside
//! `peak_activation_bytes` on both sides). The analytic `Peak::allocator_peak_bytes` adds
//! it where it is live, and the memory pre-check sizes a run by it: a bf16 run sized
//! without it was killed by the kernel for want of memory instead of being refused.
//!
//! A prefill's high-water mark, as libtorch's CPU allocator reported it during the forward,
//! must be the modelled one: to the byte in bf16 and fp16, and in fp32 but for the wrapped
//! scalar no op list names (the scores' scale, `/ sqrt(d)` or `* softmax_scale`: at most 12
//! bytes), for the multi-head and both MLA forms, at these widths (at other small widths the
//! CPU's reduced-precision GEMMs may add kernel scratch of their own, up to about 1 MiB).
//! A decode step's reduced-precision matrix-vector products allocate scratch inside their
//! kernels (not modelled, docs/memory.md): there the model is a lower bound.

use modelmeter::layers::{AttentionImpl, LayerId};
use modelmeter::{Dtype, MlaForm, ModelConfig, Phase, Platform, Workload};
use modelmeter_reference::harness::run_layer;
use modelmeter_reference::Setup;
use modelmeter_verify::pairing::Pairing;
use serde_json::json;
use tch::Device;

fn config(mla: bool) -> ModelConfig {
    let mut c = json!({
        "model_type": "deepseek_v2",
        "hidden_size": 16,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 8,
        "moe_intermediate_size": 4,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 1,
        "vocab_size": 100,
        "torch_dtype": "bfloat16",
    });
    if mla {
        for (key, value) in [
            ("use_mla", json!(true)),
            ("num_key_value_heads", json!(2)),
            ("kv_lora_rank", json!(8)),
            ("qk_nope_head_dim", json!(8)),
            ("qk_rope_head_dim", json!(4)),
            ("v_head_dim", json!(8)),
        ] {
            c[key] = value;
        }
    }
    ModelConfig::from_json_value("small", &c).unwrap()
}

#[test]
fn the_allocator_peak_of_an_eager_attention_is_the_modelled_one() {
    let setup = Setup {
        device: Device::Cpu,
        seed: 5,
    };
    let p = Pairing {
        layer: LayerId::Attention,
    };
    let mut converted = 0;
    for (mla, form) in [
        (false, MlaForm::Naive),
        (true, MlaForm::Naive),
        (true, MlaForm::Absorb),
    ] {
        let config = config(mla);
        for dtype in [Dtype::Bf16, Dtype::F16, Dtype::F32] {
            for workload in [
                Workload::prefill(3, 256).unwrap(),
                Workload::decode(2, 300).unwrap(),
            ] {
                let w = workload
                    .with_dtype(dtype)
                    .unwrap()
                    .on(Platform::Cpu)
                    .with_mla(form);
                let what = format!("mla {mla} {form:?} {dtype} {:?}", w.phase);
                let module = p.module(&config).unwrap();
                let run = run_layer(module, &config, &w, AttentionImpl::Eager, &setup).unwrap();
                let cost = p
                    .analytic(&config, &w, AttentionImpl::Eager)
                    .unwrap()
                    .cost()
                    .unwrap();
                assert_eq!(
                    run.output_peak_live_bytes, cost.peak.peak_bytes,
                    "{what}: op outputs"
                );
                let (allocator, modelled) = (
                    run.allocations.peak_live_bytes,
                    cost.peak.allocator_peak_bytes,
                );
                let prefill = matches!(w.phase, Phase::Prefill { .. });
                converted += usize::from(prefill && modelled > cost.peak.peak_bytes);
                let scratch = allocator.checked_sub(modelled);
                match w.phase {
                    Phase::Prefill { .. } => assert!(
                        match dtype {
                            Dtype::F32 => scratch.is_some_and(|s| s <= 12),
                            _ => scratch == Some(0),
                        },
                        "{what}: the allocator's peak {allocator}, modelled {modelled}"
                    ),
                    Phase::Decode { .. } => assert!(
                        scratch.is_some(),
                        "{what}: the allocator's peak {allocator} under the modelled {modelled}"
                    ),
                }
            }
        }
    }
    // In every bf16 and fp16 prefill the converted scores are part of the peak.
    assert_eq!(converted, 3 * 2);
}
