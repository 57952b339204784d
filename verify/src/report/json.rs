//! `modelmeter.verify/1` JSON (and `modelmeter.verify-sweep/1` for sweeps). Every count
//! is an exact integer; relative differences are numbers, or null when infinite (measured
//! 0 < analytic), when the row is not a ratio (`uncounted_ops`, `attention_kernel`), or
//! when it has no values (an `error` row, an unavailable measurement).

use modelmeter::layers::attention_core;
use serde_json::{json, Value};

use super::{Case, Report};
use crate::compare::known_gaps_json;

/// Schema tag of a single verification.
pub const SCHEMA: &str = "modelmeter.verify/1";
/// Schema tag of a sweep: a list of cases shaped like single verifications.
pub const SWEEP_SCHEMA: &str = "modelmeter.verify-sweep/1";

fn case_json(case: &Case) -> Value {
    let mut v = json!({
        "config": case.config,
        "workload": case.workload,
        "attention": attention_core(&case.config, case.workload.mla, case.attention),
        "layers": case.layers,
        "summary": case.summary,
    });
    if let Some(i) = case.index {
        v["index"] = json!(i);
    }
    if let Some(r) = &case.replay {
        v["replay"] = json!(r);
    }
    v
}

/// The report as one JSON object.
pub fn to_json(report: &Report) -> Value {
    let known_gaps = known_gaps_json();
    let mut v = json!({
        "schema": if report.sweep.is_some() { SWEEP_SCHEMA } else { SCHEMA },
        "environment": report.environment,
        "tolerance": report.tolerance,
        "conventions": modelmeter::conventions::conventions_json(),
        "known_gaps": known_gaps,
    });
    if report.environment.include_host_details {
        v["host"] = report.environment.host_details();
    }
    match report.sweep {
        None => {
            if let (Some(case), Value::Object(map)) = (report.cases.first(), &mut v) {
                if let Value::Object(c) = case_json(case) {
                    map.extend(c);
                }
            }
        }
        Some((seed, n)) => {
            v["sweep"] = json!({"seed": seed, "cases": n});
            v["cases"] = Value::Array(report.cases.iter().map(case_json).collect());
            v["summary"] = json!(report.summary());
        }
    }
    v
}
