//! The `verify-decoder` command: options, the checks before anything runs ([`prepare`]),
//! the run or sweep ([`report_of`]), and the reports. Exit codes: 0 all pass/known_gap,
//! 1 any fail or error, 2 bad usage or setup (nothing ran).

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context};
use clap::Parser;
use modelmeter::cli::{
    beyond_trained_positions, one_line, router_keeps_too_few_experts, whole_number, ConfigSource,
    WorkloadArgs,
};
use modelmeter::layers::{attention_core, AttentionImpl};
use modelmeter::workload::DSOCR_STANDARD_V1;
use modelmeter::{Dtype, Platform, Workload};

use crate::device::{DeviceInfo, DeviceSpec};
use crate::environment::Environment;
use crate::hardware::profile as hardware;
use crate::hooks::TestHooks;
use crate::model::ModelPlan;
use crate::oracle::{self, Oracle};
use crate::pairing::{self, Pairing, REGISTRY};
use crate::plan::Plan;
use crate::report::{self, Case, Report};
use crate::results::Progress;
use crate::{runner, sweep};

/// Help is wrapped to the terminal (clap's `wrap_help`): each example's comment stands on
/// its own line above it, and no example line is longer than 80 columns, so no command is
/// split.
const EXAMPLES: &str = "Examples:
  # every layer, DeepSeek-OCR, B=1 S=512 (cuda:0 if present, else cpu)
  verify-decoder
  verify-decoder --device cuda:0 --accept-rel-diff 0.1
  verify-decoder --device cpu --dtype bf16 --seq-len 64 --layers DeepseekV2MoE
  verify-decoder --phase decode --context-len 1024 --attn eager
  verify-decoder --config config.json --json report.json --junit report.xml
  # 50 random configs and workloads
  verify-decoder --sweep 50 --seed 7
  # the whole model: a prefill and 8 decode steps
  verify-decoder --device cpu --model --num-layers 2 --seq-len 64 --new-tokens 8
  # and Nsight Compute's counters per layer
  verify-decoder --device cuda:0 --hardware-counters --ncu-dir ncu-out
  # where the wall time goes, phase by phase
  verify-decoder --device cpu --quiet --timings

Statuses: pass (flops and peak rows: rel diff <= tolerance; an --oracle oracle_output row: within its dtype's bound, said in its note; every other row: equal), fail, known_gap (a flops row off by exactly the elementwise work FlopCounterMode cannot see, matmul rows exact: all of RMSNorm's; with --oracle, an oracle_flops row that agrees but cannot witness a kernel outside FlopCounterMode's registry), error (the layer could not run); info (a row shown for information only, not a check: the informational --hardware-counters rows, and the oracle_flops row of an absorbed MLA layer, a form transformers does not have).

Exit codes: 0 all pass/known_gap, 1 any fail or error, 2 bad usage or setup (nothing ran).";

/// The most configurations one sweep may verify.
pub const MAX_SWEEP: usize = 100_000;

/// What `--sweep` takes, for its refusals.
fn sweep_range() -> String {
    format!("expected a number of configurations in 1 ..= {MAX_SWEEP}")
}

/// Parses `--sweep`: a number too large for the integer type is refused with the range a
/// sweep takes, not with the type's maximum.
fn sweep_count(text: &str) -> Result<usize, String> {
    whole_number::<usize>(text).map_err(|e| match text.parse::<usize>() {
        Err(p) if *p.kind() == std::num::IntErrorKind::PosOverflow => {
            format!("too large; {}", sweep_range())
        }
        _ => e,
    })
}

/// Command-line options of `verify-decoder`.
#[derive(Parser, Debug)]
#[command(
    name = "verify-decoder",
    version,
    about = "Verify modelmeter's analytic DeepSeek-V2 decoder layers against reference modules run under a dispatcher-level FLOP counter",
    after_help = EXAMPLES,
    allow_negative_numbers = true,
    mut_arg("dtype", |a| a.help(
        "Model dtype [default: bf16 on a GPU; fp32 on the CPU, which libtorch's CPU GEMMs run natively]"
    ))
)]
pub struct Args {
    /// cpu, cuda or cuda:N [default: cuda:0 when libtorch sees a GPU, else cpu]
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<String>,
    /// Largest accepted |analytic − measured| / |measured| of the approximate rows, flops
    /// and peak_activation_bytes (0.05 = 5%); the exact rows must agree to the unit
    #[arg(
        long,
        value_name = "REL",
        default_value = "0.05",
        allow_hyphen_values = true
    )]
    pub accept_rel_diff: String,
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Comma-separated layers to verify [default: all the config has]: DeepseekV2MLP,
    /// MoEGate, DeepseekV2MoE, DeepseekV2RMSNorm, DeepseekV2DecoderLayer_dense,
    /// DeepseekV2DecoderLayer_moe, and the attention the run verifies: LlamaFlashAttention2
    /// (LlamaAttention with --attn eager); for MLA configs DeepseekV2FlashAttention2
    /// (DeepseekV2Attention with --attn eager, DeepseekV2Attention_absorb with --mla absorb);
    /// with --sweep any of these attention names selects the attention, whose class each
    /// case draws
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub layers: Vec<String>,
    /// Seed of the random weights and inputs (FLOPs do not depend on it; routing does)
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = whole_number::<u64>)]
    pub seed: u64,
    /// Verify N random configurations and workloads instead (with --seed)
    #[arg(long, value_name = "N", value_parser = sweep_count)]
    pub sweep: Option<usize>,
    /// Write the modelmeter.verify/1 JSON report to FILE (- for standard output; the
    /// table then goes to standard error)
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write a JUnit XML report (one test case per layer and metric) to FILE (- for
    /// standard output)
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Print only the summary line, after the cause of each error (a layer, call or row
    /// that could not run)
    #[arg(long, short)]
    pub quiet: bool,
    /// Also check each layer against an independent witness: transformers' modules run
    /// under torch's own FlopCounterMode on the same device and dtype, with this Python
    /// (python = the project's .venv, else python3; or python=PATH); with --sweep, each
    /// case is drawn as transformers can run it (hidden_size = heads · head_dim, its routers)
    #[arg(long, value_name = "python[=PATH]", num_args = 0..=1, default_missing_value = "python")]
    pub oracle: Option<String>,
    /// Print where the run's wall time went (before main, setup, per layer: analytic,
    /// build, prepare, forward, compare; reports; peak RSS) on standard error, and add a
    /// `timings` object to the JSON report (a sweep's rows say their case, `[3]` and
    /// `case`; not with --model)
    #[arg(long)]
    pub timings: bool,
    /// Add a `host` object with facts that change from run to run (free device memory)
    /// to the JSON report; without it, the same seed and inputs give byte-identical reports
    #[arg(long)]
    pub report_host_details: bool,
    /// Verify the whole model instead of single layers: embedding, every decoder layer,
    /// final norm and lm_head, for the prefill (--seq-len) and each greedy decode step,
    /// per layer, per step, per phase and in total
    #[arg(long)]
    pub model: bool,
    /// With --model: run only the first K decoder layers of the config (keeping its
    /// dense/MoE pattern) [default: all]
    #[arg(long, value_name = "K", value_parser = whole_number::<u64>)]
    pub num_layers: Option<u64>,
    /// With --model: greedy decode steps after the prefill [default: 512, from
    /// dsocr-standard-v1]
    #[arg(long, value_name = "N", value_parser = whole_number::<u64>)]
    pub new_tokens: Option<u64>,
    /// With --model: list every decode step (and keep its layers in the JSON report), not
    /// only those that are not exact
    #[arg(long, short)]
    pub verbose: bool,
    /// Also measure each layer with the GPU's own counters (CUDA only): re-runs the layers
    /// under Nsight Compute's ncu, one range per layer, and adds hw_* rows and a `hardware`
    /// object per layer (docs/hardware.md)
    #[arg(long)]
    pub hardware_counters: bool,
    /// With --hardware-counters: the ncu to run [default: ncu on PATH]
    #[arg(long, value_name = "PATH")]
    pub ncu: Option<PathBuf>,
    /// With --hardware-counters: keep ncu's CSV (ncu.csv), the range list (ranges.json) and
    /// the profiled run's output (output.txt) in DIR [default: a temporary folder, removed
    /// after a successful run]
    #[arg(long, value_name = "DIR")]
    pub ncu_dir: Option<PathBuf>,
    /// With --hardware-counters: how ncu replays each layer's range for its passes:
    /// app-range reruns the whole verification per pass (any layer works), range replays
    /// in place (faster; fails on the MoE layers, which copy routing counts to the host),
    /// kernel profiles each kernel, one ncu run per layer (the only mode with SASS
    /// instruction counts, so hw_cuda_core_flops, and kernel-only time; slow for the MoE
    /// layers' hundreds of kernels)
    #[arg(long, value_name = "MODE", value_enum, ignore_case = true)]
    pub ncu_replay: Option<hardware::NcuReplay>,
    /// Read the hardware counters from DIR (ncu.csv and ranges.json of a run you wrapped in
    /// ncu yourself, see docs/hardware.md, or a folder --ncu-dir kept) instead of running
    /// ncu
    #[arg(long, value_name = "DIR")]
    pub hardware_counters_from: Option<PathBuf>,
    /// Be the profiled run under ncu: each layer's counted forward is one profiler range
    /// (cuProfilerStart to cuProfilerStop); writes DIR/ranges.json (what
    /// --hardware-counters runs under ncu)
    #[arg(long, value_name = "DIR")]
    pub hardware_counters_child: Option<PathBuf>,
}

/// A checked invocation, ready to run.
pub struct Ready {
    pub spec: DeviceSpec,
    /// Why this device (`as asked`, or the default's reason).
    pub why: String,
    pub info: DeviceInfo,
    pub plan: Plan,
    /// `--report-host-details`.
    pub host_details: bool,
    /// `--oracle`, checked.
    pub oracle: Option<Oracle>,
    /// `--model`, checked (the plan's config is then cut to its layers).
    pub model: Option<ModelPlan>,
    /// `--hardware-counters` and friends, checked.
    pub hardware: Option<hardware::Role>,
}

/// Parses, checks and runs; never panics on bad input. Returns the exit status: 0 every
/// row passed, 1 a row failed or a report could not be written, 2 bad input or a run that
/// could not start.
pub fn run(args: &Args) -> u8 {
    let ready = match prepare(args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("verify-decoder: error: {}", one_line(&format!("{e:#}")));
            return 2;
        }
    };
    if !args.quiet {
        // Free memory is shown here, not in the reports: it changes from run to run.
        let free = match &ready.info.memory_bytes {
            Ok(bytes) => format!(", {}", ready.info.free_text(*bytes)),
            Err(_) => String::new(),
        };
        eprintln!(
            "device: {} ({}): {}{free}",
            ready.spec, ready.why, ready.info.name
        );
    }
    if let Some(hardware::Role::Child { dir }) = &ready.hardware {
        return run_hardware_child(args, &ready, dir);
    }
    // A single run past the trained positions runs (the code runs at any length), with a
    // warning as `modelmeter analyze` gives; `--model` refuses it, a sweep stays inside (the
    // hardware-counter child, run above, leaves it to its parent).
    if ready.model.is_none() && args.sweep.is_none() {
        let plan = &ready.plan;
        if let Some(warning) = beyond_trained_positions(&plan.config, &plan.workload, None) {
            eprintln!("verify-decoder: warning: {}", one_line(&warning));
        }
    }
    // A degenerate router (any run but a sweep, whose generator draws such configs on
    // purpose: the counts are exact either way).
    if args.sweep.is_none() {
        if let Some(warning) = router_keeps_too_few_experts(&ready.plan.config) {
            eprintln!("verify-decoder: warning: {}", one_line(&warning));
        }
    }
    let hardware_run = match &ready.hardware {
        Some(role) => match hardware_figures(args, &ready, role) {
            Ok(run) => Some(run),
            Err(e) => {
                eprintln!("verify-decoder: error: {}", one_line(&e));
                return 2;
            }
        },
        None => None,
    };
    let (ok, written, printed) = match ready.model {
        Some(model) => {
            let report = model_report_of(args, &ready, &model);
            // Reports first: a table that cannot be printed (a full disk, a closed pipe)
            // must not cost the reports.
            let written = write_rendered(
                args,
                || serde_json::to_string_pretty(&report::model_json(&report)),
                || report::model_junit(&report),
            );
            let printed = print_text(args, report::model_table(&report));
            (report.ok(), written, printed)
        }
        None => {
            let mut report = report_of(args, &ready);
            if let Some((run, missing)) = &hardware_run {
                hardware::attach_with_reasons(
                    &mut report,
                    &ready.plan,
                    run,
                    missing,
                    &ready.info.name,
                );
            }
            let phases = args.timings.then(|| {
                crate::timings::Phases::now(
                    report
                        .cases
                        .iter()
                        .flat_map(|c| c.layers.iter().map(move |l| (c.index, l)))
                        .map(|(case, l)| crate::timings::LayerPhases {
                            layer: l.name.clone(),
                            case,
                            timings: l.timings,
                        })
                        .collect(),
                )
            });
            let reports_start = crate::timings::since_main();
            let written = write_rendered(
                args,
                || {
                    let mut json = report::to_json(&report);
                    if let Some(phases) = &phases {
                        json["timings"] = phases.to_json();
                    }
                    serde_json::to_string_pretty(&json)
                },
                || report::to_junit(&report),
            );
            let printed = print_table(args, &report);
            if let Some(phases) = &phases {
                let reports_s = crate::timings::since_main() - reports_start;
                eprint!("{}", phases.table(reports_s));
            }
            (report.summary().ok(), written, printed)
        }
    };
    let mut code = if ok { 0 } else { 1 };
    for message in [written.err(), printed.err()].into_iter().flatten() {
        eprintln!("verify-decoder: error: {}", one_line(&message));
        code = 1;
    }
    code
}

/// The figures of a hardware-counter run attributed to layers, or why there are none
/// (shown on every layer); and the layers without figures, with why (kernel replay).
type HardwareRun = (
    Result<Vec<crate::hardware::ranges::AttributedRange>, String>,
    Vec<(String, String)>,
);

/// `--hardware-counters` (run ncu over a child) or `--hardware-counters-from` (read a
/// wrapped child's files): the figures attributed to ranges, or why there are none (shown
/// on every layer). An error here is a setup failure: ncu could not run or left no CSV,
/// or (kernel replay) no layer has figures.
fn hardware_figures(
    args: &Args,
    ready: &Ready,
    role: &hardware::Role,
) -> Result<HardwareRun, String> {
    let files = match role {
        hardware::Role::Parent {
            ncu,
            dir,
            keep,
            replay,
        } => {
            let exe = std::env::current_exe()
                .map_err(|e| format!("cannot find this program to run it under ncu: {e}"))?;
            let own: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
            if !args.quiet {
                let per = if *replay == hardware::NcuReplay::Kernel {
                    "one ncu run per layer"
                } else {
                    "one range per layer"
                };
                eprintln!(
                    "hardware counters: running the layers under {} ({} replay, {per}; minutes); files in {}",
                    ncu.display(),
                    replay.mode(),
                    dir.display()
                );
            }
            if *replay == hardware::NcuReplay::Kernel {
                let plan = &ready.plan;
                let layers: Vec<String> = plan
                    .layers
                    .iter()
                    .map(|p| {
                        p.name_for(&plan.config, plan.workload.mla, plan.attention)
                            .to_string()
                    })
                    .collect();
                let total = layers.len();
                let quiet = args.quiet;
                let run =
                    hardware::run_per_layer(ncu, &exe, &own, dir, &layers, &mut |i, name| {
                        if !quiet {
                            eprintln!(
                                "hardware counters: [{}/{total}] {name} under ncu (kernel replay)",
                                i + 1
                            );
                        }
                    })?;
                if !keep && run.errors.is_empty() {
                    let _ = std::fs::remove_dir_all(dir);
                }
                return per_layer_figures(ready, run, None);
            }
            if !args.quiet && !replay.counts_instructions() {
                eprintln!(
                    "hardware counters: ncu counts SASS instructions only in kernel replay, so hw_cuda_core_flops is unavailable in {} replay (--ncu-replay kernel measures it)",
                    replay.mode()
                );
            }
            let files = hardware::run_under_ncu(ncu, &exe, &own, dir, *replay)?;
            if !keep {
                let _ = std::fs::remove_dir_all(dir);
            }
            files
        }
        hardware::Role::Reader { dir } => match hardware::read_per_layer(dir) {
            // A kernel-replay folder (`<i>-<layer>/` per layer).
            Some(run) => return per_layer_figures(ready, run?, Some(dir)),
            None => hardware::read_range_run(dir, &ready.info.name)?,
        },
        hardware::Role::Child { .. } => return Err("internal: the child reads no figures".into()),
    };
    same_run(ready, &files.ranges.device, files.ranges.run.as_ref())?;
    Ok((hardware::attributed(&files), Vec::new()))
}

/// Refuses figures profiled on another device than this run's, or of another run (its
/// config, workload, attention or seed: [`hardware::run_identity`]). A range
/// list written before runs were recorded is judged by its counts alone (a layer whose
/// counted work differs fails).
fn same_run(ready: &Ready, device: &str, run: Option<&serde_json::Value>) -> Result<(), String> {
    let here = hardware::run_identity(&ready.plan);
    hardware::check_same_run(&ready.spec.to_string(), &here, device, run)
}

/// A kernel-replay run's figures: every layer that has them; the layers without say why
/// (on their row); a run in which no layer has figures is a setup error (exit 2).
/// `read_from`: the folder given to `--hardware-counters-from`, whose GPU must be this
/// machine's; `None` for a run of our own (profiled here).
fn per_layer_figures(
    ready: &Ready,
    run: hardware::PerLayerRun,
    read_from: Option<&std::path::Path>,
) -> Result<HardwareRun, String> {
    if let Some(folder) = read_from {
        hardware::check_profiled_on(&run.gpus, &ready.info.name, folder)?;
    }
    if let Some(profiled) = &run.profiled {
        same_run(ready, &profiled.device, profiled.run.as_ref())?;
    }
    for (layer, why) in &run.errors {
        eprintln!("hardware counters: {layer}: no figures: {}", one_line(why));
    }
    if run.ranges.is_empty() {
        let why = run
            .errors
            .first()
            .map_or("no layer ran".to_string(), |(l, e)| format!("{l}: {e}"));
        return Err(format!("no layer has kernel-replay figures ({why})"));
    }
    Ok((Ok(run.ranges), run.errors))
}

/// The profiled child: verifies with each counted forward in a profiler range, writes the
/// range list, prints its table (which the parent keeps in output.txt).
fn run_hardware_child(args: &Args, ready: &Ready, dir: &std::path::Path) -> u8 {
    match hardware::run_child(&ready.plan, ready.spec.to_string(), dir) {
        Ok(layers) => {
            let mut env = ready.environment();
            let case = Case::of(&ready.plan, layers, None, None, &mut env);
            let report = Report {
                environment: env,
                tolerance: ready.plan.tolerance,
                cases: vec![case],
                sweep: None,
            };
            let _ = print_table(args, &report);
            if report.summary().ok() {
                0
            } else {
                1
            }
        }
        Err(e) => {
            eprintln!("verify-decoder: error: {}", one_line(&e));
            2
        }
    }
}

/// Prints the table (or with `--quiet` its summary line) to standard output, or to
/// standard error when a report goes to standard output.
fn print_table(args: &Args, report: &Report) -> Result<(), String> {
    print_text(args, report::to_table(report))
}

/// Prints a report's table as [`print_table`] says.
fn print_text(args: &Args, mut text: String) -> Result<(), String> {
    if args.quiet {
        text = report::quiet_text(&text);
    }
    let report_on_stdout = [&args.json, &args.junit]
        .into_iter()
        .flatten()
        .any(|p| report::goes_to_stdout(p));
    if report_on_stdout {
        eprint!("{text}");
        return Ok(());
    }
    modelmeter::cli::print_stdout(&text)
        .map_err(|e| format!("cannot write the table to standard output: {e}"))
}

impl Ready {
    /// The report's environment block for this device and plan.
    pub fn environment(&self) -> Environment {
        let p = &self.plan;
        let attention = attention_core(&p.config, p.workload.mla, p.attention);
        let mut env = Environment::collect(self.spec, &self.info, &p.workload, attention, p.seed);
        env.include_host_details = self.host_details;
        env.test_hooks = p.hooks.describe();
        env
    }
}

/// Runs the checked invocation (one case, or `--sweep N`), printing progress unless
/// `--quiet`; nothing is written.
pub fn report_of(args: &Args, ready: &Ready) -> Report {
    for hook in ready.plan.hooks.describe() {
        eprintln!("verify-decoder: warning: test hook {hook} is active: results are altered");
    }
    match args.sweep {
        Some(n) => {
            let quiet = args.quiet;
            let bar = modelmeter::cli::progress_bar(n as u64, "configurations", quiet);
            let report = sweep::run(
                &ready.plan,
                &ready.spec.to_string(),
                n,
                ready.oracle.as_ref(),
                ready.environment(),
                &mut |case, n| {
                    let line = report::case_line(case, n);
                    if !bar.is_hidden() {
                        bar.println(line);
                        bar.inc(1);
                    } else if !quiet {
                        eprintln!("{line}");
                    }
                },
            );
            bar.finish_and_clear();
            report
        }
        None => {
            let plan = &ready.plan;
            let mut env = ready.environment();
            let mut layers = runner::verify(plan, &mut progress_printer(args.quiet));
            if let Some(oracle) = &ready.oracle {
                // The per-layer lines above judged this project's rows; the oracle adds two.
                let start = std::time::Instant::now();
                if !args.quiet {
                    eprint!("oracle: transformers under torch's FlopCounterMode ... ");
                }
                oracle::apply(plan, &mut layers, oracle);
                if !args.quiet {
                    let summary = crate::results::Summary::of(&layers);
                    eprintln!(
                        "{:.2} s; with its rows: {}",
                        start.elapsed().as_secs_f64(),
                        summary.line("layer", "layers")
                    );
                }
            }
            let case = Case::of(plan, layers, None, None, &mut env);
            Report {
                environment: env,
                tolerance: plan.tolerance,
                cases: vec![case],
                sweep: None,
            }
        }
    }
}

/// Checks every option and the device before anything runs, and builds the plan. An
/// error is one line naming the value and what would be valid (exit 2 in [`run`]).
pub fn prepare(args: &Args) -> anyhow::Result<Ready> {
    let tolerance: f64 = args.accept_rel_diff.trim().parse().map_err(|_| {
        anyhow!(
            "--accept-rel-diff = {} is invalid: expected a number in [0, 1) (0.05 = 5%)",
            modelmeter::cli::shown_value(&args.accept_rel_diff)
        )
    })?;
    if !tolerance.is_finite() || !(0.0..1.0).contains(&tolerance) {
        bail!(
            "--accept-rel-diff = {} is invalid: expected a number in [0, 1) (0.05 = 5%; at 1 an analytic 0 would pass any measurement)",
            modelmeter::cli::shown_value(&args.accept_rel_diff)
        );
    }
    // A nonzero literal that a 64-bit float rounds to 0 (1e-400) would silently mean an
    // exact check.
    let mantissa = args.accept_rel_diff.trim().split(['e', 'E']).next();
    if tolerance == 0.0 && mantissa.is_some_and(|m| m.bytes().any(|b| (b'1'..=b'9').contains(&b))) {
        bail!(
            "--accept-rel-diff = {} is invalid: it rounds to 0 in a 64-bit float; write 0 for an exact check, or a tolerance of at least 1e-300",
            modelmeter::cli::shown_value(&args.accept_rel_diff)
        );
    }
    // -0 is in [0, 1) and means 0: reports and sweep replays say 0, not -0.
    let tolerance = tolerance + 0.0;
    let reports: Vec<(&str, &std::path::Path)> = [("--json", &args.json), ("--junit", &args.junit)]
        .into_iter()
        .filter_map(|(option, path)| Some((option, path.as_deref()?)))
        .collect();
    for (option, path) in &reports {
        report::check_writable(option, path).map_err(anyhow::Error::msg)?;
    }
    let config_file = match args.workload.config_source() {
        ConfigSource::Builtin(builtin) => report::ConfigFile::Builtin {
            name: builtin.name,
            source: std::path::Path::new(builtin.source),
        },
        ConfigSource::File(path) => report::ConfigFile::Given(path),
    };
    report::check_distinct(&reports, Some(config_file)).map_err(anyhow::Error::msg)?;
    if args.model {
        check_model_options(args).map_err(anyhow::Error::msg)?;
    } else if let Some(option) = [
        ("--num-layers", args.num_layers.is_some()),
        ("--new-tokens", args.new_tokens.is_some()),
        ("--verbose", args.verbose),
    ]
    .iter()
    .find_map(|(option, given)| given.then_some(option))
    {
        bail!("{option} applies only with --model (the whole-model verification)");
    }
    if args.report_host_details && args.json.is_none() {
        bail!("--report-host-details applies only with --json (it adds a host object to the JSON report; the table shows the free memory already)");
    }
    let hardware_given = check_hardware_options(args).map_err(anyhow::Error::msg)?;
    let oracle = match &args.oracle {
        Some(spec) => {
            let oracle = Oracle::parse(spec).map_err(anyhow::Error::msg)?;
            oracle.check().map_err(anyhow::Error::msg)?;
            Some(oracle)
        }
        None => None,
    };
    let (spec, why) = match &args.device {
        Some(text) => (
            DeviceSpec::parse(text).map_err(anyhow::Error::msg)?,
            "as asked".to_string(),
        ),
        None => DeviceSpec::default_choice(),
    };
    if let Some(option) = hardware_given {
        if spec == DeviceSpec::Cpu {
            bail!("{option} needs a CUDA GPU and libtorch sees none here ({why}): run it on a machine with an NVIDIA GPU, with --device cuda:0");
        }
    }
    let device = spec.open().map_err(anyhow::Error::msg)?;
    let info = spec.describe();
    let (default_dtype, platform) = match spec {
        DeviceSpec::Cpu => (Dtype::F32, Platform::Cpu),
        DeviceSpec::Cuda(_) => (Dtype::Bf16, Platform::Cuda),
    };
    let attention = args.workload.attention();
    let (config, workload) = if args.sweep.is_some() {
        check_sweep_options(args).map_err(anyhow::Error::msg)?;
        // Placeholders: every case brings its own config and workload.
        let w = args.workload.workload(default_dtype)?.on(platform);
        (modelmeter::ModelConfig::deepseek_ocr(), w)
    } else {
        let config = args.workload.model_config()?;
        let workload = args.workload.workload(default_dtype)?.on(platform);
        (config, workload)
    };
    let (config, model) = match args.model {
        true => {
            let new_tokens = args.new_tokens.unwrap_or(DSOCR_STANDARD_V1.new_tokens);
            let (cut, model) = ModelPlan::new(
                &config,
                &workload,
                args.num_layers,
                new_tokens,
                args.verbose,
            )
            .map_err(anyhow::Error::msg)?;
            (cut, Some(model))
        }
        false => (config, None),
    };
    let layers = match model {
        Some(_) => Vec::new(),
        None => select_layers(
            &args.layers,
            &config,
            &workload,
            attention,
            args.sweep.is_some(),
        )
        .map_err(anyhow::Error::msg)?,
    };
    let plan = Plan {
        config,
        workload,
        attention,
        device,
        tolerance,
        layers,
        seed: args.seed,
        hooks: TestHooks::default(),
    };
    // Its refusals say what they are (a workload that does not fit, an overflow, a config
    // value a layer cannot take): no common label, which would call the latter two a
    // matter of memory.
    match &model {
        Some(model) => {
            crate::memory::check_model(&plan, model, spec, &info).map_err(anyhow::Error::msg)?
        }
        None if args.sweep.is_none() => {
            crate::memory::check(&plan, spec, &info).map_err(anyhow::Error::msg)?
        }
        None => {}
    }
    let hardware = hardware_role(args)?;
    Ok(Ready {
        spec,
        why,
        info,
        plan,
        host_details: args.report_host_details,
        oracle,
        model,
        hardware,
    })
}

/// Refuses hardware-counter options where they cannot work, before anything runs; the
/// hardware-counter option given, if any (errors name it). An explicit `--ncu PATH` is
/// checked here; ncu on PATH only once the device opened ([`hardware_role`] finds it), so
/// a machine without a GPU says that first.
fn check_hardware_options(args: &Args) -> Result<Option<&'static str>, String> {
    let roles = [
        ("--hardware-counters", args.hardware_counters),
        (
            "--hardware-counters-from",
            args.hardware_counters_from.is_some(),
        ),
        (
            "--hardware-counters-child",
            args.hardware_counters_child.is_some(),
        ),
    ];
    let given: Vec<&str> = roles.iter().filter(|(_, g)| *g).map(|(o, _)| *o).collect();
    let Some(first) = given.first() else {
        for (option, set) in [
            ("--ncu", args.ncu.is_some()),
            ("--ncu-dir", args.ncu_dir.is_some()),
            ("--ncu-replay", args.ncu_replay.is_some()),
        ] {
            if set {
                return Err(format!("{option} applies only with --hardware-counters"));
            }
        }
        return Ok(None);
    };
    // The child runs with its parent's arguments, --hardware-counters included; the
    // parent marks it so (a user who gives both would silently be the child).
    let child = args.hardware_counters_child.is_some();
    if child && args.hardware_counters && std::env::var_os(hardware::CHILD_MARKER).is_none() {
        return Err("--hardware-counters-child is what --hardware-counters runs under ncu: give one (--hardware-counters to run ncu from here, or --hardware-counters-child alone inside your own ncu command)".into());
    }
    if !child && args.hardware_counters && args.hardware_counters_from.is_some() {
        return Err("--hardware-counters runs ncu, --hardware-counters-from reads a run made without it: give one".into());
    }
    let refused = [
        (
            "--sweep",
            args.sweep.is_some(),
            "profile single configurations",
        ),
        (
            "--model",
            args.model,
            "it profiles single layers; run it without --model",
        ),
    ];
    if let Some((option, _, why)) = refused.iter().find(|(_, given, _)| *given) {
        return Err(format!("{first} does not apply with {option}: {why}"));
    }
    if args.device.as_deref().map(DeviceSpec::parse) == Some(Ok(DeviceSpec::Cpu)) {
        return Err(format!(
            "{first} does not apply with --device cpu: Nsight Compute reads NVIDIA GPU counters; use --device cuda:0"
        ));
    }
    // A `--ncu PATH` given is checked now; ncu on PATH after the device (`hardware_role`):
    // without a GPU, installing ncu would not help.
    let runs_ncu = args.hardware_counters && !child && args.hardware_counters_from.is_none();
    if runs_ncu && args.ncu.is_some() {
        hardware::find_ncu(args.ncu.as_deref(), std::env::var_os("PATH").as_deref())?;
    } else if args.ncu.is_some() && !child {
        return Err("--ncu applies only with --hardware-counters (which runs ncu)".into());
    }
    // The reader takes the replay mode from the folder; a mode given would be ignored.
    if !child && !runs_ncu {
        for (option, set) in [
            ("--ncu-replay", args.ncu_replay.is_some()),
            ("--ncu-dir", args.ncu_dir.is_some()),
        ] {
            if set {
                return Err(format!(
                    "{option} applies only with --hardware-counters (which runs ncu); {first} reads the folder as it is"
                ));
            }
        }
    }
    if let Some(dir) = &args.hardware_counters_from {
        if !child && !dir.is_dir() {
            return Err(format!(
                "--hardware-counters-from {} is not a folder: give the folder of the wrapped run's ncu.csv and ranges.json",
                dir.display()
            ));
        }
    }
    Ok(Some(first))
}

/// The role of this invocation in a hardware-counter run (options already checked).
fn hardware_role(args: &Args) -> anyhow::Result<Option<hardware::Role>> {
    if let Some(dir) = &args.hardware_counters_child {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("--hardware-counters-child {}", dir.display()))?;
        return Ok(Some(hardware::Role::Child { dir: dir.clone() }));
    }
    if let Some(dir) = &args.hardware_counters_from {
        return Ok(Some(hardware::Role::Reader { dir: dir.clone() }));
    }
    if !args.hardware_counters {
        return Ok(None);
    }
    let ncu = hardware::find_ncu(args.ncu.as_deref(), std::env::var_os("PATH").as_deref())
        .map_err(anyhow::Error::msg)?;
    let (dir, keep) = match &args.ncu_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("--ncu-dir {}", dir.display()))?;
            (dir.clone(), true)
        }
        None => (
            hardware::temporary_dir().map_err(anyhow::Error::msg)?,
            false,
        ),
    };
    Ok(Some(hardware::Role::Parent {
        ncu,
        dir,
        keep,
        replay: args.ncu_replay.unwrap_or_default(),
    }))
}

/// `--model` runs its own prefill and decode steps over every layer: options that pick
/// layers, a decode phase or other runs do not apply.
fn check_model_options(args: &Args) -> Result<(), String> {
    let w = &args.workload;
    let refused = [
        (
            "--sweep",
            args.sweep.is_some(),
            "it verifies one config; run --sweep on its own",
        ),
        (
            "--oracle",
            args.oracle.is_some(),
            "the oracle checks single layers; run it without --model",
        ),
        (
            "--layers",
            !args.layers.is_empty(),
            "it runs every layer of the model; use --num-layers to run the first K",
        ),
        (
            "--phase",
            w.phase() != modelmeter::cli::PhaseArg::Prefill,
            "it runs the prefill and then --new-tokens decode steps itself",
        ),
        (
            "--context-len",
            w.context_len.is_some(),
            "the decode steps follow the prefill of --seq-len tokens",
        ),
        (
            "--timings",
            args.timings,
            "it times the single-layer runs' phases; time a --model run from outside (time verify-decoder --model …)",
        ),
    ];
    match refused.iter().find(|(_, given, _)| *given) {
        Some((option, _, why)) => Err(format!("{option} does not apply with --model: {why}")),
        None => Ok(()),
    }
}

/// Runs `--model`, with a progress bar over the calls (or plain lines when standard
/// error is not a terminal); nothing is written.
pub fn model_report_of(args: &Args, ready: &Ready, model: &ModelPlan) -> report::ModelReport {
    for hook in ready.plan.hooks.describe() {
        eprintln!("verify-decoder: warning: test hook {hook} is active: results are altered");
    }
    let quiet = args.quiet;
    let bar = modelmeter::cli::progress_bar(1 + model.new_tokens, "calls", quiet);
    let lines = bar.is_hidden() && !quiet;
    let result = crate::model::run(&ready.plan, model, &mut |p| match p {
        crate::model::ModelProgress::Building => {
            bar.set_message("building the reference model");
            if lines {
                eprintln!("model: building the reference model ...");
            }
        }
        crate::model::ModelProgress::Call {
            done,
            total,
            result,
        } => {
            bar.inc(1);
            bar.set_message(result.call.describe());
            let line = format!(
                "[{done}/{total}] {} {} ({:.2} s)",
                result.call.describe(),
                result.status.as_str(),
                result.seconds
            );
            let notable = done == 1 || done == total || !result.status.is_ok() || model.verbose;
            if lines && notable {
                eprintln!("{line}");
            } else if !bar.is_hidden() && (!result.status.is_ok() || model.verbose) {
                bar.println(line);
            }
        }
    });
    bar.finish_and_clear();
    let mut environment = ready.environment();
    for call in &result.calls {
        environment.saw_kernels(&call.attention_kernels);
    }
    report::ModelReport {
        environment,
        tolerance: ready.plan.tolerance,
        config: ready.plan.config.clone(),
        workload: ready.plan.workload.clone(),
        attention: ready.plan.attention,
        result,
    }
}

fn check_sweep_options(args: &Args) -> Result<(), String> {
    if let Some(n) = args.sweep.filter(|n| !(1..=MAX_SWEEP).contains(n)) {
        return Err(format!("--sweep = {n} is invalid: {}", sweep_range()));
    }
    let w = &args.workload;
    let fixed = [
        ("--config", w.config.is_some()),
        ("--batch", w.batch.is_some()),
        ("--seq-len", w.seq_len.is_some()),
        ("--context-len", w.context_len.is_some()),
        // Refused when given at all, its default spelled out included: a case's own
        // draw would silently override it.
        ("--phase", w.phase.is_some()),
        ("--attn", w.attn.is_some()),
        ("--mla", w.mla.is_some()),
    ];
    if let Some((option, _)) = fixed.iter().find(|(_, given)| *given) {
        return Err(format!(
            "{option} does not apply with --sweep (each case draws its own config, batch, phase, attention and MLA form); \
             keep --device, --dtype, --allow-tf32, --layers, --seed, --accept-rel-diff and --oracle"
        ));
    }
    Ok(())
}

fn select_layers(
    names: &[String],
    config: &modelmeter::ModelConfig,
    workload: &Workload,
    attention: AttentionImpl,
    sweep: bool,
) -> Result<Vec<Pairing>, String> {
    let names: Vec<&str> = names.iter().map(|n| n.trim()).collect();
    pairing::select(&REGISTRY, &names, config, workload.mla, attention, sweep)
}

fn progress_printer(quiet: bool) -> impl FnMut(Progress) {
    move |p| {
        if quiet {
            return;
        }
        match p {
            Progress::Started { index, total, name } => {
                eprint!("[{}/{total}] {name} ... ", index + 1);
            }
            Progress::Finished { result, .. } => {
                eprintln!("{} ({:.2} s)", result.status.as_str(), result.seconds);
            }
        }
    }
}

/// Renders the reports asked for and writes them.
fn write_rendered(
    args: &Args,
    json: impl FnOnce() -> serde_json::Result<String>,
    junit: impl FnOnce() -> String,
) -> Result<(), String> {
    // Render everything first, so a rendering failure writes nothing.
    let mut files = Vec::new();
    if let Some(path) = &args.json {
        let mut text = json().map_err(|e| e.to_string())?;
        text.push('\n');
        files.push(("--json", path, text));
    }
    if let Some(path) = &args.junit {
        files.push(("--junit", path, junit()));
    }
    // One report that cannot be written does not keep the other from being written.
    let failed: Vec<String> = files
        .into_iter()
        .filter_map(|(option, path, text)| {
            let result = report::write_report(path, &text);
            result
                .err()
                .map(|e| format!("cannot write {option} {}: {e}", path.display()))
        })
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The options of `verify-decoder` with `options`.
    fn args(options: &[&str]) -> Args {
        let argv = std::iter::once("verify-decoder").chain(options.iter().copied());
        Args::try_parse_from(argv).expect("parses")
    }

    #[test]
    fn a_sweep_count_past_the_integer_type_names_the_range_a_sweep_takes() {
        assert_eq!(sweep_count("40"), Ok(40));
        assert_eq!(
            sweep_count(&"1".repeat(30)),
            Err(format!(
                "too large; expected a number of configurations in 1 ..= {MAX_SWEEP}"
            ))
        );
        // Other malformed counts keep the whole-number message.
        for bad in ["4.5", "-3", "+3", "many"] {
            let e = sweep_count(bad).unwrap_err();
            assert!(
                e.contains("digits only") && !e.contains("too large"),
                "{bad}: {e}"
            );
        }
    }

    /// `check_hardware_options` of `verify-decoder` with `options`.
    fn hardware_options(options: &[&str]) -> Result<Option<&'static str>, String> {
        check_hardware_options(&args(options))
    }

    /// Each refusal of the hardware-counter options, and what each role accepts, checked
    /// here without a GPU or ncu (the binary's tests reach most of them only through a
    /// process each). The child marker is not set in tests.
    #[test]
    fn hardware_counter_options_are_refused_where_they_cannot_work() {
        let folder = std::env::temp_dir();
        let folder = folder.to_str().expect("a UTF-8 temporary folder");
        let missing = format!("{folder}/modelmeter-no-such-folder-{}", std::process::id());
        let refused = |options: &[&str], says: &str| match hardware_options(options) {
            Err(e) => assert!(e.contains(says), "{options:?}: {e}"),
            Ok(role) => panic!("{options:?} accepted as {role:?}"),
        };
        // Accepted: each role alone, and ncu's own options with the run that runs ncu.
        assert_eq!(hardware_options(&[]), Ok(None));
        for (options, first) in [
            (&["--hardware-counters"][..], "--hardware-counters"),
            (
                &["--hardware-counters", "--ncu", "/bin/true"],
                "--hardware-counters",
            ),
            (
                &[
                    "--hardware-counters",
                    "--ncu-replay",
                    "kernel",
                    "--ncu-dir",
                    folder,
                ],
                "--hardware-counters",
            ),
            (
                &["--hardware-counters-from", folder],
                "--hardware-counters-from",
            ),
            (
                &["--hardware-counters-child", &missing],
                "--hardware-counters-child",
            ),
        ] {
            assert_eq!(hardware_options(options), Ok(Some(first)), "{options:?}");
        }
        // ncu's options without a run that runs ncu.
        for option in ["--ncu", "--ncu-dir", "--ncu-replay"] {
            let value = if option == "--ncu-replay" {
                "kernel"
            } else {
                folder
            };
            refused(
                &[option, value],
                &format!("{option} applies only with --hardware-counters"),
            );
            refused(
                &["--hardware-counters-from", folder, option, value],
                &format!("{option} applies only with --hardware-counters (which runs ncu)"),
            );
        }
        // Two roles at once, and options a profile cannot take.
        refused(
            &["--hardware-counters", "--hardware-counters-child", folder],
            "is what --hardware-counters runs under ncu: give one",
        );
        refused(
            &["--hardware-counters", "--hardware-counters-from", folder],
            "reads a run made without it: give one",
        );
        refused(
            &["--hardware-counters", "--sweep", "3"],
            "--hardware-counters does not apply with --sweep",
        );
        refused(
            &["--hardware-counters-from", folder, "--model"],
            "--hardware-counters-from does not apply with --model",
        );
        refused(
            &["--hardware-counters", "--device", "cpu"],
            "does not apply with --device cpu",
        );
        // An explicit ncu that is not there, and a folder to read that is not one.
        refused(&["--hardware-counters", "--ncu", &missing], &missing);
        refused(&["--hardware-counters-from", &missing], "is not a folder");
    }

    /// The role an invocation plays, from options already checked.
    #[test]
    fn the_hardware_role_follows_the_option_given() {
        let role = |options: &[&str]| hardware_role(&args(options)).expect("a role");
        assert!(role(&[]).is_none());
        let folder = std::env::temp_dir();
        let folder_str = folder.to_str().expect("a UTF-8 temporary folder");
        assert!(matches!(
            role(&["--hardware-counters-from", folder_str]),
            Some(hardware::Role::Reader { dir }) if dir == folder
        ));
        assert!(matches!(
            role(&["--hardware-counters-child", folder_str]),
            Some(hardware::Role::Child { dir }) if dir == folder
        ));
        let parent = role(&[
            "--hardware-counters",
            "--ncu",
            "/bin/true",
            "--ncu-dir",
            folder_str,
        ]);
        assert!(
            matches!(
                &parent,
                Some(hardware::Role::Parent { ncu, dir, keep: true, .. })
                    if ncu.as_path() == std::path::Path::new("/bin/true") && dir == &folder
            ),
            "{parent:?}"
        );
    }

    /// `--model` takes the workload's size, the device and dtype and its own options;
    /// each option that picks layers, a phase or another run is refused by name.
    #[test]
    fn model_runs_refuse_each_option_that_does_not_apply_by_name() {
        let accepted = [
            "--model",
            "--num-layers",
            "2",
            "--new-tokens",
            "3",
            "--seq-len",
            "8",
            "--batch",
            "2",
            "--dtype",
            "bf16",
            "--phase",
            "prefill",
            "--verbose",
        ];
        assert_eq!(check_model_options(&args(&accepted)), Ok(()));
        for (option, value) in [
            ("--sweep", Some("3")),
            ("--oracle", None),
            ("--layers", Some("DeepseekV2MLP")),
            ("--phase", Some("decode")),
            ("--context-len", Some("16")),
            ("--timings", None),
        ] {
            let mut options = vec!["--model", option];
            options.extend(value);
            let e = check_model_options(&args(&options)).expect_err(option);
            assert!(
                e.starts_with(&format!("{option} does not apply with --model: ")),
                "{option}: {e}"
            );
        }
    }

    /// `--sweep` draws each case's config and workload: every option it would override is
    /// refused when given at all (a default spelled out included), the others kept.
    #[test]
    fn sweeps_refuse_each_option_a_case_draws_by_name() {
        let accepted = [
            "--sweep",
            "3",
            "--device",
            "cpu",
            "--dtype",
            "bf16",
            "--allow-tf32",
            "--layers",
            "DeepseekV2MLP",
            "--seed",
            "7",
            "--accept-rel-diff",
            "0.2",
            "--oracle",
        ];
        assert_eq!(check_sweep_options(&args(&accepted)), Ok(()));
        assert_eq!(check_sweep_options(&args(&[])), Ok(()));
        for (option, value) in [
            ("--config", "deepseek-ocr"),
            ("--batch", "1"),
            ("--seq-len", "8"),
            ("--context-len", "8"),
            ("--phase", "prefill"),
            ("--attn", "sdpa"),
            ("--mla", "naive"),
        ] {
            let e = check_sweep_options(&args(&["--sweep", "3", option, value])).expect_err(option);
            assert!(
                e.starts_with(&format!("{option} does not apply with --sweep")),
                "{option}: {e}"
            );
        }
        // The count's own range: 0 parses as a number, and is refused with the range.
        for n in ["0", &(MAX_SWEEP + 1).to_string()] {
            let e = check_sweep_options(&args(&["--sweep", n])).expect_err(n);
            assert_eq!(e, format!("--sweep = {n} is invalid: {}", sweep_range()));
        }
        assert_eq!(check_sweep_options(&args(&["--sweep", "1"])), Ok(()));
        let most = MAX_SWEEP.to_string();
        assert_eq!(check_sweep_options(&args(&["--sweep", &most])), Ok(()));
    }

    /// `prepare`'s refusals before anything runs, each naming the value: the tolerance
    /// (not a number, out of [0, 1), a nonzero literal that rounds to 0), options of other
    /// runs, and a workload that cannot fit in memory; and the tolerances it takes.
    #[test]
    fn prepare_refuses_bad_options_by_name_and_takes_good_ones() {
        let refused = |options: &[&str], says: &str| match prepare(&args(options)) {
            Err(e) => assert!(e.to_string().contains(says), "{options:?}: {e}"),
            Ok(_) => panic!("{options:?} accepted"),
        };
        let tolerance = |rel: &str| {
            let ready = prepare(&args(&[
                "--device",
                "cpu",
                "--layers",
                "MoEGate",
                "--accept-rel-diff",
                rel,
            ]));
            ready.expect(rel).plan.tolerance
        };
        for bad in ["x", "1", "1.5", "-0.1", "nan", "inf"] {
            refused(
                &["--device", "cpu", "--accept-rel-diff", bad],
                &format!("--accept-rel-diff = {bad} is invalid: expected a number in [0, 1)"),
            );
        }
        refused(
            &["--device", "cpu", "--accept-rel-diff", "1e-400"],
            "--accept-rel-diff = 1e-400 is invalid: it rounds to 0",
        );
        assert_eq!(tolerance("0.1"), 0.1);
        assert_eq!(tolerance(" 0.25 "), 0.25);
        assert_eq!(tolerance("0e-400"), 0.0);
        // -0 is 0, spelled without its sign in reports.
        let zero = tolerance("-0");
        assert!(zero == 0.0 && zero.is_sign_positive(), "{zero}");
        for option in ["--num-layers", "--new-tokens"] {
            refused(
                &["--device", "cpu", option, "2"],
                &format!("{option} applies only with --model"),
            );
        }
        refused(
            &["--device", "cpu", "--verbose"],
            "--verbose applies only with --model",
        );
        refused(
            &["--device", "cpu", "--report-host-details"],
            "--report-host-details applies only with --json",
        );
        // The memory pre-check of a single run.
        refused(
            &[
                "--device",
                "cpu",
                "--phase",
                "decode",
                "--context-len",
                "100000000",
            ],
            "(B=1 decode C=100000000 fp32) needs at least",
        );
        // A hardware-counter run on a machine whose default device is the CPU.
        if DeviceSpec::default_choice().0 == DeviceSpec::Cpu {
            let folder = std::env::temp_dir();
            refused(
                &["--hardware-counters-from", folder.to_str().expect("UTF-8")],
                "--hardware-counters-from needs a CUDA GPU",
            );
        }
    }
}
