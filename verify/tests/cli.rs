//! `verify-decoder` driven as users and CI call it (CPU).

use serde_json::Value;

mod common;
use common::{
    assert_quiet, names, read_json, report_order, row, text, verify_env as verify, TempDir, EXACT,
    PEAK,
};

/// Runs `verify-decoder` with `args` plus `--json FILE -q`, asserts it exits 0, and
/// returns the JSON report.
fn passing_report(tag: &str, args: &[&str]) -> Value {
    let dir = TempDir::new(tag);
    let json = dir.path("r.json");
    let mut all = args.to_vec();
    all.extend(["--json", json.to_str().unwrap(), "-q"]);
    let o = verify(&all, &[]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{args:?}: {}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    assert_quiet(&text(&o.stderr));
    read_json(&json)
}

/// Every exact row, and the peak's, has rel_diff exactly 0 and status pass; the flops
/// row passes except RMSNorm's, which is the known gap, and a layer whose elementwise
/// work is more than the tolerance of its FLOPs (MLPs one to four wide): a known gap
/// off by exactly that work.
fn assert_exact(layers: &Value) {
    for layer in layers.as_array().unwrap() {
        let name = layer["name"].as_str().unwrap();
        let rows = layer["metrics"].as_array().unwrap();
        let analytic = |metric: &str| row(layer, metric)["analytic"].as_u64().unwrap();
        for m in rows {
            let metric = m["metric"].as_str().unwrap();
            if EXACT.contains(&metric) || metric == PEAK {
                assert_eq!(m["rel_diff"], 0.0, "{name} {metric}: {m}");
                assert_eq!(m["analytic"], m["measured"], "{name} {metric}");
                assert_eq!(m["status"], "pass", "{name} {metric}");
            } else if metric == "flops" && name == "DeepseekV2RMSNorm" {
                assert_eq!(m["status"], "known_gap", "{m}");
                assert_eq!(m["measured"], 0);
            } else if metric == "flops" && m["status"] == "known_gap" {
                let (a, measured) = (m["analytic"].as_u64(), m["measured"].as_u64());
                assert_eq!(
                    a.unwrap() - measured.unwrap(),
                    analytic("elementwise_flops"),
                    "{name}: {m}"
                );
                assert!(m["rel_diff"].as_f64().unwrap() > 0.05, "{name}: {m}");
            } else {
                assert_eq!(m["status"], "pass", "{name} {metric}: {m}");
            }
        }
        assert_eq!(
            layer["metrics"].as_array().unwrap().len(),
            2 + EXACT.len(),
            "{name}: flops, the exact rows and the peak, no uncounted ops"
        );
    }
}

#[test]
fn default_workload_on_cpu_passes_with_exact_rows_and_valid_reports() {
    let dir = TempDir::new("default");
    let (json, junit) = (dir.path("r.json"), dir.path("r.xml"));
    let o = verify(
        &[
            "--device",
            "cpu",
            "--json",
            json.to_str().unwrap(),
            "--junit",
            junit.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}\n{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    let stdout = text(&o.stdout);
    assert!(
        stdout
            .trim_end()
            .ends_with("7 layers: 6 pass, 1 known_gap, 0 fail, 0 error"),
        "{stdout}"
    );
    assert!(
        stdout.contains("GFLOP") && stdout.contains("MiB"),
        "readable units: {stdout}"
    );

    let j = read_json(&json);
    assert_eq!(j["schema"], "modelmeter.verify/1");
    for key in [
        "device",
        "device_name",
        "libtorch_version",
        "dtype",
        "sdpa_kernels",
        "seed",
        "tf32_allowed",
    ] {
        assert!(!j["environment"][key].is_null(), "environment.{key}");
    }
    assert_eq!(j["environment"]["device"], "cpu");
    assert_eq!(j["environment"]["dtype"], "fp32");
    assert_eq!(j["environment"]["libtorch_version"], "2.11.0");
    assert_eq!(
        j["environment"]["sdpa_kernels"][0],
        "aten::_scaled_dot_product_flash_attention_for_cpu"
    );
    assert_eq!(j["config"]["name"], "deepseek-ocr-v1-base");
    assert_eq!(j["workload"]["seq_len"], 512);
    assert_eq!(j["tolerance"], 0.05);
    assert!(j["conventions"]["ops"].as_array().unwrap().len() > 50);
    assert_eq!(
        j["summary"],
        serde_json::json!({"pass": 6, "known_gap": 1, "fail": 0, "error": 0})
    );
    assert_eq!(names(&j["layers"]), report_order("LlamaFlashAttention2"));
    assert_exact(&j["layers"]);
    let mlp = &j["layers"][0];
    assert_eq!(mlp["metrics"][1]["measured"], 26_927_431_680u64);
    assert!(mlp["ops"]
        .as_array()
        .unwrap()
        .iter()
        .any(|op| op["name"] == "aten::mm" && op["calls"] == 3));
    let moe = &j["layers"][2];
    assert!(moe["experts_used"].as_u64().unwrap() >= 32);

    // JUnit: valid XML, one test case per layer and metric, the known gap skipped.
    let xml = std::fs::read_to_string(&junit).unwrap();
    let mut reader = quick_xml::Reader::from_str(&xml);
    let (mut testcases, mut skipped, mut failures) = (0, 0, 0);
    loop {
        match reader.read_event().expect("well-formed XML") {
            quick_xml::events::Event::Eof => break,
            quick_xml::events::Event::Start(e) | quick_xml::events::Event::Empty(e) => {
                match e.name().as_ref() {
                    b"testcase" => testcases += 1,
                    b"skipped" => skipped += 1,
                    b"failure" | b"error" => failures += 1,
                    _ => {}
                }
            }
            _ => {}
        }
    }
    assert_eq!(
        (testcases, skipped, failures),
        (7 * (2 + EXACT.len()), 1, 0)
    );
}

#[test]
fn bf16_on_cpu_splits_engines_exactly() {
    let j = passing_report(
        "bf16",
        &["--device", "cpu", "--dtype", "bf16", "--seq-len", "32"],
    );
    assert_eq!(j["environment"]["dtype"], "bf16");
    assert_exact(&j["layers"]);
    let metric = |layer: usize, name: &str| -> u64 {
        row(&j["layers"][layer], name)["measured"].as_u64().unwrap()
    };
    // The MLP's bf16 GEMMs are tensor-core work; the gate's fp32 GEMM is not.
    assert_eq!(metric(0, "tensor_core_flops"), metric(0, "matmul_flops"));
    assert_eq!(metric(1, "tensor_core_flops"), 0);
    assert!(
        metric(2, "tensor_core_flops") > 0
            && metric(2, "cuda_core_flops") > metric(2, "elementwise_flops")
    );
}

#[test]
fn decode_and_eager_pass_exactly() {
    let j = passing_report(
        "decode",
        &[
            "--device",
            "cpu",
            "--phase",
            "decode",
            "--context-len",
            "40",
            "--batch",
            "2",
            "--attn",
            "eager",
        ],
    );
    assert_eq!(j["workload"]["context_len"], 40);
    assert_eq!(j["layers"][6]["name"], "LlamaAttention");
    assert_exact(&j["layers"]);
}

/// A run past the config's trained positions (DeepSeek-OCR: 8,192) runs, with the warning
/// `modelmeter analyze` gives; a layer without a KV cache runs its decode step alone, so
/// no prefill of the context is needed (nor judged by the memory check).
#[test]
fn a_run_past_the_trained_positions_is_warned_of() {
    let run = |context: &str| {
        let args = [
            "--device",
            "cpu",
            "-q",
            "--layers",
            "DeepseekV2RMSNorm",
            "--phase",
            "decode",
            "--context-len",
            context,
        ];
        let o = verify(&args, &[]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
        text(&o.stderr)
    };
    assert_eq!(run("8191"), "");
    let warned = run("8192");
    assert!(
        warned.starts_with(
            "verify-decoder: warning: the workload reaches 8193 positions, beyond max_position_embeddings = 8192"
        ),
        "{warned}"
    );
    // Far past it: the norm's step over one token, without a prefill of 10¹² tokens.
    assert!(run("1000000000000").contains("reaches 1000000000001 positions"));
}

/// A config whose noaux_tc router keeps fewer experts than k (16 groups of 4, one kept,
/// k = 6) verifies exactly, with the warning `modelmeter analyze` gives; two groups kept:
/// no warning.
#[test]
fn a_router_keeping_fewer_experts_than_k_is_warned_of() {
    let dir = TempDir::new("router");
    let run = |topk_group: u64| {
        let mut v: Value =
            serde_json::from_str(include_str!("../../fixtures/deepseek-ocr/config.json")).unwrap();
        let lang = &mut v["language_config"];
        lang["scoring_func"] = "sigmoid".into();
        lang["topk_method"] = "noaux_tc".into();
        lang["n_group"] = 16.into();
        lang["topk_group"] = topk_group.into();
        let config = dir.str(&format!("router-{topk_group}.json"));
        std::fs::write(&config, v.to_string()).unwrap();
        let args = [
            "--device",
            "cpu",
            "-q",
            "--config",
            &config,
            "--layers",
            "MoEGate",
            "--seq-len",
            "64",
            "--accept-rel-diff",
            "0",
        ];
        let o = verify(&args, &[]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
        text(&o.stderr)
    };
    let warned = run(1);
    assert!(
        warned.starts_with("verify-decoder: warning: topk_method noaux_tc keeps topk_group × n_routed_experts / n_group = 1 × 4 = 4 experts per token, fewer than num_experts_per_tok = 6")
            && warned.lines().count() == 1,
        "{warned}"
    );
    assert_eq!(run(2), "");
}

fn extra_has_eager(args: &[&str]) -> bool {
    args.windows(2).any(|w| w == ["--attn", "eager"])
}

#[test]
fn mla_configs_verify_exactly_in_both_forms() {
    // DeepSeek-V2-Lite's every layer is checked below; here its attention in both MLA
    // forms, at batch 2, and V3's noaux_tc gate, at small workloads.
    for (config, extra, name) in [
        (
            "deepseek-v2-lite",
            vec!["--attn", "eager", "--seq-len", "16"],
            "DeepseekV2Attention",
        ),
        (
            "deepseek-v2-lite",
            vec![
                "--mla",
                "absorb",
                "--phase",
                "decode",
                "--context-len",
                "16",
            ],
            "DeepseekV2Attention_absorb",
        ),
        ("deepseek-v3", vec!["--seq-len", "16"], "MoEGate"),
    ] {
        let mut args = vec![
            "--device", "cpu", "--config", config, "--batch", "2", "--layers", name,
        ];
        args.extend(extra);
        let j = passing_report("mla", &args);
        assert_eq!(j["layers"][0]["name"], name);
        assert_exact(&j["layers"]);
        // No attention core runs in the absorbed form; elsewhere the one asked for.
        let core = if name.ends_with("_absorb") {
            Value::Null
        } else {
            Value::from(if extra_has_eager(&args) {
                "eager"
            } else {
                "sdpa"
            })
        };
        assert_eq!(j["attention"], core, "{args:?}");
        assert_eq!(j["environment"]["attention"], core, "{args:?}");
    }
}

#[test]
fn every_layer_of_deepseek_v2_lite_verifies_exactly_at_full_size() {
    // Issue 16's CI check: the V2-Lite fixture, nothing reduced (its MoE layers' 64
    // experts are built on the CPU), a short workload: exit 0 and every exact row exact.
    let j = passing_report(
        "v2-lite",
        &[
            "--device",
            "cpu",
            "--config",
            "deepseek-v2-lite",
            "--seq-len",
            "8",
        ],
    );
    assert_eq!(j["layers"].as_array().unwrap().len(), 7);
    assert_exact(&j["layers"]);
}

#[test]
fn sweep_of_50_passes_with_exact_rows() {
    let dir = TempDir::new("sweep");
    let json = dir.path("r.json");
    let o = verify(
        &[
            "--device",
            "cpu",
            "--sweep",
            "50",
            "--seed",
            "3",
            "--json",
            json.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    assert_eq!(
        text(&o.stderr)
            .lines()
            .filter(|l| l.starts_with('['))
            .count(),
        50,
        "one line per configuration"
    );
    assert!(text(&o.stdout).contains("50 of 50 configurations pass"));
    let j = read_json(&json);
    assert_eq!(j["schema"], "modelmeter.verify-sweep/1");
    // No attention was asked for the sweep as a whole: each case draws its own.
    assert!(
        j["environment"]["attention"].is_null(),
        "{}",
        j["environment"]
    );
    let cases = j["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 50);
    // The sweep's summary (what CI gates on) is the sum of its cases' summaries.
    for key in ["pass", "known_gap", "fail", "error"] {
        let sum: u64 = cases
            .iter()
            .map(|c| c["summary"][key].as_u64().unwrap())
            .sum();
        assert_eq!(j["summary"][key], sum, "{key}");
    }
    // The sweep's base: the default workload on the CPU in fp32 (a case draws the rest).
    let base = modelmeter::Workload::prefill(1, 512)
        .unwrap()
        .with_dtype(modelmeter::Dtype::F32)
        .unwrap();
    for case in cases {
        // Every sweep config has a dense and a MoE decoder layer (first_k_dense_replace
        // = 1 of 2): all seven layers run, the attention's class following the case.
        let kinds = case["config"]["layer_kinds"].as_array().unwrap();
        assert!(
            kinds.contains(&Value::from("dense")) && kinds.contains(&Value::from("moe")),
            "{kinds:?}"
        );
        let mla = !case["config"]["mla"].is_null();
        let absorb = case["workload"]["mla"] == "absorb";
        // The absorbed form has no attention core: its `attention` is null.
        let attention = match (mla, absorb, case["attention"].as_str()) {
            (true, true, None) => "DeepseekV2Attention_absorb",
            (true, false, Some("sdpa")) => "DeepseekV2FlashAttention2",
            (true, false, Some("eager")) => "DeepseekV2Attention",
            (false, _, Some("sdpa")) => "LlamaFlashAttention2",
            (false, _, Some("eager")) => "LlamaAttention",
            other => panic!("unexpected case {other:?}: {case}"),
        };
        assert_eq!(
            names(&case["layers"]),
            report_order(attention),
            "case {}",
            case["index"]
        );
        assert_exact(&case["layers"]);
        // Each case runs its own draw (`sweep::generate`): its batch, phase and attention
        // core, not the sweep's base ones.
        let index = case["index"].as_u64().unwrap() as usize;
        let drawn = modelmeter_verify::sweep::generate(3, index, &base);
        let w = &case["workload"];
        assert_eq!(w["batch"], drawn.workload.batch, "case {index}");
        let (phase, len) = match drawn.workload.phase {
            modelmeter::Phase::Prefill { seq_len } => ("prefill", ("seq_len", seq_len)),
            modelmeter::Phase::Decode { context_len } => ("decode", ("context_len", context_len)),
        };
        assert_eq!(
            (&w["phase"], &w[len.0]),
            (&Value::from(phase), &Value::from(len.1))
        );
        if !case["attention"].is_null() {
            assert_eq!(
                case["attention"],
                serde_json::to_value(drawn.attention).unwrap(),
                "case {index}"
            );
        }
    }
}

#[test]
fn tolerance_zero_leaves_only_the_exactly_explained_flops_gap() {
    // At tolerance 0 the flops row is off by exactly the elementwise work FlopCounterMode
    // cannot see: a known gap. One FLOP more is a fail.
    let args = [
        "--device",
        "cpu",
        "--seq-len",
        "8",
        "--layers",
        "DeepseekV2MLP",
        "--accept-rel-diff",
        "0",
    ];
    let o = verify(&args, &[]);
    let stdout = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{stdout}");
    assert!(
        stdout
            .trim_end()
            .ends_with("1 layer: 0 pass, 1 known_gap, 0 fail, 0 error"),
        "{stdout}"
    );
    assert!(
        stdout.contains("exactly the analytic elementwise FLOPs"),
        "{stdout}"
    );
    // One FLOP off the blind work fails: verify/tests/hooks.rs.

    // -0 is 0: the report says 0, not -0 (a sweep's replay command is built from it too).
    let dir = TempDir::new("tolerance-minus-zero");
    let json = dir.path("r.json");
    let mut minus_zero = args.to_vec();
    let last = minus_zero.len() - 1;
    minus_zero[last] = "-0";
    minus_zero.extend(["--json", json.to_str().unwrap()]);
    let o = verify(&minus_zero, &[]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let written = std::fs::read_to_string(&json).unwrap();
    assert!(written.contains("\"tolerance\": 0.0"), "{written}");
    assert!(!written.contains("-0.0"), "{written}");
}

#[test]
fn bad_input_is_one_line_exit_2_and_nothing_written() {
    let dir = TempDir::new("bad");
    let json = dir.path("r.json");
    let bad_config = dir.path("bad.json");
    std::fs::write(&bad_config, r#"{"hidden_size": 64, "num_attention_heads": 3, "intermediate_size": 8, "num_hidden_layers": 1, "vocab_size": 5}"#).unwrap();
    let mla = dir.path("mla.json");
    std::fs::write(&mla, r#"{"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 8, "num_hidden_layers": 1, "vocab_size": 5, "use_mla": true}"#).unwrap();
    let not_json = dir.path("x.json");
    std::fs::write(&not_json, "{ nope").unwrap();
    let j = json.to_str().unwrap();
    let mut cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--device", "tpu"],
            "--device = tpu is invalid: expected cpu, cuda or cuda:N",
        ),
        (vec!["--device", "cuda:99"], "--device cuda:99"),
        (
            vec!["--accept-rel-diff", "-0.1"],
            "--accept-rel-diff = -0.1 is invalid",
        ),
        (
            vec!["--accept-rel-diff", "NaN"],
            "--accept-rel-diff = NaN is invalid",
        ),
        (
            vec!["--accept-rel-diff", "inf"],
            "--accept-rel-diff = inf is invalid",
        ),
        (
            vec!["--accept-rel-diff", "1e-400"],
            "--accept-rel-diff = 1e-400 is invalid: it rounds to 0",
        ),
        (
            vec!["--config", "/no/such/config.json"],
            "/no/such/config.json",
        ),
        (
            vec!["--config", bad_config.to_str().unwrap()],
            "hidden_size = 64 (config ",
        ),
        (
            // MLA configs are read now; this one lacks the MLA dimensions.
            vec!["--config", mla.to_str().unwrap()],
            "kv_lora_rank is missing",
        ),
        (
            vec![
                "--config",
                "deepseek-v2-lite",
                "--layers",
                "LlamaAttention2",
            ],
            "unknown layer LlamaAttention2",
        ),
        (
            vec!["--config", not_json.to_str().unwrap()],
            "cannot parse config",
        ),
        (vec!["--seq-len", "4000000"], "needs about"),
        (vec!["--batch", "0"], "--batch = 0 is invalid"),
        (
            vec!["--batch", "18446744073709551615"],
            "--batch × --seq-len = 18446744073709551615 × 512",
        ),
        (
            vec!["--accept-rel-diff", ""],
            "--accept-rel-diff = \"\" is invalid",
        ),
        (vec!["--device", ""], "--device = \"\" is invalid"),
        (
            vec!["--accept-rel-diff", "1"],
            "--accept-rel-diff = 1 is invalid: expected a number in [0, 1)",
        ),
        // A value with a blank at its end is shown quoted, as in the parse error.
        (
            vec!["--accept-rel-diff", "1 "],
            "--accept-rel-diff = \"1 \" is invalid: expected a number in [0, 1)",
        ),
        (
            vec!["--sweep", "18446744073709551615"],
            "--sweep = 18446744073709551615 is invalid",
        ),
        (vec!["--layers", "Nope"], "unknown layer Nope"),
        // A sweep draws each case's phase, attention and MLA form: given at all, even as
        // the default's spelling, they would be silently overridden.
        (
            vec!["--sweep", "3", "--mla", "naive"],
            "--mla does not apply with --sweep",
        ),
        (
            vec!["--sweep", "3", "--phase", "prefill"],
            "--phase does not apply with --sweep",
        ),
        (
            vec!["--sweep", "3", "--attn", "sdpa"],
            "--attn does not apply with --sweep",
        ),
        // Usage errors too: one line naming the option (clap's own are several).
        (vec!["--seed", "-1"], "invalid value '-1' for '--seed <N>'"),
        (vec!["--sede", "1"], "a similar argument exists: '--seed'"),
        // The attention named is the one verified, or a refusal naming the options.
        (
            vec!["--layers", "LlamaAttention"],
            "LlamaAttention is not the attention this run verifies (LlamaFlashAttention2); run it with --attn eager",
        ),
        (
            vec![
                "--config",
                "deepseek-v2-lite",
                "--mla",
                "absorb",
                "--layers",
                "DeepseekV2Attention",
            ],
            "run it with --attn eager --mla naive",
        ),
        (
            vec!["--layers", "DeepseekV2Attention_absorb"],
            "has multi-head attention: LlamaFlashAttention2, LlamaAttention",
        ),
        (vec!["--sweep", "0"], "--sweep = 0"),
        (
            vec!["--report-host-details"],
            "--report-host-details applies only with --json",
        ),
        // Too large for any integer: the range a sweep takes, not the type's maximum.
        (
            vec!["--sweep", "99999999999999999999"],
            "too large; expected a number of configurations in 1 ..= 100000",
        ),
        (vec!["--json", "/no/such/dir/r.json"], "/no/such/dir"),
        (
            vec!["--json", "/proc/r.json"],
            "cannot write in /proc (",
        ),
        (
            vec!["--json", "/proc/self/status"],
            "give a path in a folder you can create files in",
        ),
    ];
    if !modelmeter_reference::cuda_backend::is_available() {
        cases.push((vec!["--device", "cuda:0"], "run with --device cpu"));
    }
    for (args, needle) in cases {
        let mut all = vec!["--device", "cpu", "--json", j];
        if args[0] == "--device" || args[0] == "--json" {
            all = vec!["--json", j];
        }
        if args[0] == "--json" {
            all.clear();
        }
        if args[0] == "--report-host-details" {
            // Refused for want of --json: give none.
            all = vec!["--device", "cpu"];
        }
        all.extend(&args);
        let o = verify(&all, &[]);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        assert!(o.stdout.is_empty(), "{args:?}: nothing ran");
        assert!(!json.exists(), "{args:?}: no report written");
    }
}

#[test]
fn help_shows_examples_and_statuses() {
    let o = verify(&["--help"], &[]);
    let help = text(&o.stdout);
    assert!(
        help.contains("Examples:") && help.contains("--device cuda:0 --accept-rel-diff 0.1"),
        "{help}"
    );
    assert!(
        help.contains("known_gap") && help.contains("Exit codes"),
        "{help}"
    );
    // --dtype states this binary's default (the option is shared with modelmeter analyze).
    assert!(help.contains("fp32 on the CPU"), "{help}");
    assert!(!help.contains("modelmeter analyze"), "{help}");
    // Help is wrapped to the terminal: an example line over 80 columns would be split
    // on an 80-column one, and its second half read as a command of its own.
    let examples = help.split("Examples:\n").nth(1).unwrap();
    for line in examples.lines().take_while(|l| !l.is_empty()) {
        assert!(line.chars().count() <= 80, "{line:?}");
    }
}

/// `verify-decoder` ends with `_exit`, skipping libtorch's teardown (process_exit), unless
/// a tool that collects its results in exit handlers is loaded (here LLVM's coverage
/// runtime, named by `LLVM_PROFILE_FILE`; this build has none, so the variable only picks
/// the normal exit). Both ends print the same whole table (standard output is flushed
/// before `_exit`) and return the same status, a refusal's 2 as a pass's 0.
#[test]
fn the_quick_exit_prints_and_returns_what_a_normal_exit_does() {
    let dir = TempDir::new("exit");
    let profile = dir.str("cov-%p.profraw");
    let run = |args: &[&str], normal_exit: bool| {
        let mut cmd = common::command(args);
        for name in modelmeter_verify::process_exit::EXIT_HANDLERS_NEEDED_BY {
            cmd.env_remove(name);
        }
        if normal_exit {
            cmd.env("LLVM_PROFILE_FILE", &profile);
        }
        common::no_panic(cmd.output().expect("verify-decoder runs"))
    };
    let pass = ["--device", "cpu", "--phase", "decode", "--context-len", "8"];
    let refused = ["--device", "cpu", "--batch", "0"];
    for (args, status) in [(&pass[..], 0), (&refused[..], 2)] {
        let quick = run(args, false);
        let normal = run(args, true);
        assert_eq!(
            quick.status.code(),
            Some(status),
            "{args:?}: {}",
            text(&quick.stderr)
        );
        assert_eq!(normal.status.code(), Some(status), "{args:?}");
        assert_eq!(text(&quick.stdout), text(&normal.stdout), "{args:?}");
    }
    let table = text(&run(&pass, false).stdout);
    assert!(
        table.ends_with("7 layers: 6 pass, 1 known_gap, 0 fail, 0 error\n"),
        "{table}"
    );
}
