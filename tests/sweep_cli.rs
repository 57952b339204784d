//! `modelmeter sweep`, driven as a user runs it: every row is `modelmeter analyze`'s row
//! for that point's workload, and bad input is one line, exit 2, nothing written.

use std::process::{Command, Output};

fn modelmeter(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_modelmeter"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("UTF-8")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The CSV of a sweep, as (header, rows of exact integers).
fn csv(args: &[&str]) -> (Vec<String>, Vec<Vec<u64>>) {
    let o = modelmeter(&[&["sweep", "--csv"], args].concat());
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    let text = stdout(&o);
    let mut lines = text.lines();
    let header = lines.next().unwrap().split(',').map(String::from).collect();
    let rows = lines
        .map(|l| l.split(',').map(|v| v.parse().unwrap()).collect())
        .collect();
    (header, rows)
}

/// `analyze --json`'s node called `name` (a layer, or `stack`) for a workload.
fn analyzed(args: &[&str], name: &str) -> serde_json::Value {
    let o = modelmeter(&[&["analyze", "--json"], args].concat());
    assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    if name == "stack" {
        return report["stack"].clone();
    }
    report["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("no layer {name}"))
        .clone()
}

/// Each CSV row against analyze's node for the same workload, column by column.
fn assert_rows_are_analyzes(
    header: &[String],
    rows: &[Vec<u64>],
    workload_of: impl Fn(&[u64]) -> Vec<String>,
    name: &str,
    fixed: &[&str],
) {
    for row in rows {
        let options = workload_of(row);
        let args: Vec<&str> = fixed
            .iter()
            .copied()
            .chain(options.iter().map(String::as_str))
            .collect();
        let node = analyzed(&args, name);
        for (column, value) in header.iter().zip(row).skip(2) {
            let expected = match column.as_str() {
                "peak_activation_bytes" => &node["peak"]["peak_bytes"],
                metric => &node["metrics"][metric],
            };
            assert_eq!(expected.as_u64(), Some(*value), "{args:?} {column}");
        }
    }
}

#[test]
fn rows_are_analyzes_rows_for_each_point() {
    let (header, rows) = csv(&["--vary", "batch=1,3", "--vary", "seq-len=17:40:23"]);
    assert_eq!(&header[..2], ["batch", "seq_len"]);
    assert_eq!(header.len(), 2 + 8 + 1);
    let points: Vec<[u64; 2]> = rows.iter().map(|r| [r[0], r[1]]).collect();
    assert_eq!(points, [[1, 17], [1, 40], [3, 17], [3, 40]]);
    let prefill = |r: &[u64]| {
        vec![
            "--batch".into(),
            r[0].to_string(),
            "--seq-len".into(),
            r[1].to_string(),
        ]
    };
    assert_rows_are_analyzes(&header, &rows, prefill, "stack", &[]);

    // One layer of an MLA config, decode steps on the CPU.
    let fixed = [
        "--config",
        "deepseek-v2-lite",
        "--phase",
        "decode",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
    ];
    let (header, rows) = csv(&[
        &fixed[..],
        &[
            "--layer",
            "DeepseekV2DecoderLayer_moe",
            "--vary",
            "context-len=1:64:*8",
        ],
    ]
    .concat());
    assert_eq!(&header[..2], ["batch", "context_len"]);
    assert_eq!(rows.iter().map(|r| r[1]).collect::<Vec<_>>(), [1, 8, 64]);
    let decode = |r: &[u64]| vec!["--context-len".into(), r[1].to_string()];
    assert_rows_are_analyzes(&header, &rows, decode, "DeepseekV2DecoderLayer_moe", &fixed);
}

/// A generation's row is `analyze --new-tokens`'s `generation.total`; its columns add the
/// new tokens and leave out the peak (the closed form has none).
#[test]
fn generation_rows_are_analyzes_generation_totals() {
    let (header, rows) = csv(&[
        "--vary",
        "new-tokens=0:10:5",
        "--vary",
        "seq-len=9,30",
        "--batch",
        "2",
    ]);
    assert_eq!(&header[..3], ["batch", "seq_len", "new_tokens"]);
    assert_eq!(header.len(), 3 + 8);
    assert!(!header.iter().any(|h| h == "peak_activation_bytes"));
    let points: Vec<[u64; 3]> = rows.iter().map(|r| [r[0], r[1], r[2]]).collect();
    assert_eq!(
        points,
        [
            [2, 9, 0],
            [2, 30, 0],
            [2, 9, 5],
            [2, 30, 5],
            [2, 9, 10],
            [2, 30, 10]
        ]
    );
    for row in &rows {
        let o = modelmeter(&[
            "analyze",
            "--json",
            "--batch",
            "2",
            "--seq-len",
            &row[1].to_string(),
            "--new-tokens",
            &row[2].to_string(),
        ]);
        let report: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
        for (column, value) in header.iter().zip(row).skip(3) {
            assert_eq!(
                report["generation"]["total"][column.as_str()].as_u64(),
                Some(*value),
                "{row:?} {column}"
            );
        }
    }
    // --new-tokens alone: every point a generation of that many steps.
    let (header, rows) = csv(&["--new-tokens", "3", "--vary", "seq-len=4,8"]);
    assert_eq!(&header[..3], ["batch", "seq_len", "new_tokens"]);
    assert_eq!(rows.iter().map(|r| r[2]).collect::<Vec<_>>(), [3, 3]);
}

#[test]
fn threads_change_nothing_but_the_time() {
    let args = [
        "sweep",
        "--csv",
        "--vary",
        "seq-len=1:300",
        "--layer",
        "DeepseekV2MoE",
    ];
    let one = modelmeter(&[&args[..], &["--threads", "1"]].concat());
    let four = modelmeter(&[&args[..], &["--threads", "4"]].concat());
    assert!(one.status.success() && four.status.success());
    assert_eq!(stdout(&one).lines().count(), 301);
    assert_eq!(one.stdout, four.stdout);
}

#[test]
fn json_and_table_list_every_point() {
    let o = modelmeter(&[
        "sweep",
        "--json",
        "--vary",
        "batch=1:4:*2",
        "--layer",
        "MoEGate",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(j["schema"], "modelmeter.sweep/1");
    assert_eq!(j["target"], "MoEGate");
    assert_eq!(j["varied"], serde_json::json!(["batch"]));
    assert_eq!(j["attention"], "sdpa");
    assert_eq!(j["first_workload"]["batch"], 1);
    assert_eq!(j["config"]["name"], "deepseek-ocr-v1-base");
    let points = j["points"].as_array().unwrap();
    assert_eq!(points.len(), 3);
    let gate = analyzed(&["--batch", "4"], "MoEGate");
    assert_eq!(points[2]["batch"], 4);
    assert_eq!(points[2]["seq_len"], 512);
    assert_eq!(points[2]["metrics"], gate["metrics"]);
    assert_eq!(points[2]["peak"], gate["peak"]);

    let o = modelmeter(&["sweep", "--vary", "seq-len=64,128"]);
    let text = stdout(&o);
    assert!(
        text.starts_with("modelmeter sweep — deepseek-ocr-v1-base — DeepseekV2ForCausalLM on cuda"),
        "{text}"
    );
    assert!(
        text.contains("2 points: B=1 prefill S=64 bf16 … B=1 prefill S=128 bf16"),
        "{text}"
    );
    assert_eq!(
        text.lines().filter(|l| l.contains("FLOP")).count(),
        2,
        "{text}"
    );
    // Calls, not generations: no note on unrounded activations.
    assert!(!text.contains("activations: tensor bytes"), "{text}");
    // One point is named alone, not as a span.
    let o = modelmeter(&["sweep", "--vary", "seq-len=64"]);
    let text = stdout(&o);
    assert!(
        text.contains("\n1 point: B=1 prefill S=64 bf16\n"),
        "{text}"
    );
    // Without --vary: the one workload the options name.
    let (_, rows) = csv(&["--batch", "2", "--seq-len", "8"]);
    assert_eq!(
        rows.iter().map(|r| [r[0], r[1]]).collect::<Vec<_>>(),
        [[2, 8]]
    );
}

#[test]
fn points_past_the_trained_positions_are_counted_in_one_warning() {
    let o = modelmeter(&["sweep", "--csv", "--vary", "seq-len=8191:8194"]);
    assert!(o.status.success());
    let warning = stderr(&o);
    assert_eq!(warning.lines().count(), 1, "{warning}");
    assert!(
        warning.contains("2 of 4 points: furthest, the workload reaches 8194 positions"),
        "{warning}"
    );
}

#[test]
fn bad_input_is_one_line_exit_2_and_nothing_written() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--vary", "seq-len=0:2"],
            "at seq-len=0 (point 1 of 3): --vary seq-len = 0 is invalid",
        ),
        (
            &["--vary", "batch=2", "--batch", "2"],
            "--batch = 2 is invalid: expected no value with --vary batch=…",
        ),
        (
            &["--vary", "batch=1", "--vary", "batch=2"],
            "--vary batch=… is given twice",
        ),
        (
            &["--vary", "context-len=1:4"],
            "context-len is not an axis of a prefill",
        ),
        (
            &["--phase", "decode", "--vary", "seq-len=4"],
            "seq-len is not an axis of a decode step",
        ),
        (&["--vary", "tokens=4"], "unknown axis `tokens`"),
        (&["--vary", "batch=4:1"], "runs backwards"),
        (&["--vary", "batch=1,1"], "1 is given twice"),
        (
            &["--layer", "Foo"],
            "--layer = Foo is invalid: expected one of DeepseekV2RMSNorm",
        ),
        // The attention layer is named as --attn runs it.
        (
            &["--layer", "LlamaAttention"],
            "expected one of DeepseekV2RMSNorm, DeepseekV2MLP, MoEGate, DeepseekV2MoE, LlamaFlashAttention2,",
        ),
        (
            &["--threads", "0"],
            "--threads = 0 is invalid: expected 1 to 1024",
        ),
        (&["--csv", "--json"], "'--csv' cannot be used with '--json'"),
        (
            &["--vary", "seq-len=1:1000", "--vary", "batch=1:1001"],
            "1001000 (1000 seq-len × 1001 batch)",
        ),
        (
            &["--vary", "batch=18446744073709551615"],
            "at batch=18446744073709551615 (point 1 of 1): --vary batch × --seq-len = ",
        ),
        (&["--device", "tpu"], "tpu"),
        // A range over every u64 has 2^64 values, not 0 (the count once wrapped: an empty
        // sweep, exit 0).
        (
            &["--vary", "batch=0:18446744073709551615"],
            "has 18446744073709551616 values or more",
        ),
        (&["--threads", "100000"], "--threads = 100000 is invalid: expected 1 to 1024"),
        (
            &["--threads", "18446744073709551615"],
            "expected 1 to 1024 (this machine has",
        ),
        // The varied axis is checked first, then each point with the fixed options: the
        // error names a value the sweep uses, not the axis's default.
        (
            &["--batch", "0", "--vary", "batch=1,2"],
            "--batch = 0 is invalid: expected no value with --vary batch=…",
        ),
        (
            &["--batch", "36028797018963968", "--vary", "seq-len=1,2"],
            "at seq-len=1 (point 1 of 2): --batch = 36028797018963968",
        ),
        (&["--vary", "seq-len=1", "--vary", "seq-len=2"], "(seq-len=1,2,4)"),
        (
            &["--new-tokens", "4", "--phase", "decode"],
            "--new-tokens = 4 is invalid: expected no value with --phase decode (a generation starts with a prefill",
        ),
        (
            &["--vary", "new-tokens=4", "--phase", "decode"],
            "no new-tokens axis with --phase decode",
        ),
        // Not a hint back to --phase decode, which a generation refuses.
        (
            &["--vary", "new-tokens=4", "--vary", "context-len=1"],
            "context-len is not an axis of a generation (its axes: batch, seq-len, new-tokens); its cache grows from its prompt",
        ),
        (
            &["--vary", "new-tokens=4", "--layer", "MoEGate"],
            "--layer = MoEGate is invalid: expected no value with --new-tokens",
        ),
        (
            &["--new-tokens", "4", "--vary", "new-tokens=1,2"],
            "--new-tokens = 4 is invalid: expected no value with --vary new-tokens=…",
        ),
        (
            &["--new-tokens", "18446744073709551615"],
            "lower --new-tokens",
        ),
        // An input the sweep varies is named as its axis, the fixed ones as their options.
        (
            &["--vary", "seq-len=1,100000000000"],
            "at seq-len=100000000000 (point 2 of 2): --vary seq-len = 100000000000 is too large: ",
        ),
        (
            &["--vary", "new-tokens=1,1000000000000000000"],
            "; lower --vary new-tokens",
        ),
        (
            &["--vary", "seq-len=1,18446744073709551615", "--batch", "2"],
            "(point 2 of 2): --batch × --vary seq-len = 2 × 18446744073709551615 is invalid",
        ),
    ];
    for (args, needle) in cases {
        let o = modelmeter(&[&["sweep"][..], args].concat());
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
        assert_eq!(stderr(&o).lines().count(), 1, "{args:?}: {}", stderr(&o));
        assert!(o.stdout.is_empty(), "{args:?}: nothing half-written");
    }
}

/// A layer the config lacks is refused with the reason, before any point is evaluated.
#[test]
fn a_layer_the_config_lacks_is_refused_with_the_reason() {
    let text = include_str!("../fixtures/deepseek-ocr/config.json");
    let mut v: serde_json::Value = serde_json::from_str(text).unwrap();
    v["language_config"]["first_k_dense_replace"] = 0.into();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("all-moe.json");
    std::fs::write(&path, v.to_string()).unwrap();
    let o = modelmeter(&[
        "sweep",
        "--config",
        path.to_str().unwrap(),
        "--layer",
        "DeepseekV2MLP",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("--layer = DeepseekV2MLP is invalid: expected a layer the config has (DeepseekV2RMSNorm, MoEGate")
            && e.contains("no dense decoder layer"),
        "{e}"
    );
    assert!(o.stdout.is_empty());
}

#[test]
fn help_shows_examples_and_the_value_grammar() {
    for args in [&["sweep", "--help"][..], &["help", "sweep"]] {
        let o = modelmeter(args);
        assert!(o.status.success(), "{args:?}");
        let text = stdout(&o);
        assert!(
            text.contains("Examples:")
                && text.contains("modelmeter sweep --vary seq-len=128:8192:128 --csv"),
            "{text}"
        );
        assert!(text.contains("START:END:*FACTOR"), "{text}");
        let examples = text.split("Examples:\n").nth(1).unwrap();
        for line in examples.lines() {
            assert!(line.chars().count() <= 80, "{line:?}");
        }
    }
    let top = stdout(&modelmeter(&["--help"]));
    assert!(
        top.contains("sweep") && top.contains("modelmeter sweep --vary"),
        "{top}"
    );
}
