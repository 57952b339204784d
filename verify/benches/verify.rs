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
//!   counter saw and recorded; `BENCH_BATCH` and `BENCH_SEQ_LEN` give another prefill
//!   (a GPU kept busier than its host hides more of the counter's host work per op);
//! - analytic evaluations per second: one decoder layer's `metrics()` (on one thread and
//!   on all), the same as a design-space sweep runs it (a new layer for each prompt length
//!   from 1 to 4,096, built and evaluated), the whole stack, a 512-token generation, and
//!   `modelmeter sweep`'s points per second on all threads (one MoE decoder layer, the
//!   stack, a 512-token generation; sums and peaks kept, as its rows show them);
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
//! `verify-decoder` binary (by default the release build beside this bench). `BENCH_OUT`
//! is the folder the JSON goes to (relative to where the command was typed); each run
//! prints its figures beside the newest earlier run in that folder made on the same device
//! and thread count. A `BENCH_*` value that is not valid stops the run with exit 2; a
//! failed whole-process round (either side) is shown with the child's last lines, leaves
//! no figure and makes the run exit 1, as does a result file that cannot be written.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use modelmeter::layers::{AttentionImpl, DeepseekV2Decoder, Generation, Layer, LayerId};
use modelmeter::sweep::{evaluate_all, Point, Target};
use modelmeter::{Dtype, ModelConfig, Platform, Workload};
use modelmeter_reference::attention::KvCache;
use modelmeter_reference::harness::{measure, Prepared};
use modelmeter_reference::Setup;
use modelmeter_verify::device::DeviceSpec;
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

/// What a run measures, from the `BENCH_*` variables: a value that is not valid stops the
/// run (exit 2) naming it, instead of measuring a default the user did not ask for.
struct Options {
    /// `BENCH_DEVICE`: `cpu` (default), `cuda` or `cuda:N`.
    device: DeviceSpec,
    /// `BENCH_ROUNDS`: interleaved rounds per layer (default 7).
    rounds: usize,
    /// `BENCH_PROCESS_ROUNDS`: whole-process rounds (default 3).
    process_rounds: usize,
    /// `BENCH_PARTS`: which of [`PARTS`] run (all by default).
    parts: Vec<&'static str>,
    /// `BENCH_OUT`: the folder of the result files.
    out: PathBuf,
    /// `BENCH_BATCH` and `BENCH_SEQ_LEN`: the prefill the layers part runs (default 1
    /// and 512, the default workload). A larger one keeps a GPU busier than its host, which
    /// shows how much of the counter's host work per op the kernels hide.
    batch: u64,
    seq_len: u64,
}

/// The parts of a run, in the order they run.
const PARTS: [&str; 3] = ["layers", "analytic", "process"];

impl Options {
    fn from_env() -> Result<Options, String> {
        let var = |name: &str| std::env::var(name).ok();
        let count = |name: &str, default: usize| -> Result<usize, String> {
            match var(name) {
                None => Ok(default),
                Some(text) => text.trim().parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
                    format!("{name} = {text:?} is invalid: expected a whole number ≥ 1")
                }),
            }
        };
        let device = match var("BENCH_DEVICE") {
            None => DeviceSpec::Cpu,
            // Its message names the command line's option: this is the variable.
            Some(text) => {
                DeviceSpec::parse(&text).map_err(|e| e.replacen("--device", "BENCH_DEVICE", 1))?
            }
        };
        let parts = match var("BENCH_PARTS") {
            None => PARTS.to_vec(),
            Some(text) => {
                let mut parts = Vec::new();
                for part in text.split(',').map(str::trim) {
                    let known = PARTS.iter().find(|p| **p == part).ok_or_else(|| {
                        format!(
                            "BENCH_PARTS: {part:?} is not a part; expected a comma-separated list of {}",
                            PARTS.join(", ")
                        )
                    })?;
                    parts.push(*known);
                }
                parts
            }
        };
        let out = match std::env::var_os("BENCH_OUT") {
            Some(dir) if dir.is_empty() => {
                return Err("BENCH_OUT is empty: expected a folder".into())
            }
            Some(dir) => invoking_dir().join(dir),
            None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench"),
        };
        let options = Options {
            device,
            rounds: count("BENCH_ROUNDS", 7)?,
            process_rounds: count("BENCH_PROCESS_ROUNDS", 3)?,
            parts,
            out,
            batch: count("BENCH_BATCH", 1)? as u64,
            seq_len: count("BENCH_SEQ_LEN", 512)? as u64,
        };
        // The workload's own limits (its size in tokens), named by the variables.
        Workload::prefill(options.batch, options.seq_len).map_err(|e| {
            format!(
                "BENCH_BATCH = {} and BENCH_SEQ_LEN = {} are invalid together: {e}",
                options.batch, options.seq_len
            )
        })?;
        Ok(options)
    }

    fn wants(&self, part: &str) -> bool {
        self.parts.contains(&part)
    }

    /// The libtorch device and the layers' workload on it (`BENCH_BATCH`, `BENCH_SEQ_LEN`;
    /// fp32 on the CPU, the model's dtype on a GPU).
    fn device_and_workload(&self) -> (Device, Workload) {
        let w = Workload::prefill(self.batch, self.seq_len).expect("checked by from_env");
        match self.device {
            DeviceSpec::Cuda(index) => (Device::Cuda(index), w.on(Platform::Cuda)),
            DeviceSpec::Cpu => (
                Device::Cpu,
                w.with_dtype(Dtype::F32)
                    .expect("fp32 is a model dtype")
                    .on(Platform::Cpu),
            ),
        }
    }
}

/// The folder the command was typed in: a relative `BENCH_OUT` is relative to it. Cargo
/// runs a bench in its package's folder (`verify/`) but leaves the shell's `PWD` as it
/// was; without an absolute `PWD`, the process's own folder.
fn invoking_dir() -> PathBuf {
    std::env::var_os("PWD")
        .map(PathBuf::from)
        .filter(|d| d.is_absolute() && d.is_dir())
        .or_else(|| std::env::current_dir().ok())
        .unwrap_or_default()
}

fn sync(device: Device) {
    modelmeter_reference::ffi::synchronize(device).expect("CUDA synchronises");
}

fn layers(options: &Options) -> Vec<Value> {
    let rounds = options.rounds;
    let config = ModelConfig::deepseek_ocr();
    let (device, workload) = options.device_and_workload();
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
    // `modelmeter sweep` as a user runs it: points over every thread, with sums and
    // peaks kept (what its rows show), prompt lengths 1 to 20,000 (and 512 new tokens
    // after each for generations).
    let calls: Vec<Point> = (1..=20_000)
        .map(|s| Point::call(Workload::prefill(1, s).expect("valid")))
        .collect();
    let generation_points: Vec<Point> = calls
        .iter()
        .map(|p| Point {
            new_tokens: Some(512),
            ..p.clone()
        })
        .collect();
    let sweep_command = |target: Target| {
        let points = match target {
            Target::Generation => &generation_points,
            _ => &calls,
        };
        let start = Instant::now();
        let rows = evaluate_all(
            &config,
            target,
            points,
            AttentionImpl::Sdpa,
            threads,
            &|_| {},
        )
        .expect("every point evaluates");
        rows.len() as f64 / start.elapsed().as_secs_f64()
    };
    let sweep_command_layer = sweep_command(Target::Layer(LayerId::DecoderMoe));
    let sweep_command_stack = sweep_command(Target::Stack);
    let sweep_command_generation = sweep_command(Target::Generation);
    println!("\nanalytic evaluations per second:");
    println!("  one MoE decoder layer   {one_layer:>12.0}");
    println!("    … on {threads} threads at once {all_cores:>10.0}");
    println!("    … with its breakdown  {one_layer_tree:>12.0}");
    println!("  a sweep of prompt lengths (a new layer each) {sweep_one:>10.0}");
    println!("    … on {threads} threads at once {sweep_all:>10.0}");
    println!("  the whole stack         {stack:>12.0}");
    println!("  a 512-token generation  {generations:>12.0}");
    println!("  modelmeter sweep on {threads} threads (sums and peaks, prompt lengths 1–20,000):");
    println!("    one MoE decoder layer {sweep_command_layer:>12.0}");
    println!("    the whole stack       {sweep_command_stack:>12.0}");
    println!("    a 512-token generation {sweep_command_generation:>11.0}");
    json!({"decoder_layer_per_s": one_layer, "decoder_layer_all_threads_per_s": all_cores,
           "threads": threads, "decoder_layer_cost_tree_per_s": one_layer_tree,
           "sweep_per_s": sweep_one, "sweep_all_threads_per_s": sweep_all,
           "stack_per_s": stack, "generation_512_per_s": generations,
           "sweep_command_decoder_layer_per_s": sweep_command_layer,
           "sweep_command_stack_per_s": sweep_command_stack,
           "sweep_command_generation_512_per_s": sweep_command_generation})
}

/// One finished child process: wall seconds, how it ended, the last lines it printed
/// (to show when it failed), and the JSON it wrote to its `--json` file (if any).
struct ChildRun {
    wall_s: f64,
    status: Result<std::process::ExitStatus, String>,
    output_tail: String,
    json: Value,
}

impl ChildRun {
    fn succeeded(&self) -> bool {
        self.status.as_ref().is_ok_and(|s| s.success())
    }

    /// How it ended, for a line of the bench's output: `exit 1`, `signal 9`, or why it
    /// did not start.
    fn ending(&self) -> String {
        match &self.status {
            Ok(s) => match (s.code(), std::os::unix::process::ExitStatusExt::signal(s)) {
                (Some(code), _) => format!("exit {code}"),
                (None, Some(signal)) => format!("signal {signal}"),
                (None, None) => "no exit code".into(),
            },
            Err(why) => format!("did not start: {why}"),
        }
    }
}

/// Runs `command` to its end, timing it; `json` is the file it was told to write.
fn time_child(mut command: Command, json: &Path) -> ChildRun {
    let _ = std::fs::remove_file(json);
    let start = Instant::now();
    let output = command.stdin(std::process::Stdio::null()).output();
    let wall_s = start.elapsed().as_secs_f64();
    let (status, output_tail) = match output {
        Ok(o) => {
            let text = String::from_utf8_lossy(&[o.stdout, o.stderr].concat()).into_owned();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(8)..].join("\n");
            (Ok(o.status), tail)
        }
        Err(e) => (Err(e.to_string()), String::new()),
    };
    let json = std::fs::read_to_string(json)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    ChildRun {
        wall_s,
        status,
        output_tail,
        json,
    }
}

/// Says that round `round` of `who` failed, with what it printed: its time is no result.
fn report_failure(who: &str, round: usize, run: &ChildRun) {
    eprintln!(
        "  {who}, round {}: {} after {:.2} s; its time is not a result. Its last lines:",
        round + 1,
        run.ending(),
        run.wall_s
    );
    for line in run.output_tail.lines() {
        eprintln!("    {line}");
    }
}

/// The FlopCounterMode way's weight initialisations: `model` (transformers' `_init_weights`,
/// random weights as `DeepseekV2Model(config)` has them: like for like with
/// verify-decoder's seeded weights) and `constructor` (the constructors alone: the router
/// at zeros, so every token picks the same experts, and the experts uninitialised — how
/// the first measurement, 8.2–9.1 s, ran).
const BASELINE_INITS: [&str; 2] = ["model", "constructor"];

/// The Python way: transformers' modules under torch's FlopCounterMode
/// (`scripts/flopcounter-baseline.py`), when the `.venv` has transformers.
fn python_baseline(root: &Path) -> Option<(PathBuf, PathBuf)> {
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

/// The `verify-decoder` to time: `BENCH_VERIFY_DECODER`, else the one cargo built beside
/// this bench (`<target>/release/verify-decoder`, wherever `CARGO_TARGET_DIR` puts it;
/// scripts/bench builds it first, so it is never an older build).
fn verify_decoder_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("BENCH_VERIFY_DECODER") {
        return PathBuf::from(path);
    }
    // This bench runs as <target>/release/deps/verify-<hash>.
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("verify-decoder")))
        .unwrap_or_else(|| PathBuf::from("verify-decoder"))
}

/// The whole default `verify-decoder` process (on the CPU, or the `BENCH_DEVICE` GPU),
/// `rounds` times, interleaved with the Python way when it can run (CPU only): wall time
/// (median, min–max), peak RSS, and the phases `--timings` reports. A round that fails
/// (either side) is said, with the child's last lines, and leaves no figure; the second
/// value is then false.
fn whole_process(options: &Options) -> (Value, bool) {
    let rounds = options.process_rounds;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let binary = verify_decoder_binary();
    let (device, _) = options.device_and_workload();
    let device_arg = options.device.to_string();
    let where_ = match options.device {
        DeviceSpec::Cuda(_) => format!("on {device_arg} (its default dtype)"),
        DeviceSpec::Cpu => "on the CPU".to_string(),
    };
    if !binary.exists() {
        println!(
            "\nwhole process: skipped ({} not built; scripts/bench builds it)",
            binary.display()
        );
        return (Value::Null, true);
    }
    // The ratio target is the CPU's; on a GPU the process time stands alone.
    let python = python_baseline(&root).filter(|_| device == Device::Cpu);
    let dir = std::env::temp_dir().join(format!("modelmeter-bench-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let (ours_json, theirs_json) = (dir.join("verify.json"), dir.join("baseline.json"));
    // Each side's wall times; `None` once a round of it failed: the rounds that ran are
    // not the same runs, so that side has no figure.
    let mut ours: Option<Vec<f64>> = Some(Vec::new());
    let mut theirs = BASELINE_INITS.map(|_| Some(Vec::<f64>::new()));
    let (mut phases, mut baseline_phases) = (Value::Null, [Value::Null, Value::Null]);
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
    // Its own VmHWM, as --timings reports it (RUSAGE_CHILDREN would hold the Python
    // runs' peaks and the probes'): none when no round reported one.
    let mut peak_rss: Option<u64> = None;
    for round in 0..rounds {
        let mut command = Command::new(&binary);
        command.args(["--device", &device_arg, "--quiet", "--timings", "--json"]);
        command.arg(&ours_json);
        let run = time_child(command, &ours_json);
        if run.succeeded() {
            ours.iter_mut().for_each(|times| times.push(run.wall_s));
            phases = run.json.get("timings").cloned().unwrap_or(Value::Null);
            if let Some(own) = phases.get("peak_rss_bytes").and_then(Value::as_u64) {
                peak_rss = Some(peak_rss.map_or(own, |p| p.max(own)));
            }
        } else {
            report_failure("verify-decoder", round, &run);
            ours = None;
        }
        if let Some((python, script)) = &python {
            for (i, init) in BASELINE_INITS.iter().enumerate() {
                let mut command = Command::new(python);
                command.arg(script).args(["--init", init, "--json"]);
                command.arg(&theirs_json);
                let run = time_child(command, &theirs_json);
                if run.succeeded() {
                    theirs[i]
                        .iter_mut()
                        .for_each(|times| times.push(run.wall_s));
                    baseline_phases[i] = run.json;
                } else {
                    report_failure(
                        &format!("the FlopCounterMode way (--init {init})"),
                        round,
                        &run,
                    );
                    theirs[i] = None;
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let ok = ours.is_some() && theirs.iter().all(Option::is_some);
    let mut out = json!({"device": device_arg, "rounds": rounds});
    let ours_median = if let Some(ours) = ours {
        let (om, omin, omax) = median_and_spread(ours);
        let rss = peak_rss.map_or("not reported".into(), modelmeter::units::bytes);
        println!("  verify-decoder           {om:>6.2} s ({omin:.2}–{omax:.2}), peak RSS {rss}");
        out["wall_s"] = json!({"median": om, "min": omin, "max": omax});
        out["peak_rss_bytes"] = json!(peak_rss);
        out["phases"] = phases.clone();
        Some(om)
    } else {
        println!("  verify-decoder           failed (above): no figure");
        out["failed"] = json!(true);
        None
    };
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
    for (i, (init, times)) in BASELINE_INITS.iter().zip(theirs).enumerate() {
        let Some(times) = times else {
            println!("  FlopCounterMode way, --init {init:<11} failed (above): no figure");
            out["flop_counter_mode"][init] = json!({"failed": true});
            continue;
        };
        if times.is_empty() {
            continue;
        }
        let (tm, tmin, tmax) = median_and_spread(times);
        let ratio = ours_median.map(|om| om / tm);
        println!(
            "  FlopCounterMode way, --init {init:<11} {tm:>6.2} s ({tmin:.2}–{tmax:.2}); verify-decoder / it = {} (target ≤ 0.25)",
            ratio.map_or("—".into(), |r| format!("{r:.3}"))
        );
        out["flop_counter_mode"][init] = json!({
            "wall_s": {"median": tm, "min": tmin, "max": tmax},
            "ratio": ratio, "report": baseline_phases[i],
        });
    }
    (out, ok)
}

fn main() {
    let options = match Options::from_env() {
        Ok(options) => options,
        Err(why) => {
            eprintln!("bench: {why} (see scripts/bench --help)");
            std::process::exit(2);
        }
    };
    let layers = if options.wants("layers") {
        Value::Array(layers(&options))
    } else {
        Value::Null
    };
    let analytic = if options.wants("analytic") {
        analytic()
    } else {
        Value::Null
    };
    let (process, process_ok) = if options.wants("process") {
        whole_process(&options)
    } else {
        (Value::Null, true)
    };
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let report = json!({
        "schema": "modelmeter.bench/1", "unix_time": stamp, "device": options.device.to_string(),
        "rounds": options.rounds, "threads": tch::get_num_threads(), "layers": layers,
        "layers_workload": options.wants("layers").then(|| json!({"batch": options.batch, "seq_len": options.seq_len})),
        "analytic": analytic, "process": process,
    });
    let dir = &options.out;
    if let Some((previous, old)) = previous_run(dir, stamp, &report) {
        print_comparison(&previous, &old, &report);
    }
    let path = dir.join(result_file_name(stamp));
    let text = serde_json::to_string_pretty(&report).expect("a JSON value serialises");
    let written = std::fs::create_dir_all(dir)
        .and_then(|_| modelmeter_verify::report::write_atomically(&path, &text));
    if let Err(e) = written {
        eprintln!("\nbench: could not write {}: {e}", path.display());
        std::process::exit(1);
    }
    println!("\nwritten: {}", path.display());
    if !process_ok {
        eprintln!("bench: a whole-process round failed (above); its figures are left out");
        std::process::exit(1);
    }
}

/// The name of the result file written at `stamp` (unix seconds): `verify-<stamp>.json`.
fn result_file_name(stamp: u64) -> String {
    format!("{RESULT_PREFIX}{stamp}{RESULT_SUFFIX}")
}

/// The two ends of [`result_file_name`], read back by [`previous_run`].
const RESULT_PREFIX: &str = "verify-";
const RESULT_SUFFIX: &str = ".json";

/// The newest earlier result in `dir` (`verify-<unix time>.json`, before `stamp`) that
/// `report` can be compared with: the same device and thread count (a file from before
/// the device was recorded counts as a CPU run) and at least one figure in common (a
/// layer's figures name their prefill unless it is the default, [`figures`]). A run of
/// other parts, another device or an unreadable file is passed over, not compared.
fn previous_run(dir: &Path, stamp: u64, report: &Value) -> Option<(PathBuf, Value)> {
    let mut earlier: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
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
        .collect();
    earlier.sort();
    let device = |r: &Value| r["device"].as_str().unwrap_or("cpu").to_string();
    let names: std::collections::BTreeSet<String> =
        figures(report).into_iter().map(|(name, _)| name).collect();
    earlier.into_iter().rev().find_map(|(_, path)| {
        let old: Value = serde_json::from_str(&std::fs::read_to_string(&path).ok()?).ok()?;
        let comparable = device(&old) == device(report)
            && old["threads"] == report["threads"]
            && figures(&old).iter().any(|(name, _)| names.contains(name));
        comparable.then_some((path, old))
    })
}

/// The figures a later run is compared on: (name, value), those the run measured. A
/// layer's figures at another prefill than the default (`BENCH_BATCH`, `BENCH_SEQ_LEN`)
/// name it (`B=8 S=2048 DeepseekV2MoE: …`), so that they meet only their own kind; a
/// file from before the prefill was recorded ran the default.
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
            "sweep_command_decoder_layer_per_s",
            "analytic: modelmeter sweep, MoE layer /s",
        ),
        (
            "sweep_command_stack_per_s",
            "analytic: modelmeter sweep, stack /s",
        ),
        (
            "sweep_command_generation_512_per_s",
            "analytic: modelmeter sweep, 512-token generation /s",
        ),
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
    let w = &report["layers_workload"];
    let prefill = match (
        w["batch"].as_u64().unwrap_or(1),
        w["seq_len"].as_u64().unwrap_or(512),
    ) {
        (1, 512) => String::new(),
        (batch, seq_len) => format!("B={batch} S={seq_len} "),
    };
    for layer in report["layers"].as_array().into_iter().flatten() {
        let name = format!("{prefill}{}", layer["layer"].as_str().unwrap_or("?"));
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
fn print_comparison(previous: &Path, old: &Value, new: &Value) {
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
            "  {name:<58} {:>12} → {:>12}  {change}",
            show(then),
            show(now)
        );
    }
}
