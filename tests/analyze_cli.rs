//! `modelmeter analyze`, driven as a user runs it.

use std::process::{Command, Output};

fn analyze(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_modelmeter"))
        .arg("analyze")
        .args(args)
        .output()
        .expect("the binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts every JSON number under `v` is a `u64` (no float, no negative); counts them.
fn every_number_is_u64(v: &serde_json::Value, path: &str, counted: &mut usize) {
    use serde_json::Value;
    match v {
        Value::Number(n) => {
            assert!(n.is_u64(), "{path} = {n} is not an exact unsigned integer");
            *counted += 1;
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                every_number_is_u64(item, &format!("{path}[{i}]"), counted);
            }
        }
        Value::Object(fields) => {
            for (k, item) in fields {
                every_number_is_u64(item, &format!("{path}.{k}"), counted);
            }
        }
        Value::Null | Value::Bool(_) | Value::String(_) => {}
    }
}

#[test]
fn the_integer_walk_refuses_floats_and_negatives() {
    // The walk must be able to fail: a float or a negative deep in a tree.
    for bad in [
        serde_json::json!({"a": [{"b": 1.5}]}),
        serde_json::json!({"a": {"b": -1}}),
    ] {
        let walked = std::panic::catch_unwind(|| every_number_is_u64(&bad, "x", &mut 0));
        assert!(walked.is_err(), "{bad}");
    }
    let mut counted = 0;
    every_number_is_u64(
        &serde_json::json!({"a": [1, {"b": 2}], "c": "3"}),
        "x",
        &mut counted,
    );
    assert_eq!(counted, 2);
}

#[test]
fn json_report_has_the_schema_layers_and_exact_integers() {
    let o = analyze(&["--json", "--new-tokens", "4"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["schema"], "modelmeter.analyze/1");
    assert_eq!(j["config"]["name"], "deepseek-ocr-v1-base");
    assert_eq!(j["workload"]["phase"], "prefill");
    assert_eq!(j["workload"]["seq_len"], 512);
    let layers = j["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 7);
    // Each metric is present where it is expected (the walk below checks numbers only).
    let metrics = modelmeter::Metric::ALL.map(modelmeter::Metric::name);
    for layer in layers {
        for key in metrics {
            assert!(layer["metrics"][key].is_u64(), "{} {key}", layer["name"]);
        }
        assert!(!layer["children"].as_array().unwrap().is_empty());
    }
    assert_eq!(j["generation"]["new_tokens"], 4);
    for stage in ["prefill", "decode", "total"] {
        for key in metrics {
            assert!(j["generation"][stage][key].is_u64(), "{stage} {key}");
        }
    }
    // Every number in the layers, the stack and the generation, at every depth (metrics,
    // peaks, returned sizes), is an exact unsigned integer. No field there is a float.
    let mut counted = 0;
    for key in ["layers", "stack", "generation"] {
        assert!(!j[key].is_null(), "{key} is in the report");
        every_number_is_u64(&j[key], key, &mut counted);
    }
    assert!(
        counted > 8 * 100,
        "{counted} numbers: the walk saw the trees"
    );
    let gate = layers.iter().find(|l| l["name"] == "MoEGate").unwrap();
    assert_eq!(gate["metrics"]["tensor_core_flops"], 0);
    assert_eq!(gate["metrics"]["matmul_flops"], 83_886_080u64);
    assert!(j["stack"]["metrics"]["matmul_flops"].is_u64());
    assert!(j["conventions"]["ops"].is_array());
}

#[test]
fn decode_and_config_file_options() {
    let config = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/deepseek-ocr/config.json"
    );
    let o = analyze(&[
        "--config",
        config,
        "--phase",
        "decode",
        "--context-len",
        "100",
        "--batch",
        "2",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["workload"]["context_len"], 100);
    let attn = j["layers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "LlamaFlashAttention2")
        .unwrap();
    let core = attn["children"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "attention core")
        .unwrap();
    assert_eq!(core["metrics"]["matmul_flops"], 4u64 * 2 * 10 * 101 * 128);
}

#[test]
fn human_tables_use_readable_units() {
    let o = analyze(&["--new-tokens", "4"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.contains("GFLOP") && text.contains("MiB"), "{text}");
    assert!(text.contains("DeepseekV2DecoderLayer_moe"));
    assert!(text.contains("generation: prefill + 4 decode steps"));
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["--config", "/no/such/config.json"],
            "/no/such/config.json",
        ),
        (&["--batch", "0"], "--batch = 0 is invalid"),
        (&["--seq-len", "0"], "--seq-len = 0 is invalid"),
        (&["--dtype", "int4"], "int4"),
        (
            &["--phase", "decode", "--context-len", "0"],
            "--context-len = 0 is invalid",
        ),
        (
            &["--phase", "prefill", "--context-len", "3"],
            "--context-len",
        ),
        (&["--phase", "sideways"], "sideways"),
        (
            &["--batch", "-3"],
            "invalid value '-3' for '--batch <B>': expected a whole number",
        ),
        (&["--depth", "-1"], "invalid value '-1' for '--depth <N>'"),
        (&["--dtype", "fp8"], "[possible values: bf16, fp16, fp32]"),
        (&["--seqlen", "4"], "a similar argument exists: '--seq-len'"),
        (
            &["--batch", "18446744073709551615"],
            "--batch × --seq-len = 18446744073709551615 × 512",
        ),
        (&["--new-tokens", "18446744073709551615"], "would overflow"),
    ];
    for (args, needle) in cases {
        let o = analyze(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
        assert_eq!(stderr(&o).lines().count(), 1, "{args:?}: {}", stderr(&o));
        assert!(o.stdout.is_empty(), "{args:?}: nothing half-written");
    }
}

#[test]
fn invalid_config_file_is_refused_with_its_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mla.json");
    std::fs::write(&path, r#"{"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 8, "num_hidden_layers": 1, "vocab_size": 5, "use_mla": true}"#).unwrap();
    let o = analyze(&["--config", path.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    // MLA is modelled now; an MLA config without its dimensions names the first missing.
    assert!(
        stderr(&o).contains("kv_lora_rank is missing from config "),
        "{}",
        stderr(&o)
    );
}

#[test]
fn every_built_in_family_config_prints_its_stack_and_a_generation() {
    for name in ["deepseek-v2-lite", "deepseek-v2", "deepseek-v3"] {
        for mla in ["naive", "absorb"] {
            let o = analyze(&[
                "--config",
                name,
                "--mla",
                mla,
                "--seq-len",
                "64",
                "--new-tokens",
                "4",
                "--depth",
                "0",
            ]);
            assert_eq!(o.status.code(), Some(0), "{name} {mla}: {}", stderr(&o));
            let text = String::from_utf8(o.stdout).unwrap();
            assert!(
                text.contains(&format!("modelmeter analyze — {name}")),
                "{text}"
            );
            assert!(text.contains("DeepseekV2ForCausalLM"), "{text}");
            assert!(
                text.contains("generation: prefill + 4 decode steps"),
                "{text}"
            );
            let attention = if mla == "absorb" {
                "DeepseekV2Attention_absorb"
            } else {
                "DeepseekV2FlashAttention2"
            };
            assert!(text.contains(attention), "{name} {mla}: {text}");
        }
    }
    let o = analyze(&["--mla", "absorb"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("--mla = absorb is invalid"),
        "{}",
        stderr(&o)
    );
    // The absorbed form has no attention core: --attn would be reported but change nothing.
    let o = analyze(&[
        "--config",
        "deepseek-v2",
        "--mla",
        "absorb",
        "--attn",
        "eager",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("--attn = eager is invalid: expected no value with --mla absorb"),
        "{}",
        stderr(&o)
    );
    let o = analyze(&["--config", "deepseek-v9"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("built-in name"), "{}", stderr(&o));
}

#[test]
fn help_shows_examples() {
    // The top level's help and the subcommand's, which every usage error points at.
    for args in [
        &["--help"][..],
        &["analyze", "--help"],
        &["help", "analyze"],
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_modelmeter"))
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{args:?}");
        let text = String::from_utf8(o.stdout).unwrap();
        assert!(
            text.contains("Examples:") && text.contains("modelmeter analyze --phase decode"),
            "{args:?}: {text}"
        );
        if args != ["--help"] {
            // --dtype states this binary's default (the option is shared with verify-decoder).
            assert!(text.contains("bf16, the deployed dtype, on any"), "{text}");
            assert!(!text.contains("verify-decoder"), "{text}");
        }
        // Help is wrapped to the terminal: an example line over 80 columns would be split
        // on an 80-column one, and its second half read as a command of its own.
        let examples = text.split("Examples:\n").nth(1).unwrap();
        for line in examples.lines().take_while(|l| !l.is_empty()) {
            assert!(line.chars().count() <= 80, "{line:?}");
        }
    }
}

#[test]
fn the_title_names_the_platform_modelled() {
    // The same config and workload read differently on each platform (engines, kernels,
    // allocator blocks): the title says which.
    for (args, platform) in [(&[][..], "cuda"), (&["--device", "cpu"], "cpu")] {
        let o = analyze(&[args, &["--depth", "0"]].concat());
        assert!(o.status.success(), "{}", stderr(&o));
        let text = String::from_utf8(o.stdout).unwrap();
        let title = text.lines().next().unwrap();
        assert!(
            title.contains(&format!("B=1 prefill S=512 bf16 on {platform} — attention")),
            "{title}"
        );
    }
    // A config path with a line break stays on the title's one line.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a\nb.json");
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/deepseek-ocr/config.json"
        ),
        &path,
    )
    .unwrap();
    let o = analyze(&["--config", path.to_str().unwrap(), "--depth", "0"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(
        text.lines().next().unwrap().contains("a\\nb.json — B=1"),
        "{text}"
    );
}

/// DeepSeek-OCR's config routing with V3's noaux_tc over 16 groups of 4 experts, keeping
/// `topk_group` of them for its k = 6.
fn grouped_router_config(dir: &std::path::Path, topk_group: u64) -> String {
    let text = include_str!("../fixtures/deepseek-ocr/config.json");
    let mut v: serde_json::Value = serde_json::from_str(text).unwrap();
    let lang = &mut v["language_config"];
    lang["scoring_func"] = "sigmoid".into();
    lang["topk_method"] = "noaux_tc".into();
    lang["n_group"] = 16.into();
    lang["topk_group"] = topk_group.into();
    let path = dir.join(format!("router-{topk_group}.json"));
    std::fs::write(&path, v.to_string()).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn a_router_keeping_fewer_experts_than_k_is_costed_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let few = analyze(&["--config", &grouped_router_config(dir.path(), 1)]);
    assert!(few.status.success(), "{}", stderr(&few));
    let err = stderr(&few);
    assert!(
        err.starts_with("modelmeter: warning: topk_method noaux_tc keeps topk_group × n_routed_experts / n_group = 1 × 4 = 4 experts per token, fewer than num_experts_per_tok = 6")
            && err.contains("raise topk_group to at least 2")
            && err.lines().count() == 1,
        "{err}"
    );
    // Two groups keep 8 ≥ 6: no warning.
    let enough = analyze(&["--config", &grouped_router_config(dir.path(), 2)]);
    assert!(
        enough.status.success() && stderr(&enough).is_empty(),
        "{}",
        stderr(&enough)
    );
}

#[test]
fn workloads_past_the_trained_positions_are_costed_with_a_warning() {
    let o = analyze(&["--seq-len", "8000", "--new-tokens", "500"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!o.stdout.is_empty());
    let err = stderr(&o);
    assert!(
        err.starts_with("modelmeter: warning: the workload reaches 8500 positions")
            && err.contains("max_position_embeddings = 8192")
            && err.lines().count() == 1,
        "{err}"
    );
    // At the limit: no warning.
    let o = analyze(&["--phase", "decode", "--context-len", "8191"]);
    assert!(
        o.status.success() && stderr(&o).is_empty(),
        "{}",
        stderr(&o)
    );
}
