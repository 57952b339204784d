//! The GPU bundle's own logic, with a fake Python that names a fake torch: the library
//! path (`scripts/device-check --print-library-path`: torch's lib folder must always come
//! first, and what the GPU image set, the driver's folder, must be kept) and the preflight
//! (stand-in binaries: a run without a working GPU exits 1; when only a preloaded
//! `libtorch_cuda.so` makes CUDA work, every run uses it).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/device-check")
}

/// A fresh folder, removed when dropped (even when the test fails first).
fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("mm-device-check-")
        .tempdir()
        .unwrap()
}

/// A fake `python3` in `dir` that prints `lib` for any program (or fails when `lib` is
/// None).
fn fake_python(dir: &Path, lib: Option<&str>) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("python3");
    let body = match lib {
        Some(lib) => format!("#!/bin/sh\necho '{lib}'\n"),
        None => "#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\nexit 1\n"
            .to_string(),
    };
    std::fs::write(&path, body).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn print_library_path(python: &Path, ld_library_path: Option<&str>) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg(script())
        .arg("--print-library-path")
        .env("PYTHON", python);
    match ld_library_path {
        Some(v) => cmd.env("LD_LIBRARY_PATH", v),
        None => cmd.env_remove("LD_LIBRARY_PATH"),
    };
    cmd.output().expect("bash runs device-check")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn torch_lib_alone_when_nothing_was_set() {
    let tmp = temp_dir();
    let py = fake_python(tmp.path(), Some("/opt/torch/lib"));
    let o = print_library_path(&py, None);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stdout(&o), "/opt/torch/lib");
}

#[test]
fn torch_lib_is_prepended_to_what_the_image_set() {
    let tmp = temp_dir();
    let py = fake_python(tmp.path(), Some("/opt/torch/lib"));
    let o = print_library_path(&py, Some("/usr/local/nvidia/lib64:/usr/local/cuda/lib64"));
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        stdout(&o),
        "/opt/torch/lib:/usr/local/nvidia/lib64:/usr/local/cuda/lib64"
    );
}

#[test]
fn a_python_without_torch_is_a_clear_error() {
    let tmp = temp_dir();
    let py = fake_python(tmp.path(), None);
    let o = print_library_path(&py, Some("/usr/local/nvidia/lib64"));
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(stdout(&o).is_empty());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("torch's lib folder"), "{err}");
}

#[test]
fn unknown_arguments_are_refused() {
    let o = Command::new("bash")
        .arg(script())
        .arg("--bogus")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("usage: device-check"));
}

/// Runs a copy of device-check (HARDWARE_ONLY=1: the preflight and the hardware-counter
/// runs) beside stand-in binaries, a stand-in `ncu` among them: `verify_decoder` is the
/// body of a fake `verify-decoder` script; a fake torch lib folder holds a
/// `libtorch_cuda.so` when `cuda_lib`. Returns the exit code and the summary.
fn bundle(verify_decoder: &str, cuda_lib: bool) -> (Option<i32>, String) {
    bundle_with(verify_decoder, cuda_lib, true)
}

/// [`bundle`], with a stand-in `ncu` first on `PATH` when `ncu`.
fn bundle_with(verify_decoder: &str, cuda_lib: bool, ncu: bool) -> (Option<i32>, String) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = temp_dir();
    let dir = tmp.path();
    let lib = dir.join("torch-lib");
    std::fs::create_dir_all(&lib).unwrap();
    if cuda_lib {
        std::fs::write(lib.join("libtorch_cuda.so"), "").unwrap();
    }
    std::fs::copy(script(), dir.join("device-check")).unwrap();
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for (path, body) in [
        (dir.join("verify-decoder"), verify_decoder),
        (dir.join("counter-tests"), "exit 0"),
        (dir.join("allocation-tests"), "exit 0"),
        (
            bin.join("ncu"),
            "echo 'NVIDIA (R) Nsight Compute Command Line Profiler'",
        ),
    ] {
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let python = fake_python(dir, Some(lib.to_str().unwrap()));
    let out = dir.join("out");
    let mut path = std::env::var("PATH").unwrap_or_default();
    if ncu {
        path = format!("{}:{path}", bin.display());
    }
    let o = Command::new("bash")
        .arg(dir.join("device-check"))
        .env("PATH", path)
        .env("PYTHON", &python)
        .env("OUT", &out)
        .env("HARDWARE_ONLY", "1")
        .env_remove("LD_PRELOAD")
        .output()
        .expect("bash runs device-check");
    let summary = std::fs::read_to_string(out.join("summary.txt")).unwrap_or_default();
    (o.status.code(), summary)
}

const NO_CUDA: &str =
    "echo 'verify-decoder: error: --device cuda:0: libtorch cannot use CUDA here (x)'; exit 2";

#[test]
fn a_bundle_run_without_a_working_gpu_is_not_a_pass() {
    let (code, summary) = bundle(NO_CUDA, true);
    assert_eq!(code, Some(1), "{summary}");
    assert!(summary.contains("cannot run on cuda:0"), "{summary}");
    assert!(summary.contains("not with LD_PRELOAD"), "{summary}");
}

#[test]
fn the_bundle_falls_back_to_preloading_libtorch_cuda() {
    // CUDA works only when libtorch_cuda is preloaded: every later run must get it too.
    let body = format!("[ -n \"$LD_PRELOAD\" ] && exit 0\n{NO_CUDA}");
    let (code, summary) = bundle(&body, true);
    assert_eq!(code, Some(0), "{summary}");
    assert!(
        summary.contains("every run below uses LD_PRELOAD"),
        "{summary}"
    );
    assert!(summary.contains("libtorch_cuda.so"), "{summary}");
}

#[test]
fn a_bundle_run_with_cuda_working_at_start_up_passes_its_preflight() {
    let (code, summary) = bundle("exit 0", false);
    assert_eq!(code, Some(0), "{summary}");
    assert!(summary.contains("runs on cuda:0"), "{summary}");
    assert!(!summary.contains("LD_PRELOAD"), "{summary}");
}

#[test]
fn hardware_counters_fall_back_to_range_replay_without_the_moe_layers() {
    // ncu is there; the app-range run fails, the range-replay run of the other layers works.
    let body = "case \"$*\" in\n\
        *'--ncu-replay range --layers DeepseekV2MLP,MoEGate,'*--hardware-counters*) exit 0 ;;\n\
        *--hardware-counters*) echo 'ncu: Failed to profile'; exit 2 ;;\n\
        esac\nexit 0";
    let (code, summary) = bundle_with(body, false, true);
    assert_eq!(
        code,
        Some(1),
        "a failed app-range run still fails the check: {summary}"
    );
    for name in ["hw-bf16-prefill", "hw-bf16-decode", "hw-fp32-prefill"] {
        assert!(
            summary.contains(&format!("{name:<28} exit 2")),
            "{name}: {summary}"
        );
        let fallback = format!("{name}-range");
        assert!(
            summary.contains(&format!("{fallback:<28} exit 0")),
            "{fallback}: {summary}"
        );
    }
}

/// Runs `scripts/<script>` with the `.venv`'s Python (or `python3`) on `files` written to a
/// fresh folder, passing the folder (`None`) or the files themselves (`Some(names)`):
/// (exit code, stdout, stderr).
fn python_script(
    script: &str,
    tag: &str,
    files: &[(&str, String)],
    args: Option<&[&str]>,
) -> (Option<i32>, String, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let venv = root.join(".venv/bin/python");
    let python = if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    };
    let tmp = tempfile::Builder::new()
        .prefix(&format!("mm-{tag}-"))
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    for (name, text) in files {
        std::fs::write(dir.join(name), text).unwrap();
    }
    let mut cmd = Command::new(python);
    cmd.arg(root.join("scripts").join(script));
    match args {
        None => cmd.arg(dir),
        Some(names) => cmd.args(names.iter().map(|n| dir.join(n))),
    };
    let o = cmd.output().expect("python runs the script");
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn exactness_scan(tag: &str, files: &[(&str, String)]) -> (Option<i32>, String) {
    let (code, out, _) = python_script("exactness-scan.py", &format!("scan-{tag}"), files, None);
    (code, out)
}

/// A verify-decoder report of one MoE layer on `device` with this routing and FLOP rows.
fn moe_report(device: &str, seed: u64, tokens: &[u64], matmul: u64) -> String {
    let platform = &device[..device.find(':').unwrap_or(device.len())];
    format!(
        r#"{{"environment": {{"device": "{device}", "dtype": "fp32", "seed": {seed},
              "attention": "sdpa", "tf32_allowed": false}},
            "config": {{"hidden_size": 64}}, "workload": {{"seq_len": 8, "platform": "{platform}"}},
            "layers": [{{"name": "DeepseekV2MoE", "tokens_per_expert": {tokens:?},
              "metrics": [{{"metric": "matmul_flops", "analytic": 1, "measured": {matmul}}},
                          {{"metric": "io_bytes", "analytic": 1, "measured": {matmul}}}]}}]}}"#
    )
}

fn cross_device(tag: &str, a: String, b: String) -> (Option<i32>, String, String) {
    python_script(
        "cross-device.py",
        &format!("cross-{tag}"),
        &[("a.json", a), ("b.json", b)],
        Some(&["a.json", "b.json"]),
    )
}

#[test]
fn cross_device_compares_routing_and_flops_of_one_run() {
    let cuda = moe_report("cuda:0", 0, &[3, 5], 100);
    let (code, out, err) = cross_device("same", cuda.clone(), moe_report("cpu", 0, &[3, 5], 100));
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("2 counts identical between cuda:0 and cpu (seed 0)"),
        "{out}"
    );
    // Bytes may differ between devices (blocks vs tensor bytes); routing and FLOPs may not.
    let (code, out, err) =
        cross_device("routing", cuda.clone(), moe_report("cpu", 0, &[4, 4], 100));
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.contains("DeepseekV2MoE: tokens_per_expert [3, 5] vs [4, 4]"),
        "{out}"
    );
    let (code, out, _) = cross_device("flops", cuda.clone(), moe_report("cpu", 0, &[3, 5], 101));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("measured matmul_flops 100 vs 101"), "{out}");
    // Another seed is another run: refused, not compared.
    let (code, _, err) = cross_device("seed", cuda.clone(), moe_report("cpu", 1, &[3, 5], 100));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("different seed"), "{err}");
    // Another workload likewise (the platform alone may differ).
    let longer = moe_report("cpu", 0, &[3, 5], 100).replace("\"seq_len\": 8", "\"seq_len\": 9");
    let (code, _, err) = cross_device("workload", cuda.clone(), longer);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("different workloads"), "{err}");
    // A built-in config and its file are one config (only the name differs); another
    // size is another config.
    let named = |name: &str| {
        cuda.replace(
            "\"hidden_size\": 64",
            &format!("\"name\": \"{name}\", \"hidden_size\": 64"),
        )
    };
    let (code, out, err) = cross_device(
        "named",
        named("deepseek-ocr-v1-base"),
        named("fixtures/deepseek-ocr/config.json").replace("cuda:0", "cpu"),
    );
    assert_eq!(code, Some(0), "{out}{err}");
    let wider = cuda.replace("\"hidden_size\": 64", "\"hidden_size\": 128");
    let (code, _, err) = cross_device("config", cuda.clone(), wider);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("different configs"), "{err}");
    // Nothing in common is not an identical pair.
    let other = cuda.replace("DeepseekV2MoE", "DeepseekV2MLP");
    let (code, _, err) = cross_device("none", cuda, other.replace("tokens_per_expert", "x"));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("nothing compared"), "{err}");
}

fn rows(analytic: u64, measured: u64) -> String {
    format!(
        r#"[{{"metric": "io_bytes", "analytic": {analytic}, "measured": {measured}}},
            {{"metric": "peak_activation_bytes", "analytic": 7, "measured": 7}}]"#
    )
}

/// A `--model` report: an exact prefill call, then a decode call whose kept part has
/// `part` as its rows, and a phase.
fn model_report(part: &str) -> String {
    format!(
        r#"{{"model": {{"calls": [
            {{"phase": "prefill", "context_len": 0, "metrics": {exact}, "layers": [{{"name": "layers.0", "metrics": {exact}}}]}},
            {{"phase": "decode", "context_len": 4, "metrics": {exact}, "layers": [{{"name": "layers.1", "metrics": {part}}}]}}],
          "phases": [{{"phase": "total", "metrics": {exact}, "groups": [{{"name": "norm", "metrics": {exact}}}]}}]}}}}"#,
        exact = rows(5, 5)
    )
}

#[test]
fn the_exactness_scan_reads_model_reports_and_refuses_unreadable_ones() {
    // The scan once read only single-layer reports: a --model run's rows, all under
    // model.calls[].layers[] and model.phases[], were never looked at.
    let single = format!(
        r#"{{"layers": [{{"name": "MoEGate", "metrics": {}}}]}}"#,
        rows(3, 3)
    );
    let (code, out) = exactness_scan(
        "exact",
        &[
            ("verify-a.json", single.clone()),
            ("model-a.json", model_report(&rows(9, 9))),
        ],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("exact rows: 7 of 7"), "{out}");
    assert!(out.contains("peak rows: 7 of 7 exact"), "{out}");

    let (code, out) = exactness_scan("model", &[("model-a.json", model_report(&rows(9, 8)))]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("INEXACT model-a.json decode C=4 layers.1 io_bytes: analytic 9 measured 8"),
        "{out}"
    );

    // A report with nothing the scan can read is a failure, not an empty pass.
    let (code, out) = exactness_scan(
        "empty",
        &[
            ("verify-a.json", single),
            ("model-b.json", r#"{"model": {"calls": []}}"#.into()),
        ],
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("NO EXACT ROWS in model-b.json"), "{out}");
}

#[test]
fn hardware_only_without_ncu_checks_nothing_and_is_not_a_pass() {
    // Every run would be "skipped, ncu not found" and the exactness scan pass on 0 of 0:
    // the check must fail and say why, though the preflight passed.
    let (code, summary) = bundle_with("exit 0", false, false);
    assert_eq!(code, Some(1), "{summary}");
    assert!(summary.contains("runs on cuda:0"), "{summary}");
    assert!(summary.contains("HARDWARE_ONLY=1 without ncu"), "{summary}");
}
