//! `--hardware-counters`: running the layers under Nsight Compute and bringing the figures
//! back to the report.
//!
//! Three roles of one binary:
//! * **Parent** (`--hardware-counters`): re-executes itself with the same arguments plus
//!   `--hardware-counters-child DIR` under `ncu --replay-mode app-range …
//!   --log-file DIR/ncu.csv` (the default; `--ncu-replay range` for `--replay-mode
//!   range`; [`ncu_arguments`]), or with `--ncu-replay kernel` once per layer under
//!   `--replay-mode kernel` in `DIR/<i>-<layer>/` ([`run_per_layer`]), then verifies the
//!   layers itself as usual and adds the hardware rows ([`attach`]).
//! * **Child** (`--hardware-counters-child DIR`): runs each layer's counted forward as one
//!   profiler range after a warm-up ([`run_child`]) and writes `DIR/ranges.json`.
//! * **Reader** (`--hardware-counters-from DIR`): for a child the user wrapped in ncu
//!   themselves; reads DIR as the parent would after its own ncu run.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use modelmeter::conventions::{is_fused_attention, runs_fast_fp32};
use modelmeter::layers::{ATTENTION_CORE_ROLE, ROUTED_EXPERTS_ROLE};
use modelmeter::Cost;

use super::metrics::NCU_METRICS;
use super::peaks;
use super::ranges::{
    self, AttributedRange, RangeEntry, RangeList, RangeRecord, TimeSpan, NCU_CSV_FILE,
};
use super::rows::{self, Context, MAX_TILE_ROWS, SMALL_GEMM_ROWS};
use super::{LeftOut, TensorSource};
use crate::check::Check;
use crate::compare::worst;
use crate::plan::Plan;
use crate::report::Report;
use crate::results::{LayerResult, Summary};

/// The environment variable the parent sets for its child under ncu: the child runs with
/// the parent's arguments (`--hardware-counters` among them), which a user may not give
/// together with `--hardware-counters-child`.
pub const CHILD_MARKER: &str = "MODELMETER_NCU_CHILD";

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
    /// Replays each kernel of a layer's range (`--replay-mode kernel`, only what runs
    /// between the profiler start and stop calls): one ncu run per layer, the layer's
    /// kernels summed. The only mode in which ncu counts SASS instructions (the FFMA, FADD
    /// and FMUL of `hw_cuda_core_flops`), and its time is the kernels' own (no gaps
    /// between them); slow for layers of hundreds of kernels (the eager MoE).
    Kernel,
}

impl NcuReplay {
    /// ncu's `--replay-mode` value.
    pub fn mode(self) -> &'static str {
        match self {
            NcuReplay::AppRange => "app-range",
            NcuReplay::Range => "range",
            NcuReplay::Kernel => "kernel",
        }
    }

    /// Whether ncu can count SASS instructions (`…sass_thread_inst_executed…`) in this
    /// mode: only per kernel (ncu 2025.3 on an H200 refused each of them in range and
    /// app-range replay, 2026-11-28).
    pub fn counts_instructions(self) -> bool {
        self == NcuReplay::Kernel
    }
}

/// True for a SASS instruction metric, which ncu collects only in kernel replay.
pub fn is_instruction_metric(metric: &str) -> bool {
    metric.contains("__sass_")
}

/// The ncu options of a run: the replay mode, raw CSV in base units (bytes as bytes, not
/// `Mbyte`), the clocks the GPU chooses, only what runs between the profiler start and
/// stop calls (in range replay those calls delimit the ranges, and ncu 2025.3 refuses
/// `--profile-from-start off` beside it: "not supported during range replay", measured
/// on an H200 on 2026-11-28; in kernel replay it is what limits profiling to the range).
pub fn ncu_arguments(csv: &Path, metrics: &[&str], replay: NcuReplay) -> Vec<OsString> {
    let from_start: &[&str] = match replay {
        NcuReplay::Kernel => &["--profile-from-start", "off"],
        NcuReplay::AppRange | NcuReplay::Range => &[],
    };
    let mut args: Vec<OsString> = from_start
        .iter()
        .chain(&[
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
        ])
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
    /// Metrics left out of ncu's command in this run's replay mode, with why (their
    /// figures unavailable); empty for a folder read with `--hardware-counters-from`,
    /// where what the wrapping command asked for is not known.
    pub left_out: Vec<LeftOut>,
    /// The replay mode ncu ran in; `None` for a folder read with
    /// `--hardware-counters-from` (the wrapping command's is not known).
    pub replay: Option<NcuReplay>,
}

/// Runs this binary (`exe`, with `args`: the invocation's own arguments) as the profiled
/// child under `ncu` in a range replay mode, with ncu's CSV, the range list and the
/// child's output (`output.txt`: its table and ncu's `==PROF==` lines on the terminal
/// side) in `dir`.
///
/// SASS instruction metrics are left out up front outside kernel replay
/// ([`NcuReplay::counts_instructions`]). ncu refuses, before anything runs, any other
/// metric it cannot collect in the mode (ncu 2025.3 on an H200: "Metric
/// smsp__sass_thread_inst_executed_op_dadd_pred_on.sum is not supported in range
/// replay", written to its log file): such metrics are left out and the run repeated.
/// [`RunFiles::left_out`] names them all with why; their figures are unavailable (never
/// 0), and the rows' notes give that reason. Prints nothing: what a person is told
/// before the run starts is the binary's to say.
pub fn run_under_ncu(
    ncu: &Path,
    exe: &Path,
    args: &[OsString],
    dir: &Path,
    replay: NcuReplay,
) -> Result<RunFiles, String> {
    let mut metrics: Vec<&str> = NCU_METRICS.to_vec();
    let mut left_out = left_out_up_front(replay);
    if !replay.counts_instructions() {
        metrics.retain(|m| !is_instruction_metric(m));
    }
    left_out.extend(run_ncu(ncu, exe, args, dir, replay, metrics)?);
    let mut files = read_run(dir).map_err(|e| with_ncu_said(e, dir))?;
    files.left_out = left_out;
    files.replay = Some(replay);
    Ok(files)
}

/// The metrics a run in `replay` leaves out of ncu's command before ncu runs, with why:
/// the SASS instruction metrics outside kernel replay ([`NcuReplay::counts_instructions`]).
pub fn left_out_up_front(replay: NcuReplay) -> Vec<LeftOut> {
    if replay.counts_instructions() {
        return Vec::new();
    }
    let why = format!(
        "ncu counts SASS instructions only in kernel replay, not in {} replay; --ncu-replay kernel measures them",
        replay.mode()
    );
    NCU_METRICS
        .iter()
        .filter(|m| is_instruction_metric(m))
        .map(|m| LeftOut {
            metric: m.to_string(),
            why: why.clone(),
        })
        .collect()
}

/// `e` with what ncu said about the run in `dir`: ncu reports its own refusals
/// (`==ERROR==`, in its log file or on the terminal side of the child's output) and may
/// still exit 0.
fn with_ncu_said(e: String, dir: &Path) -> String {
    match ncu_error(&dir.join(NCU_CSV_FILE)).or_else(|| ncu_error(&dir.join("output.txt"))) {
        Some(said) => format!("{e}; ncu said: {said}"),
        None => e,
    }
}

/// One ncu run over the child (`args` plus `--hardware-counters-child dir`) with
/// `metrics`, repeated without any metric ncu refuses in `replay`; returns those left out,
/// with why.
fn run_ncu(
    ncu: &Path,
    exe: &Path,
    args: &[OsString],
    dir: &Path,
    replay: NcuReplay,
    mut metrics: Vec<&str>,
) -> Result<Vec<LeftOut>, String> {
    let csv = dir.join(NCU_CSV_FILE);
    let output_path = dir.join("output.txt");
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
            .env(CHILD_MARKER, "1")
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
        let refused: Vec<&str> = unsupported_in_replay(&log)
            .into_iter()
            .filter_map(|m| metrics.iter().copied().find(|k| *k == m))
            .collect();
        if !refused.is_empty() && refused.len() < metrics.len() {
            eprintln!(
                "hardware counters: ncu cannot collect {} in {} replay; running again without (reported as unavailable)",
                refused.join(", "),
                replay.mode()
            );
            metrics.retain(|m| !refused.contains(m));
            left_out.extend(refused.iter().map(|m| LeftOut {
                metric: m.to_string(),
                why: format!(
                    "ncu refused it in {} replay: \"not supported in {} replay\"",
                    replay.mode(),
                    replay.mode()
                ),
            }));
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
        return Ok(left_out);
    }
}

/// The folder of the `index`-th layer's ncu run in kernel replay.
pub fn layer_dir(dir: &Path, index: usize, layer: &str) -> PathBuf {
    dir.join(format!("{index}-{layer}"))
}

/// `args` without `option` (`--layers X` or `--layers=X`): the kernel-replay parent
/// names one layer per child run itself.
pub fn without_option(args: &[OsString], option: &str) -> Vec<OsString> {
    let with_value = format!("{option}=");
    let mut out = Vec::new();
    let mut skip_next = false;
    for a in args {
        if skip_next {
            skip_next = false;
            continue;
        }
        match a.to_str() {
            Some(s) if s == option => skip_next = true,
            Some(s) if s.starts_with(&with_value) => {}
            _ => out.push(a.clone()),
        }
    }
    out
}

/// Kernel replay: one ncu run per layer of `layers` (the plan's names, in order), each a
/// child that runs only that layer, in `dir/<i>-<layer>/`; the layer's kernels summed are
/// its figures. A layer whose run failed, or in whose range ncu profiled no kernel, has
/// no figures and says why (in the run's `errors`); the others are attributed.
pub fn run_per_layer(
    ncu: &Path,
    exe: &Path,
    args: &[OsString],
    dir: &Path,
    layers: &[String],
    progress: &mut dyn FnMut(usize, &str),
) -> Result<PerLayerRun, String> {
    let base = without_option(args, "--layers");
    // A reused folder's layer folders from an earlier run would be read beside this one's.
    for (_, _, old) in per_layer_folders(dir) {
        std::fs::remove_dir_all(&old)
            .map_err(|e| format!("cannot remove the earlier run's {}: {e}", old.display()))?;
    }
    let mut run = PerLayerRun::default();
    // A metric ncu refuses for one layer is left out for the rest.
    let mut metrics: Vec<&str> = NCU_METRICS.to_vec();
    for (index, layer) in layers.iter().enumerate() {
        progress(index, layer);
        let here = layer_dir(dir, index, layer);
        std::fs::create_dir_all(&here)
            .map_err(|e| format!("cannot create {}: {e}", here.display()))?;
        let mut child = base.clone();
        child.push("--layers".into());
        child.push(layer.into());
        match run_ncu(ncu, exe, &child, &here, NcuReplay::Kernel, metrics.clone()) {
            Ok(left_out) => {
                metrics.retain(|m| !left_out.iter().any(|l| l.metric == *m));
                run.left_out.extend(left_out);
                // This layer's run lacked every metric left out so far.
                let read = read_layer(&here, index, layer).map(|(device, mut range)| {
                    range.figures.left_out = run.left_out.clone();
                    (device, range)
                });
                run.add(layer, &here, read);
            }
            Err(e) => run.errors.push((layer.clone(), e)),
        }
    }
    Ok(run)
}

/// The `index`-th layer's figures from its kernel-replay folder `here`.
fn read_layer(
    here: &Path,
    index: usize,
    layer: &str,
) -> Result<(Profiled, AttributedRange), String> {
    let files = read_run(here)?;
    let range = kernels_of_layer(&files, index, layer).map_err(|e| with_ncu_said(e, here))?;
    let profiled = Profiled {
        device: files.ranges.device,
        run: files.ranges.run,
    };
    Ok((profiled, range))
}

/// The GPUs ncu says it profiled on in `csv` (its `device__attribute_display_name`
/// column, distinct, in order of first appearance); empty when the export does not say
/// or cannot be read (reading it is judged elsewhere).
pub fn profiled_gpus(csv: &str) -> Vec<String> {
    super::ncu_csv::parse(csv, &super::ncu_csv::ParseOptions::per_kernel())
        .map(|table| gpus_of(&table))
        .unwrap_or_default()
}

/// [`profiled_gpus`] of a parsed table.
fn gpus_of(table: &super::ncu_csv::NcuCsv) -> Vec<String> {
    let mut gpus: Vec<String> = Vec::new();
    for row in table.rows() {
        if let Some(cell) = table.cell(row, "device__attribute_display_name") {
            let name = cell.text().trim();
            if !name.is_empty() && !gpus.iter().any(|g| g == name) {
                gpus.push(name.to_string());
            }
        }
    }
    gpus
}

/// Refuses figures of a folder read back (`--hardware-counters-from`) that ncu profiled on
/// another GPU than this machine's `here`: the roofline rows judge them against this GPU's
/// peaks. Exports that do not name their GPU are not judged.
pub fn check_profiled_on(gpus: &[String], here: &str, folder: &Path) -> Result<(), String> {
    match gpus {
        [] => Ok(()),
        [one] if one == here => Ok(()),
        _ => Err(format!(
            "ncu profiled the figures in {} on {}, and this machine's GPU is {here}: the roofline rows would judge them against this GPU's peaks; read the folder on a machine with that GPU",
            folder.display(),
            gpus.join(" and ")
        )),
    }
}

/// Where and what a profiled run ran (its range list's `device` and `run`).
#[derive(Clone, Debug, PartialEq)]
pub struct Profiled {
    pub device: String,
    pub run: Option<serde_json::Value>,
}

/// The per-layer folders in `dir` (`<i>-<layer>/`, as [`layer_dir`] names them), in index
/// order.
fn per_layer_folders(dir: &Path) -> Vec<(usize, String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut layers: Vec<(usize, String, PathBuf)> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().into_string().ok()?;
            let (index, layer) = name.split_once('-')?;
            let index: usize = index.parse().ok()?;
            e.file_type()
                .ok()?
                .is_dir()
                .then(|| (index, layer.to_string(), e.path()))
        })
        .collect();
    layers.sort();
    layers
}

/// Reads the per-layer folders a kernel-replay run left in `dir`, in index order; `None`
/// when `dir` has none (a range-mode folder). A folder with both layouts, or with a layer
/// twice, is an error: which figures are this run's could not be told.
pub fn read_per_layer(dir: &Path) -> Option<Result<PerLayerRun, String>> {
    let layers = per_layer_folders(dir);
    if layers.is_empty() {
        return None;
    }
    if dir.join(NCU_CSV_FILE).exists() {
        return Some(Err(format!(
            "{} holds both a range-replay run ({NCU_CSV_FILE}) and kernel-replay layer folders: give the folder of one run",
            dir.display()
        )));
    }
    let mut run = PerLayerRun::default();
    for (index, layer, here) in layers {
        if run.ranges.iter().any(|r| r.record.layer == layer)
            || run.errors.iter().any(|(l, _)| *l == layer)
        {
            return Some(Err(format!(
                "{} holds {layer} twice (folders of two runs?): give the folder of one run",
                dir.display()
            )));
        }
        run.add(&layer, &here, read_layer(&here, index, &layer));
        if let Ok(csv) = std::fs::read_to_string(here.join(NCU_CSV_FILE)) {
            for gpu in profiled_gpus(&csv) {
                if !run.gpus.contains(&gpu) {
                    run.gpus.push(gpu);
                }
            }
        }
    }
    Some(Ok(run))
}

/// What a kernel-replay run found, layer by layer.
#[derive(Debug, Default)]
pub struct PerLayerRun {
    /// The device the children ran on and what they ran (the first that reported them;
    /// a layer whose run differs from it has no figures).
    pub profiled: Option<Profiled>,
    pub ranges: Vec<AttributedRange>,
    /// Layers without figures, with why.
    pub errors: Vec<(String, String)>,
    /// Metrics ncu refused, with why (unavailable), in the order it refused them: each
    /// left out of that layer's run and every later one's.
    pub left_out: Vec<LeftOut>,
    /// The GPUs the layers' exports say ncu profiled on ([`profiled_gpus`]).
    pub gpus: Vec<String>,
}

impl PerLayerRun {
    /// Adds `layer`'s figures (with where and what its run ran), or why it has none: also
    /// when its run (in `folder`) is not the first layer's (folders of two runs).
    fn add(
        &mut self,
        layer: &str,
        folder: &Path,
        read: Result<(Profiled, AttributedRange), String>,
    ) {
        match read {
            Ok((profiled, range)) => match &self.profiled {
                Some(first) if *first != profiled => {
                    let why = match (&first.run, &profiled.run) {
                        (Some(_), None) => {
                            "its range list does not record its run, the first layer's does".into()
                        }
                        (None, Some(_)) => {
                            "its range list records its run, the first layer's does not".into()
                        }
                        // Both or neither recorded: the fields (or the device) that differ.
                        (first_run, run) => check_same_run(
                            &first.device,
                            first_run.as_ref().unwrap_or(&serde_json::Value::Null),
                            &profiled.device,
                            run.as_ref(),
                        )
                        .err()
                        .unwrap_or_default(),
                    };
                    self.errors.push((
                        layer.to_string(),
                        format!(
                            "{} holds another run than the first layer's folder (folders of two runs?): {why}",
                            folder.display()
                        ),
                    ))
                }
                _ => {
                    self.profiled.get_or_insert(profiled);
                    self.ranges.push(range);
                }
            },
            Err(e) => self.errors.push((layer.to_string(), e)),
        }
    }
}

/// The `index`-th layer's figures from its own kernel-replay run: every profiled kernel
/// of the CSV (only the layer's range was profiled), summed.
pub fn kernels_of_layer(
    files: &RunFiles,
    index: usize,
    layer: &str,
) -> Result<AttributedRange, String> {
    let record = match files.ranges.layers.as_slice() {
        [RangeEntry::Counted(one)] if one.layer == layer => one.clone(),
        [failed] if failed.layer() == layer => {
            let why = failed.error().unwrap_or("it did not run");
            return Err(format!("the profiled run of {layer} failed: {why}"));
        }
        _ => {
            return Err(format!(
                "the profiled run of {layer} has no range: it did not run"
            ))
        }
    };
    let no_kernel = || {
        format!(
            "ncu profiled no kernel in {layer}'s range (kernel replay with --profile-from-start off)"
        )
    };
    // ncu writes no table at all when nothing was profiled, or a header alone.
    if !files.csv.lines().any(super::ncu_csv::is_header) {
        return Err(no_kernel());
    }
    let table = super::ncu_csv::parse(&files.csv, &super::ncu_csv::ParseOptions::per_kernel())
        .map_err(|e| format!("ncu's CSV: {e}"))?;
    if table.rows().is_empty() {
        return Err(no_kernel());
    }
    // A range-replay export has one row per range: its time is the range's, not its
    // kernels', and its figures are not this layer's kernels one by one.
    if let Some(row) = table.rows().iter().find(|row| {
        table
            .cell(row, "Kernel Name")
            .is_some_and(|c| c.text() == "range")
    }) {
        return Err(format!(
            "ncu's CSV: line {}: the row is a range, not a kernel: {layer}'s export is of range replay, not the kernel replay --ncu-replay kernel reads",
            row.line()
        ));
    }
    let figures =
        super::HardwareFigures::of_range(&table, None).map_err(|e| format!("ncu's CSV: {e}"))?;
    Ok(AttributedRange {
        index,
        ncu_id: format!("{} kernels", figures.rows),
        record,
        figures,
        time: TimeSpan::Kernels,
    })
}

/// The metrics ncu's `log` says it cannot collect in this replay mode ("… is not supported
/// in range replay.", and the same sentence for any other mode, such as app-range).
pub fn unsupported_in_replay(log: &str) -> Vec<&str> {
    log.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("==ERROR== Metric ")?;
            let (metric, mode) = rest.split_once(" is not supported in ")?;
            mode.trim_end().ends_with("replay.").then_some(metric)
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
        replay: None,
    })
}

/// [`read_run`] of a range-replay folder given to `--hardware-counters-from`, read on a
/// machine whose GPU is `here`: a folder given to read is input, so a CSV that cannot be
/// read (cut short, a row of another width, a value or unit that is no figure) is refused
/// here (exit 2, nothing written), not turned into a failing row on every layer, and so
/// are figures profiled on another GPU ([`check_profiled_on`]). Rows that cannot be
/// matched to the ranges are judged as in a run of our own (failing rows that say why).
pub fn read_range_run(dir: &Path, here: &str) -> Result<RunFiles, String> {
    let files = read_run(dir)?;
    let csv_path = dir.join(NCU_CSV_FILE);
    let unreadable =
        |e: super::ncu_csv::NcuCsvError| format!("{}: ncu's CSV: {e}", csv_path.display());
    let table = ranges::parse_range_results(&files.csv).map_err(unreadable)?;
    super::HardwareFigures::per_range(&table).map_err(unreadable)?;
    check_profiled_on(&gpus_of(&table), here, dir)?;
    Ok(files)
}

/// The figures of a run, attributed to its ranges, each with what the run left out of
/// ncu's command; the error (one line) when ncu's CSV cannot be read or matched to the
/// ranges.
pub fn attributed(files: &RunFiles) -> Result<Vec<AttributedRange>, String> {
    let table = ranges::parse_range_results(&files.csv).map_err(|e| format!("ncu's CSV: {e}"))?;
    let mut all =
        ranges::attribute(&table, &files.ranges, files.replay).map_err(|e| e.to_string())?;
    for range in &mut all {
        range.figures.left_out = files.left_out.clone();
    }
    Ok(all)
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

/// The child's range list from its layer results, in plan order (the order of their
/// ranges), by whether each layer's range was opened
/// ([`LayerResult::profiler_range_opened`]): a layer that ran and was judged is
/// [`RangeEntry::Counted`]; one that failed with its range opened (inside it, or in
/// judging the run) has a row in ncu's CSV ([`RangeEntry::Failed`]); one that failed
/// before opening it has none ([`RangeEntry::NotOpened`]); one where that is not known
/// (a panic) may or may not have ([`RangeEntry::Unknown`]).
pub fn range_list(device: String, results: &[LayerResult]) -> RangeList {
    let layers = results
        .iter()
        .map(|r| {
            let layer = r.name.clone();
            match (r.error.clone(), record_of(r)) {
                (None, Some(record)) => RangeEntry::Counted(record),
                // It ran without error: its range was opened and closed.
                (None, None) => RangeEntry::Failed {
                    layer,
                    error: "no counted rows".into(),
                },
                (Some(error), _) => match r.profiler_range_opened {
                    Some(true) => RangeEntry::Failed { layer, error },
                    Some(false) => RangeEntry::NotOpened { layer, error },
                    None => RangeEntry::Unknown { layer, error },
                },
            }
        })
        .collect();
    RangeList::new(device, layers)
}

/// The child: verifies the plan's layers with each counted forward in a profiler range
/// and writes the range list to `dir`; returns the layer results for its own table.
pub fn run_child(plan: &Plan, device: String, dir: &Path) -> Result<Vec<LayerResult>, String> {
    let results = crate::runner::verify_in_profiler_ranges(plan, &mut |_| {});
    range_list(device, &results)
        .of_run(run_identity(plan))
        .write(dir)?;
    Ok(results)
}

/// What a profiled run did, as its range list records it: every field of the config the
/// layers read (not its name, which is how it was given), the workload, the attention
/// and the seed. Figures are this run's only when its identity is the same.
pub fn run_identity(plan: &Plan) -> serde_json::Value {
    let mut config = serde_json::to_value(&plan.config).unwrap_or_default();
    if let Some(fields) = config.as_object_mut() {
        fields.remove("name");
    }
    serde_json::json!({
        "config": config,
        "workload": plan.workload,
        "attention": plan.attention,
        "seed": plan.seed,
    })
}

/// Refuses figures profiled on `device` with identity `run` for this run (on `here_device`,
/// [`run_identity`] `here`): another device, or another run (the fields that differ). A
/// list without an identity (written before it was recorded) is judged by its counts alone.
pub fn check_same_run(
    here_device: &str,
    here: &serde_json::Value,
    device: &str,
    run: Option<&serde_json::Value>,
) -> Result<(), String> {
    if device != here_device {
        return Err(format!(
            "the profiled run was on {device}, this run is on {here_device}: give the same --device"
        ));
    }
    match run.and_then(|profiled| run_differences(profiled, here)) {
        Some(differences) => Err(format!(
            "the profiled run is not this run ({differences}): give the options it ran with"
        )),
        None => Ok(()),
    }
}

/// Why figures profiled as `profiled` are not this run's (`here`, [`run_identity`]):
/// the fields that differ, each with both values; `None` when the runs are the same.
pub fn run_differences(profiled: &serde_json::Value, here: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    fn walk(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
        match (a, b) {
            _ if a == b => {}
            (Value::Object(x), Value::Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let (p, q) = (
                        x.get(k).unwrap_or(&Value::Null),
                        y.get(k).unwrap_or(&Value::Null),
                    );
                    walk(
                        &format!("{path}{}{k}", if path.is_empty() { "" } else { "." }),
                        p,
                        q,
                        out,
                    );
                }
            }
            _ => out.push(format!("{path} {a} there, {b} here")),
        }
    }
    let mut out = Vec::new();
    walk("", profiled, here, &mut out);
    (!out.is_empty()).then(|| out.join(", "))
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
        .find(|p| p.name_for(&plan.config, w.mla, plan.attention) == result.name)
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
    let masked = |flops: u64| {
        let m = u128::from(flops) * s_q.saturating_sub(1) / (2 * s_kv).max(1);
        u64::try_from(m).unwrap_or(u64::MAX)
    };
    let fp32 = w.dtype == modelmeter::Dtype::F32;
    let (mut cores, mut skippable, mut fast, mut fast_skippable) = (0u64, 0u64, 0u64, 0u64);
    for core in nodes.iter().filter(|c| c.name == ATTENTION_CORE_ROLE) {
        cores = cores.saturating_add(core.metrics.tensor_core_flops);
        // The fused kernel is a leaf inside the attention core's node.
        for kernel in core
            .ops()
            .into_iter()
            .filter(|c| c.op.is_some_and(is_fused_attention))
        {
            let flops = kernel.metrics.tensor_core_flops;
            skippable = skippable.saturating_add(masked(flops));
            if fp32 && kernel.op.is_some_and(runs_fast_fp32) {
                fast = fast.saturating_add(flops);
                fast_skippable = fast_skippable.saturating_add(masked(flops));
            }
        }
    }
    let total = cost.as_ref().map_or(0, |c| c.metrics.tensor_core_flops);
    let (small_gemm_flops, small_gemm_ceiling_flops) = if tokens < SMALL_GEMM_ROWS {
        (total, None)
    } else {
        let routed: u64 = nodes
            .iter()
            .filter(|c| c.name == ROUTED_EXPERTS_ROLE)
            .map(|c| c.metrics.tensor_core_flops)
            .fold(0u64, u64::saturating_add);
        let (experts, ceiling) =
            small_expert_share(routed, result.tokens_per_expert.as_deref(), plan);
        // Fewer query tokens than a tile's rows (a decode step at B ≥ 64): the attention
        // core's products have S_q rows per sequence, however large the batch.
        let core = if w.query_len() < SMALL_GEMM_ROWS {
            cores
        } else {
            0
        };
        let ceiling = if core > 0 { None } else { ceiling };
        (experts.saturating_add(core), ceiling)
    };
    Context {
        tokens,
        causal_skippable_flops: skippable,
        small_gemm_flops,
        small_gemm_ceiling_flops,
        fast_f32_flops: fast,
        fast_f32_skippable_flops: fast_skippable,
        simt_gemm_flops,
        tensor_source: TensorSource::of_dtype(w.dtype),
    }
}

/// The part of the routed experts' `routed` tensor FLOPs in experts that received fewer
/// than [`SMALL_GEMM_ROWS`] rows, and the most those experts could execute padded to
/// [`MAX_TILE_ROWS`] rows each: by the measured rows per expert where the run has them;
/// otherwise all of the routed work when the average expert's rows (N·k / E) are that
/// few, with no bound (which experts got how few rows is not known).
fn small_expert_share(
    routed: u64,
    tokens_per_expert: Option<&[i64]>,
    plan: &Plan,
) -> (u64, Option<u64>) {
    if routed == 0 {
        return (0, Some(0));
    }
    let small_rows = SMALL_GEMM_ROWS as i64;
    match tokens_per_expert {
        Some(rows) => {
            let all: i64 = rows.iter().filter(|r| **r > 0).sum();
            if all <= 0 {
                return (0, Some(0));
            }
            let small: i64 = rows.iter().filter(|r| **r > 0 && **r < small_rows).sum();
            let padded = rows.iter().filter(|r| **r > 0 && **r < small_rows).count() as u128
                * u128::from(MAX_TILE_ROWS);
            let share =
                |n: u128| u64::try_from(u128::from(routed) * n / all as u128).unwrap_or(u64::MAX);
            (share(small as u128), Some(share(padded)))
        }
        None => {
            let Some(moe) = plan.config.moe.as_ref() else {
                return (0, Some(0));
            };
            let w = &plan.workload;
            let rows = w
                .batch
                .saturating_mul(w.query_len())
                .saturating_mul(moe.num_experts_per_tok);
            if rows < SMALL_GEMM_ROWS.saturating_mul(moe.n_routed_experts.max(1)) {
                (routed, None)
            } else {
                (0, Some(0))
            }
        }
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
    attach_with_reasons(report, plan, run, &[], device_name);
}

/// [`attach`], with why a layer has no figures where the run knows (`missing`: layer and
/// reason; kernel replay's per-layer errors): that layer's failing row says it.
pub fn attach_with_reasons(
    report: &mut Report,
    plan: &Plan,
    run: &Result<Vec<AttributedRange>, String>,
    missing: &[(String, String)],
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
                    .ok_or_else(|| match missing.iter().find(|(l, _)| *l == layer.name) {
                        Some((_, why)) => why.clone(),
                        None => {
                            "the profiled run has no figures for it (why: its error in ranges.json)"
                                .to_string()
                        }
                    }),
                Err(e) => Err(e.clone()),
            };
            match found {
                Ok(range) => {
                    let context = context_of(plan, layer);
                    let here = record_of(layer).map(|r| rows::Counted::of(&r));
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

    fn plan(seq_len: u64) -> Plan {
        Plan::on_cpu(
            modelmeter::ModelConfig::deepseek_ocr(),
            modelmeter::Workload::prefill(1, seq_len).unwrap(),
        )
    }

    #[test]
    fn another_device_or_run_is_refused_and_an_old_list_is_judged_by_counts() {
        let here = run_identity(&plan(8));
        assert_eq!(
            check_same_run("cuda:0", &here, "cuda:0", Some(&here)),
            Ok(())
        );
        assert_eq!(check_same_run("cuda:0", &here, "cuda:0", None), Ok(()));
        let e = check_same_run("cuda:0", &here, "cuda:1", Some(&here)).unwrap_err();
        assert!(e.contains("cuda:1") && e.contains("--device"), "{e}");
        let other = run_identity(&plan(512));
        let e = check_same_run("cuda:0", &here, "cuda:0", Some(&other)).unwrap_err();
        assert!(e.contains("workload.seq_len 512 there, 8 here"), "{e}");
    }

    #[test]
    fn figures_profiled_on_another_gpu_are_refused() {
        let recorded = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/h200-2026-11-28-hw/bf16-prefill");
        let csv = std::fs::read_to_string(recorded.join(NCU_CSV_FILE)).unwrap();
        let gpus = profiled_gpus(&csv);
        assert_eq!(gpus, ["NVIDIA H200"]);
        assert_eq!(check_profiled_on(&gpus, "NVIDIA H200", &recorded), Ok(()));
        let e = check_profiled_on(&gpus, "NVIDIA H100 80GB HBM3", &recorded).unwrap_err();
        assert!(
            e.contains("on NVIDIA H200, and this machine's GPU is NVIDIA H100 80GB HBM3"),
            "{e}"
        );
        // Rows of two GPUs, or an export that names none.
        let two = ["NVIDIA H200".to_string(), "NVIDIA H100".to_string()];
        assert!(check_profiled_on(&two, "NVIDIA H200", &recorded).is_err());
        assert_eq!(check_profiled_on(&[], "NVIDIA H200", &recorded), Ok(()));
        let mlp = include_str!("../../../fixtures/ncu-h200/ncu_mlp_bfloat16.csv");
        assert_eq!(profiled_gpus(mlp), ["NVIDIA H200"]);
    }

    #[test]
    fn a_folder_to_read_with_an_unreadable_csv_is_refused() {
        let recorded = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/h200-2026-11-28-hw/bf16-prefill");
        assert!(read_range_run(&recorded, "NVIDIA H200").is_ok());
        // Read on another GPU: refused in the same step.
        let e = read_range_run(&recorded, "NVIDIA H100")
            .err()
            .expect("refused");
        assert!(e.contains("this machine's GPU is NVIDIA H100"), "{e}");
        let csv = std::fs::read_to_string(recorded.join(NCU_CSV_FILE)).unwrap();
        let ranges = std::fs::read_to_string(recorded.join("ranges.json")).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let with_csv = |text: &str| {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("ranges.json"), &ranges).unwrap();
            std::fs::write(dir.join(NCU_CSV_FILE), text).unwrap();
            read_range_run(&dir, "NVIDIA H200")
        };
        // Cut short inside a quoted field; a time in cycles; a row of another width.
        let cut = &csv.trim_end()[..csv.trim_end().len() - 1];
        let cycles = csv.replace("\"ns\"", "\"cycle\"");
        assert_ne!(cycles, csv, "the time's unit is in the export");
        let last = csv.trim_end().lines().last().unwrap();
        let narrow = csv.replacen(last, "\"99\",\"range\"", 1);
        for (what, text) in [
            ("cut", cut.to_string()),
            ("cycles", cycles),
            ("narrow", narrow),
        ] {
            let Err(e) = with_csv(&text) else {
                panic!("{what}: read")
            };
            assert!(
                e.contains(&format!(
                    "{}: ncu's CSV: ",
                    dir.join(NCU_CSV_FILE).display()
                )),
                "{what}: {e}"
            );
        }
    }

    #[test]
    fn a_kernel_replay_export_must_hold_kernels() {
        let mlp = include_str!("../../../fixtures/ncu-h200/ncu_mlp_bfloat16.csv");
        let files = |csv: String| RunFiles {
            csv,
            ranges: RangeList {
                schema: super::super::ranges::RANGE_LIST_SCHEMA.into(),
                device: "cuda:0".into(),
                layers: vec![RangeEntry::Counted(RangeRecord {
                    layer: "DeepseekV2MLP".into(),
                    tensor_core_flops: 1,
                    cuda_core_flops: 0,
                    io_bytes: 1,
                })],
                run: None,
            },
            left_out: Vec::new(),
            replay: Some(NcuReplay::Kernel),
        };
        let read = |csv: String| kernels_of_layer(&files(csv), 0, "DeepseekV2MLP");
        assert!(read(mlp.to_string()).is_ok());
        // A header without quotes is ncu's header too.
        let header = mlp.lines().find(|l| l.starts_with("\"ID\"")).unwrap();
        let unquoted = mlp.replacen(header, &header.replace('"', ""), 1);
        let range = read(unquoted).expect("an unquoted header is read");
        assert_eq!(range.figures.rows, 6);
        // A header and no rows: no kernel was profiled (not "no row belongs to the range").
        let header_only: String = mlp
            .lines()
            .take_while(|l| !l.starts_with("\"1\"") && !l.starts_with("\"0\""))
            .map(|l| format!("{l}\n"))
            .collect();
        let e = read(header_only).unwrap_err();
        assert!(e.starts_with("ncu profiled no kernel"), "{e}");
        // Rows of ranges: a range-replay export, refused (its time is no kernels' time).
        let mut as_ranges = String::new();
        for line in mlp.lines() {
            let mut cells: Vec<&str> = line.split("\",\"").collect();
            // A result row (its ID a number): its fifth column is the Kernel Name.
            let is_row = line
                .strip_prefix('"')
                .is_some_and(|l| l.starts_with(|c: char| c.is_ascii_digit()));
            if is_row {
                cells[4] = "range";
            }
            as_ranges.push_str(&cells.join("\",\""));
            as_ranges.push('\n');
        }
        let e = read(as_ranges).unwrap_err();
        assert!(e.contains("the row is a range, not a kernel"), "{e}");
    }

    /// Fast fp32 (3xTF32) is the memory-efficient kernel's fp32 work only: the same
    /// kernel in bf16 (a head dimension above flash's and cuDNN's 256) runs plain bf16 MMAs.
    /// The attention core's products are small GEMMs when a sequence has fewer query rows
    /// than a tile, however many tokens the batch holds (a decode step at B = 64).
    #[test]
    fn fast_fp32_and_small_gemms_of_the_attention_core() {
        let config = modelmeter::ModelConfig::from_json_str(
            "d264",
            r#"{"hidden_size": 528, "num_attention_heads": 2, "intermediate_size": 64,
                "num_hidden_layers": 1, "vocab_size": 100}"#,
        )
        .unwrap();
        let context = |w: modelmeter::Workload, dtype| {
            let w = w.with_dtype(dtype).unwrap().on(modelmeter::Platform::Cuda);
            let plan = Plan {
                layers: vec![crate::pairing::Pairing {
                    layer: modelmeter::layers::LayerId::Attention,
                }],
                ..Plan::on_cpu(config.clone(), w)
            };
            let name = plan.layers[0].name_for(&plan.config, plan.workload.mla, plan.attention);
            context_of(
                &plan,
                &LayerResult::new(name.into(), crate::compare::Status::Pass),
            )
        };
        let prefill = || modelmeter::Workload::prefill(1, 64).unwrap();
        // Core QKᵀ and PV: 4·B·H·S²·d, (S − 1)/(2S) of it above the diagonal.
        let core = 4 * 2 * 64 * 64 * 264u64;
        let masked = core * 63 / 128;
        let bf16 = context(prefill(), modelmeter::Dtype::Bf16);
        assert_eq!(
            (
                bf16.causal_skippable_flops,
                bf16.fast_f32_flops,
                bf16.fast_f32_skippable_flops
            ),
            (masked, 0, 0)
        );
        // 64 query rows: a full tile, no small GEMM.
        assert_eq!(
            (bf16.small_gemm_flops, bf16.small_gemm_ceiling_flops),
            (0, Some(0))
        );
        let fp32 = context(prefill(), modelmeter::Dtype::F32);
        assert_eq!(
            (
                fp32.causal_skippable_flops,
                fp32.fast_f32_flops,
                fp32.fast_f32_skippable_flops
            ),
            (masked, core, masked)
        );
        // One query row per sequence over 64 keys, 64 sequences: 64 tokens, yet each
        // product of the core has one row.
        let decode = context(
            modelmeter::Workload::decode(64, 63).unwrap(),
            modelmeter::Dtype::Bf16,
        );
        assert_eq!(decode.tokens, 64);
        assert_eq!(
            (decode.small_gemm_flops, decode.small_gemm_ceiling_flops),
            (4 * 64 * 2 * 64 * 264, None)
        );
    }

    /// The routed experts' small-GEMM share: by the measured rows per expert where the
    /// run has them (experts with 1 ..= 63 rows; empty experts and full tiles are not
    /// small), otherwise all or nothing by the average expert's rows, N·k / E, against a
    /// tile's 64.
    #[test]
    fn small_expert_share_counts_experts_with_fewer_rows_than_a_tile() {
        let moe = crate::plan::small_moe_config();
        let plan_at = |seq_len| {
            Plan::on_cpu(
                moe.clone(),
                modelmeter::Workload::prefill(1, seq_len).unwrap(),
            )
        };
        let plan = plan_at(8);
        // Measured: 337 rows in all, 10 + 63 of them in two small experts (each padded to
        // 256 rows at most); the empty expert and those with 64 and 200 rows are not small.
        let rows = [0, 10, 63, 64, 200];
        assert_eq!(
            small_expert_share(337_000, Some(&rows), &plan),
            (73_000, Some(512_000))
        );
        assert_eq!(small_expert_share(0, Some(&rows), &plan), (0, Some(0)));
        assert_eq!(small_expert_share(5, Some(&[0, 0]), &plan), (0, Some(0)));
        // Not measured: N·k = 255 · 2 rows over 8 experts is under 64 each on average (all
        // of it, no bound); 256 · 2 is 64 each (none).
        assert_eq!(
            small_expert_share(1_000, None, &plan_at(255)),
            (1_000, None)
        );
        assert_eq!(small_expert_share(1_000, None, &plan_at(256)), (0, Some(0)));
        // No routed experts in the config.
        let dense = Plan::on_cpu(
            modelmeter::ModelConfig::from_json_str(
                "dense",
                r#"{"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 48,
                    "num_hidden_layers": 1, "vocab_size": 100}"#,
            )
            .unwrap(),
            modelmeter::Workload::prefill(1, 8).unwrap(),
        );
        assert_eq!(small_expert_share(1_000, None, &dense), (0, Some(0)));
    }

    /// A layer's kernel-replay folder answers for that layer only: its range list must
    /// hold the one layer asked for, counted (its figures) or failed (its error).
    #[test]
    fn a_layer_folder_answers_only_for_its_own_layer() {
        let mlp = include_str!("../../../fixtures/ncu-h200/ncu_mlp_bfloat16.csv");
        let files = |layers: Vec<RangeEntry>| RunFiles {
            csv: mlp.to_string(),
            ranges: RangeList {
                schema: super::super::ranges::RANGE_LIST_SCHEMA.into(),
                device: "cuda:0".into(),
                layers,
                run: None,
            },
            left_out: Vec::new(),
            replay: Some(NcuReplay::Kernel),
        };
        let counted = |layer: &str| {
            RangeEntry::Counted(RangeRecord {
                layer: layer.into(),
                tensor_core_flops: 1,
                cuda_core_flops: 0,
                io_bytes: 1,
            })
        };
        let failed = RangeEntry::Failed {
            layer: "MoEGate".into(),
            error: "boom".into(),
        };
        let read = |layers, layer| kernels_of_layer(&files(layers), 0, layer);
        let no_range = "the profiled run of DeepseekV2MLP has no range: it did not run";
        let range = read(vec![counted("DeepseekV2MLP")], "DeepseekV2MLP").expect("its own");
        assert_eq!(range.record.layer, "DeepseekV2MLP");
        assert_eq!(
            read(vec![counted("MoEGate")], "DeepseekV2MLP").unwrap_err(),
            no_range
        );
        assert_eq!(
            read(vec![failed.clone()], "MoEGate").unwrap_err(),
            "the profiled run of MoEGate failed: boom"
        );
        assert_eq!(
            read(vec![failed.clone()], "DeepseekV2MLP").unwrap_err(),
            no_range
        );
        assert_eq!(
            read(vec![counted("DeepseekV2MLP"), failed], "DeepseekV2MLP").unwrap_err(),
            no_range
        );
    }

    #[test]
    fn a_kernel_replay_folder_of_another_run_gives_its_layer_no_figures() {
        let table = super::super::ncu_csv::parse(
            include_str!("../../../fixtures/ncu-h200/ncu_mlp_bfloat16.csv"),
            &super::super::ncu_csv::ParseOptions::per_kernel(),
        )
        .unwrap();
        let range = |layer: &str| AttributedRange {
            index: 0,
            ncu_id: "1 kernels".into(),
            record: RangeRecord {
                layer: layer.into(),
                tensor_core_flops: 1,
                cuda_core_flops: 0,
                io_bytes: 1,
            },
            figures: super::super::HardwareFigures::of_range(&table, None).unwrap(),
            time: TimeSpan::Kernels,
        };
        let profiled = |seq_len| Profiled {
            device: "cuda:0".into(),
            run: Some(run_identity(&plan(seq_len))),
        };
        let mut run = PerLayerRun::default();
        run.add("A", Path::new("run/0-A"), Ok((profiled(8), range("A"))));
        run.add("B", Path::new("run/1-B"), Ok((profiled(8), range("B"))));
        run.add("C", Path::new("run/2-C"), Ok((profiled(16), range("C"))));
        assert_eq!(run.ranges.len(), 2);
        assert_eq!(run.errors.len(), 1);
        let (layer, why) = &run.errors[0];
        assert_eq!(layer, "C");
        assert!(
            why.contains("run/2-C holds another run")
                && why.contains("workload.seq_len 16 there, 8 here"),
            "{why}"
        );
        // A folder whose list records no run beside ones that do (or the reverse) says
        // which side lacks it.
        let unrecorded = Profiled {
            run: None,
            ..profiled(8)
        };
        run.add(
            "D",
            Path::new("run/3-D"),
            Ok((unrecorded.clone(), range("D"))),
        );
        assert!(run.errors[1]
            .1
            .contains("does not record its run, the first layer's does"));
        let mut old_first = PerLayerRun::default();
        old_first.add("A", Path::new("run/0-A"), Ok((unrecorded, range("A"))));
        old_first.add("B", Path::new("run/1-B"), Ok((profiled(8), range("B"))));
        assert!(old_first.errors[0]
            .1
            .contains("records its run, the first layer's does not"));
    }

    #[test]
    fn figures_of_another_run_are_told_apart_by_what_it_ran() {
        let here = run_identity(&plan(8));
        assert_eq!(run_differences(&run_identity(&plan(8)), &here), None);
        // The config's name is how it was given, not what it is.
        let mut renamed = plan(8);
        renamed.config.name = "./configs/ocr.json".into();
        assert_eq!(run_differences(&run_identity(&renamed), &here), None);
        let d = run_differences(&run_identity(&plan(512)), &here).unwrap();
        assert_eq!(d, "workload.seq_len 512 there, 8 here");
        let mut other = plan(8);
        other.seed = 7;
        other.workload = other.workload.with_dtype(modelmeter::Dtype::F16).unwrap();
        other.config.intermediate_size = 64;
        let d = run_differences(&run_identity(&other), &here).unwrap();
        for part in [
            "config.intermediate_size 64 there, 6848 here",
            "seed 7 there, 0 here",
            "workload.dtype \"fp16\" there",
        ] {
            assert!(d.contains(part), "{part} in {d}");
        }
    }

    /// A run's files go to a folder of its own under the system's temporary folder,
    /// named after the process, created (not into the working directory).
    #[test]
    fn a_run_gets_its_own_temporary_folder() {
        let dir = temporary_dir().unwrap();
        assert!(dir.is_dir(), "{}", dir.display());
        assert_eq!(
            dir,
            std::env::temp_dir().join(format!("modelmeter-ncu-{}", std::process::id()))
        );
        // Empty unless another test of this process is using it.
        let _ = std::fs::remove_dir(&dir);
    }

    /// Only kernel replay counts SASS instructions: the range modes leave exactly those
    /// metrics out up front, each saying which mode measures it; kernel replay none.
    #[test]
    fn only_kernel_replay_counts_sass_instructions() {
        assert!(NcuReplay::Kernel.counts_instructions());
        assert!(left_out_up_front(NcuReplay::Kernel).is_empty());
        let sass: Vec<&str> = NCU_METRICS
            .iter()
            .copied()
            .filter(|m| is_instruction_metric(m))
            .collect();
        assert!(!sass.is_empty());
        for replay in [NcuReplay::AppRange, NcuReplay::Range] {
            assert!(!replay.counts_instructions());
            let left_out = left_out_up_front(replay);
            let metrics: Vec<&str> = left_out.iter().map(|l| l.metric.as_str()).collect();
            assert_eq!(metrics, sass, "{replay:?}");
            assert!(left_out.iter().all(|l| l.why.contains(&format!(
                "not in {} replay; --ncu-replay kernel measures them",
                replay.mode()
            ))));
        }
    }

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
            unsupported_in_replay(log),
            vec!["smsp__sass_thread_inst_executed_op_dadd_pred_on.sum"]
        );
        assert!(unsupported_in_replay("\"ID\",\"Range Name\"\n").is_empty());
        // The same sentence for another replay mode.
        let app = "==ERROR== Metric smsp__sass_thread_inst_executed_op_ffma_pred_on.sum is not supported in app-range replay.\n";
        assert_eq!(
            unsupported_in_replay(app),
            vec!["smsp__sass_thread_inst_executed_op_ffma_pred_on.sum"]
        );
    }

    #[test]
    fn the_range_list_keeps_failed_layers_in_their_place() {
        use crate::compare::Status;
        let failed = |name: &str, error: &str, opened: Option<bool>| {
            let mut r = LayerResult::new(name.into(), Status::Error);
            r.error = Some(error.into());
            r.profiler_range_opened = opened;
            r
        };
        let judged = failed("Judged", "analytic model: routing", Some(true));
        let inside = failed("Inside", "out of memory", Some(true));
        let before = failed("Before", "a test hook made Before fail", Some(false));
        let panicked = failed("Panicked", "the reference module panicked: x", None);
        // It ran without error but booked nothing: its range was opened and closed.
        let unjudged = LayerResult::new("NoRows".into(), Status::Pass);
        let list = range_list(
            "cuda:0".into(),
            &[judged, inside, before, panicked, unjudged],
        );
        let entry = |kind: fn(String, String) -> RangeEntry, layer: &str, error: &str| {
            kind(layer.into(), error.into())
        };
        let failed = |layer, error| RangeEntry::Failed { layer, error };
        let not_opened = |layer, error| RangeEntry::NotOpened { layer, error };
        let unknown = |layer, error| RangeEntry::Unknown { layer, error };
        assert_eq!(
            list.layers,
            [
                entry(failed, "Judged", "analytic model: routing"),
                entry(failed, "Inside", "out of memory"),
                entry(not_opened, "Before", "a test hook made Before fail"),
                entry(unknown, "Panicked", "the reference module panicked: x"),
                entry(failed, "NoRows", "no counted rows"),
            ]
        );
    }

    #[test]
    fn ncu_is_found_on_path_or_refused_in_one_line() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
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
    }
}
