//! The reference modules are DeepSeek-V2: their fp32 outputs match the independent
//! Hugging Face transformers modules (deepseek_v2 and deepseek_ocr2) to 1e-5.

use std::path::PathBuf;

use modelmeter::layers::AttentionImpl;
use modelmeter::MlpKind;
use modelmeter::{ModelConfig, Workload};
use modelmeter_reference::harness::ModuleKind;
use modelmeter_reference::parity::{export_case, run_parity};
use serde_json::json;

fn small(kv_heads: u64, bias: bool, norm_topk_prob: bool, shared: u64) -> ModelConfig {
    ModelConfig::from_json_value(
        "small",
        &json!({
            "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": kv_heads,
            "intermediate_size": 384, "moe_intermediate_size": 96, "n_routed_experts": 8,
            "num_experts_per_tok": 3, "n_shared_experts": shared, "norm_topk_prob": norm_topk_prob,
            "num_hidden_layers": 2, "first_k_dense_replace": 1, "vocab_size": 10,
            "attention_bias": bias, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        }),
    )
    .unwrap()
}

/// DeepSeek-OCR's language model with 8 of its 64 routed experts (same shapes otherwise).
fn ocr_eight_experts() -> ModelConfig {
    let mut c = ModelConfig::deepseek_ocr();
    c.moe.as_mut().unwrap().n_routed_experts = 8;
    c
}

struct Cases {
    root: PathBuf,
    dirs: Vec<PathBuf>,
}

impl Cases {
    fn new(tag: &str) -> Cases {
        let root =
            std::env::temp_dir().join(format!("modelmeter-parity-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        Cases {
            root,
            dirs: Vec::new(),
        }
    }

    fn add(
        &mut self,
        kind: ModuleKind,
        config: &ModelConfig,
        workload: Workload,
        attention: AttentionImpl,
    ) -> PathBuf {
        let dir = self.root.join(format!("{:02}-{:?}", self.dirs.len(), kind));
        export_case(&dir, kind, config, &workload, attention, 11).unwrap();
        self.dirs.push(dir.clone());
        dir
    }
}

impl Drop for Cases {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The first dense decoder layer of `config`.
fn dense(config: &ModelConfig) -> ModuleKind {
    ModuleKind::DecoderLayer(config.first_layer_of(MlpKind::Dense).unwrap())
}

/// The first MoE decoder layer of `config`.
fn moe(config: &ModelConfig) -> ModuleKind {
    ModuleKind::DecoderLayer(config.first_layer_of(MlpKind::Moe).unwrap())
}

#[test]
fn every_module_matches_transformers_in_fp32() {
    let mut cases = Cases::new("ok");
    let prefill = Workload::prefill(2, 16).unwrap();
    let decode = Workload::decode(2, 9).unwrap();
    let ocr = ModelConfig::deepseek_ocr();
    for kind in [
        ModuleKind::RmsNorm,
        ModuleKind::Mlp,
        ModuleKind::MoEGate,
        ModuleKind::Attention,
        dense(&ocr),
    ] {
        cases.add(kind, &ocr, prefill.clone(), AttentionImpl::Sdpa);
    }
    let ocr8 = ocr_eight_experts();
    cases.add(ModuleKind::MoE, &ocr8, prefill.clone(), AttentionImpl::Sdpa);
    cases.add(moe(&ocr8), &ocr8, prefill.clone(), AttentionImpl::Eager);
    cases.add(
        ModuleKind::Attention,
        &ocr,
        decode.clone(),
        AttentionImpl::Sdpa,
    );
    cases.add(moe(&ocr8), &ocr8, decode.clone(), AttentionImpl::Sdpa);
    // Variants: grouped KV heads, biases, renormalised top-k, no shared experts, eager.
    for config in [
        small(2, true, false, 2),
        small(4, false, true, 0),
        small(1, false, false, 1),
    ] {
        for kind in [
            ModuleKind::MoEGate,
            ModuleKind::MoE,
            ModuleKind::Attention,
            dense(&config),
            moe(&config),
        ] {
            cases.add(kind, &config, prefill.clone(), AttentionImpl::Eager);
        }
        cases.add(
            ModuleKind::Attention,
            &config,
            decode.clone(),
            AttentionImpl::Eager,
        );
        cases.add(moe(&config), &config, decode.clone(), AttentionImpl::Sdpa);
    }
    let results = run_parity(&cases.dirs).unwrap();
    assert_eq!(results.len(), cases.dirs.len());
    for r in &results {
        assert!(r.ok, "{r:?}");
        assert!(r.rel_err.unwrap() < 1e-5, "{r:?}");
    }
}

#[test]
fn a_wrong_output_fails_the_parity_check() {
    let mut cases = Cases::new("bad");
    let dir = cases.add(
        ModuleKind::Mlp,
        &small(2, false, false, 1),
        Workload::prefill(1, 4).unwrap(),
        AttentionImpl::Sdpa,
    );
    // Perturb the exported reference output by 1e-3 relative.
    let path = dir.join("case.safetensors");
    let tensors = tch::Tensor::read_safetensors(&path).unwrap();
    let tensors: Vec<(String, tch::Tensor)> = tensors
        .into_iter()
        .map(|(n, t)| {
            if n == "output" {
                (n, &t * 1.001)
            } else {
                (n, t)
            }
        })
        .collect();
    tch::Tensor::write_safetensors(&tensors, &path).unwrap();
    let results = run_parity(&cases.dirs).unwrap();
    assert!(!results[0].ok, "{:?}", results[0]);
    assert!(results[0].rel_err.unwrap() > 1e-5);
}
