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
use modelmeter_verify::hardware::ranges::{RangeEntry, RangeList, RangeRecord};
use modelmeter_verify::hardware::LeftOut;
use modelmeter_verify::report::{self, Report};
use modelmeter_verify::results::Progress;
use serde_json::Value;

mod common;
use common::{assert_refused, row, TempDir};

fn verify(args: &[&str], path: Option<&Path>) -> Output {
    match path {
        Some(p) => common::verify_env(args, &[("PATH", p.to_str().unwrap())]),
        None => common::verify(args),
    }
}

/// `dir/ncu`, an executable shell script with `script` as its text.
fn ncu_script(dir: &Path, script: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let ncu = dir.join("ncu");
    std::fs::write(&ncu, script).unwrap();
    std::fs::set_permissions(&ncu, std::fs::Permissions::from_mode(0o755)).unwrap();
    ncu
}

/// An executable stand-in for ncu that must never be run by a refused invocation.
fn fake_ncu(dir: &Path) -> PathBuf {
    ncu_script(dir, "#!/bin/sh\necho fake ncu ran >&2\nexit 3\n")
}

#[test]
fn options_that_cannot_work_are_refused_in_one_line() {
    let tmp = TempDir::new("refusals");
    let ncu = fake_ncu(tmp.root());
    let ncu = ncu.to_str().unwrap();
    let cases: [(&[&str], &[&str]); 9] = [
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
        (
            &["--hardware-counters-from", "/tmp", "--ncu-replay", "kernel"],
            &[
                "--ncu-replay applies only with --hardware-counters",
                "reads the folder",
            ],
        ),
        (
            &["--hardware-counters", "--hardware-counters-child", "/tmp/x"],
            &[
                "--hardware-counters-child is what --hardware-counters runs",
                "give one",
            ],
        ),
    ];
    for (args, needles) in cases {
        assert_refused(&verify(args, None), needles);
    }
}

#[test]
fn without_ncu_on_path_the_error_says_what_to_install_once_the_gpu_is_there() {
    let tmp = TempDir::new("no-ncu");
    let o = verify(&["--hardware-counters"], Some(tmp.root()));
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
    let ncu = fake_ncu(tmp.root());
    let o = verify(&["--hardware-counters"], Some(tmp.root()));
    assert_refused(&o, &["needs a CUDA GPU", "sees none", "--device cuda:0"]);
    let o = verify(
        &["--hardware-counters", "--ncu", ncu.to_str().unwrap()],
        None,
    );
    assert_refused(&o, &["needs a CUDA GPU"]);
    assert!(!String::from_utf8_lossy(&o.stderr).contains("fake ncu ran"));
    // The error names the option given, not one the user did not pass.
    let child = tmp.root().join("child");
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

/// One range-replay result row per range of `list` (failed layers' included, and those
/// of unknown range; a layer that opened none has no row), as many as `tensor` has values, with the bf16 tensor ops of range i set to `tensor[i]`, the fp16 and tf32 tensor pipes measured at 0 (every tensor pipe
/// measured), and fixed other figures. The FFMA column is built from the counted
/// CUDA-core FLOPs, so it checks plumbing, not the counter.
fn range_replay_csv(list: &RangeList, tensor: &[u64]) -> String {
    replay_csv(list, tensor, true)
}

/// [`range_replay_csv`], with the fp16 and tf32 tensor pipes only when `all_pipes`
/// (without them: metrics ncu was not asked for).
fn replay_csv(list: &RangeList, tensor: &[u64], all_pipes: bool) -> String {
    let (pipes, pipe_units, pipe_cells) = if all_pipes {
        (
            "\"sm__ops_path_tensor_src_fp16_dst_fp32.sum\",\"sm__ops_path_tensor_src_tf32_dst_fp32.sum\",",
            "\"\",\"\",",
            "\"0\",\"0\",",
        )
    } else {
        ("", "", "")
    };
    let mut csv = format!(
        "==PROF== Connected to process 1 (verify-decoder)\n\
         \"ID\",\"Kernel Name\",\"dram__bytes_read.sum\",\"dram__bytes_write.sum\",\"gpu__time_duration.sum\",\"lts__t_bytes.sum\",\"sm__ops_path_tensor_src_bf16_dst_fp32.sum\",{pipes}\"smsp__sass_thread_inst_executed_op_ffma_pred_on.sum\",\"smsp__sass_thread_inst_executed_op_fadd_pred_on.sum\",\"smsp__sass_thread_inst_executed_op_fmul_pred_on.sum\"\n\
         \"\",\"\",\"byte\",\"byte\",\"ns\",\"byte\",\"\",{pipe_units}\"inst\",\"inst\",\"inst\"\n",
    );
    let ranges = list
        .layers
        .iter()
        .filter(|e| !matches!(e, RangeEntry::NotOpened { .. }));
    for (i, (entry, t)) in ranges.zip(tensor).enumerate() {
        // Half the CUDA-core FLOPs as FMAs: 2·FFMA = the counted figure.
        let cuda_core_flops = match entry {
            RangeEntry::Counted(record) => record.cuda_core_flops,
            _ => 0,
        };
        csv.push_str(&format!(
            "\"{i}\",\"range\",\"1,000\",\"24\",\"5,000\",\"4,096\",\"{t}\",{pipe_cells}\"{}\",\"0\",\"0\"\n",
            cuda_core_flops / 2
        ));
    }
    csv
}

/// `csv` (a synthetic export, every cell quoted) without its SASS instruction columns:
/// what ncu writes when they were not asked for.
fn without_sass_columns(csv: &str) -> String {
    let mut keep: Option<Vec<bool>> = None;
    let mut out = String::new();
    for line in csv.lines() {
        if !line.starts_with('"') {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let inner = line
            .strip_prefix('"')
            .and_then(|l| l.strip_suffix('"'))
            .unwrap();
        let cells: Vec<&str> = inner.split("\",\"").collect();
        let keep =
            keep.get_or_insert_with(|| cells.iter().map(|c| !c.contains("__sass_")).collect());
        let kept: Vec<&str> = cells
            .iter()
            .zip(keep.iter())
            .filter_map(|(c, k)| k.then_some(*c))
            .collect();
        out.push_str(&format!("\"{}\"\n", kept.join("\",\"")));
    }
    out
}

fn layer<'a>(json: &'a Value, name: &str) -> &'a Value {
    json["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("{name}"))
}

/// The profiled child's work on the CPU (no ranges there) for `verify-decoder --device cpu
/// --quiet <options>`: the parsed options, the prepared run, the child's folder (its
/// `ranges.json` written) and its layer results.
fn child_on_cpu(
    tag: &str,
    options: &[&str],
) -> (
    Args,
    modelmeter_verify::app::Ready,
    TempDir,
    Vec<modelmeter_verify::results::LayerResult>,
) {
    let mut argv = vec!["verify-decoder", "--device", "cpu", "--quiet"];
    argv.extend_from_slice(options);
    let args = Args::try_parse_from(argv).expect("valid options");
    let ready = prepare(&args).expect("checks out");
    let tmp = TempDir::new(tag);
    let child = profile::run_child(&ready.plan, "cpu".into(), tmp.root()).expect("child runs");
    (args, ready, tmp, child)
}

/// The report of `ready` with the hardware rows of a synthetic range-replay CSV (range i
/// with `tensor[i]` tensor ops) attached, and its JSON.
fn attached(
    args: &Args,
    ready: &modelmeter_verify::app::Ready,
    list: &RangeList,
    tensor: &[u64],
) -> (Report, Value) {
    attached_csv(args, ready, list, range_replay_csv(list, tensor))
}

/// [`attached`] with the range-replay CSV given.
fn attached_csv(
    args: &Args,
    ready: &modelmeter_verify::app::Ready,
    list: &RangeList,
    csv: String,
) -> (Report, Value) {
    attached_run(args, ready, list, csv, Vec::new())
}

/// [`attached_csv`] for a run that left `left_out` out of ncu's command.
fn attached_run(
    args: &Args,
    ready: &modelmeter_verify::app::Ready,
    list: &RangeList,
    csv: String,
    left_out: Vec<LeftOut>,
) -> (Report, Value) {
    let files = RunFiles {
        csv,
        ranges: list.clone(),
        left_out,
        replay: Some(profile::NcuReplay::AppRange),
    };
    let mut report = report_of(args, ready);
    profile::attach(
        &mut report,
        &ready.plan,
        &profile::attributed(&files),
        "NVIDIA H200",
    );
    let json = report::to_json(&report);
    (report, json)
}

/// The options of the child runs that profile the MLP and the gate, in bf16 at S = 8.
const MLP_AND_GATE: [&str; 6] = [
    "--dtype",
    "bf16",
    "--seq-len",
    "8",
    "--layers",
    "DeepseekV2MLP,MoEGate",
];

#[test]
fn a_profiled_run_is_attributed_to_its_layers_on_cpu() {
    // The child: each counted forward after a warm-up (no range on CPU), the list written.
    let (args, ready, tmp, child) = child_on_cpu("child", &MLP_AND_GATE);
    assert_eq!(child.len(), 2);
    let list = RangeList::read(tmp.root()).expect("written");
    // The list says what the child ran, so a reader can refuse another run's figures.
    assert_eq!(list.run, Some(profile::run_identity(&ready.plan)));
    let counted: Vec<&RangeRecord> = list.counted().collect();
    let names: Vec<&str> = counted.iter().map(|r| r.layer.as_str()).collect();
    assert_eq!(names, ["DeepseekV2MLP", "MoEGate"]);
    assert_eq!(list.layers.len(), 2, "no failed layer");
    let (mlp, gate) = (counted[0], counted[1]);
    assert!(mlp.tensor_core_flops > 0, "bf16 GEMMs are tensor-core work");
    assert_eq!(
        gate.tensor_core_flops, 0,
        "the gate's fp32 GEMM is CUDA-core work"
    );

    let attach = |tensor: &[u64]| attached(&args, &ready, &list, tensor);

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
    // Every tensor pipe measured: fp16 and tf32 executed nothing (0, not unavailable).
    for pipe in ["tensor_ops_fp16", "tensor_ops_tf32"] {
        assert_eq!(m["hardware"]["figures"][pipe], 0, "{pipe}");
        assert_eq!(
            layer(&json, "MoEGate")["hardware"]["figures"][pipe],
            0,
            "{pipe}"
        );
    }
    assert_eq!(m["hardware"]["counted"]["io_bytes"], mlp.io_bytes);
    assert_eq!(m["hardware"]["roofline"]["peaks"]["model"], "H200 SXM");
    assert_eq!(m["hardware"]["time"], "range_elapsed");
    for metric in ["hw_dram_bytes", "hw_l2_bytes", "hw_time_ns"] {
        assert_eq!(row(m, metric)["status"], "info", "{metric}");
    }
    assert_eq!(row(m, "hw_time_ns")["measured"], 5000);
    let g = layer(&json, "MoEGate");
    assert_eq!(row(g, "hw_tensor_flops")["status"], "pass");
    assert_eq!(row(g, "hw_tensor_flops")["measured"], 0);
    // The gate's CUDA-core work is its SIMT GEMM. The synthetic CSV's FFMA column is
    // built from the counted figure (2·FFMA = cuda_core_flops), so equality here checks
    // the plumbing (CSV → figures → row), not the counter against the hardware.
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

    // Pipes ncu was not asked for are unavailable (null), not 0; the bf16 figure alone
    // still checks the tensor work.
    let csv = replay_csv(&list, &[padded, 0], false);
    let (report, json) = attached_csv(&args, &ready, &list, csv);
    assert!(report.summary().ok(), "{}", report::to_table(&report));
    let m = layer(&json, "DeepseekV2MLP");
    for pipe in ["tensor_ops_fp16", "tensor_ops_tf32"] {
        assert!(
            m["hardware"]["figures"][pipe].is_null(),
            "{pipe}: unavailable, not 0"
        );
    }
    assert_eq!(row(m, "hw_tensor_flops")["measured"], padded);

    // App-range replay: the SASS instruction metrics were left out of ncu's command, and
    // the CSV has no column for them. The row and the JSON say why, not "the device lacks
    // the metric".
    let left_out = profile::left_out_up_front(profile::NcuReplay::AppRange);
    let csv = without_sass_columns(&range_replay_csv(&list, &[padded, 0]));
    let (report, json) = attached_run(&args, &ready, &list, csv, left_out.clone());
    assert!(report.summary().ok(), "{}", report::to_table(&report));
    let m = layer(&json, "DeepseekV2MLP");
    let cuda = row(m, "hw_cuda_core_flops");
    assert_eq!(cuda["status"], "info");
    let note = cuda["note"].as_str().unwrap();
    assert!(
        note.contains("only in kernel replay, not in app-range replay"),
        "{note}"
    );
    assert!(!note.contains("lacks the metric"), "{note}");
    let listed = m["hardware"]["figures"]["left_out"].as_array().unwrap();
    assert_eq!(listed.len(), left_out.len());
    assert_eq!(listed[0]["metric"], left_out[0].metric.as_str());
    assert!(listed[0]["why"]
        .as_str()
        .unwrap()
        .contains("--ncu-replay kernel"));
    assert!(m["hardware"]["figures"]["ffma"].is_null());

    // The hardware disagrees: tensor work on the gate, none on the MLP.
    let (report, json) = attach(&[0, 1_000_000]);
    assert!(!report.summary().ok());
    for name in ["DeepseekV2MLP", "MoEGate"] {
        let l = layer(&json, name);
        assert_eq!(row(l, "hw_tensor_flops")["status"], "fail", "{name}");
        assert_eq!(l["status"], "fail", "{name}");
    }

    // A range missing from ncu's CSV: nothing is attributed, every layer says why.
    let (_, json) = attached(&args, &ready, &list, &[padded]);
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

/// The options of the failed-layer tests: the gate between the MLP and the norm.
const GATE_BETWEEN: [&str; 10] = [
    "verify-decoder",
    "--device",
    "cpu",
    "--quiet",
    "--dtype",
    "bf16",
    "--seq-len",
    "8",
    "--layers",
    "DeepseekV2MLP,MoEGate,DeepseekV2RMSNorm",
];

/// A layer without figures in a kernel-replay run says why where the run knows (its own
/// ncu run's error), and only that layer; another layer without figures gets the general
/// reason.
#[test]
fn a_layer_without_figures_says_why_where_the_run_knows() {
    let (args, ready, _tmp, _child) = child_on_cpu("reasons", &MLP_AND_GATE);
    let mut report = report_of(&args, &ready);
    let reasons = [(
        "MoEGate".to_string(),
        "ncu profiled no kernel in its run".to_string(),
    )];
    profile::attach_with_reasons(
        &mut report,
        &ready.plan,
        &Ok(Vec::new()),
        &reasons,
        "NVIDIA H200",
    );
    let json = report::to_json(&report);
    let note = |name: &str| {
        row(layer(&json, name), "hw_tensor_flops")["note"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        note("MoEGate"),
        "no hardware figures for this layer: ncu profiled no kernel in its run"
    );
    assert!(
        note("DeepseekV2MLP").contains("(why: its error in ranges.json)"),
        "{}",
        note("DeepseekV2MLP")
    );
    for name in ["MoEGate", "DeepseekV2MLP"] {
        assert_eq!(layer(&json, name)["status"], "fail", "{name}");
    }
}

#[test]
fn a_layer_that_failed_before_its_range_takes_no_row() {
    // The child: the gate fails before its range is opened (a test hook's error, raised
    // before the module is built). The list keeps it in its place, with no range.
    let args = Args::try_parse_from(GATE_BETWEEN).expect("valid options");
    let mut ready = prepare(&args).expect("checks out");
    ready.plan.hooks.fail_layer = Some("MoEGate".into());
    let tmp = TempDir::new("failed-before-range");
    profile::run_child(&ready.plan, "cpu".into(), tmp.root()).expect("child runs");
    let list = RangeList::read(tmp.root()).expect("written");
    let layers: Vec<&str> = list.layers.iter().map(RangeEntry::layer).collect();
    assert_eq!(layers, ["DeepseekV2MLP", "MoEGate", "DeepseekV2RMSNorm"]);
    assert!(
        matches!(&list.layers[1], RangeEntry::NotOpened { error, .. } if error.contains("test hook")),
        "{:?}",
        list.layers[1]
    );
    let mlp = list.counted().next().unwrap().tensor_core_flops;
    let padded = mlp + mlp / 80;

    // ncu wrote a row for the two ranges opened: each layer gets its own figures (the
    // norm the second row, 0 tensor ops: a pass), not a verdict of "not settled".
    let (report, json) = attached(&args, &ready, &list, &[padded, 0]);
    assert_norm_got_its_own_row(&json, 1);
    let mlp_row = row(layer(&json, "DeepseekV2MLP"), "hw_tensor_flops");
    assert_eq!(mlp_row["status"], "pass", "{}", mlp_row["note"]);
    assert_eq!(layer(&json, "DeepseekV2MLP")["hardware"]["range"], 0);
    // The gate failed in the parent too (the same hook): an error, no figures.
    assert_eq!(layer(&json, "MoEGate")["status"], "error");
    assert!(layer(&json, "MoEGate")["hardware"].is_null());
    assert_eq!(report.summary().error, 1);
}

/// The norm's figures came from ncu's row `range` (0 tensor ops: a pass), not another
/// layer's.
fn assert_norm_got_its_own_row(json: &Value, range: u64) {
    let norm = row(layer(json, "DeepseekV2RMSNorm"), "hw_tensor_flops");
    assert_eq!(
        (norm["status"].as_str(), &norm["measured"]),
        (Some("pass"), &Value::from(0)),
        "{}",
        norm["note"]
    );
    assert_eq!(layer(json, "DeepseekV2RMSNorm")["hardware"]["range"], range);
}

#[test]
fn a_layer_that_failed_inside_its_range_keeps_its_row() {
    // The child: the gate's counted forward fails inside its range (a counted region is
    // already open on this thread while the gate runs, so the counter cannot arm).
    let args = Args::try_parse_from(GATE_BETWEEN).expect("valid options");
    let ready = prepare(&args).expect("checks out");
    let mut outer = None;
    let results =
        modelmeter_verify::runner::verify_in_profiler_ranges(&ready.plan, &mut |p| match p {
            Progress::Started {
                name: "MoEGate", ..
            } => outer = Some(modelmeter_reference::FlopCounter::start().unwrap()),
            Progress::Finished { .. } => outer = None,
            Progress::Started { .. } => {}
        });
    let list = profile::range_list("cpu".into(), &results);
    assert!(
        matches!(&list.layers[1], RangeEntry::Failed { layer, error } if layer == "MoEGate" && error.contains("already open")),
        "{:?}",
        list.layers[1]
    );
    assert_eq!(list.counted().count(), 2);
    let mlp = list.counted().next().unwrap().tensor_core_flops;
    let padded = mlp + mlp / 80;

    // A row for each of the three ranges: the gate's (5,000,000 tensor ops, a failure if
    // given to the norm) is passed over, the norm gets the third.
    let (_, json) = attached(&args, &ready, &list, &[padded, 5_000_000, 0]);
    assert_norm_got_its_own_row(&json, 2);
    // The gate ran in the parent: it has no figures, and its row says where to look.
    let gate = row(layer(&json, "MoEGate"), "hw_tensor_flops");
    assert_eq!(gate["status"], "fail");
    assert!(
        gate["note"].as_str().unwrap().contains("ranges.json"),
        "{}",
        gate["note"]
    );
    assert!(layer(&json, "MoEGate")["hardware"].is_null());

    // Two rows: ncu skipped a range. Nothing is matched (the norm would get the gate's
    // row), and each layer says why.
    let (report, json) = attached(&args, &ready, &list, &[padded, 0]);
    assert!(!report.summary().ok());
    for name in ["DeepseekV2MLP", "DeepseekV2RMSNorm"] {
        let r = row(layer(&json, name), "hw_tensor_flops");
        assert_eq!(r["status"], "fail", "{name}");
        let note = r["note"].as_str().unwrap();
        assert!(
            note.contains("2 result row(s) for the 3 range(s)"),
            "{note}"
        );
        assert!(layer(&json, name)["hardware"].is_null());
    }
}

#[test]
fn routed_experts_with_few_rows_make_the_moe_padding_information() {
    // 64 tokens, top-6 of 64 experts: 6 rows per expert on average, every expert's GEMMs
    // far under the 64 rows a tile pads to (run-4 on the H200: 1.23× at S = 512).
    let (args, ready, tmp, child) = child_on_cpu(
        "moe-child",
        &[
            "--dtype",
            "bf16",
            "--seq-len",
            "64",
            "--layers",
            "DeepseekV2MoE,DeepseekV2MLP",
        ],
    );
    let list = RangeList::read(tmp.root()).expect("written");

    let result = child.iter().find(|r| r.name == "DeepseekV2MoE").unwrap();
    let context = profile::context_of(&ready.plan, result);
    let routed_rows: i64 = result.tokens_per_expert.as_ref().unwrap().iter().sum();
    assert_eq!(routed_rows, 64 * 6);
    // Routed experts: 2·3·h·m per row; all of it in experts under 64 rows.
    let (h, m) = (1280u64, 896u64);
    assert_eq!(context.small_gemm_flops, 6 * h * m * 64 * 6);
    assert_eq!(context.tokens, 64);
    let mlp_context = profile::context_of(
        &ready.plan,
        child.iter().find(|r| r.name == "DeepseekV2MLP").unwrap(),
    );
    assert_eq!(mlp_context.small_gemm_flops, 0, "64 token rows: not small");

    let attach = |factor: (u64, u64)| -> Value {
        let mut tensor = vec![0; list.layers.len()];
        for (i, r) in list.counted().enumerate() {
            tensor[i] = r.tensor_core_flops * factor.0 / factor.1;
        }
        attached(&args, &ready, &list, &tensor).1
    };
    // 1.25×: above the band; the MoE's is padding of small GEMMs (info), the MLP's not.
    let json = attach((5, 4));
    let moe_row = row(layer(&json, "DeepseekV2MoE"), "hw_tensor_flops");
    assert_eq!(moe_row["status"], "info", "{}", moe_row["note"]);
    assert!(moe_row["note"]
        .as_str()
        .unwrap()
        .contains("fewer than 64 token rows"));
    assert_eq!(
        row(layer(&json, "DeepseekV2MLP"), "hw_tensor_flops")["status"],
        "fail"
    );
    // Half the counted work: padding cannot explain less; both fail.
    let json = attach((1, 2));
    for name in ["DeepseekV2MoE", "DeepseekV2MLP"] {
        assert_eq!(
            row(layer(&json, name), "hw_tensor_flops")["status"],
            "fail",
            "{name}"
        );
    }
}

/// A stand-in for ncu in kernel replay: records its options, writes the child's range
/// list for the one layer named by `--layers`, and as "ncu's CSV" the real per-kernel
/// export of the H200's MLP (`fixtures/ncu-h200`), or, for the gate, no kernel at all.
/// With `refuse` beside it, it refuses `dram__bytes_write.sum` as ncu refuses a metric.
fn kernel_replay_ncu(dir: &Path) -> PathBuf {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/ncu-h200/ncu_mlp_bfloat16.csv")
        .canonicalize()
        .unwrap();
    let script = format!(
        r#"#!/bin/sh
log=""; layer=""; dir=""; layers_given=0; metrics=""
here=$(dirname "$0")
echo "$@" > "$here/last-args.txt"
while [ $# -gt 0 ]; do
  case "$1" in
    --log-file) log=$2; shift ;;
    --metrics) metrics=$2; shift ;;
    --layers) layer=$2; layers_given=$((layers_given + 1)); shift ;;
    --hardware-counters-child) dir=$2; shift ;;
  esac
  shift
done
[ "$layers_given" = 1 ] || {{ echo "--layers given $layers_given times" >&2; exit 2; }}
case ",$metrics," in
  *,dram__bytes_write.sum,*)
    if [ -f "$here/refuse" ]; then
      echo '==ERROR== Metric dram__bytes_write.sum is not supported in kernel replay.' > "$log"
      exit 1
    fi ;;
esac
cat > "$dir/ranges.json" <<JSON
{{"schema": "modelmeter.hardware-ranges/2", "device": "cuda:0",
 "layers": [{{"range": "counted", "layer": "$layer", "tensor_core_flops": 26927431680, "cuda_core_flops": 17530880, "io_bytes": 112623616}}]}}
JSON
if [ "$layer" = MoEGate ]; then
  printf '==PROF== Connected to process 1\n==PROF== Disconnected from process 1\n' > "$log"
else
  cp "{}" "$log"
fi
"#,
        fixture.display()
    );
    ncu_script(dir, &script)
}

#[test]
fn kernel_replay_runs_one_layer_per_ncu_run_and_sums_its_kernels() {
    let tmp = TempDir::new("kernel-replay");
    let ncu = kernel_replay_ncu(tmp.root());
    let own: Vec<std::ffi::OsString> = [
        "--dtype",
        "bf16",
        "--layers=DeepseekV2MLP,MoEGate",
        "--quiet",
    ]
    .iter()
    .map(Into::into)
    .collect();
    let layers = ["DeepseekV2MLP".to_string(), "MoEGate".to_string()];
    let mut seen = Vec::new();
    let run = profile::run_per_layer(
        &ncu,
        Path::new("/bin/true"),
        &own,
        &tmp.root().join("run"),
        &layers,
        &mut |i, name| seen.push((i, name.to_string())),
    )
    .expect("ncu ran");
    assert_eq!(seen, [(0, "DeepseekV2MLP".into()), (1, "MoEGate".into())]);
    // ncu's options: kernel replay of what runs between the profiler calls, and SASS
    // instruction counts asked for (the point of this mode).
    let args = std::fs::read_to_string(tmp.root().join("last-args.txt")).unwrap();
    for needle in [
        "--profile-from-start off",
        "--replay-mode kernel",
        "smsp__sass_thread_inst_executed_op_ffma_pred_on.sum",
        "--layers MoEGate",
    ] {
        assert!(args.contains(needle), "{needle} in {args}");
    }
    assert!(!args.contains("DeepseekV2MLP,MoEGate"), "{args}");
    // The MLP: the export's kernels summed (27,262,976,000 bf16 tensor ops on the H200).
    assert_eq!(
        run.profiled.as_ref().map(|p| p.device.as_str()),
        Some("cuda:0")
    );
    assert_eq!(run.ranges.len(), 1);
    let mlp = &run.ranges[0];
    assert_eq!((mlp.index, mlp.record.layer.as_str()), (0, "DeepseekV2MLP"));
    assert_eq!(mlp.figures.tensor_ops_bf16, Some(27_262_976_000));
    assert!(mlp.figures.rows > 1 && mlp.ncu_id.ends_with("kernels"));
    assert_eq!(
        mlp.time,
        modelmeter_verify::hardware::ranges::TimeSpan::Kernels
    );
    // The gate: no kernel profiled is an error for that layer, not zeros.
    assert_eq!(run.errors.len(), 1);
    assert_eq!(run.errors[0].0, "MoEGate");
    assert!(
        run.errors[0].1.contains("profiled no kernel"),
        "{}",
        run.errors[0].1
    );
    assert!(tmp.root().join("run/0-DeepseekV2MLP/ncu.csv").exists());
    // `--hardware-counters-from` reads the kept folder the same way.
    let again = profile::read_per_layer(&tmp.root().join("run"))
        .expect("a kernel-replay folder")
        .expect("readable");
    assert_eq!(again.ranges, run.ranges);
    assert_eq!(again.errors, run.errors);
    // A range-mode folder (ncu.csv and ranges.json at the top) is not one.
    assert!(profile::read_per_layer(&tmp.root().join("run/0-DeepseekV2MLP")).is_none());
    // A second run into the same folder replaces the first one's layer folders: with one
    // layer, only its folder is read.
    let run = profile::run_per_layer(
        &ncu,
        Path::new("/bin/true"),
        &own,
        &tmp.root().join("run"),
        &layers[..1],
        &mut |_, _| {},
    )
    .expect("ncu ran");
    assert_eq!((run.ranges.len(), run.errors.len()), (1, 0));
    let again = profile::read_per_layer(&tmp.root().join("run"))
        .unwrap()
        .unwrap();
    assert_eq!((again.ranges.len(), again.errors.len()), (1, 0));
    // Folders of two runs, or both layouts, are refused rather than mixed.
    std::fs::create_dir_all(tmp.root().join("run/5-DeepseekV2MLP")).unwrap();
    let twice = profile::read_per_layer(&tmp.root().join("run"))
        .unwrap()
        .unwrap_err();
    assert!(twice.contains("DeepseekV2MLP twice"), "{twice}");
    std::fs::remove_dir_all(tmp.root().join("run/5-DeepseekV2MLP")).unwrap();
    std::fs::write(tmp.root().join("run/ncu.csv"), "").unwrap();
    let both = profile::read_per_layer(&tmp.root().join("run"))
        .unwrap()
        .unwrap_err();
    assert!(both.contains("both a range-replay run"), "{both}");
    std::fs::remove_file(tmp.root().join("run/ncu.csv")).unwrap();

    // The failed layer first, with a metric ncu refuses: refused in the first layer's run,
    // it is left out of the next layer's, and the folder reads back with the failed layer
    // before the one with figures (not as a layer given twice).
    std::fs::write(tmp.root().join("refuse"), "").unwrap();
    let reversed = [layers[1].clone(), layers[0].clone()];
    let run = profile::run_per_layer(
        &ncu,
        Path::new("/bin/true"),
        &own,
        &tmp.root().join("run"),
        &reversed,
        &mut |_, _| {},
    )
    .expect("ncu ran");
    let last = std::fs::read_to_string(tmp.root().join("last-args.txt")).unwrap();
    assert!(last.contains("--layers DeepseekV2MLP"), "{last}");
    assert!(!last.contains("dram__bytes_write.sum"), "{last}");
    assert!(last.contains("dram__bytes_read.sum"), "{last}");
    let refused: Vec<&str> = run.left_out.iter().map(|l| l.metric.as_str()).collect();
    assert_eq!(refused, ["dram__bytes_write.sum"]);
    assert_eq!((run.ranges.len(), run.errors.len()), (1, 1));
    assert_eq!(run.ranges[0].figures.left_out, run.left_out);
    let again = profile::read_per_layer(&tmp.root().join("run"))
        .expect("a kernel-replay folder")
        .expect("readable: each layer once");
    assert_eq!((again.ranges.len(), again.errors.len()), (1, 1));
    assert_eq!(again.errors[0].0, "MoEGate");
    // The GPU the export names, once.
    assert_eq!(again.gpus, ["NVIDIA H200"]);
    // A failed layer's folder twice is refused like a layer with figures twice.
    std::fs::create_dir_all(tmp.root().join("run/7-MoEGate")).unwrap();
    let twice = profile::read_per_layer(&tmp.root().join("run"))
        .unwrap()
        .unwrap_err();
    assert!(twice.contains("MoEGate twice"), "{twice}");
}

/// A stand-in for ncu in a range replay mode: records each command line (a line of
/// `calls.txt` beside it), then answers from files beside it. With `refuse` there, a
/// command that asks for `dram__bytes_write.sum` is refused the way ncu 2025.3 refuses a
/// metric it cannot collect in the mode, and with `refuse-all` there every metric it is
/// asked for; with `child-refuses` there, it ends as a child that refused its options
/// does (exit 2, the refusal on its output); with `range-fails` there, it fails the way ncu does
/// when a range cannot be replayed in place. Otherwise it writes `csv.txt` as its CSV and
/// `ranges.json` as the child's range list.
fn range_replay_ncu(dir: &Path) -> PathBuf {
    ncu_script(
        dir,
        r#"#!/bin/sh
here=$(dirname "$0")
echo "$@" >> "$here/calls.txt"
log=""; child=""; metrics=""
while [ $# -gt 0 ]; do
  case "$1" in
    --log-file) log=$2; shift ;;
    --metrics) metrics=$2; shift ;;
    --hardware-counters-child) child=$2; shift ;;
  esac
  shift
done
case ",$metrics," in
  *,dram__bytes_write.sum,*)
    if [ -f "$here/refuse" ]; then
      echo '==ERROR== Metric dram__bytes_write.sum is not supported in range replay.' > "$log"
      exit 1
    fi ;;
esac
if [ -f "$here/refuse-all" ] && [ -n "$metrics" ]; then
  echo "$metrics" | tr ',' '\n' | while read -r m; do
    echo "==ERROR== Metric $m is not supported in range replay."
  done > "$log"
  exit 1
fi
if [ -f "$here/child-refuses" ]; then
  printf 'verify-decoder: --bad = 3 is invalid\n\n'
  exit 2
fi
if [ -f "$here/range-fails" ]; then
  echo '==ERROR== Failed to profile "range" in process 1' > "$log"
  exit 1
fi
cp "$here/csv.txt" "$log"
cp "$here/ranges.json" "$child/ranges.json"
"#,
    )
}

#[test]
fn range_replay_asks_for_no_sass_metric_and_runs_again_without_a_refused_one() {
    // A real range list (the MLP's child on the CPU) and a CSV without SASS columns.
    let (_args, _ready, child, _results) = child_on_cpu(
        "range-list",
        &[
            "--dtype",
            "bf16",
            "--seq-len",
            "8",
            "--layers",
            "DeepseekV2MLP",
        ],
    );
    let list = RangeList::read(child.root()).expect("written");
    let tmp = TempDir::new("range-replay");
    let ncu = range_replay_ncu(tmp.root());
    let csv = without_sass_columns(&range_replay_csv(&list, &[1]));
    std::fs::write(tmp.path("csv.txt"), &csv).unwrap();
    std::fs::copy(child.path("ranges.json"), tmp.path("ranges.json")).unwrap();
    let own: Vec<std::ffi::OsString> = vec!["--quiet".into()];
    let run = |replay, folder: &str| {
        let _ = std::fs::remove_file(tmp.path("calls.txt"));
        let dir = tmp.path(folder);
        std::fs::create_dir_all(&dir).unwrap();
        let result = profile::run_under_ncu(&ncu, Path::new("/bin/true"), &own, &dir, replay);
        let calls = std::fs::read_to_string(tmp.path("calls.txt")).unwrap_or_default();
        (
            result,
            calls.lines().map(str::to_string).collect::<Vec<_>>(),
        )
    };
    let sass = |line: &str| line.contains("__sass_");

    // Range replay: one ncu run, asked for the bytes and tensor pipes but no SASS
    // instruction metric (ncu counts those in kernel replay only); they are left out with
    // why, and the files are the run's.
    let (files, calls) = run(profile::NcuReplay::Range, "clean");
    let files = files.expect("ncu ran");
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(calls[0].contains("--replay-mode range"), "{}", calls[0]);
    assert!(calls[0].contains("dram__bytes_read.sum"), "{}", calls[0]);
    assert!(!sass(&calls[0]), "{}", calls[0]);
    let left: Vec<&str> = files.left_out.iter().map(|l| l.metric.as_str()).collect();
    assert!(!left.is_empty() && left.iter().all(|m| sass(m)), "{left:?}");
    assert!(files.left_out[0].why.contains("--ncu-replay kernel"));
    assert_eq!(files.csv, csv);
    assert_eq!(files.ranges, list);
    assert_eq!(files.replay, Some(profile::NcuReplay::Range));

    // A metric ncu refuses in the mode: the run is repeated without it, and it is left out
    // with ncu's reason.
    std::fs::write(tmp.path("refuse"), "").unwrap();
    let (files, calls) = run(profile::NcuReplay::AppRange, "refused");
    let files = files.expect("ncu ran again");
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(calls[0].contains("dram__bytes_write.sum"), "{}", calls[0]);
    assert!(!calls[1].contains("dram__bytes_write.sum"), "{}", calls[1]);
    assert!(calls[1].contains("dram__bytes_read.sum"), "{}", calls[1]);
    let refused: Vec<&LeftOut> = files.left_out.iter().filter(|l| !sass(&l.metric)).collect();
    assert_eq!(refused.len(), 1, "{:?}", files.left_out);
    assert_eq!(refused[0].metric, "dram__bytes_write.sum");
    assert!(
        refused[0].why.contains("refused it in app-range replay"),
        "{}",
        refused[0].why
    );
    std::fs::remove_file(tmp.path("refuse")).unwrap();
    // Every metric refused: no run without any metric, but ncu's refusal as the error.
    std::fs::write(tmp.path("refuse-all"), "").unwrap();
    let (all, calls) = run(profile::NcuReplay::Range, "all-refused");
    let all = all.err().expect("nothing to collect");
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert!(
        all.contains("ncu said: ==ERROR== Metric") && all.contains("not supported in range replay"),
        "{all}"
    );
    std::fs::remove_file(tmp.path("refuse-all")).unwrap();
    // A child that refused to start: the error ends with its last words.
    std::fs::write(tmp.path("child-refuses"), "").unwrap();
    let (refusal, _) = run(profile::NcuReplay::Range, "child-refused");
    let refusal = refusal.err().expect("exit 2");
    assert!(
        refusal.contains(
            "ended with exit status: 2: verify-decoder: --bad = 3 is invalid (all output in "
        ),
        "{refusal}"
    );
    std::fs::remove_file(tmp.path("child-refuses")).unwrap();

    // A range ncu cannot replay in place: range replay says to use app-range; in
    // app-range replay that message is not the answer (the run's own error is).
    std::fs::write(tmp.path("range-fails"), "").unwrap();
    let (range, _) = run(profile::NcuReplay::Range, "no-range");
    let range = range.err().expect("refused");
    assert!(range.contains("--ncu-replay app-range"), "{range}");
    let (app, _) = run(profile::NcuReplay::AppRange, "no-app-range");
    let app = app.err().expect("no ranges were written");
    assert!(!app.contains("--ncu-replay app-range"), "{app}");
    assert!(
        app.contains("ncu said: ==ERROR== Failed to profile \"range\""),
        "{app}"
    );
}

#[test]
fn the_layers_option_is_dropped_in_both_spellings() {
    let args: Vec<std::ffi::OsString> = [
        "--layers",
        "A,B",
        "--dtype",
        "bf16",
        "--layers=C",
        "--quiet",
    ]
    .iter()
    .map(Into::into)
    .collect();
    let kept = profile::without_option(&args, "--layers");
    assert_eq!(
        kept,
        ["--dtype", "bf16", "--quiet"].map(std::ffi::OsString::from)
    );
}

#[test]
fn the_attention_context_finds_its_fused_kernel_inside_the_core() {
    // The H200 (2026-11-28, run-5) found this allowance never applied: the fused kernel
    // is a leaf inside the core's node, not the node itself.
    let (_args, ready, _tmp, child) = child_on_cpu(
        "attention-child",
        &[
            "--dtype",
            "fp32",
            "--seq-len",
            "64",
            "--layers",
            "LlamaFlashAttention2",
        ],
    );
    let result = &child[0];
    // Core QKᵀ and PV: 4·B·H·S²·d; (S − 1)/(2S) of it above the diagonal.
    let core = 4 * 10 * 64 * 64 * 128u64;
    let masked = core * 63 / 128;
    // On the CPU: the CPU's fused kernel (CUDA-core work, not fast fp32).
    let cpu = profile::context_of(&ready.plan, result);
    assert_eq!(cpu.fast_f32_flops, 0);
    // On a GPU the same fp32 workload runs the memory-efficient kernel: 3xTF32, and its
    // causal share may be skipped.
    let mut cuda = ready.plan.clone();
    cuda.workload.platform = modelmeter::Platform::Cuda;
    let gpu = profile::context_of(&cuda, result);
    assert_eq!(
        (
            gpu.causal_skippable_flops,
            gpu.fast_f32_flops,
            gpu.fast_f32_skippable_flops
        ),
        (masked, core, masked)
    );
    // bf16 on the GPU: a fused kernel with its causal share, not fast fp32.
    cuda.workload.dtype = modelmeter::Dtype::Bf16;
    let bf16 = profile::context_of(&cuda, result);
    assert_eq!(
        (bf16.causal_skippable_flops, bf16.fast_f32_flops),
        (masked, 0)
    );
}
