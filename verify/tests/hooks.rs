//! What verify-decoder does with a wrong analytic value or a layer that cannot run,
//! forced through the library's test hooks (`Plan::hooks`; the binary has none and reads
//! nothing from the environment): the row fails, the reports say so, the other layers
//! still run.

use approx::assert_relative_eq;
use clap::Parser;
use modelmeter_verify::app::{prepare, report_of, Args};
use modelmeter_verify::hooks::TestHooks;
use modelmeter_verify::report::{self, Report};
use serde_json::Value;

mod common;
use common::{row, TempDir};

fn run(args: &[&str], hooks: TestHooks) -> (Report, Value) {
    let mut argv = vec!["verify-decoder", "--device", "cpu", "--quiet"];
    argv.extend_from_slice(args);
    let args = Args::try_parse_from(argv).expect("valid options");
    let mut ready = prepare(&args).expect("the invocation checks out");
    ready.plan.hooks = hooks;
    let report = report_of(&args, &ready);
    let json = report::to_json(&report);
    (report, json)
}

#[test]
fn a_perturbed_exact_metric_fails_and_every_report_says_so() {
    let args = [
        "--seq-len",
        "8",
        "--layers",
        "DeepseekV2MLP,MoEGate",
        "--accept-rel-diff",
        "0",
    ];
    let (clean, _) = run(&args, TestHooks::default());
    assert!(clean.summary().ok());
    let (report, j) = run(&args, TestHooks::perturbing("MoEGate", "matmul_flops", 1));
    assert!(!report.summary().ok(), "exit code 1");
    let gate = &j["layers"][1];
    assert_eq!(gate["status"], "fail");
    let r = row(gate, "matmul_flops");
    assert_eq!(r["status"], "fail");
    assert_eq!(
        r["analytic"].as_u64().unwrap(),
        r["measured"].as_u64().unwrap() + 1
    );
    assert_relative_eq!(
        r["rel_diff"].as_f64().unwrap(),
        1.0 / r["measured"].as_u64().unwrap() as f64,
        max_relative = 1e-12
    );
    assert_eq!(
        j["layers"][0]["status"], "known_gap",
        "the MLP is untouched"
    );
    assert!(report::to_junit(&report).contains("<failure"));
    let hooks = j["environment"]["test_hooks"].as_array().unwrap();
    assert!(hooks[0]
        .as_str()
        .unwrap()
        .contains("MoEGate:matmul_flops:+1"));
}

#[test]
fn a_peak_off_by_a_byte_passes_within_the_tolerance_and_fails_at_zero() {
    let peak = "peak_activation_bytes";
    let args = ["--seq-len", "8", "--layers", "DeepseekV2MLP"];
    let (clean, j) = run(&args, TestHooks::default());
    assert!(clean.summary().ok());
    let r = row(&j["layers"][0], peak);
    assert_eq!(r["analytic"], r["measured"]);
    assert!(r["note"].as_str().unwrap().starts_with("exact"), "{r}");

    let (report, j) = run(&args, TestHooks::perturbing("DeepseekV2MLP", peak, 1));
    assert!(report.summary().ok(), "1 byte is within 5 %");
    let r = row(&j["layers"][0], peak);
    assert_eq!(r["status"], "pass");
    assert_eq!(
        r["analytic"].as_u64().unwrap(),
        r["measured"].as_u64().unwrap() + 1
    );
    assert!(r["note"].as_str().unwrap().contains("not exact"), "{r}");

    let mut strict = args.to_vec();
    strict.extend(["--accept-rel-diff", "0"]);
    let (report, j) = run(&strict, TestHooks::perturbing("DeepseekV2MLP", peak, 1));
    assert!(!report.summary().ok(), "exit code 1");
    assert_eq!(row(&j["layers"][0], peak)["status"], "fail");
}

#[test]
fn an_activation_row_off_by_a_byte_fails_and_says_not_exact_beside_the_scratch_note() {
    // An exact row fails on any difference, even one byte in 5 % of tolerance; the gate's
    // allocator also sees scratch (wrapped scalars), whose note must not replace the
    // comparison's "not exact" (it did once, when such a row passed and looked exact).
    let args = ["--seq-len", "8", "--layers", "MoEGate"];
    let (report, j) = run(
        &args,
        TestHooks::perturbing("MoEGate", "activation_bytes", 1),
    );
    assert!(
        !report.summary().ok(),
        "exit code 1 at the default tolerance"
    );
    let r = row(&j["layers"][0], "activation_bytes");
    assert_eq!(r["status"], "fail");
    let note = r["note"].as_str().unwrap();
    assert!(
        note.contains("not exact: analytic − measured = +1") && note.contains("held no op output"),
        "{r}"
    );
    let junit = report::to_junit(&report);
    let case = junit
        .lines()
        .find(|l| l.contains("name=\"activation_bytes\""))
        .unwrap();
    assert!(
        case.contains("<failure") && case.contains("not exact"),
        "{case}"
    );
}

/// A sweep whose cases error (a layer that cannot run) or fail (a perturbed row): each
/// case is listed with its replay, the count says none passed, the JSON keeps the
/// sweep's tolerance.
#[test]
fn a_sweeps_failing_and_errored_cases_are_listed_with_their_replays() {
    for (hooks, verdict) in [
        (
            TestHooks {
                fail_layer: Some("MoEGate".into()),
                ..TestHooks::default()
            },
            "error",
        ),
        (TestHooks::perturbing("MoEGate", "matmul_flops", 1), "fail"),
    ] {
        let args = [
            "--sweep",
            "2",
            "--seed",
            "3",
            "--layers",
            "MoEGate",
            "--accept-rel-diff",
            "0",
        ];
        let (report, j) = run(&args, hooks);
        assert!(!report.summary().ok());
        assert_eq!(j["summary"][verdict], 2, "{}", j["summary"]);
        assert_eq!(j["tolerance"], 0.0);
        let table = report::to_table(&report);
        assert!(
            table.contains("sweep seed 3: 0 of 2 configurations pass"),
            "{table}"
        );
        let replays: Vec<&str> = table
            .lines()
            .filter(|l| l.starts_with("replay: "))
            .collect();
        assert_eq!(replays.len(), 2, "{table}");
        let junit = report::to_junit(&report);
        for (case, replay) in report.cases.iter().zip(&replays) {
            assert_eq!(case.replay.as_deref(), replay.strip_prefix("replay: "));
            assert!(
                replay.contains(" --accept-rel-diff 0 ") && replay.ends_with(" --layers MoEGate"),
                "{replay}"
            );
            // JUnit: the case's failed or errored rows end with the same command, escaped.
            let class = format!(r#"classname="case-{}/MoEGate""#, case.index.unwrap() + 1);
            let tag = if verdict == "fail" {
                "<failure"
            } else {
                "<error"
            };
            let failing: Vec<&str> = junit
                .split("<testcase ")
                .filter(|c| c.starts_with(&class) && c.contains(tag))
                .collect();
            assert!(!failing.is_empty(), "{junit}");
            let escaped = replay
                .replace('&', "&amp;")
                .replace('\'', "&apos;")
                .replace('"', "&quot;");
            for c in failing {
                assert!(c.contains(&escaped), "{c}");
            }
        }
    }
}

#[test]
fn a_layer_that_cannot_run_is_an_error_and_the_others_still_run() {
    let hooks = TestHooks {
        perturb: None,
        fail_layer: Some("DeepseekV2MoE".into()),
        scaled_matmul: None,
    };
    let (report, j) = run(&["--seq-len", "8"], hooks);
    assert!(!report.summary().ok());
    assert_eq!(j["summary"]["error"], 1);
    assert_eq!(j["summary"]["pass"], 5);
    let moe = &j["layers"][2];
    assert_eq!(moe["status"], "error");
    assert!(moe["error"].as_str().unwrap().contains("DeepseekV2MoE"));
    assert!(report::to_table(&report).contains("DeepseekV2MoE: error:"));
    // JUnit: every row the layer would have had is an <error> carrying the cause, and
    // the suite counts them (what a CI system gates on); the other layers' rows are not.
    let junit = report::to_junit(&report);
    let rows = modelmeter_verify::check::reported().count();
    let moe_errors: Vec<&str> = junit
        .lines()
        .filter(|l| l.contains(r#"classname="DeepseekV2MoE""#))
        .collect();
    assert_eq!(moe_errors.len(), rows, "{junit}");
    for line in &moe_errors {
        assert!(
            line.contains("<error message=\"")
                && line.contains("a test hook made DeepseekV2MoE fail"),
            "{line}"
        );
    }
    assert_eq!(junit.matches("<error ").count(), rows, "{junit}");
    assert!(junit.contains(&format!(r#" errors="{rows}""#)), "{junit}");
}

/// A small valid config whose MoEGate `flops` row is off by more than 5 %: exactly its
/// elementwise work, which FlopCounterMode cannot see.
const SMALL: &str = r#"{"hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
  "n_routed_experts": 64, "num_experts_per_tok": 16, "norm_topk_prob": true,
  "n_shared_experts": 1, "num_attention_heads": 4, "num_hidden_layers": 2,
  "first_k_dense_replace": 1, "vocab_size": 100}"#;

#[test]
fn a_flops_row_off_by_anything_but_the_blind_work_fails() {
    let tmp = TempDir::new("hooks");
    let config = tmp.path("small.json");
    std::fs::write(&config, SMALL).unwrap();
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--seq-len",
        "16",
        "--layers",
        "MoEGate,DeepseekV2RMSNorm,DeepseekV2MLP",
        "--accept-rel-diff",
        "0",
    ];
    let (clean, j) = run(&args, TestHooks::default());
    assert!(clean.summary().ok(), "{j}");
    for layer in j["layers"].as_array().unwrap() {
        assert_eq!(row(layer, "flops")["status"], "known_gap", "{layer}");
    }
    for layer in ["MoEGate", "DeepseekV2RMSNorm", "DeepseekV2MLP"] {
        let (report, j) = run(&args, TestHooks::perturbing(layer, "flops", 1));
        assert!(!report.summary().ok(), "{layer}");
        let l = j["layers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == layer)
            .unwrap();
        let r = row(l, "flops");
        assert_eq!(r["status"], "fail", "{layer}: {r}");
        assert!(r["note"].as_str().unwrap().contains("is not the"), "{r}");
    }
}

#[test]
fn a_wrong_kv_cache_size_fails_its_row() {
    // The measured side is the bytes of the cache tensors the reference module keeps; an
    // analytic value off by one byte must fail.
    let args = [
        "--seq-len",
        "8",
        "--layers",
        "LlamaFlashAttention2",
        "--accept-rel-diff",
        "0",
    ];
    let (clean, j) = run(&args, TestHooks::default());
    assert!(clean.summary().ok(), "{j}");
    let kv = row(&j["layers"][0], "kv_cache_bytes");
    assert_eq!(kv["status"], "pass");
    assert!(kv["measured"].as_u64().unwrap() > 0);
    let (report, j) = run(
        &args,
        TestHooks::perturbing("LlamaFlashAttention2", "kv_cache_bytes", 1),
    );
    assert!(!report.summary().ok());
    assert_eq!(row(&j["layers"][0], "kv_cache_bytes")["status"], "fail");
}

#[test]
fn bytes_moved_or_allocated_off_by_one_byte_fail_their_rows() {
    // The measured side costs the inputs and outputs the dispatcher saw; an analytic
    // value off by one byte must fail, on a layer with routing (the MoE) and without.
    for layer in ["DeepseekV2MLP", "DeepseekV2MoE"] {
        let args = [
            "--seq-len",
            "8",
            "--layers",
            layer,
            "--accept-rel-diff",
            "0",
        ];
        let (clean, j) = run(&args, TestHooks::default());
        assert!(clean.summary().ok(), "{j}");
        let io = row(&j["layers"][0], "io_bytes");
        assert_eq!(io["status"], "pass", "{io}");
        assert!(io["measured"].as_u64().unwrap() > 0);
        let (report, j) = run(&args, TestHooks::perturbing(layer, "io_bytes", 1));
        assert!(!report.summary().ok());
        assert_eq!(row(&j["layers"][0], "io_bytes")["status"], "fail");
        // The same for the bytes the allocator handed out for op outputs.
        let act = row(&j["layers"][0], "activation_bytes");
        assert_eq!(act["status"], "pass", "{act}");
        let (report, j) = run(&args, TestHooks::perturbing(layer, "activation_bytes", 1));
        assert!(!report.summary().ok());
        assert_eq!(row(&j["layers"][0], "activation_bytes")["status"], "fail");
    }
}
