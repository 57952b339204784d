//! Reports of a whole-model run (`--model`): a compact table (per group of parts and per
//! phase, with totals; a decode step's lines only with `--verbose` or when it is not
//! exact), `modelmeter.verify-model/1` JSON and JUnit (one case per phase × metric, plus
//! the failing rows of each call that is not exact).

use modelmeter::layers::{attention_class_name, attention_core, AttentionImpl};
use modelmeter::{units, ModelConfig, Workload};
use serde_json::{json, Value};

use super::junit::Suite;
use crate::check::{Check, EXACT};
use crate::compare::{known_gaps_json, MetricRow, Status};
use crate::environment::Environment;
use crate::model::{is_exact, is_inexact, Call, CallResult, ModelResult};
use crate::results::LayerResult;

/// Schema tag of a whole-model report.
pub const MODEL_SCHEMA: &str = "modelmeter.verify-model/1";

/// Everything a whole-model report shows.
#[derive(Clone, Debug)]
pub struct ModelReport {
    pub environment: Environment,
    pub tolerance: f64,
    pub config: ModelConfig,
    /// The prefill.
    pub workload: Workload,
    pub attention: AttentionImpl,
    pub result: ModelResult,
}

impl ModelReport {
    /// True when nothing failed or errored.
    pub fn ok(&self) -> bool {
        self.result.summary.ok()
    }
}

/// `6/6`: the exact rows that are exact.
fn exact_count(rows: &[MetricRow]) -> String {
    let exact = rows
        .iter()
        .filter(|r| matches!(r.metric, Check::Exact(_)) && r.analytic == r.measured)
        .count();
    format!("{exact}/{}", EXACT.len())
}

fn measured(rows: &[MetricRow], metric: modelmeter::Metric) -> String {
    rows.iter()
        .find(|r| r.metric == Check::Exact(metric))
        .map_or("-".into(), |r| r.metric.show(r.measured))
}

fn flops_status(rows: &[MetricRow]) -> String {
    rows.iter()
        .find(|r| r.metric == Check::Flops)
        .map_or("-".into(), |r| r.status.as_str().into())
}

/// One compact row: measured values of the main metrics, exact rows, the flops row's
/// status and the status.
fn compact(phase: String, part: String, rows: &[MetricRow], status: Status) -> Vec<String> {
    use modelmeter::Metric::*;
    vec![
        phase,
        part,
        measured(rows, MatmulFlops),
        measured(rows, ElementwiseFlops),
        measured(rows, WeightBytes),
        measured(rows, KvCacheBytes),
        exact_count(rows),
        flops_status(rows),
        status.as_str().into(),
    ]
}

/// Rows in the layer table's form (metric, analytic, measured, rel diff, status).
fn detail(
    name: &str,
    rows: &[MetricRow],
    only_failing: bool,
    out: &mut Vec<Vec<String>>,
    notes: &mut Vec<String>,
) {
    let mut first = true;
    for m in rows {
        if only_failing && !notable(m) {
            continue;
        }
        out.push(vec![
            if first {
                name.to_string()
            } else {
                String::new()
            },
            m.metric.name().into(),
            m.metric.show(m.analytic),
            m.measured_text(),
            m.rel_text(),
            m.status.as_str().into(),
        ]);
        first = false;
        if let Some(note) = &m.note {
            if notable(m) || !only_failing {
                notes.push(format!("{name} {}: {note}", m.metric));
            }
        }
    }
}

fn phase_label(phase: &str, report: &ModelReport) -> String {
    let r = &report.result;
    match phase {
        "prefill" => format!("prefill S={}", report.workload.query_len()),
        "decode" => format!("decode x{}", r.plan.new_tokens),
        _ => "total".into(),
    }
}

fn call_line(c: &CallResult) -> String {
    match &c.error {
        Some(cause) => super::error_note(&c.call.describe(), cause),
        None => format!(
            "{} (C={}, {} keys): {} exact, flops {}, {} ({:.2} s)",
            c.call.describe(),
            c.context_len,
            c.key_len,
            exact_count(&c.metrics),
            flops_status(&c.metrics),
            c.status.as_str(),
            c.seconds
        ),
    }
}

/// The parts of `c` that are not ok or not exact.
fn failing_parts(c: &CallResult) -> impl Iterator<Item = &LayerResult> {
    c.layers
        .iter()
        .filter(|l| !l.status.is_ok() || !is_exact(&l.metrics))
}

/// A row worth showing in detail: not ok, or an exact row (or the peak) that is not
/// exact.
fn notable(m: &MetricRow) -> bool {
    !m.status.is_ok() || is_inexact(m)
}

/// The human report.
pub fn model_table(report: &ModelReport) -> String {
    let env = &report.environment;
    let r = &report.result;
    let mut out = format!(
        "device: {} ({}), libtorch {}, tolerance {}, seed {}\n",
        env.device,
        env.device_name,
        env.libtorch_version,
        units::percent(report.tolerance),
        env.seed
    );
    let dense = r
        .layer_kinds
        .iter()
        .filter(|k| **k == modelmeter::MlpKind::Dense)
        .count();
    out.push_str(&format!(
        "model: {}, layers 0-{} of {} ({dense} dense, {} MoE), {}, then {} greedy decode steps, attention: {}\n\n",
        modelmeter::cli::one_line(&report.config.name),
        r.plan.num_layers.saturating_sub(1),
        r.plan.config_layers,
        r.layer_kinds.len() - dense,
        report.workload.describe(),
        r.plan.new_tokens,
        attention_class_name(&report.config, report.workload.mla, report.attention)
    ));
    if let Some(cause) = &r.error {
        out.push_str(&format!("error: {cause}\n\n{}\n", r.summary_line()));
        return out;
    }
    // The compact table: per phase, each group of parts and the whole stack.
    let mut rows = vec![[
        "phase",
        "part",
        "matmul",
        "elementwise",
        "weights",
        "kv cache",
        "exact",
        "flops",
        "status",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect::<Vec<_>>()];
    let mut notes = Vec::new();
    for p in &r.phases {
        let label = phase_label(p.phase, report);
        if let Some(cause) = &p.error {
            rows.push(vec![
                label.clone(),
                "stack".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                Status::Error.as_str().into(),
            ]);
            notes.push(super::error_note(&label, cause));
            continue;
        }
        for (i, g) in p.groups.iter().enumerate() {
            let phase = if i == 0 { label.clone() } else { String::new() };
            rows.push(compact(phase, g.name.clone(), &g.metrics, g.status));
        }
        rows.push(compact(String::new(), "stack".into(), &p.metrics, p.status));
    }
    out.push_str(&units::table(
        &rows,
        &[false, false, true, true, true, true, true, false, false],
    ));
    out.push_str(
        "(measured values; exact: exact rows whose analytic and measured values are equal)\n",
    );

    // The totals in full: the analytic generation's closed form against the measured sum.
    let mut detail_rows = vec![[
        "check", "metric", "analytic", "measured", "rel diff", "status",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect::<Vec<_>>()];
    for p in &r.phases {
        let show_all = p.phase == "total";
        if p.error.is_none() && (show_all || !p.status.is_ok() || !is_exact(&p.metrics)) {
            let name = format!("{} (closed form vs Σ calls)", p.phase);
            detail(&name, &p.metrics, !show_all, &mut detail_rows, &mut notes);
            for g in p
                .groups
                .iter()
                .filter(|g| !g.status.is_ok() || !is_exact(&g.metrics))
            {
                detail(
                    &format!("{} {}", p.phase, g.name),
                    &g.metrics,
                    true,
                    &mut detail_rows,
                    &mut notes,
                );
            }
        }
    }
    // Calls: every decode step with --verbose, else only those that are not exact; the
    // failing rows of their parts.
    let mut lines = Vec::new();
    for c in &r.calls {
        let settled = c.status.is_ok() && c.exact();
        if r.plan.verbose || c.call == Call::Prefill || !settled {
            lines.push(call_line(c));
        }
        if settled || c.error.is_some() {
            continue;
        }
        let prefix = c.call.describe();
        detail(
            &format!("{prefix} stack"),
            &c.metrics,
            true,
            &mut detail_rows,
            &mut notes,
        );
        for l in failing_parts(c) {
            let name = format!("{prefix} {}", l.name);
            match &l.error {
                Some(cause) => notes.push(super::error_note(&name, cause)),
                None => detail(&name, &l.metrics, true, &mut detail_rows, &mut notes),
            }
        }
    }
    out.push('\n');
    out.push_str(&units::table(
        &detail_rows,
        &[false, false, true, true, true, false],
    ));
    if !lines.is_empty() {
        out.push_str("\ncalls:\n");
        for l in lines {
            out.push_str(&format!("  {l}\n"));
        }
    }
    if !notes.is_empty() {
        out.push_str("\nnotes:\n");
        for n in notes {
            out.push_str(&format!("  {n}\n"));
        }
    }
    out.push('\n');
    out.push_str(&r.summary_line());
    out.push('\n');
    out
}

/// The report as one JSON object (`modelmeter.verify-model/1`).
pub fn model_json(report: &ModelReport) -> Value {
    let known_gaps = known_gaps_json();
    let mut v = json!({
        "schema": MODEL_SCHEMA,
        "environment": report.environment,
        "config": report.config,
        "workload": report.workload,
        "attention": attention_core(&report.config, report.workload.mla, report.attention),
        "tolerance": report.tolerance,
        "conventions": modelmeter::conventions::conventions_json(),
        "known_gaps": known_gaps,
        "model": report.result,
        "summary": report.result.summary,
    });
    if report.environment.include_host_details {
        v["host"] = report.environment.host_details();
    }
    v
}

/// The report as JUnit XML: one test case per phase × metric (and per group of parts),
/// plus one per failing row of each call that is not exact.
pub fn model_junit(report: &ModelReport) -> String {
    let mut suite = Suite::default();
    let tolerance = report.tolerance;
    let r = &report.result;
    for p in &r.phases {
        let class = format!("model/{}", p.phase);
        if let Some(cause) = &p.error {
            for metric in crate::check::reported() {
                suite.case(&class, metric.name(), Status::Error, false, cause, "");
            }
            continue;
        }
        for m in &p.metrics {
            suite.row(&class, m, tolerance);
        }
        for g in &p.groups {
            let class = format!("model/{}/{}", p.phase, g.name);
            for m in &g.metrics {
                suite.row(&class, m, tolerance);
            }
        }
    }
    for c in r.calls.iter().filter(|c| !c.status.is_ok() || !c.exact()) {
        let class = format!("model/{}", c.call.label());
        if let Some(cause) = &c.error {
            suite.case(&class, "run", Status::Error, false, cause, "");
            continue;
        }
        for m in c.metrics.iter().filter(|m| notable(m)) {
            suite.row(&format!("{class}/stack"), m, tolerance);
        }
        for l in failing_parts(c) {
            let class = format!("{class}/{}", l.name);
            if let Some(cause) = &l.error {
                suite.case(&class, "run", Status::Error, false, cause, "");
                continue;
            }
            for m in l.metrics.iter().filter(|m| notable(m)) {
                suite.row(&class, m, tolerance);
            }
        }
    }
    suite.document("verify-decoder --model")
}
