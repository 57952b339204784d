//! Command-line options shared by `modelmeter analyze` and `verify-decoder`: which
//! model config, which workload, which attention implementation.

use std::io::Write;
use std::path::PathBuf;

use crate::config::{builtin_named, default_builtin, BuiltinConfig, ModelConfig};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::layers::AttentionImpl;
use crate::sweep::{self, Axis};
use crate::workload::{MlaForm, Phase, Workload, DSOCR_STANDARD_V1};

/// Where a model config comes from ([`WorkloadArgs::config_source`]).
#[derive(Clone, Copy, Debug)]
pub enum ConfigSource<'a> {
    Builtin(&'static BuiltinConfig),
    File(&'a std::path::Path),
}

/// `--phase`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PhaseArg {
    /// The whole prompt at once: S_q = S_kv = --seq-len.
    #[default]
    Prefill,
    /// One token after --context-len cached ones.
    Decode,
}

/// `--dtype`: the model dtypes, as users and Hugging Face configs spell them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DtypeArg {
    #[value(alias = "bfloat16")]
    Bf16,
    #[value(alias = "float16", alias = "half", alias = "f16")]
    Fp16,
    #[value(alias = "float32", alias = "float", alias = "f32")]
    Fp32,
}

impl From<DtypeArg> for Dtype {
    fn from(d: DtypeArg) -> Dtype {
        match d {
            DtypeArg::Bf16 => Dtype::Bf16,
            DtypeArg::Fp16 => Dtype::F16,
            DtypeArg::Fp32 => Dtype::F32,
        }
    }
}

/// Model and workload options (clap `Args`, flattened into each binary's options).
#[derive(Clone, Debug, Default, clap::Args)]
pub struct WorkloadArgs {
    /// Hugging Face config.json of a DeepSeek-V2-family model, or a built-in name:
    /// deepseek-ocr-v1-base, deepseek-v2-lite, deepseek-v2, deepseek-v3 (a name wins over a
    /// file of that name: write ./NAME for the file) [default: deepseek-ocr-v1-base, the
    /// DeepSeek-OCR language model]
    #[arg(long, value_name = "FILE|NAME")]
    pub config: Option<PathBuf>,
    /// Sequences per call [default: 1, from dsocr-standard-v1]
    #[arg(long, value_name = "B", value_parser = whole_number::<u64>)]
    pub batch: Option<u64>,
    /// Prompt tokens of a prefill [default: 512, from dsocr-standard-v1]
    #[arg(long, value_name = "S", value_parser = whole_number::<u64>)]
    pub seq_len: Option<u64>,
    /// prefill (S_q = S_kv = seq-len) or decode (one token after context-len cached ones)
    /// [default: prefill]
    #[arg(long, value_name = "PHASE", value_enum, ignore_case = true)]
    pub phase: Option<PhaseArg>,
    /// Cached tokens before the decode step; the step attends over context-len + 1 keys
    /// [default: 512]
    #[arg(long, value_name = "C", value_parser = whole_number::<u64>)]
    pub context_len: Option<u64>,
    /// Model dtype [default: bf16, the deployed dtype] (each binary states its own default:
    /// verify-decoder's depends on the device)
    #[arg(long, value_name = "DTYPE", value_enum, ignore_case = true)]
    pub dtype: Option<DtypeArg>,
    /// Let fp32 GEMMs use TF32 tensor cores (PyTorch's default is off)
    #[arg(long)]
    pub allow_tf32: bool,
    /// Attention core: sdpa (fused, LlamaFlashAttention2) or eager (LlamaAttention)
    /// [default: sdpa]
    #[arg(long, value_name = "IMPL", value_enum, ignore_case = true)]
    pub attn: Option<AttentionImpl>,
    /// MLA configs only: naive (the vendor code: decompressed per-head K/V cache; --attn
    /// picks its core) or absorb (weight-absorbed, latent cache; explicit matmuls)
    /// [default: naive]
    #[arg(long, value_name = "FORM", value_enum, ignore_case = true)]
    pub mla: Option<MlaForm>,
}

impl WorkloadArgs {
    /// These options with each workload axis of `point` set to its value (a point of a
    /// sweep: its workload is then [`WorkloadArgs::workload`]'s, with the same checks).
    /// `new-tokens` is no workload option: the caller takes it from `point`.
    pub fn at(&self, point: &[(Axis, u64)]) -> WorkloadArgs {
        let mut args = self.clone();
        for &(axis, value) in point {
            if let Some(slot) = args.axis_mut(axis) {
                *slot = Some(value);
            }
        }
        args
    }

    /// The value `axis`'s own option (`--batch` …) sets, if given (`None` for
    /// `new-tokens`, which is not one of these options).
    pub fn sets(&self, axis: Axis) -> Option<u64> {
        match axis {
            Axis::Batch => self.batch,
            Axis::SeqLen => self.seq_len,
            Axis::ContextLen => self.context_len,
            Axis::NewTokens => None,
        }
    }

    fn axis_mut(&mut self, axis: Axis) -> Option<&mut Option<u64>> {
        match axis {
            Axis::Batch => Some(&mut self.batch),
            Axis::SeqLen => Some(&mut self.seq_len),
            Axis::ContextLen => Some(&mut self.context_len),
            Axis::NewTokens => None,
        }
    }

    /// Where the model config comes from: the default built-in without `--config`, the
    /// built-in `--config` names (a built-in name wins over a file of the same name), or
    /// the file it names.
    pub fn config_source(&self) -> ConfigSource<'_> {
        match &self.config {
            None => ConfigSource::Builtin(default_builtin()),
            Some(path) => match path.to_str().and_then(builtin_named) {
                Some(builtin) => ConfigSource::Builtin(builtin),
                None => ConfigSource::File(path),
            },
        }
    }

    /// The model config these options name: a built-in name (which wins over a file of
    /// the same name; write `./NAME` for the file) or a `config.json` path. `--mla
    /// absorb` with a multi-head-attention config is an error, not ignored.
    pub fn model_config(&self) -> Result<ModelConfig> {
        let config = match self.config_source() {
            ConfigSource::Builtin(builtin) => {
                ModelConfig::from_json_str(builtin.name, builtin.json)?
            }
            ConfigSource::File(path) => ModelConfig::from_file(path).map_err(|e| match e {
                Error::Io { ref cause, .. } if cause.kind() == std::io::ErrorKind::NotFound => {
                    Error::invalid(
                        "--config",
                        path.display(),
                        &format!(
                            "an existing config.json or a built-in name: {}",
                            ModelConfig::builtin_names()
                        ),
                    )
                }
                e => e,
            })?,
        };
        if self.mla_form() == MlaForm::Absorb && config.mla.is_none() {
            return Err(Error::invalid(
                "--mla",
                "absorb",
                &format!(
                    "naive (config {} uses multi-head attention; --mla applies to MLA configs)",
                    config.name
                ),
            ));
        }
        if let (MlaForm::Absorb, Some(attn)) = (self.mla_form(), self.attn) {
            // The absorbed form has no attention core to choose: a given --attn would be
            // reported but change nothing.
            return Err(Error::invalid(
                "--attn",
                format!("{attn:?}").to_lowercase(),
                "no value with --mla absorb (the weight-absorbed form computes its scores with explicit matmuls; --attn picks the naive form's core)",
            ));
        }
        Ok(config)
    }

    /// The workload these options describe; `default_dtype` when `--dtype` is absent.
    pub fn workload(&self, default_dtype: Dtype) -> Result<Workload> {
        let batch = self.batch.unwrap_or(DSOCR_STANDARD_V1.batch);
        let phase = match self.phase() {
            PhaseArg::Decode => {
                if self.seq_len.is_some() {
                    return Err(Error::invalid(
                        "--seq-len",
                        self.seq_len.unwrap_or_default(),
                        "no value with --phase decode (use --context-len for the cached tokens)",
                    ));
                }
                Phase::Decode {
                    context_len: self.context_len.unwrap_or(DSOCR_STANDARD_V1.prefill_len),
                }
            }
            PhaseArg::Prefill => {
                if let Some(c) = self.context_len {
                    return Err(Error::invalid(
                        "--context-len",
                        c,
                        "no value with --phase prefill (add --phase decode, or use --seq-len)",
                    ));
                }
                Phase::Prefill {
                    seq_len: self.seq_len.unwrap_or(DSOCR_STANDARD_V1.prefill_len),
                }
            }
        };
        let dtype = self.dtype.map_or(default_dtype, Dtype::from);
        Ok(Workload::new(batch, phase, dtype)
            .map_err(as_options)?
            .with_tf32(self.allow_tf32)
            .with_mla(self.mla_form()))
    }

    /// The phase asked for (`--phase`, prefill when not given).
    pub fn phase(&self) -> PhaseArg {
        self.phase.unwrap_or(PhaseArg::Prefill)
    }

    /// The attention implementation (`--attn`, sdpa when not given).
    pub fn attention(&self) -> AttentionImpl {
        self.attn.unwrap_or(AttentionImpl::Sdpa)
    }

    /// The MLA form (`--mla`, naive when not given).
    pub fn mla_form(&self) -> MlaForm {
        self.mla.unwrap_or(MlaForm::Naive)
    }
}

/// A workload error as the command line says it: the library names its fields
/// (`batch = 0`), the user typed options (`--batch = 0`).
fn as_options(e: Error) -> Error {
    e.with_field_named(|field| {
        match field {
            "batch" => "--batch",
            "seq_len" => "--seq-len",
            "context_len" => "--context-len",
            other => other,
        }
        .to_string()
    })
}

/// Writes `text` to standard output and flushes it, without panicking. A reader that
/// went away (a closed pipe, as in `| head`) is not an error: the output ends quietly, as
/// in other Unix tools. Any other failure (a full disk) is returned for a one-line error.
/// (A standard output closed with `>&-` is /dev/null to a Rust program: its runtime
/// reopens closed standard descriptors there before `main`.)
pub fn print_stdout(text: &str) -> std::io::Result<()> {
    write_stdout(|out| out.write_all(text.as_bytes()))
}

/// [`print_stdout`] for output written piece by piece (a large sweep's rows, not held as
/// one text): `write` writes to a buffered standard output, which is flushed after it.
pub fn write_stdout(
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    match write(&mut out).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => result,
    }
}

pub use crate::error::{one_line, shown_value};

/// An unsigned integer type an option parses into, with the largest value it holds (for
/// the message [`whole_number`] gives when a number is too large).
pub trait WholeNumber:
    std::str::FromStr<Err = std::num::ParseIntError> + std::fmt::Display
{
    /// The largest value of the type.
    const MAX: Self;
}

impl WholeNumber for u64 {
    const MAX: u64 = u64::MAX;
}

impl WholeNumber for usize {
    const MAX: usize = usize::MAX;
}

/// Parses a whole-number option, with an error that says what is valid (clap's own says
/// only why the text is not a number: "invalid digit found in string").
pub fn whole_number<T: WholeNumber>(text: &str) -> std::result::Result<T, String> {
    const DIGITS_ONLY: &str =
        "expected a whole number such as 512 (digits only: no sign, point or exponent)";
    // Rust's parse takes a leading `+`, which the message rules out.
    if text.starts_with('+') {
        return Err(DIGITS_ONLY.to_string());
    }
    text.parse::<T>().map_err(|e| match e.kind() {
        std::num::IntErrorKind::PosOverflow => {
            format!("too large; expected a whole number up to {}", T::MAX)
        }
        _ => DIGITS_ONLY.to_string(),
    })
}

/// A progress bar (`indicatif`) of `len` steps on standard error, for long runs (the
/// configurations of `verify-decoder --sweep`, the points of `modelmeter sweep`): hidden
/// with `quiet` and when standard error is not a terminal (CI logs get no bar).
pub fn progress_bar(len: u64, what: &str, quiet: bool) -> indicatif::ProgressBar {
    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
    use std::io::IsTerminal;
    if quiet || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_prefix(what.to_string());
    bar
}

/// Parses a `--vary AXIS=VALUES` option of `modelmeter sweep`: an axis (`batch`,
/// `seq-len`, `context-len` or `new-tokens`) and its values, in the order written, as a comma-separated
/// list of items, each a whole number `N`, a range `START:END` (every value), `START:END:STEP`
/// or a doubling (any factor) `START:END:*FACTOR`; a range ends at the last value not past
/// `END`. A value given twice (ranges that overlap) is refused: it would repeat a row.
pub fn parse_vary(text: &str) -> std::result::Result<(Axis, Vec<u64>), String> {
    const FORM: &str = "AXIS=VALUES such as seq-len=128:4096:128 or batch=1,2,4 (AXIS: batch, seq-len, context-len or new-tokens; VALUES: comma-separated N, START:END, START:END:STEP or START:END:*FACTOR)";
    let Some((name, list)) = text.split_once('=') else {
        return Err(format!("expected {FORM}"));
    };
    let axis =
        Axis::parse(name).ok_or_else(|| format!("unknown axis `{name}`; expected {FORM}"))?;
    let number = |item: &str, part: &str| {
        whole_number::<u64>(part).map_err(|e| match part == item {
            true => format!("`{part}`: {e}"),
            false => format!("`{part}` in `{item}`: {e}"),
        })
    };
    let mut values: Vec<u64> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for item in list.split(',') {
        let parts: Vec<&str> = item.split(':').collect();
        let (start, end, step) = match parts.as_slice() {
            [""] => return Err(format!("an empty item in `{list}`; expected {FORM}")),
            [n] => {
                let n = number(item, n)?;
                (n, n, Step::Add(1))
            }
            [start, end] => (number(item, start)?, number(item, end)?, Step::Add(1)),
            [start, end, step] => {
                let step = match step.strip_prefix('*') {
                    Some(factor) => Step::Times(number(item, factor)?),
                    None => Step::Add(number(item, step)?),
                };
                (number(item, start)?, number(item, end)?, step)
            }
            _ => {
                return Err(format!(
                    "`{item}` has more than two colons; expected {FORM}"
                ))
            }
        };
        if start > end {
            return Err(format!(
                "`{item}` runs backwards: START {start} is past END {end}"
            ));
        }
        let too_many = |count: u128| {
            format!(
                "`{text}` has {count} values or more; a sweep has at most {} points",
                sweep::MAX_POINTS
            )
        };
        let before = values.len();
        match step {
            Step::Add(0) => {
                return Err(format!(
                    "`{item}`: a step of 0 never reaches END; expected a step of 1 or more"
                ))
            }
            Step::Add(step) => {
                // `END - START` may be 2^64 − 1: the count, one more, is taken in 128 bits.
                let count = u128::from((end - start) / step) + 1;
                let total = before as u128 + count;
                if total > u128::from(sweep::MAX_POINTS) {
                    return Err(too_many(total));
                }
                let count = count as u64; // ≤ MAX_POINTS
                values.extend((0..count).map(|i| start + i * step));
            }
            Step::Times(factor) if factor < 2 => {
                return Err(format!(
                    "`{item}`: a factor of {factor} never reaches END; expected *2 or more"
                ))
            }
            Step::Times(_) if start == 0 => {
                return Err(format!(
                    "`{item}`: a doubling from 0 stays at 0; start at 1 or more"
                ))
            }
            Step::Times(factor) => {
                let mut v = start;
                while v <= end {
                    values.push(v);
                    match v.checked_mul(factor) {
                        Some(next) => v = next,
                        None => break,
                    }
                }
            }
        }
        if let Some(&twice) = values[before..].iter().find(|v| !seen.insert(**v)) {
            return Err(format!(
                "{twice} is given twice in `{list}`: each point once"
            ));
        }
    }
    Ok((axis, values))
}

/// How a `--vary` range steps.
enum Step {
    /// Adds this each time.
    Add(u64),
    /// Multiplies by this each time.
    Times(u64),
}

/// Parses the command line as `P::parse()` does, except that a usage error (an unknown
/// option, a value that does not parse) is one line on standard error that names the
/// option, with clap's tips, and exit code 2, like every other refusal of `program`:
/// clap's own are several lines with a usage block. Help and version print as clap
/// prints them.
pub fn parse_args<P: clap::Parser>(program: &str) -> P {
    P::try_parse().unwrap_or_else(|e| {
        use clap::error::ErrorKind;
        if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
            // As clap prints them, but a help that cannot be written (a full disk) is a
            // one-line error and exit 1, like any other output; a closed pipe ends quietly.
            let printed = e.print().and_then(|()| std::io::stdout().flush());
            match printed {
                Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => {
                    let _ = writeln!(
                        std::io::stderr(),
                        "{}",
                        one_line(&format!(
                            "{program}: error: cannot write to standard output: {err}"
                        ))
                    );
                    std::process::exit(1)
                }
                _ => std::process::exit(0),
            }
        }
        if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
            // A bare `modelmeter`: one line like every other refusal, not the whole help.
            let _ = writeln!(
                std::io::stderr(),
                "{}",
                missing_subcommand_line(&P::command(), program)
            );
            std::process::exit(2)
        }
        // `args_os`: `std::env::args` panics on an argument that is not UTF-8 (the very
        // error being shown).
        let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
        let help = help_command(
            &P::command(),
            program,
            args.iter().map(|a| a.to_string_lossy().into_owned()),
        );
        // clap's InvalidUtf8 error names no argument: say which.
        let detail = (e.kind() == ErrorKind::InvalidUtf8).then(|| where_not_utf8(&args));
        let line = usage_error_line(program, &help, &e, detail.as_deref());
        let _ = writeln!(std::io::stderr(), "{line}");
        std::process::exit(2)
    })
}

/// The one-line refusal of a command line that names no subcommand.
fn missing_subcommand_line(command: &clap::Command, program: &str) -> String {
    let names: Vec<&str> = command
        .get_subcommands()
        .map(|s| s.get_name())
        .filter(|name| *name != "help")
        .collect();
    format!(
        "{program}: error: a command is required: {} (e.g. `{program} {}`); see {program} --help",
        names.join(", "),
        names.first().copied().unwrap_or("help"),
    )
}

/// Which argument is not UTF-8 (clap's error does not say): its place, the option it
/// follows if any, and how it reads with the invalid bytes replaced by U+FFFD.
fn where_not_utf8(args: &[std::ffi::OsString]) -> String {
    let Some(i) = args.iter().position(|a| a.to_str().is_none()) else {
        return "every argument must be UTF-8 text".into();
    };
    let shown = args[i].to_string_lossy();
    let after = match i.checked_sub(1).and_then(|p| args[p].to_str()) {
        Some(option) if option.starts_with('-') && !shown.starts_with('-') => {
            format!(" (the value of {option})")
        }
        _ => String::new(),
    };
    format!(
        "argument {} {shown:?}{after} is not UTF-8 text; give it as UTF-8",
        i + 1
    )
}

/// The command whose `--help` lists the options of the mistaken command line: the
/// subcommand's (`modelmeter analyze --help`) when `args` name one.
fn help_command(
    command: &clap::Command,
    program: &str,
    mut args: impl Iterator<Item = String>,
) -> String {
    match args.find(|a| command.get_subcommands().any(|s| s.get_name() == a)) {
        Some(sub) => format!("{program} {sub} --help"),
        None => format!("{program} --help"),
    }
}

/// clap's error `e` as one line: its message, the possible values and tips, `detail`
/// (what clap's message leaves out) if any, and where help is (`see {help}`; not clap's
/// usage block).
fn usage_error_line(program: &str, help: &str, e: &clap::Error, detail: Option<&str>) -> String {
    let rendered = e.render().to_string();
    let mut lines = rendered
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"));
    let first = lines.next().unwrap_or("invalid arguments");
    let mut message = first.strip_prefix("error: ").unwrap_or(first).to_string();
    for line in lines {
        message.push_str("; ");
        message.push_str(line.strip_prefix("tip: ").unwrap_or(line));
    }
    if let Some(detail) = detail {
        message.push_str(": ");
        message.push_str(detail);
    }
    one_line(&format!("{program}: error: {message}; see {help}"))
}

/// A warning when `workload` (and `new_tokens` decode steps after it) reaches positions
/// past the config's `max_position_embeddings`: the tools cost (and run) the code at any
/// length, but the model was not trained for it. `None` within the trained positions.
pub fn beyond_trained_positions(
    config: &ModelConfig,
    workload: &Workload,
    new_tokens: Option<u64>,
) -> Option<String> {
    let max = config.max_position_embeddings?;
    let positions = workload
        .positions_reached(new_tokens.unwrap_or(0))
        .unwrap_or(u64::MAX);
    (positions > max).then(|| {
        format!(
            "the workload reaches {positions} positions, beyond max_position_embeddings = {max} of config {}: the counts are those of the code at that length, which the model was not trained for",
            config.name
        )
    })
}

/// A warning when the config's router keeps fewer experts after its group step than each
/// token is routed to ([`crate::routing::Routing::experts_kept`]): the counts are those of
/// the code, but the routing is not the group-limited one the config describes, and for
/// `noaux_tc` the vendor code and transformers' V3 router can choose different experts
/// there. `None` for a
/// dense config or a router that keeps enough (every DeepSeek checkpoint).
pub fn router_keeps_too_few_experts(config: &ModelConfig) -> Option<String> {
    let moe = config.moe.as_ref()?;
    let routing = &moe.routing;
    let kept = routing.experts_kept(moe.n_routed_experts);
    // Only noaux_tc has a transformers router to differ from (the V3 one).
    let scored = match routing.topk_method {
        crate::routing::TopkMethod::NoauxTc => "scored 0.0 by the vendor MoEGate and −inf by transformers' V3 router, which can then choose other experts",
        _ => "scored 0.0 by the vendor MoEGate",
    };
    (kept < moe.num_experts_per_tok).then(|| {
        format!(
            "topk_method {} keeps topk_group × n_routed_experts / n_group = {} × {} = {kept} expert{} per token, fewer than num_experts_per_tok = {} of config {}: the top-k then also picks experts of groups it did not keep ({scored}); raise topk_group to at least {} for the group-limited routing",
            routing.topk_method.name(),
            routing.topk_group,
            routing.experts_per_group(moe.n_routed_experts),
            if kept == 1 { "" } else { "s" },
            moe.num_experts_per_tok,
            config.name,
            moe.num_experts_per_tok
                .div_ceil(routing.experts_per_group(moe.n_routed_experts).max(1)),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_progress_bars_are_hidden() {
        assert!(progress_bar(10, "steps", true).is_hidden());
    }

    #[test]
    fn a_point_sets_each_of_its_axes() {
        let base = WorkloadArgs {
            batch: Some(3),
            ..WorkloadArgs::default()
        };
        let at = base.at(&[
            (Axis::SeqLen, 64),
            (Axis::ContextLen, 9),
            (Axis::NewTokens, 5),
        ]);
        assert_eq!(
            Axis::ALL.map(|a| at.sets(a)),
            [Some(3), Some(64), Some(9), None]
        );
        assert_eq!(Axis::ALL.map(|a| base.sets(a)), [Some(3), None, None, None]);
    }

    #[test]
    fn vary_lists_ranges_steps_and_doublings_in_the_order_written() {
        let v = |text| parse_vary(text).unwrap();
        assert_eq!(v("batch=1,2,4"), (Axis::Batch, vec![1, 2, 4]));
        assert_eq!(
            v("seq-len=128:512:128"),
            (Axis::SeqLen, vec![128, 256, 384, 512])
        );
        assert_eq!(v("seq_len=3:5"), (Axis::SeqLen, vec![3, 4, 5]));
        // A range stops at the last value not past END.
        assert_eq!(v("context-len=0:10:4"), (Axis::ContextLen, vec![0, 4, 8]));
        assert_eq!(v("batch=1:100:*4,7"), (Axis::Batch, vec![1, 4, 16, 64, 7]));
        assert_eq!(v("batch=5:5:*2"), (Axis::Batch, vec![5]));
        // A doubling that would pass 2^64 stops at the last value that fits.
        let big = v("context-len=1:18446744073709551615:*2").1;
        assert_eq!((big.len(), big.last()), (64, Some(&(1u64 << 63))));
        // As many values as a sweep takes points, and no more.
        let most = v("seq-len=1:1000000").1;
        assert_eq!(most.len() as u64, sweep::MAX_POINTS);
        assert!(parse_vary("seq-len=1:1000001")
            .unwrap_err()
            .contains("has 1000001 values or more; a sweep has at most 1000000 points"));
    }

    #[test]
    fn vary_refuses_what_would_be_an_empty_endless_or_repeated_list() {
        for (text, says) in [
            ("batch", "expected AXIS=VALUES"),
            ("tokens=4", "unknown axis `tokens`"),
            ("batch=", "an empty item"),
            ("batch=1,,2", "an empty item"),
            ("batch=x", "`x`: expected a whole number"),
            ("batch=1:x", "`x` in `1:x`: expected a whole number"),
            (
                "batch=0:18446744073709551615",
                "has 18446744073709551616 values or more",
            ),
            ("batch=-1", "expected a whole number"),
            ("batch=+4", "`+4`: expected a whole number"),
            ("batch=8:1", "runs backwards: START 8 is past END 1"),
            ("batch=1:8:0", "a step of 0"),
            ("batch=1:8:*1", "a factor of 1"),
            ("batch=0:8:*2", "a doubling from 0"),
            ("batch=1:2:3:4", "more than two colons"),
            ("batch=1:4,4", "4 is given twice"),
            (
                "seq-len=1:2000000",
                "has 2000000 values or more; a sweep has at most 1000000",
            ),
            ("seq-len=1:600000,600001:1200000", "at most 1000000"),
        ] {
            let e = parse_vary(text).unwrap_err();
            assert!(e.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn positions_past_the_trained_ones_are_warned_of() {
        let c = ModelConfig::deepseek_ocr();
        assert_eq!(c.max_position_embeddings, Some(8192));
        let at = |w: Workload, n| beyond_trained_positions(&c, &w, n);
        assert_eq!(at(Workload::prefill(1, 8192).unwrap(), None), None);
        assert_eq!(at(Workload::prefill(1, 8000).unwrap(), Some(192)), None);
        let w = at(Workload::prefill(1, 8000).unwrap(), Some(193)).unwrap();
        assert!(w.starts_with("the workload reaches 8193 positions, beyond max_position_embeddings = 8192 of config "), "{w}");
        // A decode step reaches its cached tokens and itself.
        assert_eq!(at(Workload::decode(1, 8191).unwrap(), None), None);
        assert!(at(Workload::decode(1, 8192).unwrap(), None).is_some());
    }

    #[test]
    fn a_router_keeping_fewer_experts_than_k_is_warned_of() {
        use crate::routing::{Routing, ScoringFunc, TopkMethod};
        let mut c = ModelConfig::deepseek_ocr();
        // Greedy routing keeps every expert; a dense config has no router.
        assert_eq!(router_keeps_too_few_experts(&c), None);
        let mut dense = c.clone();
        dense.moe = None;
        assert_eq!(router_keeps_too_few_experts(&dense), None);
        let moe = c.moe.as_mut().unwrap();
        moe.num_experts_per_tok = 5;
        // 64 experts in 16 groups of 4: one group keeps 4 < 5, two keep 8.
        let v3 = |topk_group| Routing {
            scoring_func: ScoringFunc::Sigmoid,
            topk_method: TopkMethod::NoauxTc,
            n_group: 16,
            topk_group,
        };
        moe.routing = v3(2);
        assert_eq!(router_keeps_too_few_experts(&c), None);
        c.moe.as_mut().unwrap().routing = v3(1);
        // One group keeps exactly k = 4: enough.
        c.moe.as_mut().unwrap().num_experts_per_tok = 4;
        assert_eq!(router_keeps_too_few_experts(&c), None);
        c.moe.as_mut().unwrap().num_experts_per_tok = 5;
        let w = router_keeps_too_few_experts(&c).unwrap();
        assert!(
            w.starts_with("topk_method noaux_tc keeps topk_group × n_routed_experts / n_group = 1 × 4 = 4 experts per token, fewer than num_experts_per_tok = 5 of config "),
            "{w}"
        );
        assert!(
            w.contains(
                "−inf by transformers' V3 router, which can then choose other experts); raise"
            ),
            "{w}"
        );
        assert!(
            w.ends_with("raise topk_group to at least 2 for the group-limited routing"),
            "{w}"
        );
        // One expert kept: said in the singular.
        let moe = c.moe.as_mut().unwrap();
        moe.routing.topk_method = TopkMethod::GroupLimitedGreedy;
        moe.routing.n_group = 64;
        let w = router_keeps_too_few_experts(&c).unwrap();
        assert!(
            w.contains("= 1 × 1 = 1 expert per token, fewer than"),
            "{w}"
        );
        assert!(
            w.contains("(scored 0.0 by the vendor MoEGate); raise"),
            "{w}"
        );
    }

    #[derive(clap::Parser, Debug)]
    #[command(allow_negative_numbers = true)]
    struct Demo {
        #[command(flatten)]
        workload: WorkloadArgs,
    }

    #[test]
    fn choices_are_read_in_any_case_as_devices_are() {
        use clap::Parser;
        let d = Demo::try_parse_from([
            "demo", "--dtype", "BF16", "--phase", "Decode", "--attn", "EAGER", "--mla", "Absorb",
        ])
        .unwrap();
        let w = &d.workload;
        assert_eq!(w.dtype, Some(DtypeArg::Bf16));
        assert_eq!(w.phase, Some(PhaseArg::Decode));
        assert_eq!(w.attn, Some(AttentionImpl::Eager));
        assert_eq!(w.mla, Some(MlaForm::Absorb));
        assert!(Demo::try_parse_from(["demo", "--dtype", "bf17"]).is_err());
    }

    #[test]
    fn the_help_states_the_defaults_the_code_uses() {
        // The help's defaults are written out (the options are `Option`s, so that "not
        // given" can be told apart); they must say what `workload()` falls back to.
        use clap::CommandFactory;
        let cmd = Demo::command();
        let help = |id: &str| {
            cmd.get_arguments()
                .find(|a| a.get_id() == id)
                .and_then(|a| a.get_help())
                .map(|h| h.to_string().replace('\n', " "))
                .unwrap_or_else(|| panic!("no help for {id}"))
        };
        let p = DSOCR_STANDARD_V1;
        assert!(help("batch").contains(&format!("[default: {}, from {}]", p.batch, p.name)));
        assert!(help("seq_len").contains(&format!("[default: {}, from {}]", p.prefill_len, p.name)));
        assert!(help("context_len").contains(&format!("[default: {}]", p.prefill_len)));
        let w = WorkloadArgs::default().workload(Dtype::Bf16).unwrap();
        assert_eq!((w.batch, w.query_len()), (p.batch, p.prefill_len));
        let decode = WorkloadArgs {
            phase: Some(PhaseArg::Decode),
            ..WorkloadArgs::default()
        };
        let w = decode.workload(Dtype::Bf16).unwrap();
        assert_eq!(w.first_position(), p.prefill_len, "--context-len's default");
    }

    fn usage_error(args: &[&str]) -> String {
        use clap::Parser;
        let e =
            Demo::try_parse_from(std::iter::once("demo").chain(args.iter().copied())).unwrap_err();
        usage_error_line("demo", "demo --help", &e, None)
    }

    #[test]
    fn every_workload_refusal_names_the_option() {
        use clap::Parser;
        let max = u64::MAX.to_string();
        // Each refusal with the message it must start with: the option the user typed
        // (not the library's field, `batch = 0`) and the value refused.
        let cases: [(&[&str], &str); 7] = [
            (&["--batch", "0"], "--batch = 0 is invalid: "),
            (&["--seq-len", "0"], "--seq-len = 0 is invalid: "),
            (
                &["--phase", "decode", "--context-len", "0"],
                "--context-len = 0 is invalid: ",
            ),
            (
                &["--phase", "decode", "--context-len", &max],
                "--context-len = 18446744073709551615 is invalid: expected below 2^64 − 1",
            ),
            (
                &["--batch", &max, "--seq-len", "2"],
                "--batch × --seq-len = 18446744073709551615 × 2 is invalid: ",
            ),
            (
                &["--phase", "decode", "--seq-len", "4"],
                "--seq-len = 4 is invalid: expected no value with --phase decode",
            ),
            (
                &["--context-len", "3"],
                "--context-len = 3 is invalid: expected no value with --phase prefill",
            ),
        ];
        for (args, start) in cases {
            let demo =
                Demo::try_parse_from(std::iter::once("demo").chain(args.iter().copied())).unwrap();
            let e = demo.workload.workload(Dtype::Bf16).unwrap_err().to_string();
            assert!(e.starts_with(start), "{args:?}: {e}");
        }
        // The largest context the step can attend over (context + 1 keys) is accepted.
        let below = (u64::MAX - 1).to_string();
        let demo =
            Demo::try_parse_from(["demo", "--phase", "decode", "--context-len", &below]).unwrap();
        assert!(demo.workload.workload(Dtype::Bf16).is_ok());
        // A number past 2^64 − 1 is refused while parsing, naming the option.
        assert_eq!(
            usage_error(&["--phase", "decode", "--context-len", "18446744073709551616"]),
            "demo: error: invalid value '18446744073709551616' for '--context-len <C>': \
             too large; expected a whole number up to 18446744073709551615; see demo --help"
        );
    }

    #[test]
    fn too_large_names_the_option_type_s_own_maximum() {
        let past = |max: u128| (max + 1).to_string();
        assert_eq!(
            whole_number::<usize>(&past(usize::MAX as u128)).unwrap_err(),
            format!("too large; expected a whole number up to {}", usize::MAX)
        );
        assert_eq!(
            whole_number::<u64>(&past(u64::MAX as u128)).unwrap_err(),
            format!("too large; expected a whole number up to {}", u64::MAX)
        );
        assert_eq!(whole_number::<usize>("7"), Ok(7));
        for signed in ["-1", "+4"] {
            assert_eq!(
                whole_number::<u64>(signed).unwrap_err(),
                "expected a whole number such as 512 (digits only: no sign, point or exponent)",
                "{signed}"
            );
        }
    }

    #[test]
    fn help_for_a_usage_error_is_the_subcommand_s() {
        let command = clap::Command::new("tool").subcommand(clap::Command::new("analyze"));
        let args = |a: &[&str]| {
            a.iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .into_iter()
        };
        assert_eq!(
            help_command(&command, "tool", args(&["analyze", "--seqlen", "4"])),
            "tool analyze --help"
        );
        assert_eq!(
            help_command(&command, "tool", args(&["--nope"])),
            "tool --help"
        );
    }

    #[test]
    fn usage_errors_are_one_line_naming_the_option_and_what_is_valid() {
        let cases = [
            (
                &["--seq-len", "-5"][..],
                "demo: error: invalid value '-5' for '--seq-len <S>': expected a whole number such as 512 (digits only: no sign, point or exponent); see demo --help",
            ),
            (
                &["--phase", "sideways"],
                "demo: error: invalid value 'sideways' for '--phase <PHASE>'; [possible values: prefill, decode]; see demo --help",
            ),
            (
                &["--seqlen", "4"],
                "demo: error: unexpected argument '--seqlen' found; a similar argument exists: '--seq-len'; see demo --help",
            ),
        ];
        for (args, line) in cases {
            assert_eq!(usage_error(args), line);
        }
        let dtype = usage_error(&["--dtype", "fp8"]);
        assert!(
            dtype.contains("[possible values: bf16, fp16, fp32]") && !dtype.contains('\n'),
            "{dtype}"
        );
    }

    #[test]
    fn defaults_are_the_standard_profile_prefill() {
        use clap::Parser;
        // As the command line leaves them: nothing given, the documented defaults used.
        let args = Demo::try_parse_from(["demo"]).unwrap().workload;
        assert_eq!((args.phase, args.attn, args.mla), (None, None, None));
        let w = args.workload(Dtype::Bf16).unwrap();
        assert_eq!(w, Workload::prefill(1, 512).unwrap());
        assert_eq!(args.attention(), AttentionImpl::Sdpa);
        assert_eq!(w.mla, MlaForm::Naive);
        // Given, even as the default's own spelling: known to be given.
        let args = Demo::try_parse_from([
            "demo", "--phase", "prefill", "--attn", "sdpa", "--mla", "naive",
        ])
        .unwrap()
        .workload;
        assert_eq!(
            (args.phase, args.attn, args.mla),
            (
                Some(PhaseArg::Prefill),
                Some(AttentionImpl::Sdpa),
                Some(MlaForm::Naive)
            )
        );
        // Given otherwise: what the accessors return, not the defaults.
        let args = Demo::try_parse_from(["demo", "--attn", "eager", "--mla", "absorb"])
            .unwrap()
            .workload;
        assert_eq!(
            (args.attention(), args.mla_form()),
            (AttentionImpl::Eager, MlaForm::Absorb)
        );
    }

    #[test]
    fn phase_specific_flags_are_checked() {
        let args = WorkloadArgs {
            phase: Some(PhaseArg::Decode),
            seq_len: Some(4),
            ..WorkloadArgs::default()
        };
        assert!(args
            .workload(Dtype::Bf16)
            .unwrap_err()
            .to_string()
            .contains("--context-len"));
        let args = WorkloadArgs {
            phase: Some(PhaseArg::Prefill),
            context_len: Some(4),
            ..WorkloadArgs::default()
        };
        assert!(args
            .workload(Dtype::Bf16)
            .unwrap_err()
            .to_string()
            .contains("--phase decode"));
        let args = WorkloadArgs {
            phase: Some(PhaseArg::Decode),
            context_len: Some(9),
            dtype: Some(DtypeArg::Fp32),
            ..WorkloadArgs::default()
        };
        assert_eq!(
            args.workload(Dtype::Bf16).unwrap(),
            Workload::decode(1, 9)
                .unwrap()
                .with_dtype(Dtype::F32)
                .unwrap()
        );
    }

    #[test]
    fn built_in_names_and_missing_files() {
        let args = |config: &str, mla: MlaForm| WorkloadArgs {
            config: Some(PathBuf::from(config)),
            mla: Some(mla),
            ..WorkloadArgs::default()
        };
        let lite = args("deepseek-v2-lite", MlaForm::Naive)
            .model_config()
            .unwrap();
        assert_eq!(lite.name, "deepseek-v2-lite");
        assert!(lite.mla.is_some());
        assert!(args("deepseek-v3", MlaForm::Absorb).model_config().is_ok());
        let e = args("no-such-model", MlaForm::Naive)
            .model_config()
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--config = no-such-model is invalid") && e.contains("deepseek-v2-lite"),
            "{e}"
        );
        let e = args("deepseek-ocr-v1-base", MlaForm::Absorb)
            .model_config()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--mla = absorb is invalid"), "{e}");
    }

    #[test]
    fn messages_stay_on_one_line() {
        assert_eq!(one_line("a\nb\tc é"), "a\\nb\\tc é");
    }
}
