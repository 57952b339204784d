//! `verify-decoder --model`: the whole causal LM on the CPU in fp32 — the CI command,
//! a config with two dense layers, mismatches named by layer and step, and sizes refused
//! before anything runs.

use std::path::{Path, PathBuf};

use clap::Parser;
use modelmeter::layers::{AttentionImpl, Generation};
use modelmeter::{Dtype, Metric, MlaForm, MlpKind, ModelConfig, Phase, Platform};
use modelmeter_verify::app::{model_report_of, prepare, Args};
use modelmeter_verify::hooks::TestHooks;
use modelmeter_verify::report::{self, ModelReport};
use modelmeter_verify::sweep;
use serde_json::Value;

mod common;
use common::{
    analytic_ops, assert_quiet, cases_from_env, measured_ops, names, read_json, row, text, verify,
    TempDir, EXACT,
};

fn rows(v: &Value) -> &Vec<Value> {
    v["metrics"].as_array().unwrap()
}

fn measured(v: &Value, metric: &str) -> u64 {
    row(v, metric)["measured"].as_u64().unwrap()
}

/// Every exact row of `v` has analytic = measured, rel_diff 0 and status pass.
fn assert_exact(what: &str, v: &Value) {
    for metric in EXACT {
        let r = row(v, metric);
        assert_eq!(r["analytic"], r["measured"], "{what} {metric}: {r}");
        assert_eq!(r["rel_diff"], 0.0, "{what} {metric}");
        assert_eq!(r["status"], "pass", "{what} {metric}");
    }
    for r in rows(v) {
        assert!(
            r["status"] == "pass" || r["status"] == "known_gap",
            "{what}: {r}"
        );
    }
}

/// A `--model --verbose` report's `model` is a prefill and `steps` decode steps, each
/// call with exactly `parts` (in order), and the prefill, decode and total phases, every
/// part of every call and every phase exact.
fn assert_model_exact(what: &str, model: &Value, steps: usize, parts: &[&str]) {
    let calls = model["calls"].as_array().unwrap();
    assert_eq!(
        calls.len(),
        1 + steps,
        "{what}: a prefill and {steps} decode steps"
    );
    for (i, call) in calls.iter().enumerate() {
        let phase = if i == 0 { "prefill" } else { "decode" };
        assert_eq!(call["phase"], phase, "{what} call {i}");
        assert_eq!(
            names(&call["layers"]),
            parts,
            "{what} call {i}: --verbose keeps every part"
        );
        for layer in call["layers"].as_array().unwrap() {
            assert_exact(&format!("{what} call {i} {}", layer["name"]), layer);
        }
    }
    let phases = model["phases"].as_array().unwrap();
    let labels: Vec<&str> = phases
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["prefill", "decode", "total"], "{what}");
    for phase in phases {
        assert_exact(&format!("{what} phase {}", phase["phase"]), phase);
    }
}

/// A small DeepSeek-V2 config: 4 layers, the first two dense (first_k_dense_replace 2).
const TWO_DENSE: &str = r#"{"model_type": "deepseek_v2", "hidden_size": 64,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "intermediate_size": 96, "moe_intermediate_size": 32, "n_routed_experts": 8,
    "num_experts_per_tok": 2, "n_shared_experts": 1, "num_hidden_layers": 4,
    "first_k_dense_replace": 2, "moe_layer_freq": 1, "vocab_size": 500,
    "max_position_embeddings": 64, "use_mla": false}"#;

/// A small MLA config in V3's shape: a LoRA query, YaRN, sigmoid routing with a
/// correction bias over groups; 3 layers, the first dense.
const SMALL_MLA: &str = r#"{"model_type": "deepseek_v3", "hidden_size": 64,
    "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 24,
    "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 6,
    "intermediate_size": 96, "moe_intermediate_size": 16, "n_routed_experts": 8,
    "num_experts_per_tok": 2, "n_shared_experts": 1, "n_group": 4, "topk_group": 2,
    "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": true,
    "routed_scaling_factor": 2.5, "num_hidden_layers": 3, "first_k_dense_replace": 1,
    "moe_layer_freq": 1, "vocab_size": 300, "max_position_embeddings": 4096,
    "rope_theta": 10000, "attention_bias": false, "tie_word_embeddings": false,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}}"#;

#[test]
fn mla_models_are_exact_in_every_form() {
    // The vendor's naive MLA (SDPA and eager) and the weight-absorbed form with its latent
    // cache: every part, every call, every phase exact to the FLOP and byte.
    let dir = TempDir::new("mla");
    let config = dir.path("config.json");
    std::fs::write(&config, SMALL_MLA).unwrap();
    for form in [
        &["--attn", "sdpa"][..],
        &["--attn", "eager"],
        &["--mla", "absorb"],
    ] {
        let json = dir.path("m.json");
        let mut args = vec![
            "--device",
            "cpu",
            "--config",
            config.to_str().unwrap(),
            "--model",
            "--seq-len",
            "9",
            "--new-tokens",
            "3",
            "--verbose",
            "--json",
            json.to_str().unwrap(),
        ];
        args.extend_from_slice(form);
        let o = verify(&args);
        let stdout = text(&o.stdout);
        let stderr = text(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "{form:?}\n{stdout}\n{stderr}");
        // Standard error is not a terminal: --verbose gives a progress line for every
        // call, not only the first and the last.
        let calls: Vec<&str> = stderr.lines().filter(|l| l.starts_with('[')).collect();
        assert_eq!(calls.len(), 4, "{form:?}: {stderr}");
        for (i, line) in calls.iter().enumerate() {
            assert!(
                line.starts_with(&format!("[{}/4] ", i + 1)),
                "{form:?}: {stderr}"
            );
        }
        let report = read_json(&json);
        // The absorbed form has no attention core to name: null, not the default sdpa.
        let core = match form {
            ["--attn", core] => Value::from(*core),
            _ => Value::Null,
        };
        assert_eq!(report["attention"], core, "{form:?}");
        assert_eq!(report["environment"]["attention"], core, "{form:?}");
        let model = &report["model"];
        assert_model_exact(
            &format!("{form:?}"),
            model,
            3,
            &[
                "embed_tokens",
                "layers.0 (DeepseekV2DecoderLayer_dense)",
                "layers.1 (DeepseekV2DecoderLayer_moe)",
                "layers.2 (DeepseekV2DecoderLayer_moe)",
                "norm",
                "lm_head",
            ],
        );
        // A phase's flops row names the kernels FlopCounterMode cannot see, gathered from
        // every layer of every call, each once: the CPU SDPA kernel under --attn sdpa.
        let sdpa = "aten::_scaled_dot_product_flash_attention_for_cpu";
        for phase in model["phases"].as_array().unwrap() {
            let note = row(phase, "flops")["note"].as_str().unwrap_or("");
            let named = note.matches(sdpa).count();
            assert_eq!(
                named,
                usize::from(form == ["--attn", "sdpa"]),
                "{form:?} {}: {note}",
                phase["phase"]
            );
        }
        if form == ["--mla", "absorb"] {
            // The latent cache: 3 layers × (r_kv + d_r) × 12 tokens × 4 bytes.
            let total = model["phases"].as_array().unwrap().last().unwrap();
            assert_eq!(measured(total, "kv_cache_bytes"), 3 * (16 + 4) * 12 * 4);
        }
    }
}

#[test]
fn generated_configs_are_exact_as_whole_models() {
    // The sweep's generator (multi-head and MLA, every routing method, both MLA forms,
    // head dims the SDPA kernels treat specially, biases, batches of 1 to 3) as whole
    // models in fp32 and bf16 by turns: a prefill and two decode steps, every part of
    // every call and every phase exact. MODELMETER_MODEL_SWEEP_CASES sets how many (a
    // longer campaign by hand); the default few hold multi-head, naive and absorbed MLA.
    let cases = cases_from_env("MODELMETER_MODEL_SWEEP_CASES", 6);
    let dir = TempDir::new("generated");
    let base = modelmeter::Workload::prefill(1, 1)
        .unwrap()
        .with_dtype(Dtype::F32)
        .unwrap()
        .on(Platform::Cpu);
    let (mut mla, mut absorbed) = (0, 0);
    for index in 0..cases {
        let case = sweep::generate(15, index, &base);
        let dtype = if index % 2 == 0 { "fp32" } else { "bf16" };
        let config = dir.path(&format!("c{index}.json"));
        std::fs::write(&config, case.config_json.to_string()).unwrap();
        let json = dir.path(&format!("m{index}.json"));
        let prompt = match case.workload.phase {
            Phase::Prefill { seq_len } => seq_len,
            Phase::Decode { context_len } => context_len,
        };
        let (batch, prompt) = (case.workload.batch.to_string(), prompt.to_string());
        let mut args = vec![
            "--device",
            "cpu",
            "--config",
            config.to_str().unwrap(),
            "--model",
            "--batch",
            &batch,
            "--seq-len",
            &prompt,
            "--new-tokens",
            "2",
            "--dtype",
            dtype,
            "--verbose",
            "--json",
            json.to_str().unwrap(),
        ];
        let absorb = case.config.mla.is_some() && case.workload.mla == MlaForm::Absorb;
        mla += usize::from(case.config.mla.is_some());
        absorbed += usize::from(absorb);
        match (absorb, case.attention) {
            (true, _) => args.extend(["--mla", "absorb"]),
            (false, AttentionImpl::Sdpa) => args.extend(["--attn", "sdpa"]),
            (false, AttentionImpl::Eager) => args.extend(["--attn", "eager"]),
        }
        let o = verify(&args);
        let what = format!("generated case {index} ({args:?})");
        assert_eq!(
            o.status.code(),
            Some(0),
            "{what}\n{}{}",
            text(&o.stdout),
            text(&o.stderr)
        );
        let report = read_json(&json);
        // The form asked for is the form that ran.
        // (The workload names its MLA form only when it is not the default, naive.)
        let form = if absorb {
            Value::from("absorb")
        } else {
            Value::Null
        };
        assert_eq!(report["workload"]["mla"], form, "{what}");
        assert_eq!(report["attention"].is_null(), absorb, "{what}");
        let model = &report["model"];
        assert_model_exact(
            &what,
            model,
            2,
            &[
                "embed_tokens",
                "layers.0 (DeepseekV2DecoderLayer_dense)",
                "layers.1 (DeepseekV2DecoderLayer_moe)",
                "norm",
                "lm_head",
            ],
        );
    }
    if cases >= 6 {
        assert!(
            absorbed > 0 && mla > absorbed && mla < cases,
            "{mla} MLA cases ({absorbed} absorbed) of {cases}"
        );
    }
    eprintln!("{cases} generated whole models exact ({mla} MLA, {absorbed} absorbed)");
}

#[test]
fn ci_command_is_exact_per_part_per_step_and_in_total() {
    let dir = TempDir::new("ci");
    let (json, junit) = (dir.path("m.json"), dir.path("m.xml"));
    let o = verify(&[
        "--device",
        "cpu",
        "--model",
        "--num-layers",
        "2",
        "--seq-len",
        "64",
        "--new-tokens",
        "8",
        "--verbose",
        "--json",
        json.to_str().unwrap(),
        "--junit",
        junit.to_str().unwrap(),
    ]);
    let stdout = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{stdout}\n{}", text(&o.stderr));
    assert!(
        stdout.trim_end().ends_with(
            "12 checks (prefill, 8 decode steps, 3 phase totals): 0 pass, 12 known_gap, 0 fail, 0 error"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("layers 1 (MoE)") && stdout.contains("decode step 7"));

    let j = read_json(&json);
    assert_eq!(j["schema"], "modelmeter.verify-model/1");
    let model = &j["model"];
    assert_eq!(model["num_layers"], 2);
    assert_eq!(model["config_layers"], 12);
    let calls = model["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 9, "the prefill and 8 decode steps");
    let names = [
        "embed_tokens",
        "layers.0 (DeepseekV2DecoderLayer_dense)",
        "layers.1 (DeepseekV2DecoderLayer_moe)",
        "norm",
        "lm_head",
    ];
    for (i, call) in calls.iter().enumerate() {
        let what = format!("call {i}");
        assert_exact(&what, call);
        let parts = call["layers"].as_array().unwrap();
        let got: Vec<&str> = parts.iter().map(|p| p["name"].as_str().unwrap()).collect();
        assert_eq!(got, names, "--verbose keeps every part of every call");
        for p in parts {
            assert_exact(&format!("{what} {}", p["name"]), p);
            assert!(p.get("unknown_ops").is_none(), "{p}");
        }
        // Decode step t follows 64 + t cached tokens and attends over 64 + t + 1 keys.
        if i > 0 {
            assert_eq!(call["phase"], "decode");
            assert_eq!(call["step"], i - 1);
            assert_eq!(call["context_len"], 64 + i - 1);
            assert_eq!(call["key_len"], 64 + i);
        }
    }
    // lm_head in the prefill: 2·S·h·V, by hand.
    let head = &calls[0]["layers"][4];
    assert_eq!(measured(head, "matmul_flops"), 2 * 64 * 1280 * 129_280);
    // Each decode step: the same work but one more key in each layer's attention core
    // (4·B·H·S_q·d = 4·10·128 per layer on the CPU SDPA kernel); the routed experts run
    // N·k = 6 rows whatever the routing.
    let stack: Vec<u64> = calls[1..]
        .iter()
        .map(|c| measured(c, "matmul_flops"))
        .collect();
    for w in stack.windows(2) {
        assert_eq!(w[1] - w[0], 2 * 4 * 10 * 128, "{stack:?}");
    }

    // The analytic generation's closed form equals the sum of the measured calls.
    let generation = Generation {
        config: ModelConfig::deepseek_ocr().first_layers(2).unwrap(),
        batch: 1,
        prefill_len: 64,
        new_tokens: 8,
        dtype: Dtype::F32,
        allow_tf32: false,
        platform: Platform::Cpu,
        attention: AttentionImpl::Sdpa,
        mla: Default::default(),
    }
    .metrics()
    .unwrap();
    // The closed form has min(E, N·k) routed experts read their weights in each call (64
    // in the prefill, 6 in a decode step); an expert that received no tokens reads none:
    // 3·h·m fp32 weights each.
    let unread: Vec<u64> = calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let default = if i == 0 { 64 } else { 6 };
            c["layers"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|p| p["experts_used"].as_u64())
                .map(|used| (default - used) * 3 * 1280 * 896 * 4)
                .sum()
        })
        .collect();
    for metric in Metric::ALL
        .into_iter()
        .filter(|m| EXACT.contains(&m.name()))
    {
        let per_call: Vec<u64> = calls
            .iter()
            .zip(&unread)
            .map(|(c, unread)| {
                let m = measured(c, metric.name());
                if metric == Metric::IoBytes {
                    m + unread
                } else {
                    m
                }
            })
            .collect();
        let summed = match metric {
            // State: the model's weights, and the KV cache after the last step.
            Metric::WeightBytes | Metric::KvCacheBytes => *per_call.last().unwrap(),
            // A generation's activations are its largest call's (the calls do not overlap).
            Metric::ActivationBytes => *per_call.iter().max().unwrap(),
            _ => per_call.iter().sum(),
        };
        assert_eq!(metric.get(&generation.total), summed, "{}", metric.name());
        assert_eq!(
            metric.get(&generation.decode),
            match metric {
                Metric::WeightBytes | Metric::KvCacheBytes => summed,
                Metric::ActivationBytes => *per_call[1..].iter().max().unwrap(),
                _ => summed - per_call[0],
            },
            "{}",
            metric.name()
        );
    }
    // KV cache after the last step: 2 layers · 2·B·H·(64 + 8)·d · 4 bytes.
    assert_eq!(generation.total.kv_cache_bytes, 2 * 2 * 10 * 72 * 128 * 4);

    // The phases: closed form vs measured sums, and per group of parts.
    let phases = model["phases"].as_array().unwrap();
    let labels: Vec<&str> = phases
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["prefill", "decode", "total"]);
    for p in phases {
        assert_exact(p["phase"].as_str().unwrap(), p);
        assert_eq!(p["groups"].as_array().unwrap().len(), 5);
        for g in p["groups"].as_array().unwrap() {
            assert_exact(g["name"].as_str().unwrap(), g);
        }
    }
    assert_eq!(
        measured(&phases[2], "matmul_flops"),
        generation.total.matmul_flops
    );
    // A phase's io_bytes row says how many bytes of unread experts its closed form left
    // out (a model of dense layers only has none: `a_dense_model_has_no_unread_experts`).
    for (p, phase_unread) in phases.iter().zip([
        unread[0],
        unread[1..].iter().sum(),
        unread.iter().sum::<u64>(),
    ]) {
        let note = row(p, "io_bytes")["note"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let said = format!("{phase_unread} bytes of weights of experts that received no tokens");
        assert_eq!(
            note.contains(&said),
            phase_unread > 0,
            "{}: {note}",
            p["phase"]
        );
        assert_eq!(note.contains("received no tokens"), phase_unread > 0);
    }

    // JUnit: one case per phase and group × row (flops + 6 exact), none failing.
    let xml = std::fs::read_to_string(&junit).unwrap();
    let mut reader = quick_xml::Reader::from_str(&xml);
    let (mut testcases, mut failures) = (0, 0);
    loop {
        match reader.read_event().expect("well-formed XML") {
            quick_xml::events::Event::Eof => break,
            quick_xml::events::Event::Start(e) | quick_xml::events::Event::Empty(e) => {
                match e.name().as_ref() {
                    b"testcase" => testcases += 1,
                    b"failure" | b"error" => failures += 1,
                    _ => {}
                }
            }
            _ => {}
        }
    }
    assert_eq!((testcases, failures), (3 * 6 * (1 + EXACT.len()), 0));
    assert!(xml.contains("classname=\"model/total\" name=\"matmul_flops\""));
}

fn small_config(dir: &TempDir) -> PathBuf {
    let path = dir.path("two-dense.json");
    std::fs::write(&path, TWO_DENSE).unwrap();
    path
}

/// `verify-decoder --device cpu --model --quiet` on [`TWO_DENSE`] with `args`: its stdout
/// and its JSON report (the run must exit 0).
fn quiet_small_model(args: &[&str]) -> (String, Value) {
    let dir = TempDir::new("small-model");
    let config = small_config(&dir);
    let json = dir.path("m.json");
    let mut argv = vec![
        "--device",
        "cpu",
        "--model",
        "--config",
        config.to_str().unwrap(),
    ];
    argv.extend_from_slice(args);
    argv.extend(["--json", json.to_str().unwrap(), "-q"]);
    let o = verify(&argv);
    let stdout = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{stdout}\n{}", text(&o.stderr));
    assert_quiet(&text(&o.stderr));
    (stdout, read_json(&json))
}

/// Without MoE layers no weight goes unread: each phase's io_bytes row is the closed
/// form's, with no note of unread experts (not one saying 0 bytes).
#[test]
fn a_dense_model_has_no_unread_experts() {
    let (_, j) = quiet_small_model(&["--num-layers", "2", "--seq-len", "5", "--new-tokens", "2"]);
    assert_eq!(
        j["model"]["layer_kinds"],
        serde_json::json!(["dense", "dense"])
    );
    let phases = j["model"]["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 3);
    for p in phases {
        assert_exact("phase", p);
        let io = row(p, "io_bytes");
        assert!(io.get("note").is_none(), "{}: {io}", p["phase"]);
    }
}

#[test]
fn three_layers_of_a_config_with_two_dense_run_two_dense_and_one_moe() {
    let (stdout, j) = quiet_small_model(&[
        "--num-layers",
        "3",
        "--seq-len",
        "12",
        "--new-tokens",
        "5",
        "--batch",
        "2",
        "--attn",
        "eager",
    ]);
    assert_eq!(stdout.lines().count(), 1, "--quiet: the summary line only");
    assert_eq!(
        j["model"]["layer_kinds"],
        serde_json::json!(["dense", "dense", "moe"])
    );
    let calls = j["model"]["calls"].as_array().unwrap();
    assert_eq!(calls.len(), 6);
    let prefill: Vec<&str> = calls[0]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        prefill,
        [
            "embed_tokens",
            "layers.0 (DeepseekV2DecoderLayer_dense)",
            "layers.1 (DeepseekV2DecoderLayer_dense)",
            "layers.2 (DeepseekV2DecoderLayer_moe)",
            "norm",
            "lm_head"
        ]
    );
    for call in calls {
        assert_exact("call", call);
        if call["phase"] == "decode" {
            assert!(
                call.get("layers").is_none(),
                "exact decode steps keep no parts without --verbose"
            );
        }
    }
    let groups: Vec<&str> = j["model"]["phases"][2]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        groups,
        [
            "embed_tokens",
            "layers 0-1 (dense)",
            "layers 2 (MoE)",
            "norm",
            "lm_head"
        ]
    );
    for p in j["model"]["phases"].as_array().unwrap() {
        assert_exact("phase", p);
    }
}

/// Without `--quiet` and with standard error not a terminal, the progress is a line when
/// the model is built, then one for the first and the last call, each counted `[k/N]`
/// of the prefill and every decode step.
#[test]
fn progress_lines_count_the_calls() {
    let dir = TempDir::new("progress");
    let config = small_config(&dir);
    let o = verify(&[
        "--device",
        "cpu",
        "--model",
        "--config",
        config.to_str().unwrap(),
        "--seq-len",
        "6",
        "--new-tokens",
        "5",
    ]);
    let stderr = text(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{stderr}");
    let progress: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("model:") || l.starts_with('['))
        .collect();
    assert_eq!(progress.len(), 3, "{stderr}");
    assert_eq!(progress[0], "model: building the reference model ...");
    assert!(
        progress[1].starts_with("[1/6] prefill known_gap ("),
        "{stderr}"
    );
    assert!(
        progress[2].starts_with("[6/6] decode step 4 known_gap ("),
        "{stderr}"
    );
}

/// A `--model` run at the default tolerance (0.05): exact rows must still be equal.
fn run_model(config: &Path, hooks: TestHooks) -> (ModelReport, String, String) {
    run_model_within(config, hooks, "0.05")
}

/// [`run_model`] at the tolerance `accept_rel_diff`.
fn run_model_within(
    config: &Path,
    hooks: TestHooks,
    accept_rel_diff: &str,
) -> (ModelReport, String, String) {
    let argv = [
        "verify-decoder",
        "--device",
        "cpu",
        "--quiet",
        "--model",
        "--config",
        config.to_str().unwrap(),
        "--seq-len",
        "6",
        "--new-tokens",
        "5",
        "--accept-rel-diff",
        accept_rel_diff,
    ];
    let args = Args::try_parse_from(argv).expect("valid options");
    let mut ready = prepare(&args).expect("the invocation checks out");
    ready.plan.hooks = hooks;
    let model = ready.model.expect("--model");
    let report = model_report_of(&args, &ready, &model);
    let table = report::model_table(&report);
    let junit = report::model_junit(&report);
    (report, table, junit)
}

#[test]
fn a_mismatch_names_its_layer_and_step() {
    let dir = TempDir::new("hook");
    let config = small_config(&dir);
    let hooks = TestHooks::perturbing("decode[3]/layers.2", "kv_cache_bytes", 1);
    let (report, table, junit) = run_model(&config, hooks);
    assert!(!report.ok(), "exit code 1");
    let calls = &report.result.calls;
    let bad: Vec<String> = calls
        .iter()
        .filter(|c| !c.status.is_ok())
        .map(|c| c.call.describe())
        .collect();
    assert_eq!(bad, ["decode step 3"]);
    let step = &calls[4];
    let failing: Vec<&str> = step
        .layers
        .iter()
        .filter(|l| !l.status.is_ok())
        .map(|l| l.name.as_str())
        .collect();
    assert_eq!(failing, ["layers.2 (DeepseekV2DecoderLayer_moe)"]);
    assert!(
        table.contains("decode step 3 layers.2 (DeepseekV2DecoderLayer_moe)")
            && table.contains("kv_cache_bytes"),
        "{table}"
    );
    // The step's line counts 7 of its 8 exact rows equal.
    assert!(
        table
            .lines()
            .any(|l| l.contains("decode step 3") && l.contains("7/8")),
        "{table}"
    );
    assert!(
        !table.contains("decode step 2 "),
        "exact steps are not listed without --verbose: {table}"
    );
    assert!(
        junit.contains(
            "classname=\"model/decode[3]/layers.2 (DeepseekV2DecoderLayer_moe)\" name=\"kv_cache_bytes\"><failure"
        ),
        "{junit}"
    );
    // The same run without the hook passes.
    let (clean, _, _) = run_model(&config, TestHooks::default());
    assert!(clean.ok(), "{}", report::model_table(&clean));
}

/// A `--model` run of the small config with `delta` added to the decode phase's closed
/// form of `metric`: it fails, though every call passes.
fn decode_closed_form_off(metric: &str, delta: u64) -> (ModelReport, String, String) {
    let dir = TempDir::new("closed");
    let config = small_config(&dir);
    let hooks = TestHooks::perturbing("generation/decode", metric, delta);
    let (report, table, junit) = run_model(&config, hooks);
    assert!(!report.ok(), "{table}");
    assert!(report.result.calls.iter().all(|c| c.status.is_ok()));
    (report, table, junit)
}

/// The phase rows compare the generation's closed form (`Generation::metrics`), not the
/// sum of the calls' analytic sides: a closed form one FLOP off fails its phase while
/// every call passes.
#[test]
fn a_phase_row_checks_the_closed_form_not_the_calls_sum() {
    let (report, table, _) = decode_closed_form_off("matmul_flops", 1);
    let phases: Vec<(&str, bool)> = report
        .result
        .phases
        .iter()
        .map(|p| (p.phase, p.status.is_ok()))
        .collect();
    assert_eq!(
        phases,
        [("prefill", true), ("decode", false), ("total", true)]
    );
    let decode = &report.result.phases[1];
    let row = decode
        .metrics
        .iter()
        .find(|m| m.metric.name() == "matmul_flops")
        .unwrap();
    assert_eq!(row.analytic, row.measured + 1, "{table}");
}

#[test]
fn a_peak_within_the_tolerance_but_not_exact_is_not_called_exact() {
    // The peak is judged within the tolerance; a call counted exact has its parts left
    // out of the report, so an inexact peak must keep its call in view.
    let dir = TempDir::new("peak");
    let config = small_config(&dir);
    let hooks = TestHooks::perturbing("decode[1]/layers.1", "peak_activation_bytes", 1);
    let (report, table, junit) = run_model_within(&config, hooks, "0.05");
    assert!(report.ok(), "1 byte is within 5 %: {table}");
    // JUnit keeps the inexact call's part too, a passing case that says so.
    let case = junit
        .split("<testcase ")
        .find(|c| {
            c.contains("classname=\"model/decode[1]/layers.1")
                && c.contains("name=\"peak_activation_bytes\"")
        })
        .unwrap_or_else(|| panic!("no case for the inexact peak: {junit}"));
    assert!(
        case.contains("not exact") && !case.contains("<failure"),
        "{case}"
    );
    let step = &report.result.calls[2];
    assert_eq!(step.call.describe(), "decode step 1");
    assert!(!step.exact(), "{table}");
    assert!(
        table.contains("decode step 1 layers.1") && table.contains("not exact"),
        "{table}"
    );
}

#[test]
fn a_step_that_cannot_run_ends_the_generation_as_an_error() {
    let dir = TempDir::new("fail");
    let config = small_config(&dir);
    let hooks = TestHooks {
        fail_layer: Some("decode[2]".into()),
        ..TestHooks::default()
    };
    let (report, table, junit) = run_model(&config, hooks);
    assert!(!report.ok());
    let r = &report.result;
    assert_eq!(
        r.calls.len(),
        4,
        "prefill, steps 0 and 1, then step 2 fails"
    );
    // In JUnit a phase that could not be summed is an error on every reported metric
    // (decode and total), not a failure.
    let reported = modelmeter_verify::check::reported().count();
    for phase in ["decode", "total"] {
        let errors = junit
            .matches(&format!("classname=\"model/{phase}\" name="))
            .count();
        assert_eq!(errors, reported, "{junit}");
        assert!(
            junit.contains(&format!(
                "classname=\"model/{phase}\" name=\"matmul_flops\"><error"
            )),
            "{junit}"
        );
    }
    // The cause as the hook gave it (not called out of memory, as an allocation that
    // failed would be).
    assert_eq!(
        r.calls[3].error.as_deref(),
        Some("op observer: a test hook made decode[2] fail")
    );
    let statuses: Vec<&str> = r.phases.iter().map(|p| p.status.as_str()).collect();
    assert_eq!(statuses, ["known_gap", "error", "error"]);
    assert!(table.contains("decode step 2: error"), "{table}");
    // Of the 5 steps planned 3 were checked: the summary says so.
    assert!(
        r.summary_line()
            .starts_with("7 checks (prefill, 3 of 5 decode steps, 3 phase totals)"),
        "{}",
        r.summary_line()
    );
    // The kernels the report lists come from every call, kept parts or not.
    let kernels: Vec<&String> = r.calls.iter().flat_map(|c| &c.attention_kernels).collect();
    assert!(!kernels.is_empty(), "{:?}", r.calls);
}

#[test]
fn bad_sizes_are_refused_before_anything_runs() {
    let dir = TempDir::new("bad");
    let json = dir.path("m.json");
    let j = json.to_str().unwrap();
    let config = small_config(&dir);
    let c = config.to_str().unwrap();
    // A vocabulary no machine holds: 10^11 × 64 fp32 embedding weights.
    let huge = dir.path("huge.json");
    std::fs::write(
        &huge,
        TWO_DENSE.replace("\"vocab_size\": 500", "\"vocab_size\": 100000000000"),
    )
    .unwrap();
    let h = huge.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--config", c, "--seq-len", "60", "--new-tokens", "5"],
            "--new-tokens = 5 is too large: --seq-len 60 + --new-tokens 5 positions exceed max_position_embeddings = 64 of config",
        ),
        (
            vec!["--new-tokens", "8193", "--seq-len", "1"],
            "expected at most 8191",
        ),
        (vec!["--config", c, "--num-layers", "0"], "--num-layers = 0 is invalid: expected 1 ..= 4"),
        (
            vec!["--config", h, "--seq-len", "4", "--new-tokens", "1"],
            "the embedding and lm_head alone need",
        ),
        (vec!["--sweep", "2"], "--sweep does not apply with --model"),
        (vec!["--oracle"], "--oracle does not apply with --model"),
        (
            vec!["--phase", "decode", "--context-len", "8"],
            "--phase does not apply with --model",
        ),
        // It timed nothing and said nothing (no table, no JSON timings).
        (vec!["--timings"], "--timings does not apply with --model"),
    ];
    for (args, needle) in cases {
        let mut all = vec!["--device", "cpu", "--model", "--json", j];
        all.extend(&args);
        let o = verify(&all);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        assert!(o.stdout.is_empty(), "{args:?}: nothing ran");
        assert!(!json.exists(), "{args:?}: no report written");
    }
    let o = verify(&["--device", "cpu", "--new-tokens", "4"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("--new-tokens applies only with --model"));
}

#[test]
fn embedding_norm_and_head_match_the_analytic_parts_op_for_op() {
    use modelmeter::layers::{DeepseekV2Decoder, StackPart};
    use modelmeter_reference::model::RefDeepseekV2ForCausalLM;
    use modelmeter_verify::model::Call;

    let config = ModelConfig::from_json_str("two-dense", TWO_DENSE)
        .unwrap()
        .first_layers(3)
        .unwrap();
    let setup = modelmeter_reference::Setup {
        device: tch::Device::Cpu,
        seed: 5,
    };
    for dtype in [Dtype::F32, Dtype::Bf16] {
        let prefill = modelmeter::Workload::prefill(2, 7)
            .unwrap()
            .with_dtype(dtype)
            .unwrap()
            .on(Platform::Cpu);
        let model =
            RefDeepseekV2ForCausalLM::new(&config, AttentionImpl::Sdpa, prefill.mla, dtype, &setup)
                .unwrap();
        let mut generation = model.generate(2, 7, false).unwrap();
        for call in [Call::Prefill, Call::Decode { step: 0 }] {
            let run = generation.step().unwrap();
            let w = call.workload(&prefill).unwrap();
            let stack = DeepseekV2Decoder::new(&config, &w, AttentionImpl::Sdpa);
            for (part, measured) in &run.parts {
                assert!(measured.counts.is_complete(), "{part:?}");
                if matches!(part, StackPart::Layer(_)) {
                    continue; // decoder layers: verify/tests/op_for_op.rs
                }
                let mut expected = analytic_ops(&stack.part_cost(*part).unwrap().ops());
                let mut got = measured_ops(&measured.counts.records);
                expected.sort();
                got.sort();
                assert_eq!(got, expected, "{dtype} {call:?} {part:?}");
            }
        }
    }
}

/// The rows of the table in `text` whose header starts with `first`: each as the
/// subject in its first column (carried down from the row above where the cell is
/// empty) and its other cells (columns are two or more spaces apart).
fn table_rows(text: &str, first: &str) -> Vec<(String, Vec<String>)> {
    let lines = text
        .lines()
        .skip_while(|l| !l.starts_with(&format!("{first}  ")))
        .skip(2)
        .take_while(|l| !l.is_empty() && !l.starts_with('('));
    let mut rows = Vec::new();
    let mut subject = String::new();
    for line in lines {
        let mut cells: Vec<String> = line
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(String::from)
            .collect();
        if !line.starts_with(' ') {
            subject = cells.remove(0);
        }
        rows.push((subject.clone(), cells));
    }
    rows
}

/// The indented lines of the section after `heading` (`calls:`, `notes:`).
fn section<'a>(text: &'a str, heading: &str) -> Vec<&'a str> {
    text.lines()
        .skip_while(|l| *l != heading)
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .map(str::trim)
        .collect()
}

/// The whole-model table shows what the report holds: each phase's label, each group's
/// and the stack's measured values and statuses in the compact table; in the detail
/// table the total in full, and otherwise only the rows that are not ok or not exact; in
/// `calls:` the prefill and the calls that are not exact. Three runs: a clean one, one
/// call's part one byte off, and the decode phase's closed form one FLOP off.
#[test]
fn the_model_table_shows_what_the_report_holds() {
    use modelmeter_verify::check::Check;
    let dir = TempDir::new("table");
    let config = small_config(&dir);
    let total_rows = |report: &ModelReport| -> Vec<(String, String)> {
        report.result.phases[2]
            .metrics
            .iter()
            .map(|m| {
                (
                    "total (closed form vs Σ calls)".into(),
                    m.metric.name().into(),
                )
            })
            .collect()
    };
    let detail = |table: &str| -> Vec<(String, String)> {
        table_rows(table, "check")
            .into_iter()
            .map(|(subject, cells)| (subject, cells[0].clone()))
            .collect()
    };
    let named = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };

    let (report, table, _) = run_model(&config, TestHooks::default());
    assert!(
        table.contains("layers 0-3 of 4 (2 dense, 2 MoE)"),
        "{table}"
    );
    // Unequal counts, so that the two cannot trade places.
    let mut uneven = report.clone();
    uneven.result.layer_kinds = vec![MlpKind::Dense, MlpKind::Moe, MlpKind::Moe, MlpKind::Moe];
    assert!(report::model_table(&uneven).contains("of 4 (1 dense, 3 MoE)"));
    // The compact table, cell by cell, from the report's rows.
    let compact = |rows: &[modelmeter_verify::compare::MetricRow]| -> Vec<String> {
        let measured = |metric: Metric| {
            let row = rows
                .iter()
                .find(|r| r.metric == Check::Exact(metric))
                .unwrap();
            row.metric.show(row.measured)
        };
        let flops = rows.iter().find(|r| r.metric == Check::Flops).unwrap();
        vec![
            measured(Metric::MatmulFlops),
            measured(Metric::ElementwiseFlops),
            measured(Metric::WeightBytes),
            measured(Metric::KvCacheBytes),
            // The clean run is exact in every row (`assert_model_exact` elsewhere).
            format!("{0}/{0}", EXACT.len()),
            flops.status.as_str().into(),
        ]
    };
    let mut expected = Vec::new();
    for (p, label) in report
        .result
        .phases
        .iter()
        .zip(["prefill S=6", "decode x5", "total"])
    {
        let parts = p
            .groups
            .iter()
            .map(|g| (g.name.clone(), &g.metrics, g.status));
        for (part, rows, status) in parts.chain([("stack".into(), &p.metrics, p.status)]) {
            let mut cells = vec![part];
            cells.extend(compact(rows));
            cells.push(status.as_str().into());
            expected.push((label.to_string(), cells));
        }
    }
    assert_eq!(table_rows(&table, "phase"), expected, "{table}");
    // All exact: the total in full, its notes, and nothing else; the prefill's call
    // line only.
    assert_eq!(detail(&table), total_rows(&report), "{table}");
    let total_notes: Vec<String> = report.result.phases[2]
        .metrics
        .iter()
        .filter_map(|m| {
            let note = m.note.as_ref()?;
            Some(format!(
                "total (closed form vs Σ calls) {}: {note}",
                m.metric
            ))
        })
        .collect();
    assert!(
        !total_notes.is_empty(),
        "the total's flops row has its note"
    );
    assert_eq!(section(&table, "notes:"), total_notes, "{table}");
    let calls = section(&table, "calls:");
    assert_eq!(calls.len(), 1, "{table}");
    assert!(
        calls[0].starts_with("prefill (C=0, 6 keys): 8/8 exact, flops pass, known_gap ("),
        "{table}"
    );

    // One part of one decode step a byte off: that step's stack and part, the failing
    // row only, with its note; the other steps stay out of view.
    let hooks = TestHooks::perturbing("decode[3]/layers.2", "kv_cache_bytes", 1);
    let (report, table, _) = run_model(&config, hooks);
    let mut want = total_rows(&report);
    want.extend(named(&[
        ("decode step 3 stack", "kv_cache_bytes"),
        (
            "decode step 3 layers.2 (DeepseekV2DecoderLayer_moe)",
            "kv_cache_bytes",
        ),
    ]));
    assert_eq!(detail(&table), want, "{table}");
    let calls = section(&table, "calls:");
    assert_eq!(calls.len(), 2, "{table}");
    assert!(
        calls[1].starts_with("decode step 3 (C=9, 10 keys): 7/8 exact, flops pass, fail ("),
        "{table}"
    );
    let step_notes: Vec<&str> = section(&table, "notes:")
        .into_iter()
        .filter(|n| n.starts_with("decode step 3"))
        .collect();
    assert_eq!(step_notes.len(), 2, "{table}");
    assert!(step_notes
        .iter()
        .all(|n| n.contains("kv_cache_bytes: not exact")));

    // The decode phase's closed form a FLOP off: that phase's failing row before the
    // total; no call is listed but the prefill.
    let hooks = TestHooks::perturbing("generation/decode", "matmul_flops", 1);
    let (report, table, _) = run_model(&config, hooks);
    let mut want = named(&[("decode (closed form vs Σ calls)", "matmul_flops")]);
    want.extend(total_rows(&report));
    assert_eq!(detail(&table), want, "{table}");
    assert_eq!(section(&table, "calls:").len(), 1, "{table}");
}

/// A call whose exact rows all agree but one part's flops row fails (beyond the
/// tolerance) is not settled: that row is a JUnit failure, and the table lists the call.
/// The part's analytic total is in its call's stack and in its group of parts in the
/// decode and total phases, whose flops rows fail with it (the phases' own rows compare
/// the closed form, which the hook leaves alone); the detail table shows each such row,
/// though every exact row agrees.
#[test]
fn a_call_failing_only_its_flops_row_is_a_junit_failure() {
    let dir = TempDir::new("flops");
    let config = small_config(&dir);
    let hooks = TestHooks::perturbing("decode[3]/layers.2", "flops", 1_000_000_000);
    let (report, table, junit) = run_model(&config, hooks);
    assert!(!report.ok(), "{table}");
    let step = &report.result.calls[4];
    assert_eq!(step.call.describe(), "decode step 3");
    assert!(step.exact() && !step.status.is_ok(), "{table}");
    assert!(
        junit.contains(
            "classname=\"model/decode[3]/layers.2 (DeepseekV2DecoderLayer_moe)\" name=\"flops\"><failure"
        ),
        "{junit}"
    );
    assert!(
        table.contains("decode step 3 (C=9, 10 keys): 8/8 exact, flops fail, fail ("),
        "{table}"
    );
    let flops_row = |rows: &[modelmeter_verify::compare::MetricRow]| {
        let failing: Vec<&str> = rows
            .iter()
            .filter(|r| !r.status.is_ok())
            .map(|r| r.metric.name())
            .collect();
        assert_eq!(failing, ["flops"], "{table}");
        assert!(rows.iter().skip(1).all(|r| r.analytic == r.measured));
    };
    flops_row(&step.metrics);
    let moe = "layers 2-3 (MoE)";
    for (i, phase) in report.result.phases.iter().enumerate() {
        assert!(phase.status.is_ok() == (i == 0), "{table}");
        for g in &phase.groups {
            if i > 0 && g.name == moe {
                assert!(!g.status.is_ok(), "{table}");
                flops_row(&g.metrics);
            } else {
                assert!(g.status.is_ok(), "{}: {table}", g.name);
            }
        }
    }
    let detail: Vec<(String, String)> = table_rows(&table, "check")
        .into_iter()
        .filter(|(subject, _)| !subject.starts_with("total (closed form"))
        .map(|(subject, cells)| (subject, cells[0].clone()))
        .collect();
    let want: Vec<(String, String)> = [
        format!("decode {moe}"),
        format!("total {moe}"),
        "decode step 3 stack".into(),
        "decode step 3 layers.2 (DeepseekV2DecoderLayer_moe)".into(),
    ]
    .into_iter()
    .map(|subject| (subject, "flops".to_string()))
    .collect();
    assert_eq!(detail, want, "{table}");
}

/// A phase whose closed form fails only its flops row (every exact row agrees, every
/// call passes) fails, and the detail table shows that row.
#[test]
fn a_phase_failing_only_its_flops_row_is_shown() {
    let (report, table, junit) = decode_closed_form_off("flops", 1_000_000_000);
    let decode = &report.result.phases[1];
    let failing: Vec<&str> = decode
        .metrics
        .iter()
        .filter(|r| !r.status.is_ok())
        .map(|r| r.metric.name())
        .collect();
    assert_eq!(failing, ["flops"], "{table}");
    assert!(decode.groups.iter().all(|g| g.status.is_ok()), "{table}");
    let decode_rows: Vec<String> = table_rows(&table, "check")
        .into_iter()
        .filter(|(subject, _)| subject.starts_with("decode"))
        .map(|(subject, cells)| format!("{subject}: {}", cells[0]))
        .collect();
    assert_eq!(
        decode_rows,
        ["decode (closed form vs Σ calls): flops"],
        "{table}"
    );
    assert!(
        junit.contains("classname=\"model/decode\" name=\"flops\"><failure"),
        "{junit}"
    );
}
