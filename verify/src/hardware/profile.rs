//! `--hardware-counters`: running the layers under Nsight Compute and bringing the figures
//! back to the report.
//!
//! Three roles of one binary:
//! * **Parent** (`--hardware-counters`): re-executes itself with the same arguments plus
//!   `--hardware-counters-child DIR` under `ncu --replay-mode range …
//!   --log-file DIR/ncu.csv` ([`ncu_arguments`]), then verifies the layers itself as
//!   usual and adds the hardware rows ([`attach`]).
//! * **Child** (`--hardware-counters-child DIR`): runs each layer's counted forward as one
//!   profiler range after a warm-up ([`run_child`]) and writes `DIR/ranges.json`.
//! * **Reader** (`--hardware-counters-from DIR`): for a child the user wrapped in ncu
//!   themselves; reads DIR as the parent would after its own ncu run.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use modelmeter::conventions::is_fused_attention;
use modelmeter::layers::ATTENTION_CORE_ROLE;
use modelmeter::Cost;

use super::metrics::NCU_METRICS;
use super::peaks;
use super::ranges::{self, AttributedRange, RangeList, RangeRecord, NCU_CSV_FILE};
use super::rows::{self, Context};
use crate::check::Check;
use crate::compare::worst;
use crate::plan::Plan;
use crate::report::Report;
use crate::results::{LayerResult, Summary};

/// How this invocation takes part in a hardware-counter run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Run ncu (this one) over a child, keeping its files in `dir` (`keep`: given by
    /// `--ncu-dir`; otherwise a temporary folder removed after a successful run).
    Parent {
        ncu: PathBuf,
        dir: PathBuf,
        keep: bool,
        replay: NcuReplay,
    },
    /// Read a wrapped child's files from `dir`.
    Reader { dir: PathBuf },
    /// Be the profiled child, writing the range list to `dir`.
    Child { dir: PathBuf },
}

/// How ncu replays each profiler range to collect metrics that need several passes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum NcuReplay {
    /// Replays the whole program once per pass (`--replay-mode app-range`): any API call
    /// may run inside a range (the MoE copies its routing counts to the host, the
    /// allocator may map memory); the program must do the same work on every pass, which
    /// a seeded verification does.
    #[default]
    AppRange,
    /// Replays each range inside one run, saving and restoring device memory
    /// (`--replay-mode range`): faster, but ncu 2025.3 on an H200 failed to profile the
    /// MoE layer's range ("Failed to profile \"range\"", 2026-11-28) after the MLP's and
    /// the gate's.
    Range,
}

impl NcuReplay {
    /// ncu's `--replay-mode` value.
    pub fn mode(self) -> &'static str {
        match self {
            NcuReplay::AppRange => "app-range",
            NcuReplay::Range => "range",
        }
    }
}

/// The ncu options of a run: range replay, one result per range, raw CSV in base units
/// (bytes as bytes, not `Mbyte`), the clocks the GPU chooses, only what runs between the
/// profiler start and stop calls (in range replay those calls delimit the ranges, and
/// ncu 2025.3 refuses `--profile-from-start off` beside it: "not supported during range
/// replay", measured on an H200 on 2026-11-28).
pub fn ncu_arguments(csv: &Path, metrics: &[&str], replay: NcuReplay) -> Vec<OsString> {
    let mut args: Vec<OsString> = [
        "--replay-mode",
        replay.mode(),
        "--clock-control",
        "none",
        "--print-units",
        "base",
        "--csv",
        "--page",
        "raw",
        "--metrics",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    args.push(metrics.join(",").into());
    args.push("--log-file".into());
    args.push(csv.as_os_str().to_owned());
    args
}

/// Finds ncu: `explicit` (`--ncu PATH`) must be an executable file; otherwise the first
/// `ncu` on `path` (the `PATH` variable's value). The error is one line that says what
/// is missing and what to do.
pub fn find_ncu(
    explicit: Option<&Path>,
    path: Option<&std::ffi::OsStr>,
) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return if is_executable(p) {
            Ok(p.to_path_buf())
        } else {
            Err(format!(
                "--ncu {} is not an executable file: give the path of Nsight Compute's command-line profiler (ncu, in the CUDA toolkit's bin folder or /opt/nvidia/nsight-compute)",
                p.display()
            ))
        };
    }
    path.into_iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("ncu"))
        .find(|p| is_executable(p))
        .ok_or_else(|| {
            "--hardware-counters needs Nsight Compute's ncu, which is not on PATH: install Nsight Compute (it comes with the CUDA toolkit) and put ncu on PATH, or give --ncu PATH".to_string()
        })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A fresh temporary folder for a run's files.
pub fn temporary_dir() -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("modelmeter-ncu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

/// The files a hardware-counter run leaves in its folder.
pub struct RunFiles {
    /// ncu's CSV text.
    pub csv: String,
    /// The child's range list.
    pub ranges: RangeList,
    /// Metrics ncu could not collect in this run's replay mode (left out, unavailable).
    pub left_out: Vec<String>,
}

/// Runs this binary (`exe`, with `args`: the invocation's own arguments) as the profiled
/// child under `ncu`, with ncu's CSV, the range list and the child's output
/// (`output.txt`: its table and ncu's `==PROF==` lines on the terminal side) in `dir`.
///
/// ncu refuses, before anything runs, a metric it cannot collect in range replay
/// (ncu 2025.3 on an H200: "Metric smsp__sass_thread_inst_executed_op_dadd_pred_on.sum is
/// not supported in range replay", written to its log file). Such metrics are left out
/// and the run repeated; [`RunFiles::left_out`] names them, and their figures are
/// unavailable (never 0).
pub fn run_under_ncu(
    ncu: &Path,
    exe: &Path,
    args: &[OsString],
    dir: &Path,
    replay: NcuReplay,
) -> Result<RunFiles, String> {
    let csv = dir.join(NCU_CSV_FILE);
    let output_path = dir.join("output.txt");
    let mut metrics: Vec<&str> = NCU_METRICS.to_vec();
    let mut left_out = Vec::new();
    loop {
        let output = std::fs::File::create(&output_path)
            .map_err(|e| format!("cannot create {}: {e}", output_path.display()))?;
        let errors = output
            .try_clone()
            .map_err(|e| format!("cannot share {}: {e}", output_path.display()))?;
        let status = Command::new(ncu)
            .args(ncu_arguments(&csv, &metrics, replay))
            .arg("--")
            .arg(exe)
            .args(args)
            .arg("--hardware-counters-child")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(errors)
            .status()
            .map_err(|e| format!("cannot run {}: {e}", ncu.display()))?;
        let log = std::fs::read_to_string(&csv).unwrap_or_default();
        if replay == NcuReplay::Range && log.contains("==ERROR== Failed to profile \"range\"") {
            return Err(format!(
                "ncu could not replay a layer's range in place (range replay); run with --ncu-replay app-range (ncu's log: {})",
                csv.display()
            ));
        }
        let refused: Vec<&str> = unsupported_in_range_replay(&log)
            .into_iter()
            .filter_map(|m| metrics.iter().copied().find(|k| *k == m))
            .collect();
        if !refused.is_empty() && refused.len() < metrics.len() {
            eprintln!(
                "hardware counters: ncu cannot collect {} in range replay; running again without (reported as unavailable)",
                refused.join(", ")
            );
            metrics.retain(|m| !refused.contains(m));
            left_out.extend(refused.iter().map(|m| m.to_string()));
            continue;
        }
        // The child exits 0 or 1 as a verification does; 2 means it refused to start.
        if !matches!(status.code(), Some(0) | Some(1)) {
            return Err(format!(
                "the profiled run under {} ended with {status}: {}",
                ncu.display(),
                last_line(&output_path)
            ));
        }
        // ncu reports its own refusals (`==ERROR==`, in its log file or on the terminal)
        // and may still exit 0: say what it said.
        let mut files = read_run(dir).map_err(|e| {
            match ncu_error(&csv).or_else(|| ncu_error(&output_path)) {
                Some(said) => format!("{e}; ncu said: {said}"),
                None => e,
            }
        })?;
        files.left_out = left_out;
        return Ok(files);
    }
}

/// The metrics ncu's `log` says it cannot collect in range replay.
pub fn unsupported_in_range_replay(log: &str) -> Vec<&str> {
    log.lines()
        .filter_map(|l| {
            l.strip_prefix("==ERROR== Metric ")?
                .strip_suffix(" is not supported in range replay.")
        })
        .map(str::trim)
        .collect()
}

/// The last `==ERROR==` line ncu wrote to `path`, if any.
fn ncu_error(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .rev()
        .find(|l| l.starts_with("==ERROR=="))
        .map(|l| l.trim().to_string())
}

/// The last non-empty line of a file, for one-line errors.
fn last_line(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(no output)");
    format!("{line} (all output in {})", path.display())
}

/// Reads a run's CSV and range list from `dir`.
pub fn read_run(dir: &Path) -> Result<RunFiles, String> {
    let csv_path = dir.join(NCU_CSV_FILE);
    let csv = std::fs::read_to_string(&csv_path).map_err(|e| {
        format!(
            "cannot read ncu's CSV {}: {e} (ncu writes it with --log-file)",
            csv_path.display()
        )
    })?;
    let ranges = RangeList::read(dir)?;
    Ok(RunFiles {
        csv,
        ranges,
        left_out: Vec::new(),
    })
}

/// The figures of a run, attributed to its ranges; the error (one line) when ncu's CSV
/// cannot be read or matched to the ranges.
pub fn attributed(files: &RunFiles) -> Result<Vec<AttributedRange>, String> {
    let table = ranges::parse_range_results(&files.csv).map_err(|e| format!("ncu's CSV: {e}"))?;
    ranges::attribute(&table, &files.ranges).map_err(|e| e.to_string())
}

/// The measured value of an exact row of `result`.
fn counted(result: &LayerResult, metric: modelmeter::Metric) -> Option<u64> {
    result
        .metrics
        .iter()
        .find(|r| r.metric == Check::Exact(metric))
        .map(|r| r.measured)
}

/// The range record of a layer the child ran (its counted work in the profiled forward).
pub fn record_of(result: &LayerResult) -> Option<RangeRecord> {
    use modelmeter::Metric::*;
    Some(RangeRecord {
        layer: result.name.clone(),
        tensor_core_flops: counted(result, TensorCoreFlops)?,
        cuda_core_flops: counted(result, CudaCoreFlops)?,
        io_bytes: counted(result, IoBytes)?,
    })
}

/// The child's range list from its layer results, in plan order: a layer that ran is a
/// range; one that could not run is an error.
pub fn range_list(device: String, results: &[LayerResult]) -> RangeList {
    let mut ranges = Vec::new();
    let mut errors = Vec::new();
    for r in results {
        match (r.error.as_ref(), record_of(r)) {
            (None, Some(record)) => ranges.push(record),
            (Some(e), _) => errors.push((r.name.clone(), e.clone())),
            (None, None) => errors.push((r.name.clone(), "no counted rows".into())),
        }
    }
    RangeList::new(device, ranges, errors)
}

/// The child: verifies the plan's layers with each counted forward in a profiler range
/// and writes the range list to `dir`; returns the layer results for its own table.
pub fn run_child(plan: &Plan, device: String, dir: &Path) -> Result<Vec<LayerResult>, String> {
    let results = crate::runner::verify_in_profiler_ranges(plan, &mut |_| {});
    range_list(device, &results).write(dir)?;
    Ok(results)
}

/// Every node of `cost` (itself included).
fn walk<'a>(cost: &'a Cost, out: &mut Vec<&'a Cost>) {
    out.push(cost);
    for c in &cost.children {
        walk(c, out);
    }
}

/// What the rules need of the layer called `name` in `plan` (see [`Context`]).
pub fn context_of(plan: &Plan, result: &LayerResult) -> Context {
    let w = &plan.workload;
    let tokens = w.batch.saturating_mul(w.query_len());
    let simt_gemm_flops = result
        .ops
        .iter()
        .filter(|op| op.flops.matmul_flops > 0)
        .map(|op| op.flops.cuda_core_flops.min(op.flops.matmul_flops))
        .fold(0u64, u64::saturating_add);
    let cost = plan
        .layers
        .iter()
        .find(|p| p.name(plan.attention) == result.name)
        .and_then(|p| p.analytic(&plan.config, w, plan.attention).ok())
        .and_then(|layer| layer.cost().ok());
    let mut nodes = Vec::new();
    if let Some(cost) = &cost {
        walk(cost, &mut nodes);
    }
    // A causal core over S_kv keys with S_q queries at the end: S_q·(S_q − 1)/2 of its
    // S_q·S_kv scores are masked.
    let s_q = u128::from(w.query_len());
    let s_kv = u128::from(w.first_position()) + s_q;
    let skippable = nodes
        .iter()
        .filter(|c| c.name == ATTENTION_CORE_ROLE && c.op.is_some_and(is_fused_attention))
        .map(|c| {
            let core = u128::from(c.metrics.tensor_core_flops);
            let masked = core * s_q.saturating_sub(1) / (2 * s_kv).max(1);
            u64::try_from(masked).unwrap_or(u64::MAX)
        })
        .fold(0u64, u64::saturating_add);
    Context {
        tokens,
        causal_skippable_flops: skippable,
        simt_gemm_flops,
    }
}

/// Adds the hardware rows (and `hardware` objects) to the single case of `report`:
/// figures by layer name from `run` (`Err`: why there are none, shown on every layer).
pub fn attach(
    report: &mut Report,
    plan: &Plan,
    run: &Result<Vec<AttributedRange>, String>,
    device_name: &str,
) {
    let peaks = peaks::of_device(device_name);
    for case in &mut report.cases {
        for layer in &mut case.layers {
            if layer.error.is_some() {
                continue;
            }
            let found = match run {
                Ok(all) => all
                    .iter()
                    .find(|a| a.record.layer == layer.name)
                    .ok_or_else(|| {
                        "the profiled run has no range for it (see its errors in ranges.json)"
                            .to_string()
                    }),
                Err(e) => Err(e.clone()),
            };
            match found {
                Ok(range) => {
                    let context = context_of(plan, layer);
                    let here = counted(layer, modelmeter::Metric::TensorCoreFlops);
                    let (rows, hardware) = rows::layer_rows(range, &context, peaks.as_ref(), here);
                    layer.metrics.extend(rows);
                    layer.hardware = Some(hardware);
                }
                Err(why) => layer.metrics.push(rows::missing_row(&why)),
            }
            layer.status = worst(&layer.metrics);
        }
        case.summary = Summary::of(&case.layers);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ncu_command_asks_for_range_replay_and_every_metric() {
        let args = ncu_arguments(Path::new("/out/ncu.csv"), &NCU_METRICS, NcuReplay::Range);
        let text: Vec<String> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let after = |flag: &str| {
            let i = text.iter().position(|a| a == flag).expect(flag);
            text[i + 1].clone()
        };
        assert_eq!(after("--replay-mode"), "range");
        let app = ncu_arguments(Path::new("/out/ncu.csv"), &NCU_METRICS, NcuReplay::AppRange);
        assert!(app.iter().any(|a| a == "app-range"));
        assert_eq!(after("--page"), "raw");
        assert_eq!(after("--print-units"), "base");
        assert_eq!(after("--log-file"), "/out/ncu.csv");
        assert!(text.contains(&"--csv".to_string()));
        // ncu 2025.3 refuses it in range replay ("not supported during range replay").
        assert!(!text.contains(&"--profile-from-start".to_string()));
        let metrics = after("--metrics");
        assert_eq!(metrics.split(',').count(), NCU_METRICS.len());
        assert!(metrics.contains("sm__ops_path_tensor_src_bf16_dst_fp32.sum"));
        assert!(metrics.contains("gpu__time_duration.sum"));
    }

    #[test]
    fn metrics_ncu_refuses_in_range_replay_are_read_from_its_log() {
        // What ncu 2025.3 wrote on an H200 (docs/results/2026-11-28-h200).
        let log = "==ERROR== Metric smsp__sass_thread_inst_executed_op_dadd_pred_on.sum is not supported in range replay.\n==ERROR== See https://docs.nvidia.com/nsight-compute/ProfilingGuide/#compatibility\n";
        assert_eq!(
            unsupported_in_range_replay(log),
            vec!["smsp__sass_thread_inst_executed_op_dadd_pred_on.sum"]
        );
        assert!(unsupported_in_range_replay("\"ID\",\"Range Name\"\n").is_empty());
    }

    #[test]
    fn ncu_is_found_on_path_or_refused_in_one_line() {
        let dir = std::env::temp_dir().join(format!("mm-find-ncu-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let err = find_ncu(None, Some(empty.as_os_str())).unwrap_err();
        assert!(
            err.contains("not on PATH") && err.contains("--ncu PATH"),
            "{err}"
        );
        assert!(!err.contains('\n'));
        let err = find_ncu(None, None).unwrap_err();
        assert!(err.contains("not on PATH"), "{err}");
        // A file called ncu that cannot be executed is not ncu.
        let fake = dir.join("ncu");
        std::fs::write(&fake, "#!/bin/sh\n").unwrap();
        assert!(find_ncu(None, Some(dir.as_os_str())).is_err());
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = std::env::join_paths([empty.clone(), dir.clone()]).unwrap();
        assert_eq!(find_ncu(None, Some(&path)).unwrap(), fake);
        assert_eq!(find_ncu(Some(&fake), None).unwrap(), fake);
        let err = find_ncu(Some(&empty), None).unwrap_err();
        assert!(err.contains("not an executable file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
