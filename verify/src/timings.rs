//! `--timings`: where a `verify-decoder` run spent its wall time, phase by phase, for
//! people (a table on standard error) and for the benchmarks (a `timings` object in the
//! JSON report). Wall time is never asserted on in tests.
//!
//! Phases: before `main` (loading libtorch and running its static initializers, from the
//! process's start time in `/proc/self/stat`), setup and the freeing of each module after
//! its layer (options, device, plan; memory handed back), then per
//! layer the analytic cost, building the module (drawing its weights), preparing its
//! inputs (and a decode step's cache), the counted forward, and the comparison; the
//! reports last (only on standard error: the JSON is written before they end).

use std::sync::OnceLock;
use std::time::Instant;

use serde::Serialize;
use serde_json::{json, Value};

use crate::results::LayerTimings;

/// Linux's user-visible clock tick (`USER_HZ`), the unit of `/proc/*/stat` times: 100 on
/// every architecture the kernel supports for user space.
const USER_HZ: f64 = 100.0;

static MAIN: OnceLock<(Instant, Option<f64>)> = OnceLock::new();

/// Marks the start of `main`; call it first thing. Also reads how long the process ran
/// before it (libtorch's loading), when `/proc` says.
pub fn mark_main() {
    MAIN.get_or_init(|| (Instant::now(), seconds_before_main()));
}

fn main_mark() -> (Instant, Option<f64>) {
    *MAIN.get_or_init(|| (Instant::now(), None))
}

/// Seconds since `main` began (since the first call here, if [`mark_main`] was not
/// called).
pub fn since_main() -> f64 {
    main_mark().0.elapsed().as_secs_f64()
}

/// The process's age now, from `/proc/self/stat` (start time) and `/proc/uptime`.
fn seconds_before_main() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
    let now: f64 = uptime.split_whitespace().next()?.parse().ok()?;
    let started = start_ticks(&stat)? as f64 / USER_HZ;
    Some((now - started).max(0.0))
}

/// Field 22 (`starttime`, in clock ticks after boot) of a `/proc/PID/stat` line; the
/// command name (field 2) may hold spaces and parentheses, so fields count from its `)`.
fn start_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// The process's peak resident memory (`VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// One layer's phases.
#[derive(Clone, Debug, Serialize)]
pub struct LayerPhases {
    pub layer: String,
    /// A sweep's case (its `index` in the report's cases, from 0); the table numbers it
    /// from 1 as the sweep's lines do (`[3] DeepseekV2MLP`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub case: Option<usize>,
    #[serde(flatten)]
    pub timings: LayerTimings,
}

/// The run's phases up to the reports.
#[derive(Clone, Debug, Serialize)]
pub struct Phases {
    /// Before `main`: the dynamic loader and libtorch's static initializers.
    pub before_main_s: Option<f64>,
    /// The rest of `main` up to the end of the last layer: options, device and plan
    /// before the first layer, and between layers freeing the last module's memory.
    pub other_s: f64,
    pub layers: Vec<LayerPhases>,
    /// From `main` to the end of the last layer.
    pub main_to_layers_end_s: f64,
    pub peak_rss_bytes: Option<u64>,
}

impl Phases {
    /// The phases of a run whose layers took `layers`, read now (after the last layer).
    pub fn now(layers: Vec<LayerPhases>) -> Phases {
        let main_to_layers_end_s = since_main();
        let in_layers: f64 = layers.iter().map(|l| total(&l.timings)).sum();
        Phases {
            before_main_s: main_mark().1,
            other_s: (main_to_layers_end_s - in_layers).max(0.0),
            layers,
            main_to_layers_end_s,
            peak_rss_bytes: peak_rss_bytes(),
        }
    }

    /// The `timings` object of the JSON report.
    pub fn to_json(&self) -> Value {
        json!(self)
    }

    /// The table for standard error, with the reports' time (`reports_s`) and the total.
    pub fn table(&self, reports_s: f64) -> String {
        let mut out = String::from("timings (wall seconds):\n");
        let row = |out: &mut String, name: &str, t: &LayerTimings| {
            out.push_str(&format!(
                "  {name:<32} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.3}\n",
                t.analytic_s,
                t.run.build_s,
                t.run.prepare_s,
                t.run.forward_s,
                t.compare_s,
                total(t)
            ))
        };
        out.push_str(&format!(
            "  {:<32} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}\n",
            "layer", "analytic", "build", "prepare", "forward", "compare", "total"
        ));
        let mut sum = LayerTimings::default();
        for l in &self.layers {
            let name = match l.case {
                Some(i) => format!("[{}] {}", i + 1, l.layer),
                None => l.layer.clone(),
            };
            row(&mut out, &name, &l.timings);
            sum.analytic_s += l.timings.analytic_s;
            sum.run.build_s += l.timings.run.build_s;
            sum.run.prepare_s += l.timings.run.prepare_s;
            sum.run.forward_s += l.timings.run.forward_s;
            sum.compare_s += l.timings.compare_s;
        }
        row(&mut out, "all layers", &sum);
        let before = self.before_main_s.unwrap_or(0.0);
        let before_text = match self.before_main_s {
            Some(s) => format!("{s:.2}"),
            None => "unknown".into(),
        };
        out.push_str(&format!(
            "  before main (libtorch loading) {before_text} · setup and freeing {:.3} · layers {:.3} · reports {reports_s:.3} · total {:.2}",
            self.other_s,
            total(&sum),
            before + self.main_to_layers_end_s + reports_s
        ));
        if let Some(rss) = self.peak_rss_bytes {
            out.push_str(&format!(" · peak RSS {}", modelmeter::units::bytes(rss)));
        }
        out.push('\n');
        out
    }
}

fn total(t: &LayerTimings) -> f64 {
    t.analytic_s + t.run.build_s + t.run.prepare_s + t.run.forward_s + t.compare_s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_field_22_even_when_the_name_has_spaces() {
        let stat = "4242 (verify (x) y) R 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 987654 19";
        assert_eq!(start_ticks(stat), Some(987654));
        assert_eq!(start_ticks("garbage"), None);
    }

    #[test]
    fn this_process_has_an_age_and_a_peak() {
        assert!(seconds_before_main().is_some_and(|s| s >= 0.0));
        assert!(peak_rss_bytes().is_some_and(|b| b > 0));
    }

    #[test]
    fn the_table_sums_the_layers() {
        let t = LayerTimings {
            analytic_s: 0.5,
            compare_s: 0.5,
            ..Default::default()
        };
        let phases = Phases {
            before_main_s: Some(1.0),
            other_s: 0.0,
            layers: vec![
                LayerPhases {
                    layer: "A".into(),
                    case: None,
                    timings: t,
                },
                LayerPhases {
                    layer: "B".into(),
                    case: Some(2),
                    timings: t,
                },
            ],
            main_to_layers_end_s: 2.0,
            peak_rss_bytes: None,
        };
        let table = phases.table(1.0);
        assert!(table.contains("all layers"), "{table}");
        assert!(
            table.contains("\n  A   ") && table.contains("\n  [3] B   "),
            "{table}"
        );
        let json = phases.to_json();
        assert_eq!(json["layers"][0].get("case"), None);
        assert_eq!(json["layers"][1]["case"], 2);
        assert!(table.contains("layers 2.000"), "{table}");
        assert!(table.contains("total 4.00"), "{table}");
    }
}
