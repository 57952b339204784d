//! `--oracle python`: torch's own FlopCounterMode on Hugging Face transformers' modules,
//! live, on the CPU (the .venv that scripts/setup-libtorch installs has transformers).

use std::process::Command;

use clap::Parser;
use modelmeter_verify::app::{prepare, report_of, Args};
use modelmeter_verify::hooks::TestHooks;
use modelmeter_verify::report;
use serde_json::Value;

mod common;
use common::{assert_quiet, row, TempDir};

fn verify(args: &[&str]) -> (Option<i32>, Value, String) {
    let tmp = TempDir::new("oracle");
    let json = tmp.path("r.json");
    let out = Command::new(env!("CARGO_BIN_EXE_verify-decoder"))
        .args(["--device", "cpu", "--oracle", "--quiet", "--json"])
        .arg(&json)
        .args(args)
        .output()
        .expect("verify-decoder runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let j = std::fs::read_to_string(&json)
        .map(|t| serde_json::from_str(&t).unwrap())
        .unwrap_or(Value::Null);
    (out.status.code(), j, stderr)
}

/// The CPU SDPA kernel: matmul work outside FlopCounterMode's registry.
const CPU_SDPA: &str = "aten::_scaled_dot_product_flash_attention_for_cpu";

/// Every layer: `oracle_flops` exact (torch's FlopCounterMode on the transformers module
/// equals this project's count), `oracle_output` within its bound. A layer whose attention
/// ran in the CPU SDPA kernel is a `known_gap` that names it (neither side counts that
/// kernel, so the equal totals do not witness it); `blind` says whether any layer of this
/// run must be one.
fn assert_oracle_agrees(args: &[&str], blind: bool) {
    let (code, j, stderr) = verify(args);
    assert_eq!(code, Some(0), "{args:?}: {stderr}");
    assert_quiet(&stderr);
    // One named layer, or DeepSeek-OCR's seven: an empty list would pass every check below.
    let layers = j["layers"].as_array().unwrap();
    let expected = if args.contains(&"--layers") { 1 } else { 7 };
    assert_eq!(layers.len(), expected, "{args:?}");
    let mut blind_layers = 0;
    for layer in layers {
        let flops = row(layer, "oracle_flops");
        assert_eq!(flops["analytic"], flops["measured"], "{args:?}: {flops}");
        let ran_cpu_sdpa = layer["ops"]
            .as_array()
            .unwrap()
            .iter()
            .any(|op| op["name"] == CPU_SDPA);
        if ran_cpu_sdpa {
            blind_layers += 1;
            assert_eq!(flops["status"], "known_gap", "{args:?}: {flops}");
            let note = flops["note"].as_str().unwrap();
            assert!(
                note.contains(&format!("not witnessed here: {CPU_SDPA}")),
                "{note}"
            );
        } else {
            assert_eq!(flops["status"], "pass", "{args:?}: {flops}");
        }
        let output = row(layer, "oracle_output");
        assert_eq!(output["status"], "pass", "{args:?}: {output}");
        // A MoE's routing is compared with transformers' router's: said for every MoE,
        // and in fp32 the same on every expert.
        if layer["tokens_per_expert"].is_array() {
            let note = output["note"].as_str().unwrap();
            let agreed = note.contains(
                "transformers' router sent each expert as many tokens as the reference's gate",
            );
            assert!(agreed || note.contains("the routing differs"), "{note}");
            if !args.contains(&"bf16") {
                assert!(agreed, "{args:?}: {note}");
            }
        }
        // A layer with matmuls was really counted by torch (not 0 = 0).
        if row(layer, "matmul_flops")["analytic"].as_u64().unwrap() > 0 {
            assert!(flops["analytic"].as_u64().unwrap() > 0, "{args:?}: {flops}");
        }
    }
    // The attention and both decoder layers, when SDPA runs on the CPU.
    assert_eq!(blind_layers, if blind { 3 } else { 0 }, "{args:?}");
}

#[test]
fn the_default_workload_agrees_with_torchs_flop_counter_exactly() {
    assert_oracle_agrees(&[], true);
}

#[test]
fn other_shapes_agree_too() {
    assert_oracle_agrees(
        &[
            "--phase",
            "decode",
            "--context-len",
            "9",
            "--batch",
            "2",
            "--attn",
            "eager",
        ],
        false,
    );
    assert_oracle_agrees(&["--dtype", "bf16", "--seq-len", "8", "--batch", "3"], true);
}

/// The witness on generated configurations: `--sweep N --oracle` draws each case as
/// transformers can run it. Seed 34's two cases are MLA ones whose draws need both fits:
/// a sigmoid greedy router (no transformers router: it becomes a softmax one) and an SDPA
/// core (transformers hands SDPA unpadded values: it runs eager).
#[test]
fn a_sweep_has_the_witness_on_every_generated_case() {
    let tmp = TempDir::new("oracle-sweep");
    let json = tmp.path("r.json");
    let out = Command::new(env!("CARGO_BIN_EXE_verify-decoder"))
        .args([
            "--device", "cpu", "--sweep", "2", "--seed", "34", "--oracle",
        ])
        .args(["--quiet", "--json"])
        .arg(&json)
        .output()
        .expect("verify-decoder runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let j: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let cases = j["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 2);
    for case in cases {
        let config = &case["config"];
        let layers = case["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 7, "{config}");
        for layer in layers {
            // Eager attention and matching routers: every row witnessed and exact.
            let flops = row(layer, "oracle_flops");
            assert_eq!(flops["status"], "pass", "{config}: {flops}");
            assert_eq!(flops["analytic"], flops["measured"], "{config}: {flops}");
            assert_eq!(row(layer, "oracle_output")["status"], "pass", "{config}");
        }
        let attention = layers.iter().find(|l| l["name"] == "DeepseekV2Attention");
        assert!(attention.is_some(), "an MLA attention, run eager: {config}");
    }
}

#[test]
fn mla_and_the_v3_router_have_the_transformers_witness_too() {
    // DeepSeek-V2-Lite's MLA (eager prefill, full size) and DeepSeek-V3's noaux_tc gate:
    // exact against DeepseekV2Attention / DeepseekV3TopkRouter, as DeepSeek-OCR's layers are.
    let mla = [
        "--config",
        "deepseek-v2-lite",
        "--layers",
        "DeepseekV2Attention",
        "--attn",
        "eager",
        "--dtype",
        "fp32",
        "--batch",
        "1",
    ];
    assert_oracle_agrees(&[&mla[..], &["--seq-len", "16"]].concat(), false);
    assert_oracle_agrees(
        &[
            "--config",
            "deepseek-v3",
            "--layers",
            "MoEGate",
            "--dtype",
            "fp32",
            "--seq-len",
            "16",
        ],
        false,
    );
    // One decode step: the outputs agree, but transformers caches the latent and
    // re-decompresses all C = 16 cached tokens with kv_b_proj at every step (a named
    // difference, reference/parity/README.md): 2·C·r_kv·H·(d_n + d_v) = 2·16·512·16·256
    // more aten::mm FLOPs in torch's count, and nothing else. The count here is adjusted
    // by exactly that, and the row says so.
    let args = [&mla[..], &["--phase", "decode", "--context-len", "16"]].concat();
    let (code, j, stderr) = verify(&args);
    assert_eq!(code, Some(0), "{stderr}");
    let layer = &j["layers"][0];
    assert_eq!(row(layer, "oracle_output")["status"], "pass", "{layer}");
    let flops = row(layer, "oracle_flops");
    assert_eq!(flops["status"], "pass", "{flops}");
    assert_eq!(flops["analytic"], flops["measured"], "{flops}");
    let note = flops["note"].as_str().unwrap();
    assert!(
        note.contains(&format!(
            "adjusted: +{} aten::mm FLOPs here",
            2 * 16 * 512 * 16 * 256
        )),
        "{note}"
    );
}

#[test]
fn a_wrong_formula_shared_by_both_sides_is_caught_only_by_the_oracle() {
    // aten::mm counted twice in a scratch copy of the table: the analytic layers and the
    // counter still agree (they share the table); torch's FlopCounterMode does not.
    let args = Args::try_parse_from([
        "verify-decoder",
        "--device",
        "cpu",
        "--oracle",
        "--quiet",
        "--seq-len",
        "8",
        "--layers",
        "DeepseekV2MLP,DeepseekV2RMSNorm",
    ])
    .unwrap();
    let mut ready = prepare(&args).expect("checks out");
    ready.plan.hooks = TestHooks {
        scaled_matmul: Some(("aten::mm", 2)),
        ..TestHooks::default()
    };
    let j = report::to_json(&report_of(&args, &ready));
    let mlp = &j["layers"][0];
    for exact in ["matmul_flops", "tensor_core_flops", "cuda_core_flops"] {
        assert_eq!(
            row(mlp, exact)["status"],
            "pass",
            "{exact}: both sides agree"
        );
    }
    let oracle = row(mlp, "oracle_flops");
    assert_eq!(oracle["status"], "fail", "{oracle}");
    assert_eq!(
        oracle["measured"].as_u64().unwrap(),
        2 * oracle["analytic"].as_u64().unwrap()
    );
    assert!(oracle["note"].as_str().unwrap().contains("aten::mm"));
    // RMSNorm has no mm: the oracle agrees there.
    assert_eq!(row(&j["layers"][1], "oracle_flops")["status"], "pass");
}

#[test]
fn quiet_still_says_why_the_oracle_could_not_check_a_layer() {
    // An interpreter that passes the start-up probe, then fails on every layer: each layer
    // is an error (exit 1), and --quiet prints the cause before the summary line.
    use std::os::unix::fs::PermissionsExt;
    let tmp = TempDir::new("oracle-quiet");
    let python = tmp.path("python");
    std::fs::write(
        &python,
        "#!/bin/sh\nif [ \"$1\" = \"-c\" ]; then echo \"2.11.0 4.46\"; exit 0; fi\n\
         echo 'boom: the oracle crashed' >&2\nexit 3\n",
    )
    .unwrap();
    std::fs::set_permissions(&python, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_verify-decoder"))
        .args(["--device", "cpu", "--quiet", "--seq-len", "8"])
        .args(["--layers", "DeepseekV2RMSNorm"])
        .arg(format!("--oracle=python={}", python.display()))
        .output()
        .expect("verify-decoder runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.last(),
        Some(&"1 layer: 0 pass, 0 known_gap, 0 fail, 1 error"),
        "{stdout}"
    );
    assert!(
        lines[0].starts_with(
            "DeepseekV2RMSNorm oracle_flops: error: the oracle could not check this layer"
        ) && stdout.contains("boom: the oracle crashed"),
        "{stdout}"
    );
}

#[test]
fn an_unusable_interpreter_is_one_line_and_exit_2_before_anything_runs() {
    for spec in ["python=/no/such/python", "ruby"] {
        let out = Command::new(env!("CARGO_BIN_EXE_verify-decoder"))
            .args(["--device", "cpu", &format!("--oracle={spec}")])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{spec}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains("--oracle"), "{stderr}");
        assert!(out.stdout.is_empty(), "nothing ran");
    }
    // A parity script that is not there (or a folder, or nothing) is refused before
    // anything runs, too, and before the interpreter is probed.
    let folder = std::env::temp_dir();
    for (script, says) in [
        (
            "/no/such/parity.py",
            "/no/such/parity.py is not there".to_string(),
        ),
        (
            folder.to_str().unwrap(),
            format!("{} is a folder, not the script", folder.display()),
        ),
        ("", "script \"\" is empty".to_string()),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_verify-decoder"))
            .args(["--device", "cpu", "--layers", "MoEGate", "--oracle"])
            .env("MODELMETER_PARITY_SCRIPT", script)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.lines().count() == 1 && stderr.contains(&says),
            "{script:?}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "nothing ran");
    }
}

/// A script whose side checks disagree (the eager mask's pattern, the MLA cache after the
/// prefill): the output row fails although the outputs agree. A copy of parity.py with
/// each check's function answering "different" stands in for a transformers that masks
/// or caches otherwise.
#[test]
fn a_mask_or_cache_that_differs_from_transformers_fails_the_output_row() {
    let script = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../reference/parity/parity.py"),
    )
    .unwrap();
    let mut broken = script.clone();
    for (def, answer) in [
        (
            "def mask_pattern_check(case_mask, hf_mask, extra):\n",
            "    return False\n",
        ),
        (
            "def mla_cache_rel_err(att, cache, layer_idx, tensors, form, family):\n",
            "    return 1.0\n",
        ),
    ] {
        assert!(broken.contains(def), "parity.py no longer has {def}");
        broken = broken.replacen(def, &format!("{def}{answer}"), 1);
    }
    let tmp = TempDir::new("oracle-broken");
    let path = tmp.path("parity.py");
    std::fs::write(&path, broken).unwrap();
    for (args, says) in [
        (
            &[
                "--layers",
                "LlamaAttention",
                "--attn",
                "eager",
                "--seq-len",
                "8",
            ][..],
            "causal mask differs",
        ),
        (
            &[
                "--config",
                "deepseek-v2-lite",
                "--layers",
                "DeepseekV2Attention",
                "--attn",
                "eager",
                "--phase",
                "decode",
                "--context-len",
                "4",
                "--dtype",
                "fp32",
            ][..],
            "KV cache after the prefill is",
        ),
    ] {
        let json = tmp.path("r.json");
        let out = Command::new(env!("CARGO_BIN_EXE_verify-decoder"))
            .args(["--device", "cpu", "--oracle", "--quiet", "--json"])
            .arg(&json)
            .args(args)
            .env("MODELMETER_PARITY_SCRIPT", &path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        let j: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        let output = row(&j["layers"][0], "oracle_output");
        assert_eq!(output["status"], "fail", "{args:?}: {output}");
        let note = output["note"].as_str().unwrap();
        assert!(note.contains(says), "{args:?}: {note}");
    }
}
