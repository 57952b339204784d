//! The analytic CUDA byte model against what an NVIDIA H200 measured: `io_bytes` and
//! `activation_bytes` (the caching allocator's blocks, with `expandable_segments:True`)
//! of every layer whose analytic side needs no routing, recorded by `verify-decoder` on
//! 2026-11-28 (docs/results/2026-11-28-h200) for four named runs and the 40 cases of
//! `--sweep 40 --seed 1 --dtype bf16` (each with the config, attention and MLA form the
//! generator drew then, kept in the fixture: the generator may change). CI has no GPU; this replays the GPU's numbers
//! against today's analytic layers, so a change to a CUDA rule (a kernel's side outputs,
//! a copy, a block rounding) that the GPU contradicts fails here, not only on the next
//! GPU run.
//!
//! Since 2026-11-29 the YaRN ramp of MLA configs is built on the host as the vendor
//! builds it (`yarn_ramp_moved`): the recorded rows of the 16 layers that have it are
//! compared after exactly that move, until the next GPU run re-records them. Likewise the
//! naive MLA form's `key_states[..., d_n:] = k_pe` reads `k_pe` expanded to every head, as
//! Python's setitem dispatches it (`k_pe_expanded`; the recording's reference copied it
//! unexpanded): 20 layers.
//!
//! The recording predates the fixes it drove (the fused kernels' side outputs, the math
//! path's mask and `where`, flash's sliced output, the `.cpu()` copy). For
//! `activation_bytes` it is the GPU's word, not ours: the caching allocator's blocks. For
//! `io_bytes` it is a regression lock only: the recorded figure is the counter's, costed
//! from the ops the GPU really ran (their shapes, dtypes and aliasing) but by the same
//! `OpConvention::io_bytes` rule the analytic side uses, so a byte rule wrong at
//! recording time passes here too (the DRAM/L2 hardware counters are its outside check).

use modelmeter::layers::AttentionImpl;
use modelmeter::{Dtype, MlaForm, ModelConfig, Platform, Workload};
use modelmeter_verify::pairing::REGISTRY;
use serde_json::Value;

mod common;
use common::row;

const FIXTURE: &str = include_str!("fixtures/h200-2026-11-28-bytes.json");

fn workload_of(v: &Value) -> Workload {
    let dtype = Dtype::parse_model("dtype", v["dtype"].as_str().unwrap()).unwrap();
    let batch = v["batch"].as_u64().unwrap();
    let w = match v["phase"].as_str().unwrap() {
        "prefill" => Workload::prefill(batch, v["seq_len"].as_u64().unwrap()),
        _ => Workload::decode(batch, v["context_len"].as_u64().unwrap()),
    };
    let mla = match v["mla"].as_str() {
        Some("absorb") => MlaForm::Absorb,
        Some("naive") | None => MlaForm::Naive,
        Some(other) => panic!("unknown MLA form {other}"),
    };
    w.unwrap()
        .with_dtype(dtype)
        .unwrap()
        .on(Platform::Cuda)
        .with_mla(mla)
}

fn attention_of(v: &Value) -> AttentionImpl {
    match v.as_str().unwrap() {
        "eager" => AttentionImpl::Eager,
        "sdpa" => AttentionImpl::Sdpa,
        other => panic!("unknown attention {other}"),
    }
}

/// The YaRN ramp's move, for a layer of an MLA config with YaRN scaling recorded before
/// 2026-11-29: the reference then built `yarn_linear_ramp_mask` on the GPU, where the
/// vendor's `torch.arange(dim)` (no device) builds it on the host and copies it over
/// (`.to(device=device)`). Today's model has that copy (+2 × the ramp's d_r/2 fp32 bytes
/// moved) and no device blocks for the four host ops (−4 blocks, +1 for the copy). Returns
/// what the recorded (io_bytes, activation_bytes) become under today's op list; `None`
/// for a layer without the YaRN rotary. Re-recorded by the next GPU run (device-check
/// runs DeepSeek-V2-Lite), which retires this.
fn yarn_ramp_moved(config: &ModelConfig, cost: &modelmeter::Cost) -> Option<(i64, i64)> {
    let has_ramp = cost.ops().iter().any(|o| o.name == "ramp.to(device)");
    let d_r = config.mla.as_ref()?.qk_rope_head_dim;
    (has_ramp && config.rope_scaling.is_some()).then(|| {
        let ramp = d_r / 2 * 4;
        let block = modelmeter::allocator::cuda_round_size(ramp, 0).unwrap();
        (2 * ramp as i64, -3 * block as i64)
    })
}

/// The `key_states[..., d_n:] = k_pe` copy of a naive MLA layer recorded before
/// 2026-11-29: the reference then copied `k_pe` [B, 1, S, d_r] as it was, where Python's
/// setitem expands it to the slot [B, H, S, d_r] first, so `copy_` reads H times its
/// bytes. Returns the bytes today's op list reads more (`None` without that copy):
/// (H − 1)/H of the slot. Re-recorded by the next GPU run, which retires this.
fn k_pe_expanded(config: &ModelConfig, cost: &modelmeter::Cost) -> Option<i64> {
    let copy = cost
        .ops()
        .into_iter()
        .find(|o| o.name == "key_states[..., d_n:] = k_pe")?;
    // copy_ reads the expanded source and writes the slot: twice the slot's bytes.
    let slot = copy.metrics.io_bytes / 2;
    let heads = config.num_attention_heads;
    Some((slot - slot / heads) as i64)
}

/// Compares every recorded layer of one run; returns the mismatches.
fn compare(
    what: &str,
    config: &ModelConfig,
    workload: &Workload,
    attention: AttentionImpl,
    layers: &Value,
    adjusted: &mut [usize; 2],
) -> (usize, Vec<String>) {
    let mut checked = 0;
    let mut wrong = Vec::new();
    for p in REGISTRY {
        let name = p.name_for(config, workload.mla, attention);
        let Some(measured) = layers.get(name) else {
            continue;
        };
        let cost = p
            .analytic(config, workload, attention)
            .unwrap()
            .cost()
            .unwrap();
        let moved = yarn_ramp_moved(config, &cost);
        if moved.is_some() {
            adjusted[0] += 1;
        }
        let (mut io_moved, blocks_moved) = moved.unwrap_or((0, 0));
        // One head: nothing to expand, nothing moved.
        if let Some(expanded) = k_pe_expanded(config, &cost).filter(|&e| e > 0) {
            adjusted[1] += 1;
            io_moved += expanded;
        }
        for (metric, analytic, delta) in [
            ("io_bytes", cost.metrics.io_bytes, io_moved),
            ("activation_bytes", cost.cuda_activation_bytes, blocks_moved),
        ] {
            checked += 1;
            let h200 = measured[metric]
                .as_u64()
                .unwrap()
                .checked_add_signed(delta)
                .unwrap();
            if analytic != h200 {
                wrong.push(format!(
                    "{what} {name} {metric}: analytic {analytic}, H200 {h200} ({:+})",
                    h200 as i64 - analytic as i64
                ));
            }
        }
    }
    (checked, wrong)
}

#[test]
fn the_analytic_cuda_bytes_equal_what_an_h200_measured() {
    let fixture: Value = serde_json::from_str(FIXTURE).unwrap();
    let (mut checked, mut wrong, mut adjusted) = (0, Vec::new(), [0, 0]);
    for run in fixture["runs"].as_array().unwrap() {
        let config = ModelConfig::builtin(run["config"].as_str().unwrap())
            .unwrap()
            .unwrap();
        let workload = workload_of(&run["workload"]);
        let attention = attention_of(&run["attention"]);
        let (n, w) = compare(
            &format!("{} {:?}", run["config"], workload.phase),
            &config,
            &workload,
            attention,
            &run["layers"],
            &mut adjusted,
        );
        checked += n;
        wrong.extend(w);
    }
    for case in fixture["sweep"]["cases"].as_array().unwrap() {
        let index = case["index"].as_u64().unwrap();
        let what = format!("sweep case {index}");
        let config = ModelConfig::from_json_value(&what, &case["config"]).unwrap();
        let (n, w) = compare(
            &what,
            &config,
            &workload_of(&case["workload"]),
            attention_of(&case["attention"]),
            &case["layers"],
            &mut adjusted,
        );
        checked += n;
        wrong.extend(w);
    }
    assert!(checked > 400, "only {checked} rows compared");
    // Only layers with the YaRN rotary are adjusted for its move to the host: the named
    // DeepSeek-V2-Lite runs' MLA attention and dense decoder layers and the sweep's YaRN
    // cases, 16 in all (the 32 rows that differed from the recording by exactly the move).
    assert_eq!(adjusted[0], 16, "layers adjusted for the YaRN ramp's move");
    // Naive MLA layers (attention and dense decoder layer) of the named V2-Lite decode run
    // and of 9 sweep cases: each differed from the recording by exactly the expansion.
    assert_eq!(adjusted[1], 20, "layers adjusted for k_pe's expansion");
    assert!(
        wrong.is_empty(),
        "{} of {checked} rows differ from the H200:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// The MoE at the default workload in bf16 on the H200 (run-6, `--hardware-counters` with
/// kernel replay: docs/results/2026-11-28-h200/run-6/hw-kernel-bf16-moe.json), costed under
/// the routing that run measured: its caching-allocator blocks and their peak are the
/// GPU's word (the recorded `measured`), which only a GPU witnesses — e.g. that
/// `tokens_per_expert`'s device tensor is freed once `.cpu()` has copied it (on the CPU
/// there is no copy to free).
#[test]
fn the_moe_under_the_h200_routing_allocates_what_the_h200_measured() {
    let run: Value = serde_json::from_str(include_str!(
        "../../docs/results/2026-11-28-h200/run-6/hw-kernel-bf16-moe.json"
    ))
    .unwrap();
    let layer = &run["layers"][0];
    assert_eq!(layer["name"], "DeepseekV2MoE");
    assert_eq!(run["workload"]["platform"], "cuda");
    let rows: Vec<u64> = layer["tokens_per_expert"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_u64().unwrap())
        .filter(|&n| n > 0)
        .collect();
    assert_eq!(rows.iter().sum::<u64>(), 512 * 6, "N·k rows");
    let workload = workload_of(&run["workload"]).with_expert_rows(rows);
    let moe = REGISTRY
        .iter()
        .find(|p| p.layer == modelmeter::layers::LayerId::MoE)
        .unwrap();
    let cost = moe
        .analytic(&ModelConfig::deepseek_ocr(), &workload, AttentionImpl::Sdpa)
        .unwrap()
        .cost()
        .unwrap();
    let measured = |metric: &str| row(layer, metric)["measured"].as_u64().unwrap();
    assert_eq!(cost.cuda_activation_bytes, measured("activation_bytes"));
    assert_eq!(
        cost.peak_on(true).peak_bytes,
        measured("peak_activation_bytes")
    );
}
