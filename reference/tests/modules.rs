//! The reference modules on CPU: FLOPs against docs/deepseek-ocr.md, routing, decode
//! and determinism. (Their op-for-op agreement with the analytic layers is verify's
//! business: verify/tests/op_for_op.rs.)

use modelmeter::layers::AttentionImpl;
use modelmeter::{Dtype, ModelConfig, Workload};
use modelmeter_reference::harness::{run_layer, LayerRun, ModuleKind};
use modelmeter_reference::Setup;
use tch::Device;

/// Every module of the DeepSeek-OCR config (layer 0 is dense, layer 1 MoE).
const ALL: [ModuleKind; 7] = [
    ModuleKind::Mlp,
    ModuleKind::MoEGate,
    ModuleKind::MoE,
    ModuleKind::RmsNorm,
    ModuleKind::DecoderLayer(0),
    ModuleKind::DecoderLayer(1),
    ModuleKind::Attention,
];

fn setup(seed: u64) -> Setup {
    Setup {
        device: Device::Cpu,
        seed,
    }
}

fn run(kind: ModuleKind, workload: &Workload, attention: AttentionImpl, seed: u64) -> LayerRun {
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

#[test]
fn deepseek_ocr_prefill_matches_the_reference_flop_numbers() {
    let w = Workload::prefill(1, 512)
        .unwrap()
        .with_dtype(Dtype::F32)
        .unwrap();
    let rotary = 512 * 128;
    let cpu_sdpa = 1_342_177_280;
    let cases = [
        (ModuleKind::RmsNorm, 0, 0, 1_280),
        (ModuleKind::Mlp, 26_927_431_680, 26_927_431_680, 26_296_320),
        (ModuleKind::MoEGate, 83_886_080, 83_886_080, 81_920),
        (ModuleKind::MoE, 28_269_608_960, 28_269_608_960, 227_164_160),
        // CUDA SDPA reads 8,053,063,680; the CPU kernel is invisible to FlopCounterMode.
        (
            ModuleKind::Attention,
            8_053_063_680 + rotary,
            8_053_063_680 - cpu_sdpa + rotary,
            6_553_600,
        ),
        (
            ModuleKind::DecoderLayer(0),
            34_980_495_360 + rotary,
            34_980_495_360 - cpu_sdpa + rotary,
            32_852_480,
        ),
        (
            ModuleKind::DecoderLayer(1),
            36_322_672_640 + rotary,
            36_322_672_640 - cpu_sdpa + rotary,
            233_720_320,
        ),
    ];
    for (kind, matmul, flop_counter_mode, params) in cases {
        let r = run(kind, &w, AttentionImpl::Sdpa, 0);
        assert_eq!(r.counts.flops.matmul_flops, matmul, "{} matmul", r.name);
        assert_eq!(
            r.counts.flops.flop_counter_mode_flops, flop_counter_mode,
            "{} FlopCounterMode",
            r.name
        );
        assert_eq!(r.weight_bytes, params * 4, "{} fp32 parameters", r.name);
    }
}

#[test]
fn routed_rows_add_up_to_n_times_k_whatever_the_routing() {
    let w = Workload::prefill(2, 48).unwrap();
    let (n, k, h) = (96u64, 6u64, 1280u64);
    let mut routings = Vec::new();
    for seed in [1, 2, 3] {
        let r = run(ModuleKind::MoE, &w, AttentionImpl::Sdpa, seed);
        let per_expert = r.tokens_per_expert.clone().unwrap();
        // Sanity check only: the counts are a scatter of the N·k top-k indices, so their
        // sum is N·k by construction. The checks below are the real ones.
        assert_eq!(per_expert.iter().sum::<i64>() as u64, n * k);
        // Rows of the expert up-projections ([rows, h] @ [h, 896]) run by the counter.
        let mut expert_rows: Vec<u64> = r
            .counts
            .records
            .iter()
            .filter(|rec| rec.name == "aten::mm" && rec.shapes[1] == vec![h, 896])
            .map(|rec| rec.shapes[0][0])
            .collect();
        let rows: u64 = expert_rows.iter().sum();
        assert_eq!(rows, 2 * n * k, "gate_proj and up_proj each see N·k rows");
        // Each routed expert (idle ones are skipped) runs gate_proj and up_proj on
        // exactly the tokens routed to it.
        expert_rows.sort_unstable();
        let mut want: Vec<u64> = per_expert
            .iter()
            .filter(|&&c| c > 0)
            .flat_map(|&c| [c as u64, c as u64])
            .collect();
        want.sort_unstable();
        assert_eq!(expert_rows, want, "per-expert rows follow the routing");
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
    let r = run(ModuleKind::MoE, &w, AttentionImpl::Sdpa, 0);
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
        let r = run(ModuleKind::Attention, &w, attention, 0);
        let core: u64 = r
            .counts
            .records
            .iter()
            .filter(|rec| {
                rec.name.contains("attention")
                    || (rec.name == "aten::bmm" && rec.shapes[0][0] == b * 10)
            })
            .map(|rec| rec.flops.matmul_flops)
            .sum();
        assert_eq!(core, 4 * b * 10 * (c + 1) * 128, "{attention:?}");
        assert_eq!(r.output.size(), vec![b as i64, 1, 1280]);
    }
}

#[test]
fn same_seed_same_outputs_other_seed_same_counts() {
    let w = Workload::prefill(1, 16).unwrap();
    for kind in ALL {
        let a = run(kind, &w, AttentionImpl::Sdpa, 5);
        let b = run(kind, &w, AttentionImpl::Sdpa, 5);
        let c = run(kind, &w, AttentionImpl::Sdpa, 6);
        assert!(a.output.equal(&b.output), "{} same seed", a.name);
        // Everything but where the allocator put the outputs (which differs run to run).
        let (mut ca, mut cb) = (a.counts.clone(), b.counts.clone());
        assert_eq!(ca.output_blocks.len(), cb.output_blocks.len());
        (ca.output_blocks, cb.output_blocks) = (Vec::new(), Vec::new());
        assert_eq!(ca, cb, "{} same seed", a.name);
        assert!(
            !a.output.equal(&c.output),
            "{} other seed, other values",
            a.name
        );
        assert_eq!(
            a.counts.flops.matmul_flops, c.counts.flops.matmul_flops,
            "{}",
            a.name
        );
        assert_eq!(
            a.counts.flops.elementwise_flops, c.counts.flops.elementwise_flops,
            "{}",
            a.name
        );
        assert_eq!(
            a.counts.flops.tensor_core_flops, c.counts.flops.tensor_core_flops,
            "{}",
            a.name
        );
    }
}
