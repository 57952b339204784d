//! `--hardware-counters` without a GPU: the refusals of the binary (one line, exit 2),
//! and the bookkeeping of a hardware-counter run on CPU through the library: the profiled
//! child's range list, a synthetic range-replay CSV for it, and the rows and `hardware`
//! objects the parent adds. The profiler ranges themselves and real counters need a GPU
//! with ncu (scripts/device-check).

use std::path::{Path, PathBuf};
use std::process::Output;

use clap::Parser;
use modelmeter_verify::app::{prepare, report_of, Args};
use modelmeter_verify::hardware::profile::{self, RunFiles};
use modelmeter_verify::hardware::ranges::RangeList;
use modelmeter_verify::report::{self, Report};
use serde_json::Value;

mod common;
use common::{assert_refused, TempDir};

fn verify(args: &[&str], path: Option<&Path>) -> Output {
    match path {
        Some(p) => common::verify_env(args, &[("PATH", p.to_str().unwrap())]),
        None => common::verify(args),
    }
}

/// An executable stand-in for ncu that must never be run by a refused invocation.
fn fake_ncu(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let ncu = dir.join("ncu");
    std::fs::write(&ncu, "#!/bin/sh\necho fake ncu ran >&2\nexit 3\n").unwrap();
    std::fs::set_permissions(&ncu, std::fs::Permissions::from_mode(0o755)).unwrap();
    ncu
}

#[test]
fn options_that_cannot_work_are_refused_in_one_line() {
    let tmp = TempDir::new("refusals");
    let ncu = fake_ncu(&tmp.0);
    let ncu = ncu.to_str().unwrap();
    let cases: [(&[&str], &[&str]); 7] = [
        (
            &["--device", "cpu", "--hardware-counters", "--ncu", ncu],
            &["--device cpu", "cuda:0"],
        ),
        (
            &["--hardware-counters", "--ncu", ncu, "--sweep", "2"],
            &["--hardware-counters does not apply with --sweep"],
        ),
        (
            &["--hardware-counters", "--ncu", ncu, "--model"],
            &["does not apply with --model"],
        ),
        (
            &["--hardware-counters", "--ncu", "/nonexistent/ncu"],
            &["--ncu /nonexistent/ncu is not an executable file"],
        ),
        (
            &["--ncu-dir", "x"],
            &["--ncu-dir applies only with --hardware-counters"],
        ),
        (
            &["--hardware-counters-from", "/nonexistent/run"],
            &["is not a folder", "ranges.json"],
        ),
        (
            &["--hardware-counters", "--hardware-counters-from", "/tmp"],
            &["give one"],
        ),
    ];
    for (args, needles) in cases {
        assert_refused(&verify(args, None), needles);
    }
}

#[test]
fn without_ncu_on_path_the_error_says_what_to_install_once_the_gpu_is_there() {
    let tmp = TempDir::new("no-ncu");
    let o = verify(&["--hardware-counters"], Some(&tmp.0));
    if modelmeter_reference::cuda_backend::is_available() {
        assert_refused(&o, &["ncu", "not on PATH", "--ncu PATH"]);
    } else {
        // The device comes first: installing ncu would not help without a GPU
        // (find_ncu's own messages are unit-tested in hardware/profile.rs).
        assert_refused(&o, &["needs a CUDA GPU"]);
        assert!(!String::from_utf8_lossy(&o.stderr).contains("ncu"));
    }
}

#[test]
fn without_a_gpu_the_error_says_so_and_ncu_never_runs() {
    if modelmeter_reference::cuda_backend::is_available() {
        eprintln!("skipped: a GPU is present (scripts/device-check runs the real thing)");
        return;
    }
    let tmp = TempDir::new("no-gpu");
    let ncu = fake_ncu(&tmp.0);
    let o = verify(&["--hardware-counters"], Some(&tmp.0));
    assert_refused(&o, &["needs a CUDA GPU", "sees none", "--device cuda:0"]);
    let o = verify(
        &["--hardware-counters", "--ncu", ncu.to_str().unwrap()],
        None,
    );
    assert_refused(&o, &["needs a CUDA GPU"]);
    assert!(!String::from_utf8_lossy(&o.stderr).contains("fake ncu ran"));
    // The error names the option given, not one the user did not pass.
    let child = tmp.0.join("child");
    let o = verify(
        &["--hardware-counters-child", child.to_str().unwrap()],
        None,
    );
    assert_refused(&o, &["--hardware-counters-child needs a CUDA GPU"]);
    // An explicit CUDA device that is not there is refused by the device check.
    let o = verify(
        &[
            "--device",
            "cuda:0",
            "--hardware-counters",
            "--ncu",
            ncu.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&o.stderr).contains("fake ncu ran"));
}

/// One range-replay result row per range of `list`, with the tensor ops of range i set
/// to `tensor[i]` and fixed other figures.
fn range_replay_csv(list: &RangeList, tensor: &[u64]) -> String {
    let mut csv = String::from(
        "==PROF== Connected to process 1 (verify-decoder)\n\
         \"ID\",\"Kernel Name\",\"dram__bytes_read.sum\",\"dram__bytes_write.sum\",\"gpu__time_duration.sum\",\"lts__t_bytes.sum\",\"sm__ops_path_tensor_src_bf16_dst_fp32.sum\",\"smsp__sass_thread_inst_executed_op_ffma_pred_on.sum\",\"smsp__sass_thread_inst_executed_op_fadd_pred_on.sum\",\"smsp__sass_thread_inst_executed_op_fmul_pred_on.sum\"\n\
         \"\",\"\",\"byte\",\"byte\",\"ns\",\"byte\",\"\",\"inst\",\"inst\",\"inst\"\n",
    );
    for (i, (record, t)) in list.ranges.iter().zip(tensor).enumerate() {
        // Half the CUDA-core FLOPs as FMAs: 2·FFMA = the counted figure.
        csv.push_str(&format!(
            "\"{i}\",\"range\",\"1,000\",\"24\",\"5,000\",\"4,096\",\"{t}\",\"{}\",\"0\",\"0\"\n",
            record.cuda_core_flops / 2
        ));
    }
    csv
}

fn layer<'a>(json: &'a Value, name: &str) -> &'a Value {
    json["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("{name}"))
}

fn row<'a>(layer: &'a Value, metric: &str) -> &'a Value {
    layer["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["metric"] == metric)
        .unwrap_or_else(|| panic!("{metric}"))
}

#[test]
fn a_profiled_run_is_attributed_to_its_layers_on_cpu() {
    let argv = [
        "verify-decoder",
        "--device",
        "cpu",
        "--quiet",
        "--dtype",
        "bf16",
        "--seq-len",
        "8",
        "--layers",
        "DeepseekV2MLP,MoEGate",
    ];
    let args = Args::try_parse_from(argv).expect("valid options");
    let ready = prepare(&args).expect("checks out");
    let tmp = TempDir::new("child");
    // The child: each counted forward after a warm-up (no range on CPU), the list written.
    let child = profile::run_child(&ready.plan, "cpu".into(), &tmp.0).expect("child runs");
    assert_eq!(child.len(), 2);
    let list = RangeList::read(&tmp.0).expect("written");
    let names: Vec<&str> = list.ranges.iter().map(|r| r.layer.as_str()).collect();
    assert_eq!(names, ["DeepseekV2MLP", "MoEGate"]);
    assert!(list.errors.is_empty());
    let (mlp, gate) = (&list.ranges[0], &list.ranges[1]);
    assert!(mlp.tensor_core_flops > 0, "bf16 GEMMs are tensor-core work");
    assert_eq!(
        gate.tensor_core_flops, 0,
        "the gate's fp32 GEMM is CUDA-core work"
    );

    let attach = |tensor: &[u64]| -> (Report, Value) {
        let files = RunFiles {
            csv: range_replay_csv(&list, tensor),
            ranges: list.clone(),
            left_out: Vec::new(),
        };
        let attributed = profile::attributed(&files);
        let mut report = report_of(&args, &ready);
        profile::attach(&mut report, &ready.plan, &attributed, "NVIDIA H200");
        let json = report::to_json(&report);
        (report, json)
    };

    // The hardware agrees: 1.0125 × the MLP's tensor FLOPs (tile padding), 0 for the gate.
    let padded = mlp.tensor_core_flops + mlp.tensor_core_flops / 80;
    let (report, json) = attach(&[padded, 0]);
    assert!(report.summary().ok(), "{}", report::to_table(&report));
    let m = layer(&json, "DeepseekV2MLP");
    let t = row(m, "hw_tensor_flops");
    assert_eq!(t["status"], "pass");
    assert_eq!(t["analytic"], mlp.tensor_core_flops);
    assert_eq!(t["measured"], padded);
    assert_eq!(m["hardware"]["figures"]["tensor_ops_bf16"], padded);
    assert!(
        m["hardware"]["figures"]["tensor_ops_fp16"].is_null(),
        "unavailable, not 0"
    );
    assert_eq!(m["hardware"]["counted"]["io_bytes"], mlp.io_bytes);
    assert_eq!(m["hardware"]["roofline"]["peaks"]["model"], "H200 SXM");
    for metric in ["hw_dram_bytes", "hw_l2_bytes", "hw_time_ns"] {
        assert_eq!(row(m, metric)["status"], "info", "{metric}");
    }
    assert_eq!(row(m, "hw_time_ns")["measured"], 5000);
    let g = layer(&json, "MoEGate");
    assert_eq!(row(g, "hw_tensor_flops")["status"], "pass");
    assert_eq!(row(g, "hw_tensor_flops")["measured"], 0);
    // The gate's CUDA-core work is its SIMT GEMM: checked, and equal here.
    let cuda = row(g, "hw_cuda_core_flops");
    assert_eq!(
        (cuda["status"].as_str(), &cuda["measured"]),
        (Some("pass"), &cuda["analytic"])
    );
    let table = report::to_table(&report);
    assert!(
        table.contains("hw_tensor_flops") && table.contains("5.0 µs"),
        "{table}"
    );

    // The hardware disagrees: tensor work on the gate, none on the MLP.
    let (report, json) = attach(&[0, 1_000_000]);
    assert!(!report.summary().ok());
    for name in ["DeepseekV2MLP", "MoEGate"] {
        let l = layer(&json, name);
        assert_eq!(row(l, "hw_tensor_flops")["status"], "fail", "{name}");
        assert_eq!(l["status"], "fail", "{name}");
    }

    // A range missing from ncu's CSV: nothing is attributed, every layer says why.
    let files = RunFiles {
        csv: range_replay_csv(&list, &[padded]),
        ranges: list.clone(),
        left_out: Vec::new(),
    };
    let mut report = report_of(&args, &ready);
    profile::attach(
        &mut report,
        &ready.plan,
        &profile::attributed(&files),
        "NVIDIA H200",
    );
    let json = report::to_json(&report);
    for name in ["DeepseekV2MLP", "MoEGate"] {
        let r = row(layer(&json, name), "hw_tensor_flops");
        assert_eq!(r["status"], "fail");
        assert!(r["note"]
            .as_str()
            .unwrap()
            .contains("1 result row(s) for the 2 range(s)"));
        assert!(layer(&json, name)["hardware"].is_null());
    }
}
