//! The reference modules on CPU: FLOPs against deepseek-ocr-facts.md, routing,
//! decode, determinism, and op-for-op agreement with the analytic layers.

use modelmeter::layers::AttentionImpl;
use modelmeter::{Dtype, ModelConfig, Platform, Workload};
use modelmeter_reference::harness::{run_layer, LayerKind, LayerRun};
use modelmeter_reference::Setup;
use tch::Device;

fn setup(seed: u64) -> Setup {
    Setup {
        device: Device::Cpu,
        dtype: Dtype::F32,
        seed,
    }
}

fn run(kind: LayerKind, workload: &Workload, attention: AttentionImpl, seed: u64) -> LayerRun {
    let run = run_layer(
        kind,
        &ModelConfig::deepseek_ocr(),
        workload,
        attention,
        &setup(seed),
    )
    .unwrap();
    assert!(
        run.counts.is_complete(),
        "{}: unknown ops {:?}, errors {:?}",
        run.name,
        run.counts.unknown_ops,
        run.counts.errors
    );
    run
}

/// Measured (counted ops) and analytic (op leaves) must be the same multiset of
/// (op, matmul FLOPs, elementwise FLOPs): agreement op for op, not only in total.
fn assert_same_ops(run: &LayerRun, workload: &Workload, attention: AttentionImpl) {
    // The analytic model of what libtorch runs on the CPU (its CPU flash kernel).
    let workload = &workload.on(Platform::Cpu);
    let analytic = run
        .kind
        .analytic(&ModelConfig::deepseek_ocr(), workload, attention)
        .unwrap()
        .cost()
        .unwrap();
    let mut expected: Vec<(String, u64, u64)> = analytic
        .ops()
        .iter()
        .filter(|o| o.metrics.matmul_flops + o.metrics.elementwise_flops > 0)
        .map(|o| {
            (
                o.op.unwrap().to_string(),
                o.metrics.matmul_flops,
                o.metrics.elementwise_flops,
            )
        })
        .collect();
    let mut measured: Vec<(String, u64, u64)> = run
        .counts
        .records
        .iter()
        .map(|r| (r.name.clone(), r.matmul_flops, r.elementwise_flops))
        .collect();
    // Experts: the analytic side has one MLP over N·k rows, the measured one MLP per
    // expert that received tokens; only layers with experts are compared per op name.
    let has_experts = matches!(run.kind, LayerKind::MoE | LayerKind::DecoderMoe);
    let merge = |ops: &mut Vec<(String, u64, u64)>| {
        ops.sort();
        if !has_experts {
            return;
        }
        let mut merged: Vec<(String, u64, u64)> = Vec::new();
        for (name, m, e) in ops.drain(..) {
            match merged.last_mut() {
                Some(last) if last.0 == name => {
                    last.1 += m;
                    last.2 += e;
                }
                _ => merged.push((name, m, e)),
            }
        }
        *ops = merged;
    };
    merge(&mut expected);
    merge(&mut measured);
    assert_eq!(measured, expected, "{}", run.name);
    assert_eq!(
        run.weight_bytes, analytic.metrics.weight_bytes,
        "{} weight bytes",
        run.name
    );
}

#[test]
fn deepseek_ocr_prefill_matches_the_reference_flop_numbers() {
    let w = Workload::prefill(1, 512)
        .unwrap()
        .with_dtype(Dtype::F32)
        .unwrap();
    let rotary = 512 * 128;
    let cpu_sdpa = 1_342_177_280;
    let cases = [
        (LayerKind::RmsNorm, 0, 0, 1_280),
        (LayerKind::Mlp, 26_927_431_680, 26_927_431_680, 26_296_320),
        (LayerKind::MoEGate, 83_886_080, 83_886_080, 81_920),
        (LayerKind::MoE, 28_269_608_960, 28_269_608_960, 227_164_160),
        // CUDA SDPA reads 8,053,063,680; the CPU kernel is invisible to FlopCounterMode.
        (
            LayerKind::Attention,
            8_053_063_680 + rotary,
            8_053_063_680 - cpu_sdpa + rotary,
            6_553_600,
        ),
        (
            LayerKind::DecoderDense,
            34_980_495_360 + rotary,
            34_980_495_360 - cpu_sdpa + rotary,
            32_852_480,
        ),
        (
            LayerKind::DecoderMoe,
            36_322_672_640 + rotary,
            36_322_672_640 - cpu_sdpa + rotary,
            233_720_320,
        ),
    ];
    for (kind, matmul, flop_counter_mode, params) in cases {
        let r = run(kind, &w, AttentionImpl::Sdpa, 0);
        assert_eq!(r.counts.matmul_flops, matmul, "{} matmul", r.name);
        assert_eq!(
            r.counts.flop_counter_mode_flops, flop_counter_mode,
            "{} FlopCounterMode",
            r.name
        );
        assert_eq!(r.weight_bytes, params * 4, "{} fp32 parameters", r.name);
        assert_same_ops(&r, &w, AttentionImpl::Sdpa);
    }
}

#[test]
fn every_layer_agrees_op_for_op_in_bf16_decode_and_eager() {
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
        for kind in LayerKind::ALL {
            let r = run(kind, &w, attention, 3);
            assert_same_ops(&r, &w, attention);
        }
    }
}

#[test]
fn routed_rows_add_up_to_n_times_k_whatever_the_routing() {
    let w = Workload::prefill(2, 48).unwrap();
    let (n, k, h) = (96u64, 6u64, 1280u64);
    let mut routings = Vec::new();
    for seed in [1, 2, 3] {
        let r = run(LayerKind::MoE, &w, AttentionImpl::Sdpa, seed);
        let per_expert = r.tokens_per_expert.clone().unwrap();
        assert_eq!(per_expert.iter().sum::<i64>() as u64, n * k);
        // Rows of the expert up-projections ([rows, h] @ [h, 896]) run by the counter.
        let rows: u64 = r
            .counts
            .records
            .iter()
            .filter(|rec| rec.name == "aten::mm" && rec.shapes[1] == vec![h, 896])
            .map(|rec| rec.shapes[0][0])
            .sum();
        assert_eq!(rows, 2 * n * k, "gate_proj and up_proj each see N·k rows");
        routings.push(per_expert);
    }
    assert_ne!(
        routings[0], routings[1],
        "different seeds route differently"
    );
}

#[test]
fn routing_spreads_tokens_over_most_experts() {
    let w = Workload::prefill(1, 512).unwrap();
    let r = run(LayerKind::MoE, &w, AttentionImpl::Sdpa, 0);
    let used = r
        .tokens_per_expert
        .unwrap()
        .iter()
        .filter(|c| **c > 0)
        .count();
    assert!(used >= 32, "only {used} of 64 experts received tokens");
}

#[test]
fn decode_step_attends_over_context_plus_one() {
    let (b, c) = (2u64, 37u64);
    let w = Workload::decode(b, c).unwrap();
    for attention in [AttentionImpl::Sdpa, AttentionImpl::Eager] {
        let r = run(LayerKind::Attention, &w, attention, 0);
        let core: u64 = r
            .counts
            .records
            .iter()
            .filter(|rec| {
                rec.name.contains("attention")
                    || (rec.name == "aten::bmm" && rec.shapes[0][0] == b * 10)
            })
            .map(|rec| rec.matmul_flops)
            .sum();
        assert_eq!(core, 4 * b * 10 * (c + 1) * 128, "{attention:?}");
        assert_eq!(r.output.size(), vec![b as i64, 1, 1280]);
    }
}

#[test]
fn same_seed_same_outputs_other_seed_same_counts() {
    let w = Workload::prefill(1, 16).unwrap();
    for kind in LayerKind::ALL {
        let a = run(kind, &w, AttentionImpl::Sdpa, 5);
        let b = run(kind, &w, AttentionImpl::Sdpa, 5);
        let c = run(kind, &w, AttentionImpl::Sdpa, 6);
        assert!(a.output.equal(&b.output), "{} same seed", a.name);
        assert_eq!(a.counts, b.counts, "{} same seed", a.name);
        assert!(
            !a.output.equal(&c.output),
            "{} other seed, other values",
            a.name
        );
        assert_eq!(a.counts.matmul_flops, c.counts.matmul_flops, "{}", a.name);
        assert_eq!(
            a.counts.elementwise_flops, c.counts.elementwise_flops,
            "{}",
            a.name
        );
        assert_eq!(
            a.counts.tensor_core_flops, c.counts.tensor_core_flops,
            "{}",
            a.name
        );
    }
}
