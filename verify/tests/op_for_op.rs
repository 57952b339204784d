//! The join, op for op, on the CPU (DeepSeek-OCR's MHA layers, and MLA with V2/V3
//! routing in `mla_and_v3_routing_…`): for every pairing of the registry, the ops the
//! reference module really dispatched and the op leaves of its analytic layer are the
//! same multiset of (op, matmul FLOPs, elementwise FLOPs) (the routed experts' ops as
//! totals per op name, every other op one for one), they move the same bytes per op name,
//! and the weights agree to the byte. Also: the workload is the one source of the dtype and the TF32 setting.

use modelmeter::layers::AttentionImpl;
use modelmeter::{Dtype, ModelConfig, Platform, Workload};
use modelmeter_reference::harness::{run_layer, LayerRun};
use modelmeter_reference::Setup;
use modelmeter_verify::pairing::{Pairing, REGISTRY};

mod common;
use common::{analytic_ops, measured_ops, OpFlops};
use tch::{Device, Kind};

const SETUP: Setup = Setup {
    device: Device::Cpu,
    seed: 3,
};

fn run(p: Pairing, config: &ModelConfig, w: &Workload, attention: AttentionImpl) -> LayerRun {
    let module = p.module(config).unwrap();
    let run = run_layer(module, config, w, attention, &SETUP).unwrap();
    assert!(
        run.counts.is_complete(),
        "{}: unknown ops {:?}, errors {:?}",
        run.name,
        run.counts.unknown_ops,
        run.counts.errors
    );
    run
}

/// The attention's pairing (its reference module and analytic layer).
fn attention_pairing() -> Pairing {
    REGISTRY
        .into_iter()
        .find(|p| p.layer == modelmeter::layers::LayerId::Attention)
        .unwrap()
}

/// `ops` merged by op name (sorted): the routed experts' side, where the analytic layer
/// has one MLP over N·k rows and the measured module one MLP per expert that received
/// tokens, so only their totals per op can agree.
fn merged_by_name(mut ops: Vec<OpFlops>) -> Vec<OpFlops> {
    ops.sort();
    let mut merged: Vec<OpFlops> = Vec::new();
    for (name, m, e) in ops {
        match merged.last_mut() {
            Some(last) if last.0 == name => {
                last.1 += m;
                last.2 += e;
            }
            _ => merged.push((name, m, e)),
        }
    }
    merged
}

/// The op leaves under every routed-experts node of `cost`.
fn expert_leaves(cost: &modelmeter::Cost) -> Vec<&modelmeter::Cost> {
    if cost.name == modelmeter::layers::ROUTED_EXPERTS_ROLE {
        return cost.ops();
    }
    cost.children.iter().flat_map(expert_leaves).collect()
}

/// `all` less one occurrence of each of `some` (a multiset difference); panics when
/// `some` holds an op `all` lacks.
fn without(mut all: Vec<OpFlops>, some: &[OpFlops], what: &str) -> Vec<OpFlops> {
    for op in some {
        let i = all
            .iter()
            .position(|o| o == op)
            .unwrap_or_else(|| panic!("{what}: {op:?} is not among the ops that ran"));
        all.swap_remove(i);
    }
    all
}

fn assert_same_ops(p: Pairing, config: &ModelConfig, w: &Workload, attention: AttentionImpl) {
    // The analytic model of what libtorch runs on the CPU (its CPU flash kernel).
    let w = &w.clone().on(Platform::Cpu);
    let run = run(p, config, w, attention);
    // Routing decides how many experts read their weights: cost the measured routing.
    let w = &run.routed(w);
    let analytic = p.analytic(config, w, attention).unwrap().cost().unwrap();
    assert_run_matches(p, &run, &analytic, config, attention);
}

/// The op lists of `run` and `analytic` agree op for op, in bytes per op name, and in
/// weights and KV cache.
fn assert_run_matches(
    p: Pairing,
    run: &LayerRun,
    analytic: &modelmeter::Cost,
    config: &ModelConfig,
    attention: AttentionImpl,
) {
    let name = p.name(attention);
    let all = analytic_ops(&analytic.ops());
    let measured = measured_ops(&run.counts.records);
    // Every op outside the routed experts matches one op that ran, FLOP for FLOP (the
    // attention's projections, the gate, the shared experts, each on its own); only the
    // experts' ops are compared as totals per op name.
    let experts = analytic_ops(&expert_leaves(analytic));
    assert_eq!(
        experts.is_empty(),
        !run.kind.has_experts(config),
        "{name}: routed experts in the analytic tree"
    );
    let outside = without(all, &experts, name);
    let routed = without(measured, &outside, name);
    assert_eq!(
        merged_by_name(routed),
        merged_by_name(experts),
        "{name}: the routed experts' ops"
    );
    // Bytes moved, op by op (summed per op name).
    let mut analytic_io: std::collections::BTreeMap<String, u64> = Default::default();
    for o in analytic.ops() {
        *analytic_io.entry(o.op.unwrap().to_string()).or_default() += o.metrics.io_bytes;
    }
    analytic_io.retain(|_, b| *b > 0);
    let mut measured_io = run.counts.io_bytes_by_op.clone();
    measured_io.retain(|_, b| *b > 0);
    assert_eq!(
        measured_io,
        analytic_io,
        "{} io bytes by op",
        p.name(attention)
    );
    assert_eq!(
        run.weight_bytes,
        analytic.metrics.weight_bytes,
        "{} weight bytes",
        p.name(attention)
    );
    assert_eq!(
        run.kv_cache_bytes,
        analytic.metrics.kv_cache_bytes,
        "{} KV cache bytes",
        p.name(attention)
    );
}

#[test]
fn the_math_path_cuda_falls_back_to_agrees_op_for_op_when_the_cpu_runs_it() {
    // fp32 with head dim 6: no fused CUDA kernel takes it, so CUDA runs
    // `_scaled_dot_product_attention_math` op by op (seen on an H200). The CPU runs the
    // same composite when asked, so the analytic CUDA math path is checked here: grouped
    // and single KV heads, one head, B = 1 and 2 (whether the heads fold into a bmm as
    // views: a size-1 head or key dim constrains no stride), prefill (the causal mask),
    // a one-token prefill and decode.
    use modelmeter::layers::SdpaKernel;
    use modelmeter_reference::attention::with_math_sdpa;
    let attention = attention_pairing();
    for (heads, kv_heads) in [(4, 2), (4, 4), (3, 1), (1, 1)] {
        let mut config = ModelConfig::deepseek_ocr();
        config.head_dim = 6;
        config.num_attention_heads = heads;
        config.num_key_value_heads = kv_heads;
        for w in [
            Workload::prefill(1, 9).unwrap(),
            Workload::prefill(2, 7).unwrap(),
            Workload::prefill(2, 1).unwrap(),
            Workload::decode(2, 5).unwrap(),
        ] {
            let w = w.with_dtype(Dtype::F32).unwrap();
            let key_len = w.key_len().unwrap();
            assert_eq!(
                SdpaKernel::select(Platform::Cuda, Dtype::F32, 6, key_len),
                SdpaKernel::Math
            );
            let measured = w.clone().on(Platform::Cpu);
            let run = with_math_sdpa(|| run(attention, &config, &measured, AttentionImpl::Sdpa));
            let analytic = attention
                .analytic(&config, &w.clone().on(Platform::Cuda), AttentionImpl::Sdpa)
                .unwrap()
                .cost()
                .unwrap();
            assert_run_matches(attention, &run, &analytic, &config, AttentionImpl::Sdpa);
            assert_eq!(
                run.output_allocated_bytes, analytic.metrics.activation_bytes,
                "H {heads}, KV {kv_heads}: activation bytes"
            );
            // The composite's temporaries go where libtorch's C++ drops them.
            assert_eq!(
                run.output_peak_live_bytes,
                analytic.peak.peak_bytes,
                "H {heads}, KV {kv_heads}, {}: peak activation bytes",
                w.describe()
            );
        }
    }
}

#[test]
fn the_kv_cache_held_after_a_decode_step_is_measured_to_the_byte() {
    // bf16, B = 2, 11 cached tokens + this step's: keys and values of 10 heads × 128,
    // 2 · 2 · 10 · 12 · 128 · 2 bytes.
    let config = ModelConfig::deepseek_ocr();
    let w = Workload::decode(2, 11).unwrap().on(Platform::Cpu);
    let attention = attention_pairing();
    let r = run(attention, &config, &w, AttentionImpl::Sdpa);
    assert_eq!(r.kv_cache_bytes, 2 * 2 * 10 * 12 * 128 * 2);
    let mlp = run(REGISTRY[0], &config, &w, AttentionImpl::Sdpa);
    assert_eq!(mlp.kv_cache_bytes, 0);
}

#[test]
fn every_pairing_agrees_op_for_op_at_the_default_workload() {
    let config = ModelConfig::deepseek_ocr();
    let w = Workload::prefill(1, 512)
        .unwrap()
        .with_dtype(Dtype::F32)
        .unwrap();
    for p in REGISTRY {
        assert_same_ops(p, &config, &w, AttentionImpl::Sdpa);
    }
}

#[test]
fn every_pairing_agrees_op_for_op_in_bf16_decode_and_eager() {
    let config = ModelConfig::deepseek_ocr();
    for (w, attention) in [
        (Workload::prefill(2, 9).unwrap(), AttentionImpl::Eager),
        (Workload::decode(2, 11).unwrap(), AttentionImpl::Sdpa),
        (
            Workload::decode(1, 5)
                .unwrap()
                .with_dtype(Dtype::F32)
                .unwrap(),
            AttentionImpl::Eager,
        ),
    ] {
        for p in REGISTRY {
            assert_same_ops(p, &config, &w, attention);
        }
    }
}

#[test]
fn the_workload_decides_dtype_and_tf32_and_the_counter_reports_the_switch() {
    // Issue 8's case: a bf16-looking setup with an fp32 + TF32 workload. Setup has no
    // dtype any more, so the module runs in the workload's fp32, libtorch's switch is set
    // from the workload, and both sides book the same tensor-core FLOPs.
    let config = ModelConfig::deepseek_ocr();
    let mlp = REGISTRY[0];
    for tf32 in [true, false] {
        let w = Workload::prefill(1, 16)
            .unwrap()
            .with_dtype(Dtype::F32)
            .unwrap()
            .with_tf32(tf32)
            .on(Platform::Cpu);
        let run = run(mlp, &config, &w, AttentionImpl::Sdpa);
        assert_eq!(run.output.kind(), Kind::Float, "the workload's dtype");
        assert_eq!(run.counts.tf32.matmul, tf32, "the switch the counter saw");
        let analytic = mlp
            .analytic(&config, &w, AttentionImpl::Sdpa)
            .unwrap()
            .metrics()
            .unwrap();
        assert_eq!(
            run.counts.flops.tensor_core_flops,
            analytic.tensor_core_flops
        );
        let mm = 2 * 16 * 1280 * 6848 * 3;
        assert_eq!(analytic.tensor_core_flops, if tf32 { mm } else { 0 });
    }
    // And bf16 from the workload: the module's output is bf16.
    let w = Workload::prefill(1, 4).unwrap().on(Platform::Cpu);
    assert_eq!(
        run(mlp, &config, &w, AttentionImpl::Sdpa).output.kind(),
        Kind::BFloat16
    );
}

/// A built-in MLA config with its MoE narrowed so a layer builds quickly on the CPU:
/// 16 routed experts of width 64 (V3: 8 groups of 2, 4 kept, 4 per token), a dense MLP
/// of width 256. Attention keeps its real dimensions.
fn narrowed(name: &str) -> ModelConfig {
    let mut c = ModelConfig::builtin(name).unwrap().unwrap();
    c.intermediate_size = 256;
    let moe = c.moe.as_mut().unwrap();
    moe.n_routed_experts = 16;
    moe.moe_intermediate_size = 64;
    if moe.routing.n_group > 1 {
        moe.routing.n_group = 8;
        moe.routing.topk_group = 4;
        moe.num_experts_per_tok = 4;
    }
    c
}

#[test]
fn mla_and_v3_routing_agree_op_for_op_naive_and_absorbed() {
    use modelmeter::MlaForm;
    let cases = [
        (
            "deepseek-v2-lite",
            Workload::prefill(2, 9).unwrap(),
            AttentionImpl::Eager,
        ),
        (
            "deepseek-v2-lite",
            Workload::decode(2, 11).unwrap(),
            AttentionImpl::Sdpa,
        ),
        (
            "deepseek-v2-lite",
            Workload::prefill(1, 7)
                .unwrap()
                .with_dtype(Dtype::F32)
                .unwrap(),
            AttentionImpl::Sdpa,
        ),
        (
            "deepseek-v2-lite",
            Workload::prefill(2, 6).unwrap().with_mla(MlaForm::Absorb),
            AttentionImpl::Sdpa,
        ),
        (
            "deepseek-v3",
            Workload::decode(2, 5).unwrap().with_mla(MlaForm::Absorb),
            AttentionImpl::Eager,
        ),
        // One key: the latent einsum contracts a size-1 label, which ATen multiplies
        // instead of calling bmm (found by `--sweep 4000 --seed 1128`).
        (
            "deepseek-v2-lite",
            Workload::prefill(2, 1).unwrap().with_mla(MlaForm::Absorb),
            AttentionImpl::Eager,
        ),
        (
            "deepseek-v3",
            Workload::decode(1, 5).unwrap(),
            AttentionImpl::Eager,
        ),
    ];
    for (name, w, attention) in cases {
        let config = narrowed(name);
        for p in REGISTRY {
            assert_same_ops(p, &config, &w, attention);
        }
    }
    // DeepSeek-V2's group_limited_greedy routing (its attention is V3's, larger).
    let v2 = narrowed("deepseek-v2");
    let w = Workload::prefill(2, 4).unwrap();
    for p in REGISTRY.into_iter().filter(|p| {
        matches!(
            p.layer,
            modelmeter::layers::LayerId::MoEGate | modelmeter::layers::LayerId::MoE
        )
    }) {
        assert_same_ops(p, &v2, &w, AttentionImpl::Sdpa);
    }
}

#[test]
fn the_mla_copies_agree_op_for_op_wherever_the_heads_fold() {
    // Where the naive form copies rather than views, each decided by sizes of 1:
    // - the eager form's `attn_weights @ value_states` copies its values (a slice of
    //   kv_b_proj's `[B, S, H, d_n + d_v]` output) only in a prefill with B, H and S all
    //   above 1 (a decode step's values are the cache's contiguous `cat`);
    // - its `transpose(1, 2).contiguous()` copies only with H and S_q above 1;
    // - the flash form's output merge: values padded to d_qk (d_v < d_qk) fold only
    //   with one row; unpadded ones (d_v = d_qk) with one head or one query; a copy is a
    //   `clone` with H > 1, a `contiguous` with one head;
    // - the absorbed form's `matmul`s copy the expanded query or latent unless B or H
    //   is 1, and at d_r = 2 (where de-interleaving q_pe is a view) its rotated q_pe
    //   too, over more than one query.
    let attention = attention_pairing();
    let lite = narrowed("deepseek-v2-lite");
    let mut one_head = lite.clone();
    one_head.num_attention_heads = 1;
    one_head.num_key_value_heads = 1;
    // d_v = d_qk = 128 + 64: no padding, no slice.
    let mut unpadded = lite.clone();
    unpadded.mla.as_mut().unwrap().v_head_dim = 192;
    let mut unpadded_one_head = one_head.clone();
    unpadded_one_head.mla.as_mut().unwrap().v_head_dim = 192;
    let mut rope_2 = lite.clone();
    rope_2.mla.as_mut().unwrap().qk_rope_head_dim = 2;
    let (eager, sdpa) = (AttentionImpl::Eager, AttentionImpl::Sdpa);
    let absorbed = |w: Workload| w.with_mla(modelmeter::MlaForm::Absorb);
    for (config, w, implementation) in [
        (&lite, Workload::prefill(1, 7).unwrap(), eager),
        (&lite, Workload::prefill(2, 1).unwrap(), eager),
        (&lite, Workload::decode(2, 5).unwrap(), eager),
        (&one_head, Workload::prefill(2, 7).unwrap(), eager),
        (&one_head, Workload::prefill(2, 7).unwrap(), sdpa),
        (&one_head, Workload::decode(1, 5).unwrap(), sdpa),
        (&unpadded, Workload::prefill(2, 7).unwrap(), sdpa),
        (&unpadded, Workload::decode(2, 5).unwrap(), sdpa),
        (&unpadded_one_head, Workload::prefill(2, 7).unwrap(), sdpa),
        (&one_head, absorbed(Workload::prefill(2, 7).unwrap()), eager),
        (&rope_2, absorbed(Workload::prefill(2, 7).unwrap()), eager),
        (&rope_2, absorbed(Workload::decode(2, 5).unwrap()), eager),
    ] {
        assert_same_ops(attention, config, &w, implementation);
    }
}
