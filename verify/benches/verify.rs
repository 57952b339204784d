//! Benchmarks of the verify path (not timed tests): run with `scripts/bench`, or
//! `cargo bench -p modelmeter-verify --bench verify`.
//!
//! Prints, and writes to `target/bench/verify-<unix time>.json` for later comparison
//! (`BENCH_PARTS=layers,analytic,process` picks the parts; all by default):
//! - per layer of the default workload (DeepSeek-OCR, B=1, S=512, fp32 on the CPU, or
//!   `BENCH_DEVICE=cuda:0` with bf16): plain vs counted forward time, interleaved
//!   (median and min–max over `BENCH_ROUNDS`, default 7; which runs first alternates by
//!   round), the ratio of the medians and of the minimums, the median of each round's
//!   counted/plain pair (back to back, so drift between rounds cancels), and the ops the
//!   counter saw and recorded;
//! - analytic evaluations per second: one decoder layer's `metrics()` (on one thread and
//!   on all), the same as a design-space sweep runs it (a new layer for each prompt length
//!   from 1 to 4,096, built and evaluated), the whole stack, and a 512-token generation;
//! - the whole `verify-decoder` process at the default workload (release build), run
//!   `BENCH_PROCESS_ROUNDS` times (default 3): wall time, peak resident memory, and its
//!   phases (`--timings`: libtorch loading, setup, module builds, forwards, analytic,
//!   comparison); interleaved with the same layers the Python way
//!   (`scripts/flopcounter-baseline.py`: transformers' modules under torch's
//!   FlopCounterMode) when the `.venv` has transformers, and the ratio of the two.
//!   With `BENCH_DEVICE=cuda:0` the process runs on that GPU (the ≤ 3 s target, CUDA
//!   start-up included) and the Python way is skipped.
//!
//! On a machine without Rust (the GPU machine: `scripts/build-device-bundle` carries the
//! built bench as `target/device/bench-verify`), `BENCH_VERIFY_DECODER` names the
//! `verify-decoder` binary and `BENCH_OUT` the folder the JSON goes to; each
//! run prints its figures beside the previous run's in that folder.

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
        "{:<30} {:>22} {:>22} {:>6} {:>6} {:>6} {:>7} {:>8}",
        "layer", "plain ms", "counted ms", "ratio", "r(min)", "paired", "ops", "counted"
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
        for round in 0..rounds {
            // Which runs first alternates, so neither side always follows the other.
            let counted_first = round % 2 == 1;
            if !counted_first {
                plain.push(forward(false).0);
            }
            let (ms, events, recorded) = forward(true);
            counted.push(ms);
            ops = (events, recorded);
            if counted_first {
                plain.push(forward(false).0);
            }
        }
        // Each round's counted forward over its plain one, run back to back: the pairs
        // cancel what drifts between rounds (this VM's speed wanders by ±20 %), so their
        // median is the steadiest of the three ratios.
        let paired = median_and_spread(plain.iter().zip(&counted).map(|(p, c)| c / p).collect()).0;
        let (pm, pmin, pmax) = median_and_spread(plain);
        let (cm, cmin, cmax) = median_and_spread(counted);
        let (ratio, ratio_min) = (cm / pm, cmin / pmin);
        println!(
            "{name:<30} {:>22} {:>22} {ratio:>6.3} {ratio_min:>6.3} {paired:>6.3} {:>7} {:>8}",
            format!("{pm:.2} ({pmin:.2}–{pmax:.2})"),
            format!("{cm:.2} ({cmin:.2}–{cmax:.2})"),
            ops.0,
            ops.1
        );
        out.push(json!({
            "layer": name, "build_ms": build_ms,
            "plain_ms": {"median": pm, "min": pmin, "max": pmax},
            "counted_ms": {"median": cm, "min": cmin, "max": cmax},
            "ratio": ratio, "ratio_of_minimums": ratio_min, "median_paired_ratio": paired,
            "ops_seen": ops.0, "ops_recorded": ops.1,
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
    // The same on every core at once, each thread with its own layer: evaluations are
    // independent, so a design-space sweep scales with the cores it is given.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let on_all_threads = |rate: &(dyn Fn() -> f64 + Sync)| -> f64 {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads).map(|_| scope.spawn(rate)).collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("no panic"))
                .sum()
        })
    };
    let all_cores = on_all_threads(&|| {
        let layer = LayerId::DecoderMoe
            .build(&config, &w, AttentionImpl::Sdpa)
            .expect("builds");
        per_second(budget, || {
            std::hint::black_box(layer.metrics().expect("finite"));
        })
    });
    // A design-space sweep: every evaluation a new layer (prompt lengths 1 to 4,096 in
    // turn), built from the config and evaluated, so nothing of one point is reused.
    let sweep = || {
        let mut seq_len = 0;
        per_second(budget, || {
            seq_len = seq_len % 4096 + 1;
            let w = Workload::prefill(1, seq_len).expect("valid");
            let layer = LayerId::DecoderMoe
                .build(&config, &w, AttentionImpl::Sdpa)
                .expect("builds");
            std::hint::black_box(layer.metrics().expect("finite"));
        })
    };
    let sweep_one = sweep();
    let sweep_all = on_all_threads(&sweep);
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
    println!("    … on {threads} threads at once {all_cores:>10.0}");
    println!("    … with its breakdown  {one_layer_tree:>12.0}");
    println!("  a sweep of prompt lengths (a new layer each) {sweep_one:>10.0}");
    println!("    … on {threads} threads at once {sweep_all:>10.0}");
    println!("  the whole stack         {stack:>12.0}");
    println!("  a 512-token generation  {generations:>12.0}");
    json!({"decoder_layer_per_s": one_layer, "decoder_layer_all_threads_per_s": all_cores,
           "threads": threads, "decoder_layer_cost_tree_per_s": one_layer_tree,
           "sweep_per_s": sweep_one, "sweep_all_threads_per_s": sweep_all,
           "stack_per_s": stack, "generation_512_per_s": generations})
}

/// Peak resident memory of terminated children, in bytes (the largest so far; only when
/// a child did not report its own).
fn children_peak_rss() -> u64 {
    // SAFETY: getrusage fills the zeroed struct we pass; no other invariants.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    (usage.ru_maxrss as u64) * 1024
}

/// One child process: wall seconds, exit code, and the JSON it wrote to `json` (if any).
fn time_child(mut command: Command, json: &std::path::Path) -> (f64, Option<i32>, Value) {
    let _ = std::fs::remove_file(json);
    let start = Instant::now();
    let status = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    let wall = start.elapsed().as_secs_f64();
    let written = std::fs::read_to_string(json)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    (wall, status.ok().and_then(|s| s.code()), written)
}

/// The FlopCounterMode way's weight initialisations: `model` (transformers' `_init_weights`,
/// random weights as `DeepseekV2Model(config)` has them: like for like with
/// verify-decoder's seeded weights) and `constructor` (the constructors alone: the router
/// at zeros, so every token picks the same experts, and the experts uninitialised — how
/// the first measurement, 8.2–9.1 s, ran).
const BASELINE_INITS: [&str; 2] = ["model", "constructor"];

/// The Python way: transformers' modules under torch's FlopCounterMode
/// (`scripts/flopcounter-baseline.py`), when the `.venv` has transformers.
fn python_baseline(root: &std::path::Path) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let python = root.join(".venv/bin/python");
    let script = root.join("scripts/flopcounter-baseline.py");
    let has_transformers = Command::new(&python)
        .args(["-c", "import transformers"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (has_transformers && script.exists()).then_some((python, script))
}

/// The whole default `verify-decoder` process (on the CPU, or the `BENCH_DEVICE` GPU),
/// `rounds` times, interleaved with the Python way when it can run (CPU only): wall time
/// (median, min–max), peak RSS, and the phases `--timings` reports.
fn whole_process(rounds: usize) -> Value {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let binary = std::env::var_os("BENCH_VERIFY_DECODER")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target/release/verify-decoder"));
    let (device, _) = device_and_workload();
    let (device_arg, where_) = match device {
        Device::Cuda(i) => (
            format!("cuda:{i}"),
            format!("on cuda:{i} (its default dtype)"),
        ),
        _ => ("cpu".to_string(), "on the CPU".to_string()),
    };
    if !binary.exists() {
        println!(
            "\nwhole process: skipped ({} not built; scripts/bench builds it)",
            binary.display()
        );
        return Value::Null;
    }
    // The ratio target is the CPU's; on a GPU the process time stands alone.
    let python = python_baseline(&root).filter(|_| device == Device::Cpu);
    let dir = std::env::temp_dir().join(format!("modelmeter-bench-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let (ours_json, theirs_json) = (dir.join("verify.json"), dir.join("baseline.json"));
    let (mut ours, mut theirs) = (Vec::new(), [Vec::new(), Vec::new()]);
    let (mut phases, mut baseline_phases, mut exit) =
        (Value::Null, [Value::Null, Value::Null], None);
    println!(
        "\nwhole process, the default workload {where_}, {rounds} interleaved rounds{}:",
        if python.is_some() {
            " (verify-decoder, then the FlopCounterMode way)"
        } else if device != Device::Cpu {
            ""
        } else {
            " (no transformers in .venv: the FlopCounterMode way is skipped)"
        }
    );
    let mut peak_rss = 0;
    for _ in 0..rounds {
        let mut command = Command::new(&binary);
        command.args(["--device", &device_arg, "--quiet", "--timings", "--json"]);
        command.arg(&ours_json);
        let (wall, code, json) = time_child(command, &ours_json);
        ours.push(wall);
        exit = code;
        phases = json.get("timings").cloned().unwrap_or(Value::Null);
        // Its own VmHWM (RUSAGE_CHILDREN would also hold the Python runs' peaks).
        let own_peak = phases.get("peak_rss_bytes").and_then(Value::as_u64);
        peak_rss = peak_rss.max(own_peak.unwrap_or_else(children_peak_rss));
        if let Some((python, script)) = &python {
            for (i, init) in BASELINE_INITS.iter().enumerate() {
                let mut command = Command::new(python);
                command.arg(script).args(["--init", init, "--json"]);
                command.arg(&theirs_json);
                let (wall, _, json) = time_child(command, &theirs_json);
                theirs[i].push(wall);
                baseline_phases[i] = json;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let (om, omin, omax) = median_and_spread(ours);
    println!(
        "  verify-decoder           {om:>6.2} s ({omin:.2}–{omax:.2}), peak RSS {} (exit {exit:?})",
        modelmeter::units::bytes(peak_rss)
    );
    if let Some(layers) = phases.get("layers").and_then(Value::as_array) {
        let sum = |key: &str| -> f64 {
            layers
                .iter()
                .filter_map(|l| l.get(key).and_then(Value::as_f64))
                .sum()
        };
        let get = |key: &str| phases.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN);
        println!(
            "    phases (last round): before main {:.2} · setup and freeing {:.2} · build {:.2} · prepare {:.2} · forwards {:.2} · analytic {:.3} · compare {:.3} s",
            get("before_main_s"),
            get("other_s"),
            sum("build_s"),
            sum("prepare_s"),
            sum("forward_s"),
            sum("analytic_s"),
            sum("compare_s")
        );
    }
    let mut out = json!({
        "device": device_arg,
        "wall_s": {"median": om, "min": omin, "max": omax},
        "peak_rss_bytes": peak_rss, "exit": exit, "phases": phases,
    });
    for (i, init) in BASELINE_INITS.iter().enumerate() {
        if theirs[i].is_empty() {
            continue;
        }
        let (tm, tmin, tmax) = median_and_spread(std::mem::take(&mut theirs[i]));
        println!(
            "  FlopCounterMode way, --init {init:<11} {tm:>6.2} s ({tmin:.2}–{tmax:.2}); verify-decoder / it = {:.3} (target ≤ 0.25)",
            om / tm
        );
        out["flop_counter_mode"][init] = json!({
            "wall_s": {"median": tm, "min": tmin, "max": tmax},
            "ratio": om / tm, "report": baseline_phases[i],
        });
    }
    out
}

fn main() {
    let rounds = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .filter(|r| *r > 0)
        .unwrap_or(7);
    let parts = std::env::var("BENCH_PARTS").unwrap_or_else(|_| "layers,analytic,process".into());
    let wants = |part: &str| parts.split(',').any(|p| p.trim() == part);
    let layers = if wants("layers") {
        Value::Array(layers(rounds))
    } else {
        Value::Null
    };
    let analytic = if wants("analytic") {
        analytic()
    } else {
        Value::Null
    };
    let process = if wants("process") {
        whole_process(
            std::env::var("BENCH_PROCESS_ROUNDS")
                .ok()
                .and_then(|r| r.parse().ok())
                .filter(|r| *r > 0)
                .unwrap_or(3),
        )
    } else {
        Value::Null
    };
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let report = json!({
        "schema": "modelmeter.bench/1", "unix_time": stamp, "rounds": rounds,
        "threads": tch::get_num_threads(), "layers": layers, "analytic": analytic,
        "process": process,
    });
    let dir = std::env::var_os("BENCH_OUT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench")
        });
    if let Some((previous, old)) = previous_run(&dir, stamp) {
        print_comparison(&previous, &old, &report);
    }
    let path = dir.join(result_file_name(stamp));
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

/// The name of the result file written at `stamp` (unix seconds): `verify-<stamp>.json`.
fn result_file_name(stamp: u64) -> String {
    format!("{RESULT_PREFIX}{stamp}{RESULT_SUFFIX}")
}

/// The two ends of [`result_file_name`], read back by [`previous_run`].
const RESULT_PREFIX: &str = "verify-";
const RESULT_SUFFIX: &str = ".json";

/// The newest earlier result in `dir` (`verify-<unix time>.json`, before `stamp`) and
/// what it holds, if any can be read.
fn previous_run(dir: &std::path::Path, stamp: u64) -> Option<(std::path::PathBuf, Value)> {
    let newest = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| {
            let path = e.ok()?.path();
            let name = path.file_name()?.to_str()?;
            let time: u64 = name
                .strip_prefix(RESULT_PREFIX)?
                .strip_suffix(RESULT_SUFFIX)?
                .parse()
                .ok()?;
            (time < stamp).then_some((time, path))
        })
        .max()?;
    let text = std::fs::read_to_string(&newest.1).ok()?;
    Some((newest.1, serde_json::from_str(&text).ok()?))
}

/// The figures a later run is compared on: (name, value), those the run measured.
fn figures(report: &Value) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    let mut take = |name: String, v: &Value| {
        if let Some(x) = v.as_f64() {
            out.push((name, x));
        }
    };
    for (key, name) in [
        ("decoder_layer_per_s", "analytic: one MoE decoder layer /s"),
        (
            "decoder_layer_all_threads_per_s",
            "analytic: … on all threads /s",
        ),
        ("sweep_per_s", "analytic: a sweep, new layer each /s"),
        ("stack_per_s", "analytic: the whole stack /s"),
        (
            "generation_512_per_s",
            "analytic: a 512-token generation /s",
        ),
    ] {
        take(name.into(), &report["analytic"][key]);
    }
    let process = &report["process"];
    take(
        "process: wall s (median)".into(),
        &process["wall_s"]["median"],
    );
    take("process: peak RSS bytes".into(), &process["peak_rss_bytes"]);
    for init in ["model", "constructor"] {
        take(
            format!("process: ratio to FlopCounterMode ({init} weights)"),
            &process["flop_counter_mode"][init]["ratio"],
        );
    }
    for layer in report["layers"].as_array().into_iter().flatten() {
        let name = layer["layer"].as_str().unwrap_or("?");
        take(
            format!("{name}: plain ms (median)"),
            &layer["plain_ms"]["median"],
        );
        take(
            format!("{name}: counted/plain (paired)"),
            &layer["median_paired_ratio"],
        );
    }
    out
}

/// Prints each figure both runs have, with its change.
fn print_comparison(previous: &std::path::Path, old: &Value, new: &Value) {
    let before: std::collections::BTreeMap<String, f64> = figures(old).into_iter().collect();
    let rows: Vec<(String, f64, f64)> = figures(new)
        .into_iter()
        .filter_map(|(name, now)| before.get(&name).map(|then| (name, *then, now)))
        .collect();
    if rows.is_empty() {
        return;
    }
    println!(
        "\ncompared with the previous run, {} (a shared VM's speed varies between hours: only runs made together compare closely):",
        previous.display()
    );
    let show = |x: f64| {
        if x.abs() >= 100.0 {
            format!("{x:.0}")
        } else {
            format!("{x:.3}")
        }
    };
    for (name, then, now) in rows {
        let change = if then != 0.0 {
            format!("{:+.1} %", (now / then - 1.0) * 100.0)
        } else {
            "—".into()
        };
        println!(
            "  {name:<48} {:>12} → {:>12}  {change}",
            show(then),
            show(now)
        );
    }
}
