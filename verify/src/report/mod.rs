//! Reports of a verification: a table for people, `modelmeter.verify/1` JSON and JUnit
//! XML for machines. Files are written whole or not at all; standard output, devices,
//! FIFOs and symlinks as [`Destination`] says.

mod destination;
mod json;
mod junit;
mod model;
mod table;
mod write;

pub use destination::{check_distinct, ConfigFile, Destination};
pub use json::{to_json, SCHEMA, SWEEP_SCHEMA};
pub use junit::to_junit;
pub use model::{model_json, model_junit, model_table, ModelReport, MODEL_SCHEMA};
pub use table::{case_line, to_table};
pub use write::{check_writable, goes_to_stdout, write_atomically, write_report};

use modelmeter::layers::AttentionImpl;
use modelmeter::{ModelConfig, Workload};

/// What separates a table line's subject from the cause of its error: every line that
/// says why a layer, call, phase or row could not run is written by [`error_note`], so that
/// [`quiet_text`] finds them.
const ERROR_MARK: &str = ": error: ";

/// A table line saying that `subject` could not run, and why.
pub(crate) fn error_note(subject: &str, cause: impl std::fmt::Display) -> String {
    format!("{subject}{ERROR_MARK}{cause}")
}

/// Whether `line` is a sweep case's line (`[ 3/40] fail h=…`, [`case_line`]): a sweep's
/// table lists only the cases that did not pass.
fn is_case_line(line: &str) -> bool {
    line.strip_prefix('[')
        .and_then(|rest| rest.split_once(']'))
        .is_some_and(|(count, _)| {
            count
                .trim()
                .split_once('/')
                .is_some_and(|(i, n)| i.parse::<u64>().is_ok() && n.parse::<u64>().is_ok())
        })
}

/// A table as `--quiet` prints it: the lines that say why something could not run (from
/// `error_note`, or a whole run's `error: …`), a sweep's failing cases with the commands
/// that replay them, then the summary line (the last).
pub fn quiet_text(table: &str) -> String {
    let mut out = String::new();
    let mut lines = table.lines();
    let last = lines.next_back().unwrap_or_default();
    for line in lines.map(str::trim) {
        if line.contains(ERROR_MARK)
            || line.starts_with("error: ")
            || line.starts_with("replay: ")
            || is_case_line(line)
        {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str(last);
    out.push('\n');
    out
}

use crate::environment::Environment;
use crate::plan::Plan;
use crate::results::{LayerResult, Summary};

/// One configuration and workload that was verified.
#[derive(Clone, Debug)]
pub struct Case {
    /// The case number in a sweep.
    pub index: Option<usize>,
    pub config: ModelConfig,
    pub workload: Workload,
    pub attention: AttentionImpl,
    pub layers: Vec<LayerResult>,
    pub summary: Summary,
    /// The command that reruns this case with plain options (sweeps).
    pub replay: Option<String>,
}

impl Case {
    /// The case of `plan`'s run with these layer results; the attention kernels that ran
    /// are added to the report's environment.
    pub fn of(
        plan: &Plan,
        layers: Vec<LayerResult>,
        index: Option<usize>,
        replay: Option<String>,
        env: &mut Environment,
    ) -> Case {
        for l in &layers {
            env.saw_kernels(&l.attention_kernels);
        }
        Case {
            index,
            config: plan.config.clone(),
            workload: plan.workload.clone(),
            attention: plan.attention,
            summary: Summary::of(&layers),
            layers,
            replay,
        }
    }
}

/// Everything a report shows.
#[derive(Clone, Debug)]
pub struct Report {
    pub environment: Environment,
    pub tolerance: f64,
    pub cases: Vec<Case>,
    /// `(seed, cases)` of a sweep; `None` for a single run.
    pub sweep: Option<(u64, usize)>,
}

impl Report {
    /// Layer statuses over all cases.
    pub fn summary(&self) -> Summary {
        let mut s = Summary::default();
        for c in &self.cases {
            s.merge(&c.summary);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_keeps_each_error_cause_and_the_summary_line() {
        let table = format!(
            "device: cpu\n\nlayer  metric  status\nMoEGate  flops  error\n\nnotes:\n  {}\n  \
             MoEGate flops: 3 FLOPs of elementwise work\n  {}\n\n1 layer: 0 pass, 0 known_gap, 0 fail, 1 error\n",
            error_note("MoEGate", "out of memory"),
            error_note("prefill S=6", "the stack could not be built"),
        );
        assert_eq!(
            quiet_text(&table),
            "MoEGate: error: out of memory\nprefill S=6: error: the stack could not be built\n\
             1 layer: 0 pass, 0 known_gap, 0 fail, 1 error\n"
        );
        // A whole run that could not start: its one cause, then the summary.
        assert_eq!(
            quiet_text("model: 2 layers\nerror: no memory\n\n0 calls: 1 error\n"),
            "error: no memory\n0 calls: 1 error\n"
        );
        assert_eq!(quiet_text("7 layers: 7 pass\n"), "7 layers: 7 pass\n");
        // A sweep: each failing case and its replay, not its rows.
        let sweep = "device: cpu\n\n[ 3/40] fail  h=64 H=4/4 d=16 i=96 | B=1 prefill S=8\n\
                     replay: verify-decoder --config '/tmp/c 3.json' --seed 1\n\
                     layer  metric  status\nMoEGate  flops  fail\n\n\
                     sweep seed 1: 39 of 40 configurations pass; 280 layers: 279 pass, 0 known_gap, 1 fail, 0 error";
        assert_eq!(
            quiet_text(sweep),
            "[ 3/40] fail  h=64 H=4/4 d=16 i=96 | B=1 prefill S=8\n\
             replay: verify-decoder --config '/tmp/c 3.json' --seed 1\n\
             sweep seed 1: 39 of 40 configurations pass; 280 layers: 279 pass, 0 known_gap, 1 fail, 0 error\n"
        );
        assert!(!is_case_line("[notes]") && !is_case_line("[1/x] y"));
    }
}
