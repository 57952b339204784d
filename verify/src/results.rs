//! The results of a verification: per layer, the compared rows and what was measured;
//! counts per status; progress events for a front end.

use std::collections::BTreeMap;

use modelmeter_reference::OpSummary;
use serde::Serialize;

use crate::compare::{MetricRow, Status};

/// The verification of one layer.
#[derive(Clone, Debug, Serialize)]
pub struct LayerResult {
    pub name: String,
    pub status: Status,
    /// Why the layer could not run (status `error`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub metrics: Vec<MetricRow>,
    /// Measured op records, summarised by op name.
    pub ops: Vec<OpSummary>,
    /// Executed ops with no rule in the conventions table.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub unknown_ops: BTreeMap<String, usize>,
    /// The fused attention kernels libtorch dispatched to.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub attention_kernels: Vec<String>,
    /// MoE layers: how many routed experts received tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub experts_used: Option<usize>,
    /// MoE layers: the tokens (rows) each routed expert received, in expert order, as
    /// the run measured them: the routing the analytic side costs (replayable without the
    /// GPU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_expert: Option<Vec<i64>>,
    /// `--hardware-counters`: the layer's range as Nsight Compute measured it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hardware: Option<crate::hardware::rows::LayerHardware>,
    /// Run in a profiler range (the `--hardware-counters` child,
    /// `runner::verify_in_profiler_ranges`): whether the layer's range was opened, so that
    /// Nsight Compute has a result row for it, which the child's range list records
    /// (`hardware::profile::range_list`). `Some(true)`: its counted forward returned (a
    /// failure in judging it came after the range closed) or failed inside the range
    /// (`modelmeter_reference::Error::opened_profiler_range`); `Some(false)`: it failed
    /// before the range (the analytic model, the module, a test hook's injected error,
    /// building or preparing it, the warm-up forward, opening the range); `None`: not
    /// known (a panic, caught around building, preparing and running the layer alike, so
    /// it may have come before the range or inside it), or not run in a profiler range.
    /// On the CPU, which has no range, the same points are told apart
    /// (`Prepared::run_in_profiler_range`). Not in reports: the child's bookkeeping.
    #[serde(skip)]
    pub profiler_range_opened: Option<bool>,
    #[serde(skip)]
    pub seconds: f64,
    /// Where those seconds went (`--timings`).
    #[serde(skip)]
    pub timings: LayerTimings,
}

impl LayerResult {
    /// The layer called `name` with `status`, before anything is measured or compared:
    /// no error, rows, ops, kernels, routing, hardware figures, profiler range or time.
    pub fn new(name: String, status: Status) -> LayerResult {
        LayerResult {
            name,
            status,
            error: None,
            metrics: Vec::new(),
            ops: Vec::new(),
            unknown_ops: BTreeMap::new(),
            attention_kernels: Vec::new(),
            experts_used: None,
            tokens_per_expert: None,
            hardware: None,
            profiler_range_opened: None,
            seconds: 0.0,
            timings: Default::default(),
        }
    }
}

/// Where a layer's verification spent its wall time, in seconds: shown by `--timings`
/// and read by the benchmarks, never asserted on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct LayerTimings {
    /// Costing the analytic layer (with its per-op breakdown).
    pub analytic_s: f64,
    /// Building the reference module, preparing its inputs, the counted forward.
    #[serde(flatten)]
    pub run: modelmeter_reference::RunTimings,
    /// Comparing the two sides row by row.
    pub compare_s: f64,
}

/// Layer counts per status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub pass: usize,
    pub known_gap: usize,
    pub fail: usize,
    pub error: usize,
}

/// Counts statuses, as [`Summary::of`] counts layers' and the whole-model run its
/// calls' and phases'.
impl FromIterator<Status> for Summary {
    fn from_iter<I: IntoIterator<Item = Status>>(statuses: I) -> Summary {
        let mut s = Summary::default();
        for status in statuses {
            s.add(status);
        }
        s
    }
}

impl Summary {
    /// Counts the statuses of `layers`.
    pub fn of(layers: &[LayerResult]) -> Summary {
        layers.iter().map(|l| l.status).collect()
    }

    fn add(&mut self, status: Status) {
        match status {
            // A layer is never only informational rows (see `Status::Info`).
            Status::Info | Status::Pass => self.pass += 1,
            Status::KnownGap => self.known_gap += 1,
            Status::Fail => self.fail += 1,
            Status::Error => self.error += 1,
        }
    }

    /// Adds another summary.
    pub fn merge(&mut self, other: &Summary) {
        self.pass += other.pass;
        self.known_gap += other.known_gap;
        self.fail += other.fail;
        self.error += other.error;
    }

    /// True when nothing failed or errored.
    pub fn ok(&self) -> bool {
        self.fail == 0 && self.error == 0
    }

    /// `7 layers: 6 pass, 1 known_gap, 0 fail, 0 error` (`one` instead of `many` for a
    /// total of 1: `1 layer: …`).
    pub fn line(&self, one: &str, many: &str) -> String {
        let total = self.pass + self.known_gap + self.fail + self.error;
        let what = if total == 1 { one } else { many };
        format!(
            "{total} {what}: {} pass, {} known_gap, {} fail, {} error",
            self.pass, self.known_gap, self.fail, self.error
        )
    }
}

/// Progress events for a front end (printing is not this module's job).
pub enum Progress<'a> {
    Started {
        index: usize,
        total: usize,
        name: &'a str,
    },
    Finished {
        index: usize,
        total: usize,
        result: &'a LayerResult,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layers' statuses, each counted once where it belongs: a summary of zeros
    /// would read as a run where nothing failed.
    #[test]
    fn a_summary_counts_each_layers_status() {
        let layers: Vec<LayerResult> = [
            Status::Pass,
            Status::Info,
            Status::KnownGap,
            Status::Fail,
            Status::Error,
            Status::Error,
        ]
        .into_iter()
        .enumerate()
        .map(|(i, status)| LayerResult::new(format!("layer {i}"), status))
        .collect();
        let s = Summary::of(&layers);
        assert_eq!(
            s,
            Summary {
                pass: 2,
                known_gap: 1,
                fail: 1,
                error: 2
            }
        );
        assert!(!s.ok());
        assert_eq!(
            s.line("layer", "layers"),
            "6 layers: 2 pass, 1 known_gap, 1 fail, 2 error"
        );
        let passing = Summary::of(&layers[..3]);
        assert!(passing.ok() && passing.pass == 2 && passing.known_gap == 1);
        // Summaries of several runs (a sweep's configurations) add field by field.
        let mut total = passing;
        total.merge(&s);
        assert_eq!(
            total,
            Summary {
                pass: 4,
                known_gap: 2,
                fail: 1,
                error: 2
            }
        );
        assert!(!total.ok());
    }

    #[test]
    fn summary_counts_and_line() {
        let mut s = Summary::default();
        s.add(Status::Pass);
        s.add(Status::KnownGap);
        s.add(Status::Fail);
        assert!(!s.ok());
        assert_eq!(
            s.line("layer", "layers"),
            "3 layers: 1 pass, 1 known_gap, 1 fail, 0 error"
        );
        let mut one = Summary::default();
        one.add(Status::Pass);
        assert_eq!(
            one.line("layer", "layers"),
            "1 layer: 1 pass, 0 known_gap, 0 fail, 0 error"
        );
        // Merging (a sweep's cases, a model's phases) adds every count; an error alone
        // is not ok.
        let mut all = s;
        all.merge(&one);
        all.merge(&s);
        assert_eq!(
            all.line("case", "cases"),
            "7 cases: 3 pass, 2 known_gap, 2 fail, 0 error"
        );
        let mut errored = Summary::default();
        errored.add(Status::Error);
        assert!(!errored.ok());
        let mut gap = Summary::default();
        gap.add(Status::KnownGap);
        assert!(gap.ok(), "a known gap is no failure");
    }
}
