//! `modelmeter`: analytic metrics of the DeepSeek-V2 decoder layers.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::io::Write;
use std::process::ExitCode;

use modelmeter::cli::{
    beyond_trained_positions, one_line, print_stdout, router_keeps_too_few_experts, whole_number,
    PhaseArg, WorkloadArgs,
};
use modelmeter::overflow::{self, Inputs};
use modelmeter::report::analyze;
use modelmeter::{Dtype, Platform};

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
  modelmeter analyze --device cpu --dtype fp32";

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
}

#[derive(clap::Args)]
#[command(
    allow_negative_numbers = true,
    mut_arg("dtype", |a| a.help("Model dtype [default: bf16, the deployed dtype, on any --device]"))
)]
struct AnalyzeArgs {
    #[command(flatten)]
    workload: WorkloadArgs,
    /// Whose kernels to model: cuda or cuda:N (an NVIDIA GPU, sm80+) or cpu. It picks the fused
    /// attention kernel (head-dim padding, math fallback); engines are always the GPU's
    #[arg(long, value_name = "DEVICE", default_value = "cuda")]
    device: String,
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

fn main() -> ExitCode {
    let cli: Cli = modelmeter::cli::parse_args("modelmeter");
    let Command::Analyze(args) = cli.command;
    let text = match run(&args) {
        Ok(text) => text,
        Err(e) => return fail(&format!("{e:#}"), 2),
    };
    // A closed pipe (`| head`) ends quietly; a full disk is a one-line error.
    match print_stdout(&text) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&format!("cannot write to standard output: {e}"), 1),
    }
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

fn run(args: &AnalyzeArgs) -> anyhow::Result<String> {
    let config = args.workload.model_config()?;
    let workload = args
        .workload
        .workload(Dtype::Bf16)?
        .on(Platform::parse(&args.device)?);
    if args.new_tokens.is_some() && args.workload.phase() != PhaseArg::Prefill {
        return Err(modelmeter::Error::invalid(
            "--new-tokens",
            args.new_tokens.unwrap_or_default(),
            "no value with --phase decode (a generation starts with a prefill)",
        )
        .into());
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
        let _ = writeln!(
            std::io::stderr(),
            "modelmeter: warning: {}",
            one_line(warning)
        );
    }
    Ok(if args.json {
        let mut text = serde_json::to_string_pretty(&report.to_json())
            .context("rendering the modelmeter.analyze/1 JSON")?;
        text.push('\n');
        text
    } else {
        report.to_text(args.depth)
    })
}
