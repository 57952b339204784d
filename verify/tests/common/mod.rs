//! What the `verify-decoder` integration tests share: running the binary, checking that
//! it never panics, refusals, temporary folders and JSON reports. Each test crate uses
//! its own subset of these.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The rows that must be exact to the FLOP or byte.
pub const EXACT: [&str; 8] = [
    "matmul_flops",
    "elementwise_flops",
    "tensor_core_flops",
    "cuda_core_flops",
    "io_bytes",
    "weight_bytes",
    "activation_bytes",
    "kv_cache_bytes",
];

/// The row of `metric` in a report's `layer` (its `metrics` array); a missing row fails
/// the test, naming the metric and the layer.
pub fn row<'a>(layer: &'a Value, metric: &str) -> &'a Value {
    layer["metrics"]
        .as_array()
        .unwrap_or_else(|| panic!("no metrics array in {}", layer["name"]))
        .iter()
        .find(|m| m["metric"] == metric)
        .unwrap_or_else(|| panic!("no {metric} row in {}", layer["name"]))
}

/// How many generated cases a campaign test runs: `var` when set (a whole number ≥ 1; any
/// other value fails the test rather than quietly running the default), else `default`.
pub fn cases_from_env(var: &str, default: usize) -> usize {
    match std::env::var(var) {
        Err(_) => default,
        Ok(text) => match text.trim().parse() {
            Ok(n) if n >= 1 => n,
            _ => panic!("{var} = {text:?} is invalid: expected a whole number ≥ 1"),
        },
    }
}

/// (op, matmul FLOPs, elementwise FLOPs) of an op: how the op-for-op tests compare an
/// analytic op list with the ops a reference module dispatched.
pub type OpFlops = (String, u64, u64);

/// The FLOP-bearing op leaves of an analytic cost tree as [`OpFlops`], in their order.
pub fn analytic_ops(leaves: &[&modelmeter::Cost]) -> Vec<OpFlops> {
    leaves
        .iter()
        .filter(|o| o.metrics.matmul_flops + o.metrics.elementwise_flops > 0)
        .map(|o| {
            (
                o.op.unwrap().to_string(),
                o.metrics.matmul_flops,
                o.metrics.elementwise_flops,
            )
        })
        .collect()
}

/// The ops a counted forward recorded as [`OpFlops`], in their order.
pub fn measured_ops(records: &[modelmeter_reference::OpRecord]) -> Vec<OpFlops> {
    records
        .iter()
        .map(|r| {
            (
                r.name.clone(),
                r.flops.matmul_flops,
                r.flops.elementwise_flops,
            )
        })
        .collect()
}

/// The liveness peak's row: within the tolerance by definition, exact on the CPU for
/// every layer the reference modules release like the vendor code (all of them).
pub const PEAK: &str = "peak_activation_bytes";

/// The layers of a DeepSeek-OCR-shaped config in report order, with `attention` the name
/// of its attention layer (which depends on MLA, its form and the attention setting).
pub fn report_order(attention: &str) -> [&str; 7] {
    [
        "DeepseekV2MLP",
        "MoEGate",
        "DeepseekV2MoE",
        "DeepseekV2RMSNorm",
        "DeepseekV2DecoderLayer_dense",
        "DeepseekV2DecoderLayer_moe",
        attention,
    ]
}

/// The `name` of each item of the JSON array `items` (a report's layers, a call's parts).
pub fn names(items: &Value) -> Vec<&str> {
    items
        .as_array()
        .expect("an array")
        .iter()
        .map(|item| item["name"].as_str().expect("a name"))
        .collect()
}

/// The binary with `args`.
pub fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_verify-decoder"));
    cmd.args(args);
    cmd
}

/// Runs the binary with `args`; asserts it did not panic.
pub fn verify(args: &[&str]) -> Output {
    verify_env(args, &[])
}

/// Runs the binary with `args` and the environment variables `env`; asserts it did not
/// panic.
pub fn verify_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = command(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    no_panic(cmd.output().expect("verify-decoder runs"))
}

/// Lossy UTF-8.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// No panic, no backtrace, no exit 101, whatever the input.
pub fn no_panic(o: Output) -> Output {
    let err = text(&o.stderr);
    assert!(
        !err.contains("panicked")
            && !err.contains("stack backtrace")
            && o.status.code() != Some(101),
        "{:?}: {err}",
        o.status
    );
    o
}

/// What `--quiet` leaves on standard error in a run that passed: warnings only (no
/// progress line, no device line, no oracle timing), each one line.
pub fn assert_quiet(err: &str) {
    assert!(
        err.lines()
            .all(|l| l.starts_with("verify-decoder: warning: ")),
        "--quiet printed more than warnings: {err}"
    );
}

/// A refusal: exit 2, one line on standard error that contains every needle, nothing on
/// standard output (no layer ran).
pub fn assert_refused(o: &Output, needles: &[&str]) {
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    for needle in needles {
        assert!(err.contains(needle), "{needle:?} in {err}");
    }
    assert!(o.stdout.is_empty(), "nothing ran: {}", text(&o.stdout));
}

/// A fresh folder (the `tempfile` crate's), removed when dropped, even when a test
/// fails before its end.
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    /// A fresh folder named after the test `tag`.
    pub fn new(tag: &str) -> TempDir {
        TempDir(
            tempfile::Builder::new()
                .prefix(&format!("mm-test-{tag}-"))
                .tempdir()
                .unwrap(),
        )
    }

    /// The folder itself.
    pub fn root(&self) -> &Path {
        self.0.path()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.root().join(name)
    }

    pub fn str(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }
}

/// A JSON file.
pub fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}
