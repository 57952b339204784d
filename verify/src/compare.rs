//! Verification semantics: per metric a status from analytic A and measured M.
//!
//! rel_diff = |A − M| / |M| (0 when both are 0). `pass` when rel_diff ≤ tolerance;
//! `fail` when above, or when M = 0 < A for anything not on the known-gap list;
//! `known_gap` when M = 0 where the instrumentation is known to be blind; `error` when
//! the layer could not run. A layer's status is its worst metric.

use serde::Serialize;

use crate::check::Check;

/// The status of a metric or a layer, ordered from best to worst.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pass,
    KnownGap,
    Fail,
    Error,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::KnownGap => "known_gap",
            Status::Fail => "fail",
            Status::Error => "error",
        }
    }

    /// True for the statuses CI treats as success.
    pub fn is_ok(self) -> bool {
        matches!(self, Status::Pass | Status::KnownGap)
    }
}

/// Where the measurement is known to be blind: (layer, metric, why).
pub const KNOWN_GAPS: &[(&str, &str, &str)] = &[(
    "DeepseekV2RMSNorm",
    "flops",
    "FlopCounterMode counts no elementwise work, and RMSNorm is only elementwise work",
)];

/// The reason `layer`'s `metric` is a known gap, if it is one.
pub fn known_gap(layer: &str, metric: &str) -> Option<&'static str> {
    KNOWN_GAPS
        .iter()
        .find(|(l, m, _)| *l == layer && *m == metric)
        .map(|(_, _, why)| *why)
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

/// Compares one metric of `layer`.
pub fn compare(
    layer: &str,
    metric: Check,
    analytic: u64,
    measured: u64,
    tolerance: f64,
) -> MetricRow {
    let rel = rel_diff(analytic, measured);
    let (status, note) = match rel {
        Some(r) if r <= tolerance => (Status::Pass, None),
        Some(_) => (Status::Fail, None),
        None => match known_gap(layer, metric.name()) {
            Some(why) => (Status::KnownGap, Some(format!("measured 0: {why}"))),
            None => (
                Status::Fail,
                Some("measured 0 where the analytic model expects work".into()),
            ),
        },
    };
    MetricRow {
        metric,
        analytic,
        measured,
        rel_diff: rel,
        status,
        note,
    }
}

/// The worst status of `rows` (pass when empty).
pub fn worst(rows: &[MetricRow]) -> Status {
    rows.iter().map(|r| r.status).max().unwrap_or(Status::Pass)
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelmeter::Metric;

    const FLOPS: Check = Check::Flops;
    const ELEMENTWISE: Check = Check::Exact(Metric::ElementwiseFlops);

    #[test]
    fn statuses_follow_the_design() {
        assert_eq!(compare("X", FLOPS, 100, 100, 0.0).status, Status::Pass);
        assert_eq!(compare("X", FLOPS, 0, 0, 0.0).rel_diff, Some(0.0));
        assert_eq!(compare("X", FLOPS, 104, 100, 0.05).status, Status::Pass);
        assert_eq!(compare("X", FLOPS, 106, 100, 0.05).status, Status::Fail);
        assert_eq!(compare("X", FLOPS, 94, 100, 0.05).status, Status::Fail);
        let gap = compare("DeepseekV2RMSNorm", FLOPS, 10, 0, 0.05);
        assert_eq!((gap.status, gap.rel_diff), (Status::KnownGap, None));
        assert!(gap.note.unwrap().contains("FlopCounterMode"));
        assert_eq!(
            compare("DeepseekV2RMSNorm", ELEMENTWISE, 10, 0, 0.05).status,
            Status::Fail
        );
        assert_eq!(
            compare("DeepseekV2MLP", FLOPS, 10, 0, 0.05).status,
            Status::Fail
        );
        assert_eq!(
            compare("DeepseekV2RMSNorm", FLOPS, 0, 0, 0.0).status,
            Status::Pass
        );
    }

    #[test]
    fn a_layer_is_its_worst_metric() {
        let rows = [
            compare("X", ELEMENTWISE, 1, 1, 0.0),
            compare("DeepseekV2RMSNorm", FLOPS, 1, 0, 0.0),
        ];
        assert_eq!(worst(&rows), Status::KnownGap);
        assert_eq!(worst(&[]), Status::Pass);
        assert!(Status::Error > Status::Fail && Status::Fail > Status::KnownGap);
    }
}
