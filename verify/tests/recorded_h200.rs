//! The analytic CUDA byte model against what an NVIDIA H200 measured: `io_bytes` and
//! `activation_bytes` (the caching allocator's blocks, with `expandable_segments:True`)
//! of every layer whose analytic side needs no routing, recorded by `verify-decoder` on
//! 2026-11-28 (docs/results/2026-11-28-h200) for four named runs and the 40 cases of
//! `--sweep 40 --seed 1 --dtype bf16`. CI has no GPU; this replays the GPU's numbers
//! against today's analytic layers, so a change to a CUDA rule (a kernel's side outputs,
//! a copy, a block rounding) that the GPU contradicts fails here, not only on the next
//! GPU run.
//!
//! The recording predates the fixes it drove (the fused kernels' side outputs, the math
//! path's mask and `where`, flash's sliced output, the `.cpu()` copy). For
//! `activation_bytes` it is the GPU's word, not ours: the caching allocator's blocks. For
//! `io_bytes` it is a regression lock only: the recorded figure is the counter's, costed
//! from the ops the GPU really ran (their shapes, dtypes and aliasing) but by the same
//! `OpConvention::io_bytes` rule the analytic side uses, so a byte rule wrong at
//! recording time passes here too (the DRAM/L2 hardware counters are its outside check).

use modelmeter::layers::AttentionImpl;
use modelmeter::{Dtype, ModelConfig, Platform, Workload};
use modelmeter_verify::pairing::REGISTRY;
use modelmeter_verify::sweep::generate;
use serde_json::Value;

const FIXTURE: &str = include_str!("fixtures/h200-2026-11-28-bytes.json");

fn workload_of(v: &Value) -> Workload {
    let dtype = Dtype::parse_model("dtype", v["dtype"].as_str().unwrap()).unwrap();
    let batch = v["batch"].as_u64().unwrap();
    let w = match v["phase"].as_str().unwrap() {
        "prefill" => Workload::prefill(batch, v["seq_len"].as_u64().unwrap()),
        _ => Workload::decode(batch, v["context_len"].as_u64().unwrap()),
    };
    w.unwrap().with_dtype(dtype).unwrap().on(Platform::Cuda)
}

/// Compares every recorded layer of one run; returns the mismatches.
fn compare(
    what: &str,
    config: &ModelConfig,
    workload: &Workload,
    attention: AttentionImpl,
    layers: &Value,
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
        for (metric, analytic) in [
            ("io_bytes", cost.metrics.io_bytes),
            ("activation_bytes", cost.cuda_activation_bytes),
        ] {
            checked += 1;
            let h200 = measured[metric].as_u64().unwrap();
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
    let (mut checked, mut wrong) = (0, Vec::new());
    for run in fixture["runs"].as_array().unwrap() {
        let config = ModelConfig::builtin(run["config"].as_str().unwrap())
            .unwrap()
            .unwrap();
        let workload = workload_of(&run["workload"]);
        let attention = match run["attention"].as_str().unwrap() {
            "eager" => AttentionImpl::Eager,
            _ => AttentionImpl::Sdpa,
        };
        let (n, w) = compare(
            &format!("{} {:?}", run["config"], workload.phase),
            &config,
            &workload,
            attention,
            &run["layers"],
        );
        checked += n;
        wrong.extend(w);
    }
    let sweep = &fixture["sweep"];
    let base = Workload::prefill(1, 512)
        .unwrap()
        .with_dtype(Dtype::Bf16)
        .unwrap()
        .on(Platform::Cuda);
    for case in sweep["cases"].as_array().unwrap() {
        let index = case["index"].as_u64().unwrap() as usize;
        let generated = generate(sweep["seed"].as_u64().unwrap(), index, &base);
        // The generator still makes the case the GPU ran.
        assert_eq!(
            generated.workload,
            workload_of(&case["workload"]).with_mla(generated.workload.mla),
            "sweep case {index}"
        );
        let (n, w) = compare(
            &format!("sweep case {index}"),
            &generated.config,
            &generated.workload,
            generated.attention,
            &case["layers"],
        );
        checked += n;
        wrong.extend(w);
    }
    assert!(checked > 400, "only {checked} rows compared");
    assert!(
        wrong.is_empty(),
        "{} of {checked} rows differ from the H200:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}
