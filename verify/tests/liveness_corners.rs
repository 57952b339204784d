//! Workloads where one liveness, gather or routing rule of the analytic layers decides a
//! row, each verified at tolerance 0 against libtorch's measurement on the CPU (its
//! allocator's tensors, its op records): a mutation review of the analytic core found
//! each rule changeable without any root-crate test noticing, and this is where the
//! measured side tells them apart. Each case runs only the layers it is about.

use modelmeter::layers::{AttentionImpl, LayerId};
use modelmeter::{Dtype, MlaForm, ModelConfig, Phase, Platform, TopkMethod, Workload};
use modelmeter_verify::compare::Status;
use modelmeter_verify::hooks::TestHooks;
use modelmeter_verify::plan::{applicable_layers, Plan};
use modelmeter_verify::runner;

/// One case: what it pins, the config, the layers, the workload and the attention.
struct Case {
    what: &'static str,
    config: ModelConfig,
    layers: &'static [LayerId],
    batch: u64,
    phase: Phase,
    dtype: Dtype,
    attention: AttentionImpl,
    mla: MlaForm,
}

fn ocr() -> ModelConfig {
    ModelConfig::deepseek_ocr()
}

fn builtin(name: &str) -> ModelConfig {
    ModelConfig::builtin(name).unwrap().unwrap()
}

/// The rows of `case` that fail or could not be checked, named.
fn failures(case: &Case) -> Vec<String> {
    let workload = Workload::new(case.batch, case.phase, case.dtype)
        .unwrap()
        .on(Platform::Cpu)
        .with_mla(case.mla);
    let layers: Vec<_> = applicable_layers(&case.config)
        .into_iter()
        .filter(|p| case.layers.contains(&p.layer))
        .collect();
    assert_eq!(layers.len(), case.layers.len(), "{}: layers", case.what);
    let plan = Plan {
        layers,
        config: case.config.clone(),
        workload: workload.clone(),
        attention: case.attention,
        device: tch::Device::Cpu,
        tolerance: 0.0,
        seed: 0,
        hooks: TestHooks::default(),
    };
    let mut bad = Vec::new();
    for layer in runner::verify(&plan, &mut |_| {}) {
        if layer.status == Status::Error {
            bad.push(format!("{}: {}: {:?}", case.what, layer.name, layer.error));
        }
        for r in &layer.metrics {
            if matches!(r.status, Status::Fail | Status::Error) {
                bad.push(format!(
                    "{} ({}): {} {:?}: analytic {} vs measured {}",
                    case.what,
                    workload.describe(),
                    layer.name,
                    r.metric,
                    r.analytic,
                    r.measured
                ));
            }
        }
    }
    bad
}

#[test]
fn rules_the_root_crate_cannot_tell_apart_agree_with_libtorch() {
    let mut cases = Vec::new();
    let prefill = |seq_len| Phase::Prefill { seq_len };
    let decode = |context_len| Phase::Decode { context_len };
    let plain = |what, config, layers, batch, phase, dtype, attention| Case {
        what,
        config,
        layers,
        batch,
        phase,
        dtype,
        attention,
        mla: MlaForm::Naive,
    };
    // Gate: group-limited routing with one group (no group is dropped, but the ops run);
    // a bf16 gate's fp32 weight copy, released before the scores' softmax; the
    // group mask's inverse, released after the masked_fill.
    let mut one_group = ocr();
    let moe = one_group.moe.as_mut().unwrap();
    moe.routing.topk_method = TopkMethod::GroupLimitedGreedy;
    (moe.routing.n_group, moe.routing.topk_group) = (1, 1);
    cases.push(plain(
        "group_limited_greedy, one group",
        one_group,
        &[LayerId::MoEGate],
        1,
        prefill(4),
        Dtype::F32,
        AttentionImpl::Sdpa,
    ));
    let mut wide_gate = ocr();
    (wide_gate.hidden_size, wide_gate.num_attention_heads) = (64, 1);
    (wide_gate.num_key_value_heads, wide_gate.head_dim) = (1, 64);
    wide_gate.moe.as_mut().unwrap().n_routed_experts = 256;
    cases.push(plain(
        "bf16 gate, 256 experts",
        wide_gate,
        &[LayerId::MoEGate],
        1,
        prefill(16),
        Dtype::Bf16,
        AttentionImpl::Sdpa,
    ));
    cases.push(plain(
        "DeepSeek-V2's group-limited gate",
        builtin("deepseek-v2"),
        &[LayerId::MoEGate],
        1,
        prefill(4),
        Dtype::F32,
        AttentionImpl::Sdpa,
    ));
    // MoE: one expert per token and four shared experts, so that the routed outputs and
    // the fp32 sum are what is live at the peak; the dense layer's input norm output,
    // released after the attention's projections.
    let mut shared = ocr();
    let moe = shared.moe.as_mut().unwrap();
    (moe.num_experts_per_tok, moe.n_shared_experts) = (1, 4);
    cases.push(plain(
        "one routed expert per token, four shared",
        shared,
        &[LayerId::MoE, LayerId::DecoderMoe],
        1,
        prefill(512),
        Dtype::Bf16,
        AttentionImpl::Sdpa,
    ));
    cases.push(plain(
        "the dense decoder layer in bf16",
        ocr(),
        &[LayerId::DecoderDense],
        1,
        prefill(512),
        Dtype::Bf16,
        AttentionImpl::Sdpa,
    ));
    // Multi-head decode of two sequences over a 16-token cache: which matmul operands
    // fold and which copy, and the step's values released.
    for attention in [AttentionImpl::Eager, AttentionImpl::Sdpa] {
        cases.push(plain(
            "multi-head decode, B = 2",
            ocr(),
            &[LayerId::Attention],
            2,
            decode(16),
            Dtype::Bf16,
            attention,
        ));
    }
    // MLA (DeepSeek-V2-Lite's attention): the de-interleave at d_r = 2 is a view; an
    // eager one-token prefill of two sequences; a decode step's keys released and the
    // flash output's view; the absorbed form's kv_a released.
    let mut narrow = builtin("deepseek-v2-lite");
    narrow.mla.as_mut().unwrap().qk_rope_head_dim = 2;
    cases.push(plain(
        "MLA with d_r = 2",
        narrow,
        &[LayerId::Attention],
        1,
        prefill(8),
        Dtype::F32,
        AttentionImpl::Sdpa,
    ));
    cases.push(plain(
        "MLA eager, one token, B = 2",
        builtin("deepseek-v2-lite"),
        &[LayerId::Attention],
        2,
        prefill(1),
        Dtype::F32,
        AttentionImpl::Eager,
    ));
    cases.push(plain(
        "MLA decode over 16 tokens",
        builtin("deepseek-v2-lite"),
        &[LayerId::Attention],
        1,
        decode(16),
        Dtype::F32,
        AttentionImpl::Sdpa,
    ));
    cases.push(Case {
        mla: MlaForm::Absorb,
        ..plain(
            "absorbed MLA, B = 2",
            builtin("deepseek-v2-lite"),
            &[LayerId::Attention],
            2,
            prefill(16),
            Dtype::F32,
            AttentionImpl::Eager,
        )
    });
    let failed: Vec<String> = cases.iter().flat_map(failures).collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}
