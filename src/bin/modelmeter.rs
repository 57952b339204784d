//! `modelmeter`: analytic metrics of the DeepSeek-V2 decoder layers.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::io::Write;
use std::process::ExitCode;

use modelmeter::cli::{
    beyond_trained_positions, one_line, parse_vary, print_stdout, router_keeps_too_few_experts,
    whole_number, write_stdout, PhaseArg, WorkloadArgs,
};
use modelmeter::layers::LayerId;
use modelmeter::overflow::{self, Inputs};
use modelmeter::report::analyze;
use modelmeter::sweep::{self, Axis, Point, SweepReport, Target};
use modelmeter::{Dtype, Platform, Workload};

/// The examples both `modelmeter --help` and `modelmeter analyze --help` end with (every
/// usage error of `analyze` points at the latter).
///
/// Help is wrapped to the terminal (clap's `wrap_help`): each example's comment stands on
/// its own line above it, and no line is longer than 80 columns, so no command is split.
const EXAMPLES: &str = "Examples:
  # DeepSeek-OCR, the dsocr-standard-v1 prefill (B=1, S=512, bf16)
  modelmeter analyze
  modelmeter analyze --phase decode --context-len 1024
  modelmeter analyze --config config.json --batch 4 --seq-len 2048 --json
  modelmeter analyze --config deepseek-v2-lite --mla absorb --phase decode \\
    --context-len 4096
  # the prefill and 512 greedy decode steps
  modelmeter analyze --new-tokens 512
  # the kernels libtorch runs on a CPU
  modelmeter analyze --device cpu --dtype fp32
  # the whole stack at prompt lengths 128, 256 … 8192, as CSV
  modelmeter sweep --vary seq-len=128:8192:128 --csv";

/// The examples of `modelmeter sweep --help`.
const SWEEP_EXAMPLES: &str = "Examples:
  # the whole stack at prompt lengths 128, 256 … 8192, as CSV
  modelmeter sweep --vary seq-len=128:8192:128 --csv
  # one MoE layer at batches 1, 2, 4 … 64 and three prompt lengths (21 points)
  modelmeter sweep --layer DeepseekV2MoE --vary batch=1:64:*2 \\
    --vary seq-len=512,1024,2048
  # decode steps over a growing KV cache, as JSON
  modelmeter sweep --phase decode --vary context-len=512:8000:512 --json
  # whole generations: 512 new tokens after prompts of 1024, 2048 … 7168 tokens
  modelmeter sweep --new-tokens 512 --vary seq-len=1024:7680:1024 --csv
  # DeepSeek-V2-Lite's absorbed MLA, every context length up to 4096
  modelmeter sweep --config deepseek-v2-lite --mla absorb --phase decode \\
    --vary context-len=1:4096 --csv > lite.csv

AXIS is batch, seq-len (prefill), context-len (decode) or new-tokens (each point
a whole generation, as --new-tokens). VALUES is a comma-separated list of N,
START:END (every value), START:END:STEP or START:END:*FACTOR (1:64:*2 is 1, 2,
4 … 64); a range stops at the last value not past END. With several --vary the
first varies slowest. Each row lists the batch, the prompt (prefill) or context
(decode) length and any new tokens, then the metrics of `modelmeter analyze`'s
row for that workload (a generation's: analyze's --new-tokens total).";

#[derive(Parser)]
#[command(
    name = "modelmeter",
    version,
    about = "Exact analytic FLOPs, bytes and memory of the DeepSeek-V2 decoder (DeepSeek-OCR's language model)",
    after_help = EXAMPLES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the metrics of every decoder layer and of the whole stack for one workload
    #[command(after_help = EXAMPLES)]
    Analyze(AnalyzeArgs),
    /// Print the metrics of the whole stack, or of one layer, at every point of a grid of
    /// workloads (batches, prompt or context lengths), on every core
    #[command(after_help = SWEEP_EXAMPLES)]
    Sweep(SweepArgs),
}

/// `--dtype`'s help in both commands: this binary's default (the option is shared with
/// verify-decoder, whose default depends on the device).
const DTYPE_HELP: &str = "Model dtype [default: bf16, the deployed dtype, on any --device]";

/// The `--device` option of both commands.
#[derive(clap::Args)]
struct DeviceArg {
    /// Whose kernels to model: cuda or cuda:N (an NVIDIA GPU, sm80+) or cpu. It picks the fused
    /// attention kernel (head-dim padding, math fallback); engines are always the GPU's
    #[arg(long, value_name = "DEVICE", default_value = "cuda")]
    device: String,
}

impl DeviceArg {
    fn platform(&self) -> modelmeter::Result<Platform> {
        Platform::parse(&self.device)
    }
}

#[derive(clap::Args)]
#[command(
    allow_negative_numbers = true,
    mut_arg("dtype", |a| a.help(DTYPE_HELP))
)]
struct AnalyzeArgs {
    #[command(flatten)]
    workload: WorkloadArgs,
    #[command(flatten)]
    device: DeviceArg,
    /// Also report a whole generation: the prefill plus N decode steps
    #[arg(long, value_name = "N", value_parser = whole_number::<u64>)]
    new_tokens: Option<u64>,
    /// Print one modelmeter.analyze/1 JSON object instead of tables
    #[arg(long)]
    json: bool,
    /// Levels of each layer's breakdown in the tables (0: summary only; the JSON always
    /// has the whole tree)
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = whole_number::<usize>,
          conflicts_with = "json")]
    depth: usize,
}

#[derive(clap::Args)]
#[command(
    allow_negative_numbers = true,
    mut_arg("dtype", |a| a.help(DTYPE_HELP))
)]
struct SweepArgs {
    #[command(flatten)]
    workload: WorkloadArgs,
    #[command(flatten)]
    device: DeviceArg,
    /// An axis and its values (see below); repeat it to vary several axes. Without it,
    /// the one workload the other options name
    #[arg(long, value_name = "AXIS=VALUES", value_parser = parse_vary)]
    vary: Vec<(Axis, Vec<u64>)>,
    /// Each point is a whole generation: its prefill, then N decode steps (rows are
    /// analyze's --new-tokens total; vary N with --vary new-tokens=…)
    #[arg(long, value_name = "N", value_parser = whole_number::<u64>)]
    new_tokens: Option<u64>,
    /// The layer to sweep, as `modelmeter analyze` names it (DeepseekV2MoE,
    /// DeepseekV2DecoderLayer_moe …) [default: the whole stack, DeepseekV2ForCausalLM]
    #[arg(long, value_name = "LAYER")]
    layer: Option<String>,
    /// Print CSV (exact integers, one line per point) instead of a table
    #[arg(long, conflicts_with = "json")]
    csv: bool,
    /// Print one modelmeter.sweep/1 JSON object instead of a table
    #[arg(long)]
    json: bool,
    /// Threads evaluating points [default: every core]
    #[arg(long, value_name = "N", value_parser = whole_number::<usize>)]
    threads: Option<usize>,
    /// No progress bar (it is drawn only when standard error is a terminal)
    #[arg(long)]
    quiet: bool,
}

fn main() -> ExitCode {
    let cli: Cli = modelmeter::cli::parse_args("modelmeter");
    let result = match &cli.command {
        Command::Analyze(args) => run(args),
        Command::Sweep(args) => run_sweep(args),
    };
    let output = match result {
        Ok(output) => output,
        Err(e) => return fail(&format!("{e:#}"), 2),
    };
    // Everything is computed by now: only writing is left. A closed pipe (`| head`) ends
    // quietly; a full disk is a one-line error.
    let written = match output {
        Output::Text(text) => print_stdout(&text),
        Output::Sweep(report, format) => write_stdout(|out| match format {
            SweepFormat::Table => report.write_text(out),
            SweepFormat::Csv => report.write_csv(out),
            SweepFormat::Json => report.write_json(out),
        }),
    };
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("cannot write to standard output: {e}"), 1),
    }
}

/// What a command prints once it has succeeded: a text, or a sweep's rows, written row
/// by row in its format (a million points do not fit in memory as one text).
enum Output {
    Text(String),
    Sweep(Box<SweepReport>, SweepFormat),
}

/// How `modelmeter sweep` prints its rows.
enum SweepFormat {
    Table,
    Csv,
    Json,
}

/// Prints `message` as one line on standard error (never panicking) and returns `code`.
fn fail(message: &str, code: u8) -> ExitCode {
    let _ = writeln!(
        std::io::stderr(),
        "modelmeter: error: {}",
        one_line(message)
    );
    ExitCode::from(code)
}

fn run(args: &AnalyzeArgs) -> anyhow::Result<Output> {
    let config = args.workload.model_config()?;
    let workload = args
        .workload
        .workload(Dtype::Bf16)?
        .on(args.device.platform()?);
    if let (Some(n), PhaseArg::Decode) = (args.new_tokens, args.workload.phase()) {
        return Err(new_tokens_with_decode(n).into());
    }
    let attention = args.workload.attention();
    let report = analyze(&config, &workload, attention, args.new_tokens).map_err(|e| {
        // Name the option or config field that overflowed, not only the op.
        let inputs = Inputs {
            config: config.clone(),
            workload,
            new_tokens: args.new_tokens,
        };
        overflow::explain(e, &inputs, |i| {
            analyze(&i.config, &i.workload, attention, i.new_tokens).is_err()
        })
    })?;
    // Said once the counts are known to exist (an overflow is the error instead).
    let warnings = [
        beyond_trained_positions(&config, &report.workload, args.new_tokens),
        router_keeps_too_few_experts(&config),
    ];
    for warning in warnings.iter().flatten() {
        warn(warning);
    }
    Ok(Output::Text(if args.json {
        let mut text = serde_json::to_string_pretty(&report.to_json())
            .context("rendering the modelmeter.analyze/1 JSON")?;
        text.push('\n');
        text
    } else {
        report.to_text(args.depth)
    }))
}

/// The refusal of `--new-tokens N` with `--phase decode`, in both commands.
fn new_tokens_with_decode(n: u64) -> modelmeter::Error {
    modelmeter::Error::invalid(
        "--new-tokens",
        n,
        "no value with --phase decode (a generation starts with a prefill)",
    )
}

/// Prints a warning as one line on standard error (never panicking).
fn warn(message: &str) {
    let _ = writeln!(
        std::io::stderr(),
        "modelmeter: warning: {}",
        one_line(message)
    );
}

/// The most threads `--threads` may ask for: far more than cores on any machine this runs
/// on, far fewer than would exhaust a process's threads or memory.
const MAX_THREADS: usize = 1024;

fn run_sweep(args: &SweepArgs) -> anyhow::Result<Output> {
    let config = args.workload.model_config()?;
    let platform = args.device.platform()?;
    let attention = args.workload.attention();
    let decode = args.workload.phase() == PhaseArg::Decode;
    // A whole generation at each point: --new-tokens, or new-tokens varied.
    let generation =
        args.new_tokens.is_some() || args.vary.iter().any(|(a, _)| *a == Axis::NewTokens);
    if generation && decode {
        let refused = match args.new_tokens {
            Some(n) => new_tokens_with_decode(n),
            None => modelmeter::Error::invalid(
                "--vary",
                "new-tokens=…",
                "no new-tokens axis with --phase decode (a generation starts with a prefill; leave out --phase decode)",
            ),
        };
        return Err(refused.into());
    }
    if let (true, Some(layer)) = (generation, &args.layer) {
        return Err(modelmeter::Error::invalid(
            "--layer",
            layer,
            "no value with --new-tokens or --vary new-tokens=… (a generation is the whole model's: its rows are analyze's generation total)",
        )
        .into());
    }
    let axes = sweep::axes_of(decode, generation);
    let mut varied: Vec<Axis> = Vec::new();
    for (axis, _) in &args.vary {
        if varied.contains(axis) {
            anyhow::bail!(
                "--vary {}=… is given twice: list all the values of an axis in one --vary ({}=1,2,4)",
                axis.option(),
                axis.option()
            );
        }
        let set_alone = match axis {
            Axis::NewTokens => args.new_tokens,
            _ => args.workload.sets(*axis),
        };
        if let Some(value) = set_alone {
            return Err(modelmeter::Error::invalid(
                &format!("--{}", axis.option()),
                value,
                &format!(
                    "no value with --vary {}=… (the sweep sets it at each point)",
                    axis.option()
                ),
            )
            .into());
        }
        if !axes.contains(axis) {
            let (phase, fix) = match axis {
                Axis::ContextLen if generation => (
                    "generation",
                    "its cache grows from its prompt: vary seq-len (and new-tokens)",
                ),
                Axis::ContextLen => ("prefill", "add --phase decode to vary the cached tokens"),
                _ => ("decode step", "its prompt is the cache: vary context-len"),
            };
            let names: Vec<&str> = axes.iter().map(|a| a.option()).collect();
            anyhow::bail!(
                "--vary {}=…: {} is not an axis of a {phase} (its axes: {}); {fix}",
                axis.option(),
                axis.option(),
                names.join(", ")
            );
        }
        varied.push(*axis);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = match args.threads {
        Some(n @ 1..=MAX_THREADS) => n,
        Some(n) => {
            return Err(modelmeter::Error::invalid(
                "--threads",
                n,
                &format!("1 to {MAX_THREADS} (this machine has {cores} cores)"),
            )
            .into());
        }
        None => cores,
    };
    // Each point's workload, with the checks analyze makes of one (the options that do
    // not vary are checked at the first point).
    let grid = sweep::grid(&args.vary)?;
    // An option the sweep varies is named as its --vary axis in a point's error.
    let shown_as = |name: &str| match varied
        .iter()
        .find(|axis| name.strip_prefix("--") == Some(axis.option()))
    {
        Some(axis) => format!("--vary {}", axis.option()),
        None => name.to_string(),
    };
    let at = |i: usize| {
        format!(
            "at {} (point {} of {})",
            describe_point(&grid[i]),
            i + 1,
            grid.len()
        )
    };
    let points = grid
        .iter()
        .enumerate()
        .map(|(i, values)| {
            let workload = args
                .workload
                .at(values)
                .workload(Dtype::Bf16)
                .map(|w| w.on(platform))
                .map_err(|e| anyhow::anyhow!("{}: {}", at(i), e.with_field_named(shown_as)))?;
            let new_tokens = values
                .iter()
                .find(|(a, _)| *a == Axis::NewTokens)
                .map(|(_, n)| *n)
                .or(args.new_tokens);
            Ok(Point {
                workload,
                new_tokens,
            })
        })
        .collect::<anyhow::Result<Vec<Point>>>()?;
    // Every axis has a value, so a grid has a point.
    let base = points
        .first()
        .context("the sweep has no point")?
        .workload
        .clone();
    let target = match (&args.layer, generation) {
        (_, true) => Target::Generation,
        (None, false) => Target::Stack,
        (Some(name), false) => parse_target(name, &config, &base, attention)?,
    };
    let bar = modelmeter::cli::progress_bar(points.len() as u64, "points", args.quiet);
    let rows = sweep::evaluate_all(&config, target, &points, attention, threads, &|n| {
        bar.inc(n as u64)
    });
    bar.finish_and_clear();
    let rows = rows.map_err(|(i, e)| {
        // Name the option or config field that overflowed, as analyze does.
        let inputs = Inputs {
            config: config.clone(),
            workload: points[i].workload.clone(),
            new_tokens: points[i].new_tokens,
        };
        let e = overflow::explain_as(
            e,
            &inputs,
            |inputs| {
                let point = Point {
                    workload: inputs.workload.clone(),
                    new_tokens: inputs.new_tokens,
                };
                sweep::evaluate(&inputs.config, target, &point, attention).is_err()
            },
            shown_as,
        );
        anyhow::anyhow!("{}: {e}", at(i))
    })?;
    // Said once the counts are known to exist: how many points pass the trained
    // positions, and the furthest.
    let beyond = |p: &Point| beyond_trained_positions(&config, &p.workload, p.new_tokens);
    let past = points.iter().filter(|p| beyond(p).is_some()).count();
    let furthest = points
        .iter()
        .max_by_key(|p| {
            p.workload
                .positions_reached(p.new_tokens.unwrap_or(0))
                .unwrap_or(u64::MAX)
        })
        .and_then(beyond);
    let past =
        furthest.map(|warning| format!("{past} of {} points: furthest, {warning}", points.len()));
    for warning in [past, router_keeps_too_few_experts(&config)]
        .iter()
        .flatten()
    {
        warn(warning);
    }
    let report = SweepReport {
        target: target.name(&config, &base, attention),
        config,
        attention,
        varied,
        points,
        rows,
    };
    let format = if args.json {
        SweepFormat::Json
    } else if args.csv {
        SweepFormat::Csv
    } else {
        SweepFormat::Table
    };
    Ok(Output::Sweep(Box::new(report), format))
}

/// A point as the command line would set it: `batch=4 seq-len=512`.
fn describe_point(point: &[(Axis, u64)]) -> String {
    let parts: Vec<String> = point
        .iter()
        .map(|(axis, value)| format!("{}={value}", axis.option()))
        .collect();
    if parts.is_empty() {
        "the workload".to_string()
    } else {
        parts.join(" ")
    }
}

/// The `--layer` named `name`: one of `config`'s layers as analyze names them for this
/// workload and attention, or the whole stack.
fn parse_target(
    name: &str,
    config: &modelmeter::ModelConfig,
    workload: &Workload,
    attention: modelmeter::layers::AttentionImpl,
) -> modelmeter::Result<Target> {
    let stack = Target::Stack.name(config, workload, attention);
    if name == stack {
        return Ok(Target::Stack);
    }
    let named = |id: LayerId| id.name_for(config, workload.mla, attention);
    let present: Vec<&str> = LayerId::ALL
        .into_iter()
        .filter(|id| id.is_in(config))
        .map(named)
        .collect();
    match LayerId::parse(name) {
        Some(id) if named(id) == name && id.is_in(config) => Ok(Target::Layer(id)),
        Some(id) if !id.is_in(config) => Err(modelmeter::Error::invalid(
            "--layer",
            name,
            &format!(
                "a layer the config has ({}, or {stack}): {}",
                present.join(", "),
                id.layer_index(config).err().unwrap_or_default()
            ),
        )),
        _ => Err(modelmeter::Error::invalid(
            "--layer",
            name,
            &format!(
                "one of {} (as this config, --attn and --mla name them) or {stack} (the whole stack, the default)",
                present.join(", ")
            ),
        )),
    }
}
