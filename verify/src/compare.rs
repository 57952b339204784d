//! Verification semantics: per metric a status from analytic A and measured M.
//!
//! rel_diff = |A − M| / |M| (0 when both are 0). `pass` when rel_diff ≤ tolerance (an
//! exact row only when A = M); `fail` when above, or when M = 0 < A; `error` when the
//! layer could not run. A layer's status is its worst metric.
//!
//! `known_gap` has two sources, both blind spots of FlopCounterMode, each listed in the
//! reports' `known_gaps` ([`known_gaps_json`]). The `flops` row ([`compare_flops`])
//! compares with FlopCounterMode's total, which is blind to elementwise work (and to
//! attention kernels outside its registry). Beyond the tolerance it is `known_gap` only
//! when the difference is exactly the analytic work the counter cannot see and the matmul
//! rows are exact; any other difference is a `fail`. RMSNorm, measured 0, is the case
//! where that blind work is all of the layer: the same rule, not a name on a list (no row
//! passes by its layer's name). With `--oracle`, the `oracle_flops` row is `known_gap` when
//! torch's count and ours agree op for op but the run had matmul work outside the
//! registry (the CPU SDPA kernel), which neither count witnesses ([`ORACLE_BLIND_SPOT`]).

use serde::Serialize;

use crate::check::Check;

/// The status of a metric or a layer, ordered from best to worst.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// A row shown for information only (hardware figures that no model claims, such as
    /// DRAM bytes beside the unfused op bytes): it never makes a layer fail. A layer's
    /// status is never `info`, since every layer that ran has checked rows.
    Info,
    Pass,
    KnownGap,
    Fail,
    Error,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Info => "info",
            Status::Pass => "pass",
            Status::KnownGap => "known_gap",
            Status::Fail => "fail",
            Status::Error => "error",
        }
    }

    /// True for the statuses CI treats as success.
    pub fn is_ok(self) -> bool {
        matches!(self, Status::Info | Status::Pass | Status::KnownGap)
    }
}

/// Why a `flops` row may be a known gap, for the JSON report's list.
pub const FLOPS_BLIND_SPOT: &str = "FlopCounterMode counts matmuls only, not elementwise work (nor attention kernels outside its registry, such as the CPU SDPA kernel): a flops row beyond the tolerance is known_gap when its difference is exactly the analytic elementwise FLOPs outside such kernels and the matmul rows are exact; any other difference fails";

/// Why an `oracle_flops` row may be a known gap, for the JSON report's list.
pub const ORACLE_BLIND_SPOT: &str = "torch's FlopCounterMode on the transformers module, like this project's compatible count, counts no matmul work outside its registry (the CPU SDPA kernel): an oracle_flops row whose totals and per-op counts agree is known_gap when the run had such work, which neither count witnesses (the row's note names it); any disagreement fails";

/// The reports' `known_gaps` list: the rules under which a row may be `known_gap`, for
/// every layer (`"layer": "*"`): the `flops` row's and, with `--oracle`, the
/// `oracle_flops` row's.
pub fn known_gaps_json() -> serde_json::Value {
    serde_json::json!([
        {"layer": "*", "metric": "flops", "reason": FLOPS_BLIND_SPOT},
        {"layer": "*", "metric": "oracle_flops", "reason": ORACLE_BLIND_SPOT},
    ])
}

/// What the FlopCounterMode-compatible counter cannot see in one layer run, from the
/// analytic model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CounterBlindSpot {
    /// Analytic elementwise FLOPs outside the attention cores below (FlopCounterMode
    /// counts no elementwise op).
    pub elementwise_flops: u64,
    /// Analytic FLOPs of attention cores that ran in kernels outside FlopCounterMode's
    /// registry (the CPU SDPA kernel); 0 when there were none.
    pub attention_core_flops: u64,
    /// Those kernels.
    pub kernels: Vec<String>,
}

/// The `flops` row: the analytic total less the attention cores the counter cannot see,
/// against the FlopCounterMode-compatible total `measured`. `pass` within `tolerance`;
/// beyond it `known_gap` when analytic − measured is exactly `blind.elementwise_flops`
/// and `matmul_exact` (the matmul row's analytic and measured values are equal), with
/// a note that says so; any other difference is a `fail`.
pub fn compare_flops(
    analytic_total: u64,
    measured: u64,
    blind: &CounterBlindSpot,
    matmul_exact: bool,
    tolerance: f64,
) -> MetricRow {
    let analytic = analytic_total.saturating_sub(blind.attention_core_flops);
    let mut row = compare(Check::Flops, analytic, measured, tolerance);
    let core_note = (!blind.kernels.is_empty()).then(|| {
        format!(
            "analytic total less the attention core FlopCounterMode cannot see ({})",
            blind.kernels.join(", ")
        )
    });
    let outside = if blind.kernels.is_empty() {
        ""
    } else {
        " outside that core"
    };
    let difference = analytic.checked_sub(measured);
    let explained = matmul_exact && difference == Some(blind.elementwise_flops);
    // What a difference that is not the blind work is, in words.
    let unexplained = || {
        let difference =
            difference.map_or_else(|| format!("−{}", measured - analytic), |d| d.to_string());
        let matmul = if matmul_exact {
            ""
        } else {
            " (and the matmul rows are not exact)"
        };
        format!(
            "the difference, {difference} FLOP, is not the {} elementwise FLOP{outside} that FlopCounterMode cannot see{matmul}",
            blind.elementwise_flops
        )
    };
    let why = if row.status == Status::Pass {
        // Within the tolerance: a pass, but a difference other than the blind work is
        // said, not hidden (both sides follow one table, so it should never happen).
        (!explained).then(|| format!("within the tolerance, but {}", unexplained()))
    } else if explained {
        row.status = Status::KnownGap;
        let all = if measured == 0 {
            ": the layer is only elementwise work"
        } else {
            ""
        };
        Some(format!(
            "the difference, {} FLOP, is exactly the analytic elementwise FLOPs{outside}, which FlopCounterMode does not count{all}; the matmul rows are exact",
            blind.elementwise_flops
        ))
    } else {
        row.status = Status::Fail;
        Some(unexplained())
    };
    let note = match (core_note, why) {
        (Some(core), Some(why)) => Some(format!("{core}; {why}")),
        (core, why) => core.or(why),
    };
    row.note = note;
    row
}

/// One compared metric.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MetricRow {
    pub metric: Check,
    pub analytic: u64,
    pub measured: u64,
    /// `None` when M = 0 < A (infinite).
    pub rel_diff: Option<f64>,
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Nothing was measured: a hardware counter ncu did not report. `measured` is then 0
    /// by necessity and means nothing; tables show `unavailable`, JSON says
    /// `"unavailable": true` (the key is absent otherwise).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unavailable: bool,
}

impl MetricRow {
    /// Adds `text` to the row's note, after what it already says (compare()'s "not
    /// exact: …" for a row within the tolerance but unequal), never in its place.
    pub fn add_note(&mut self, text: &str) {
        self.note = Some(match self.note.take() {
            Some(n) => format!("{n}; {text}"),
            None => text.to_string(),
        });
    }

    /// The row's figures for a JUnit message: `analytic A measured M rel_diff R; judged: J`
    /// (`measured unavailable rel_diff —` where nothing was measured; `inf` where
    /// M = 0 < A; `—` for a row that is not a ratio or errored), J saying how the row is
    /// judged ([`Check::judged_by`]: the tolerance only for the approximate rows).
    pub fn junit_detail(&self, tolerance: f64) -> String {
        let (measured, rel) = if self.unavailable {
            ("unavailable".to_string(), "—".to_string())
        } else if !self.metric.is_ratio() || self.status == Status::Error {
            (self.measured.to_string(), "—".to_string())
        } else {
            (
                self.measured.to_string(),
                self.rel_diff.map_or("inf".to_string(), |r| r.to_string()),
            )
        };
        format!(
            "analytic {} measured {measured} rel_diff {rel}; judged: {}",
            self.analytic,
            self.metric.judged_by(tolerance)
        )
    }

    /// The measured value as the tables print it: in the metric's unit, or `unavailable`.
    pub fn measured_text(&self) -> String {
        if self.unavailable {
            "unavailable".into()
        } else {
            self.metric.show(self.measured)
        }
    }

    /// The relative difference as the tables print it (`0.12%`, `inf`; `—` for a row
    /// that could not be measured).
    pub fn rel_text(&self) -> String {
        if self.status == Status::Error || self.unavailable || !self.metric.is_ratio() {
            return "—".into();
        }
        // The oracle's output row holds ‖out − ref‖/‖ref‖, judged against its own bound
        // (in its note), not the tolerance: a plain number, not a percentage.
        if self.metric == crate::check::Check::OracleOutput {
            return self.rel_diff.map_or("—".into(), |r| format!("{r:.2e}"));
        }
        self.rel_diff
            .map_or("inf".into(), modelmeter::units::percent)
    }
}

/// |A − M| / |M|, 0 when both are 0, `None` when only M is 0.
pub fn rel_diff(analytic: u64, measured: u64) -> Option<f64> {
    if analytic == measured {
        Some(0.0)
    } else if measured == 0 {
        None
    } else {
        Some(analytic.abs_diff(measured) as f64 / measured as f64)
    }
}

/// Compares one metric. Measured 0 where the analytic model expects work fails here;
/// only [`compare_flops`] may call that a known gap, and only for exactly the work the
/// counter cannot see.
pub fn compare(metric: Check, analytic: u64, measured: u64, tolerance: f64) -> MetricRow {
    let rel = rel_diff(analytic, measured);
    let (status, note) = match rel {
        // Both sides of an exact metric follow the same conventions: any difference is a
        // wrong rule on one side, whatever its size. The tolerance is for the rows that are
        // approximate by nature (flops, the peak): a 4 % matmul error would pass at 0.05.
        Some(_) if analytic != measured && matches!(metric, Check::Exact(_)) => (
            Status::Fail,
            Some(format!(
                "not exact: analytic − measured = {}; this metric follows the same conventions on both sides and must agree to the unit (--accept-rel-diff applies to flops and peak_activation_bytes only)",
                signed_difference(analytic, measured)
            )),
        ),
        Some(r) if r <= tolerance => (Status::Pass, None),
        Some(_) => (Status::Fail, None),
        None => (
            Status::Fail,
            Some("measured 0 where the analytic model expects work".into()),
        ),
    };
    MetricRow {
        metric,
        analytic,
        measured,
        rel_diff: rel,
        status,
        note,
        unavailable: false,
    }
}

/// `a − m` with its sign, exact for any two counts (`+12`, `−3`).
fn signed_difference(a: u64, m: u64) -> String {
    if a >= m {
        format!("+{}", a - m)
    } else {
        format!("−{}", m - a)
    }
}

/// The worst status of `rows` (pass when empty or only `info`).
pub fn worst(rows: &[MetricRow]) -> Status {
    rows.iter()
        .map(|r| r.status)
        .max()
        .unwrap_or(Status::Pass)
        .max(Status::Pass)
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelmeter::Metric;

    const FLOPS: Check = Check::Flops;
    const ELEMENTWISE: Check = Check::Exact(Metric::ElementwiseFlops);

    /// What CI treats as success: a pass, a known gap, an information row; never a
    /// failure or an error.
    #[test]
    fn only_pass_known_gap_and_info_are_ok() {
        let ok: Vec<Status> = [
            Status::Info,
            Status::Pass,
            Status::KnownGap,
            Status::Fail,
            Status::Error,
        ]
        .into_iter()
        .filter(|s| s.is_ok())
        .collect();
        assert_eq!(ok, [Status::Info, Status::Pass, Status::KnownGap]);
    }

    /// The tables' rel_diff column: a percentage, `inf` where only M is 0, `—` for an
    /// errored or unmeasured row or one that is no ratio, and the oracle's output error as
    /// a plain number.
    #[test]
    fn rel_text_shows_each_kind_of_row() {
        let row =
            |metric: Check, analytic: u64, measured: u64| compare(metric, analytic, measured, 0.1);
        assert_eq!(
            row(FLOPS, 105, 100).rel_text(),
            modelmeter::units::percent(0.05)
        );
        assert_eq!(row(FLOPS, 5, 0).rel_text(), "inf");
        let mut errored = row(FLOPS, 105, 100);
        errored.status = Status::Error;
        assert_eq!(errored.rel_text(), "—");
        let mut unmeasured = row(FLOPS, 105, 100);
        unmeasured.unavailable = true;
        assert_eq!(unmeasured.rel_text(), "—");
        assert_eq!(row(Check::UncountedOps, 0, 3).rel_text(), "—");
        let mut oracle = row(Check::OracleOutput, 0, 0);
        oracle.rel_diff = Some(0.00123);
        assert_eq!(oracle.rel_text(), "1.23e-3");
        oracle.rel_diff = None;
        assert_eq!(oracle.rel_text(), "—");
    }

    #[test]
    fn the_known_gaps_list_names_each_row_that_can_be_a_known_gap() {
        // The two rows whose code may set `Status::KnownGap`: compare_flops here and
        // oracle::rows (each tested where it is written). A report must list both rules.
        let list = known_gaps_json();
        let metrics: Vec<&str> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["metric"].as_str().unwrap())
            .collect();
        assert_eq!(
            metrics,
            [Check::Flops.name(), Check::OracleFlops.name()],
            "{list}"
        );
        assert!(list
            .as_array()
            .unwrap()
            .iter()
            .all(|g| g["layer"] == "*" && !g["reason"].as_str().unwrap().is_empty()));
    }

    #[test]
    fn junit_details_say_how_each_row_is_judged() {
        let exact = compare(ELEMENTWISE, 10, 10, 0.05);
        assert_eq!(
            exact.junit_detail(0.05),
            "analytic 10 measured 10 rel_diff 0; judged: exact"
        );
        let flops = compare(FLOPS, 106, 100, 0.05);
        assert!(
            flops
                .junit_detail(0.05)
                .ends_with("rel_diff 0.06; judged: tolerance 0.05"),
            "{}",
            flops.junit_detail(0.05)
        );
        // Completeness rows count different things on each side: no ratio, anywhere.
        let uncounted = MetricRow {
            metric: Check::UncountedOps,
            analytic: 0,
            measured: 3,
            rel_diff: None,
            status: Status::Fail,
            note: None,
            unavailable: false,
        };
        assert_eq!(uncounted.rel_text(), "—");
        assert_eq!(
            uncounted.junit_detail(0.05),
            "analytic 0 measured 3 rel_diff —; judged: any is a failure"
        );
        let output = MetricRow {
            metric: Check::OracleOutput,
            ..uncounted
        };
        assert!(output
            .junit_detail(0.05)
            .ends_with("judged: its own bound, in the note"));
    }

    #[test]
    fn rel_diff_edge_cases() {
        use approx::assert_relative_eq;
        assert_eq!(rel_diff(0, 0), Some(0.0));
        assert_eq!(rel_diff(5, 0), None, "measured 0 < analytic: infinite");
        assert_relative_eq!(rel_diff(106, 100).unwrap(), 0.06, max_relative = 1e-12);
        assert_relative_eq!(rel_diff(94, 100).unwrap(), 0.06, max_relative = 1e-12);
        assert_relative_eq!(rel_diff(0, 100).unwrap(), 1.0);
        // Far apart and huge: still finite, no overflow in |A − M|.
        assert_relative_eq!(rel_diff(u64::MAX, 1).unwrap(), u64::MAX as f64 - 1.0);
    }

    #[test]
    fn statuses_follow_the_design() {
        assert_eq!(compare(FLOPS, 100, 100, 0.0).status, Status::Pass);
        assert_eq!(compare(FLOPS, 0, 0, 0.0).rel_diff, Some(0.0));
        assert_eq!(compare(FLOPS, 104, 100, 0.05).status, Status::Pass);
        // An exact row fails on any difference, however small against the tolerance, and
        // says by how much; the tolerance is for the approximate rows.
        let close = compare(ELEMENTWISE, 97, 100, 0.05);
        assert_eq!(close.status, Status::Fail);
        assert!(close
            .note
            .unwrap()
            .starts_with("not exact: analytic − measured = −3"));
        let one = compare(ELEMENTWISE, 1_000_001, 1_000_000, 0.5);
        assert_eq!(one.status, Status::Fail);
        assert!(one.note.unwrap().contains("+1"));
        assert_eq!(compare(ELEMENTWISE, 100, 100, 0.05).status, Status::Pass);
        assert_eq!(compare(ELEMENTWISE, 100, 100, 0.05).note, None);
        let peak = compare(Check::PeakActivationBytes, 103, 100, 0.05);
        assert_eq!(
            peak.status,
            Status::Pass,
            "the peak is approximate by nature"
        );
        assert_eq!(compare(FLOPS, 106, 100, 0.05).status, Status::Fail);
        assert_eq!(compare(FLOPS, 94, 100, 0.05).status, Status::Fail);
        // Measured 0 where work is expected fails, whatever the metric: no row is a known
        // gap by its layer's name (compare_flops alone decides the counter's blind spot).
        for metric in [FLOPS, ELEMENTWISE] {
            let zero = compare(metric, 10, 0, 0.05);
            assert_eq!((zero.status, zero.rel_diff), (Status::Fail, None));
            assert!(zero.note.unwrap().starts_with("measured 0 where"));
        }
        assert_eq!(compare(FLOPS, 0, 0, 0.0).status, Status::Pass);
    }

    fn blind(elementwise_flops: u64) -> CounterBlindSpot {
        CounterBlindSpot {
            elementwise_flops,
            ..CounterBlindSpot::default()
        }
    }

    #[test]
    fn a_flops_difference_of_exactly_the_blind_work_is_a_known_gap() {
        // Within the tolerance: pass; a difference that is the blind work goes unremarked,
        // any other is said in the note.
        let row = compare_flops(1050, 1000, &blind(50), true, 0.05);
        assert_eq!((row.status, row.note), (Status::Pass, None));
        for (total, matmul_exact) in [(1049, true), (1050, false)] {
            let row = compare_flops(total, 1000, &blind(50), matmul_exact, 0.05);
            assert_eq!(row.status, Status::Pass);
            let note = row.note.unwrap();
            assert!(
                note.starts_with("within the tolerance, but the difference")
                    && note.contains("is not the 50 elementwise FLOP"),
                "{note}"
            );
        }
        // Beyond it: known_gap only for exactly the elementwise work, matmul exact.
        let row = compare_flops(1060, 1000, &blind(60), true, 0.05);
        assert_eq!(row.status, Status::KnownGap);
        assert!(row
            .note
            .unwrap()
            .contains("exactly the analytic elementwise FLOPs"));
        for (total, elementwise, matmul_exact) in [
            (1061, 60, true),
            (1059, 60, true),
            (1060, 60, false),
            (900, 60, true),
        ] {
            let row = compare_flops(total, 1000, &blind(elementwise), matmul_exact, 0.05);
            assert_eq!(
                row.status,
                Status::Fail,
                "{total} {elementwise} {matmul_exact}"
            );
            assert!(row.note.unwrap().contains("is not the 60 elementwise FLOP"));
        }
    }

    #[test]
    fn rmsnorm_is_the_all_elementwise_case_of_the_same_rule() {
        let row = compare_flops(4128, 0, &blind(4128), true, 0.05);
        assert_eq!((row.status, row.rel_diff), (Status::KnownGap, None));
        assert!(row.note.unwrap().contains("only elementwise work"));
        // A different amount fails: measured 0 is no pass by itself.
        let row = compare_flops(4129, 0, &blind(4128), true, 0.05);
        assert_eq!(row.status, Status::Fail);
    }

    #[test]
    fn an_invisible_attention_core_is_left_out_of_both_sides() {
        let spot = CounterBlindSpot {
            elementwise_flops: 100,
            attention_core_flops: 500,
            kernels: vec!["aten::_scaled_dot_product_flash_attention_for_cpu".into()],
        };
        let row = compare_flops(1600, 1000, &spot, true, 0.05);
        assert_eq!((row.analytic, row.status), (1100, Status::KnownGap));
        let note = row.note.unwrap();
        assert!(
            note.contains("attention core") && note.contains("outside that core"),
            "{note}"
        );
        let row = compare_flops(1510, 1000, &spot, true, 0.05);
        assert_eq!((row.status, row.analytic), (Status::Pass, 1010));
    }

    #[test]
    fn a_layer_is_its_worst_metric() {
        let rows = [
            compare(ELEMENTWISE, 1, 1, 0.0),
            compare_flops(1, 0, &blind(1), true, 0.0),
        ];
        assert_eq!(worst(&rows), Status::KnownGap);
        assert_eq!(worst(&[]), Status::Pass);
        let mut info = compare(ELEMENTWISE, 1, 2, 0.0);
        info.status = Status::Info;
        assert_eq!(
            worst(&[info.clone()]),
            Status::Pass,
            "info never decides a layer"
        );
        assert_eq!(worst(&[info, compare(FLOPS, 1, 2, 0.0)]), Status::Fail);
        assert!(Status::Error > Status::Fail && Status::Fail > Status::KnownGap);
    }
}
