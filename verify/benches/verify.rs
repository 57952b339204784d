//! Benchmarks of the verify path (not timed tests): run with `scripts/bench`, or
//! `cargo bench -p modelmeter-verify --bench verify`.
//!
//! Prints, and writes to `target/bench/verify-<unix time>.json` for later comparison:
//! - per layer of the default workload (DeepSeek-OCR, B=1, S=512, fp32 on the CPU, or
//!   `BENCH_DEVICE=cuda:0` with bf16): plain vs counted forward time, interleaved
//!   (median and min–max over `BENCH_ROUNDS`, default 7), their ratio, and the ops the
//!   counter saw and recorded;
//! - analytic evaluations per second: one decoder layer's `metrics()`, the whole stack,
//!   and a 512-token generation;
//! - the whole `verify-decoder` process at the default workload (release build): wall
//!   time and peak resident memory of the child process.

use std::process::Command;
use std::time::{Duration, Instant};

use modelmeter::layers::{AttentionImpl, DeepseekV2Decoder, Generation, Layer, LayerId};
use modelmeter::{Dtype, ModelConfig, Platform, Workload};
use modelmeter_reference::attention::KvCache;
use modelmeter_reference::harness::{measure, Prepared};
use modelmeter_reference::Setup;
use modelmeter_verify::pairing::REGISTRY;
use serde_json::{json, Value};
use tch::Device;

fn median_and_spread(mut samples: Vec<f64>) -> (f64, f64, f64) {
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    let median = if n % 2 == 1 {
        samples[n / 2]
    } else {
        (samples[n / 2 - 1] + samples[n / 2]) / 2.0
    };
    (median, samples[0], samples[n - 1])
}

fn device_and_workload() -> (Device, Workload) {
    let w = Workload::prefill(1, 512).expect("the default workload is valid");
    match std::env::var("BENCH_DEVICE").as_deref() {
        Ok(d) if d.starts_with("cuda") => {
            let index = d.trim_start_matches("cuda").trim_start_matches(':');
            let index = index.parse().unwrap_or(0);
            (Device::Cuda(index), w.on(Platform::Cuda))
        }
        _ => (
            Device::Cpu,
            w.with_dtype(Dtype::F32)
                .expect("fp32 is a model dtype")
                .on(Platform::Cpu),
        ),
    }
}

fn sync(device: Device) {
    modelmeter_reference::ffi::synchronize(device).expect("CUDA synchronises");
}

fn layers(rounds: usize) -> Vec<Value> {
    let config = ModelConfig::deepseek_ocr();
    let (device, workload) = device_and_workload();
    let setup = Setup { device, seed: 0 };
    let mut out = Vec::new();
    println!(
        "per layer, {} on {device:?}, {rounds} interleaved rounds (median, min–max):",
        workload.describe()
    );
    println!(
        "{:<30} {:>22} {:>22} {:>6} {:>7} {:>8}",
        "layer", "plain ms", "counted ms", "ratio", "ops", "counted"
    );
    for p in REGISTRY {
        let name = p.name(AttentionImpl::Sdpa);
        let module = p
            .module(&config)
            .expect("the default config has every layer");
        let build = Instant::now();
        let mut prepared = Prepared::new(module, &config, &workload, AttentionImpl::Sdpa, &setup)
            .expect("the reference module builds");
        let build_ms = build.elapsed().as_secs_f64() * 1e3;
        let _no_grad = tch::no_grad_guard();
        let mut forward = |counted: bool| -> (f64, usize, usize) {
            prepared.cache = KvCache::new();
            sync(device);
            let start = Instant::now();
            let (events, recorded) = if counted {
                let (_, counts) = measure(|| prepared.forward()).expect("the forward runs");
                (counts.events_seen, counts.records.len())
            } else {
                let _ = prepared.forward().expect("the forward runs");
                (0, 0)
            };
            sync(device);
            (start.elapsed().as_secs_f64() * 1e3, events, recorded)
        };
        forward(false); // warm-up
        let (mut plain, mut counted, mut ops) = (Vec::new(), Vec::new(), (0, 0));
        for _ in 0..rounds {
            plain.push(forward(false).0);
            let (ms, events, recorded) = forward(true);
            counted.push(ms);
            ops = (events, recorded);
        }
        let (pm, pmin, pmax) = median_and_spread(plain);
        let (cm, cmin, cmax) = median_and_spread(counted);
        let ratio = cm / pm;
        println!(
            "{name:<30} {:>22} {:>22} {ratio:>6.3} {:>7} {:>8}",
            format!("{pm:.2} ({pmin:.2}–{pmax:.2})"),
            format!("{cm:.2} ({cmin:.2}–{cmax:.2})"),
            ops.0,
            ops.1
        );
        out.push(json!({
            "layer": name, "build_ms": build_ms,
            "plain_ms": {"median": pm, "min": pmin, "max": pmax},
            "counted_ms": {"median": cm, "min": cmin, "max": cmax},
            "ratio": ratio, "ops_seen": ops.0, "ops_recorded": ops.1,
        }));
    }
    out
}

/// Calls of `f` per second over about `budget`.
fn per_second(budget: Duration, mut f: impl FnMut()) -> f64 {
    let start = Instant::now();
    let mut calls = 0u64;
    while start.elapsed() < budget {
        f();
        calls += 1;
    }
    calls as f64 / start.elapsed().as_secs_f64()
}

fn analytic() -> Value {
    let config = ModelConfig::deepseek_ocr();
    let w = Workload::prefill(1, 512).expect("valid");
    let budget = Duration::from_millis(700);
    let layer = LayerId::DecoderMoe
        .build(&config, &w, AttentionImpl::Sdpa)
        .expect("builds");
    let one_layer = per_second(budget, || {
        std::hint::black_box(layer.metrics().expect("finite"));
    });
    // The same layer with its per-op breakdown (`metrics()` keeps sums only).
    let one_layer_tree = per_second(budget, || {
        std::hint::black_box(layer.cost().expect("finite"));
    });
    let stack = per_second(budget, || {
        std::hint::black_box(
            DeepseekV2Decoder::new(&config, &w, AttentionImpl::Sdpa)
                .metrics()
                .expect("finite"),
        );
    });
    let generation = Generation {
        config: config.clone(),
        batch: 1,
        prefill_len: 512,
        new_tokens: 512,
        dtype: Dtype::Bf16,
        allow_tf32: false,
        platform: Platform::Cuda,
        attention: AttentionImpl::Sdpa,
        mla: modelmeter::MlaForm::Naive,
    };
    let generations = per_second(budget, || {
        std::hint::black_box(generation.metrics().expect("finite"));
    });
    println!("\nanalytic evaluations per second:");
    println!("  one MoE decoder layer   {one_layer:>12.0}");
    println!("    … with its breakdown  {one_layer_tree:>12.0}");
    println!("  the whole stack         {stack:>12.0}");
    println!("  a 512-token generation  {generations:>12.0}");
    json!({"decoder_layer_per_s": one_layer, "decoder_layer_cost_tree_per_s": one_layer_tree, "stack_per_s": stack, "generation_512_per_s": generations})
}

/// Peak resident memory of terminated children, in bytes.
fn children_peak_rss() -> u64 {
    // SAFETY: getrusage fills the zeroed struct we pass; no other invariants.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    (usage.ru_maxrss as u64) * 1024
}

fn whole_process() -> Value {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let binary = root.join("target/release/verify-decoder");
    if !binary.exists() {
        println!(
            "\nwhole process: skipped ({} not built; scripts/bench builds it)",
            binary.display()
        );
        return Value::Null;
    }
    let start = Instant::now();
    let status = Command::new(&binary)
        .args(["--device", "cpu", "--quiet"])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("verify-decoder runs");
    let wall = start.elapsed().as_secs_f64();
    let rss = children_peak_rss();
    println!(
        "\nwhole verify-decoder --device cpu (default workload): {wall:.2} s, peak RSS {} ({status})",
        modelmeter::units::bytes(rss)
    );
    json!({"wall_s": wall, "peak_rss_bytes": rss, "exit": status.code()})
}

fn main() {
    let rounds = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .filter(|r| *r > 0)
        .unwrap_or(7);
    let layers = layers(rounds);
    let analytic = analytic();
    let process = whole_process();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let report = json!({
        "schema": "modelmeter.bench/1", "unix_time": stamp, "rounds": rounds,
        "threads": tch::get_num_threads(), "layers": layers, "analytic": analytic,
        "process": process,
    });
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let path = dir.join(format!("verify-{stamp}.json"));
    let written = std::fs::create_dir_all(&dir).and_then(|_| {
        std::fs::write(
            &path,
            serde_json::to_string_pretty(&report).unwrap_or_default(),
        )
    });
    match written {
        Ok(()) => println!("\nwritten: {}", path.display()),
        Err(e) => eprintln!("\ncould not write {}: {e}", path.display()),
    }
}
