//! The reference modules are DeepSeek-V2/V3: their fp32 outputs match the independent
//! Hugging Face transformers modules (deepseek_v2, deepseek_v3 and deepseek_ocr2) to 1e-5,
//! and every difference the parity adapters bridge is present in the installed
//! transformers.

use std::path::PathBuf;

use modelmeter::layers::AttentionImpl;
use modelmeter::{MlaForm, MlpKind, ScoringFunc, TopkMethod};
use modelmeter::{ModelConfig, MoeConfig, Workload};
use modelmeter_reference::harness::{ModuleKind, RefModule};
use modelmeter_reference::parity::{
    export_case, export_edited_case, known_differences, run_parity, ParityResult,
};
use modelmeter_reference::Parameters;
use serde_json::json;

fn small(kv_heads: u64, bias: bool, norm_topk_prob: bool, shared: u64) -> ModelConfig {
    ModelConfig::from_json_value(
        "small",
        &json!({
            "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": kv_heads,
            "intermediate_size": 384, "moe_intermediate_size": 96, "n_routed_experts": 8,
            "num_experts_per_tok": 3, "n_shared_experts": MoeConfig::n_shared_experts_field(shared), "norm_topk_prob": norm_topk_prob,
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

/// Exported cases in a fresh folder (the `tempfile` crate's), removed when dropped.
struct Cases {
    root: tempfile::TempDir,
    dirs: Vec<PathBuf>,
}

impl Cases {
    fn new(tag: &str) -> Cases {
        Cases {
            root: tempfile::Builder::new()
                .prefix(&format!("modelmeter-parity-{tag}-"))
                .tempdir()
                .unwrap(),
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
        let dir = self
            .root
            .path()
            .join(format!("{:02}-{:?}", self.dirs.len(), kind));
        export_case(&dir, kind, config, &workload, attention, 11).unwrap();
        self.dirs.push(dir.clone());
        dir
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
    // The MoEs (4) and MoE decoder layers (8, 4 of them decode steps): transformers'
    // router sent every expert the reference gate's number of tokens.
    let routed: Vec<u64> = results
        .iter()
        .filter_map(|r| r.routed_count_mismatched_experts)
        .collect();
    assert_eq!(routed, vec![0; 12], "{results:?}");
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

/// A built-in MLA config shrunk for CI: 4 heads over a 256-wide hidden state, the MLA
/// structure of the checkpoint kept (q_lora_rank null or 1536, kv_lora_rank 512, head dims
/// 128 / 64 / 128, its YaRN rope_scaling), 16 routed experts of width 64 (32 in 8 groups of
/// 4 with 4 kept groups and top-4 when the config groups them), as verify's op-for-op
/// tests narrow them.
fn mla(name: &str) -> ModelConfig {
    let mut c = ModelConfig::builtin(name).unwrap().unwrap();
    assert!(c.mla.is_some() && c.rope_scaling.is_some(), "{name}");
    c.hidden_size = 256;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 4;
    c.head_dim = 64;
    c.intermediate_size = 256;
    let moe = c.moe.as_mut().unwrap();
    moe.n_routed_experts = 16;
    moe.moe_intermediate_size = 64;
    if moe.routing.n_group > 1 {
        moe.n_routed_experts = 32;
        moe.routing.n_group = 8;
        moe.routing.topk_group = 4;
        moe.num_experts_per_tok = 4;
    }
    c
}

/// What a case's result must show besides ok and rel_err < 1e-5.
#[derive(Default)]
struct Expect {
    hf_class: Option<&'static str>,
    adapters: Vec<&'static str>,
    /// MLA: (tokens transformers' kv_b_proj decompresses, tokens the vendor's does).
    kv_b_proj_tokens: Option<(u64, u64)>,
    /// MLA attention: checked against both DeepseekV2Attention and DeepseekV3Attention.
    both_attention_classes: bool,
    /// V3 router: no token where the −inf and 0.0 fills could choose differently.
    v3_router: bool,
    /// A MoE or MoE decoder layer: transformers' router sent every expert the reference
    /// gate's number of tokens (`routed_count_mismatched_experts` = 0); others report none.
    routed: bool,
}

fn check(r: &ParityResult, e: &Expect) {
    assert!(r.ok, "{r:?}");
    assert!(r.rel_err.unwrap() < 1e-5, "{r:?}");
    if let Some(class) = e.hf_class {
        assert_eq!(r.hf_class.as_deref(), Some(class), "{r:?}");
    }
    assert_eq!(r.adapters, e.adapters, "{r:?}");
    if let Some((hf, vendor)) = e.kv_b_proj_tokens {
        assert_eq!(r.hf_kv_b_proj_tokens, Some(hf), "{r:?}");
        assert_eq!(r.vendor_kv_b_proj_tokens, Some(vendor), "{r:?}");
    }
    if r.phase.as_deref() == Some("decode") && e.kv_b_proj_tokens.is_some() {
        assert!(r.cache_rel_err.unwrap() < 1e-5, "{r:?}");
    }
    if e.both_attention_classes {
        let classes: Vec<&str> = r.rel_err_by_class.keys().map(String::as_str).collect();
        assert_eq!(
            classes,
            ["DeepseekV2Attention", "DeepseekV3Attention"],
            "{r:?}"
        );
        for err in r.rel_err_by_class.values() {
            assert!(err.unwrap() < 1e-5, "{r:?}");
        }
    }
    if e.v3_router {
        assert_eq!(r.v3_fill_sensitive_rows, Some(0), "{r:?}");
    }
    let routed = e.routed.then_some(0);
    assert_eq!(r.routed_count_mismatched_experts, routed, "{r:?}");
}

#[test]
fn mla_attention_and_deepseek_routers_match_transformers_in_fp32() {
    let mut cases = Cases::new("mla");
    let mut expect = Vec::new();
    let (b, s, c) = (2u64, 16u64, 9u64);
    let prefill = Workload::prefill(b, s).unwrap();
    let decode = Workload::decode(b, c).unwrap();
    let absorbed = |w: &Workload| w.clone().with_mla(MlaForm::Absorb);
    let (lite, v2, v3) = (
        mla("deepseek-v2-lite"),
        mla("deepseek-v2"),
        mla("deepseek-v3"),
    );
    use AttentionImpl::{Eager, Sdpa};
    // The vendor's q_a_layernorm and kv_a_layernorm keep DeepseekV2RMSNorm's default eps
    // (1e-6) whatever rms_norm_eps says, as transformers' do: a config whose eps is not
    // 1e-6 tells them apart.
    let mut v2_eps = v2.clone();
    v2_eps.rms_norm_eps = 1e-2;
    // YaRN without mscale_all_dim (the vendor's default, 0) and mscale ≠ 1: transformers
    // would scale the tables by yarn_get_mscale(factor), the vendor by
    // yarn_get_mscale(factor, mscale) / 1 (no DeepSeek checkpoint has that).
    let mut lite_mscale = lite.clone();
    lite_mscale.rope_scaling.as_mut().unwrap().mscale_all_dim = 0.0;
    // The attention, naive (both cores) and absorbed, prefill and one decode step over a
    // cache: q_lora_rank null (V2-Lite) and set (V2, V3), YaRN as the checkpoints have it.
    // A decode step: transformers prefills its own latent cache from the context, and
    // then decompresses all C + 1 tokens; the vendor naive form only the new one.
    for (config, workload, attention) in [
        (&lite, prefill.clone(), Eager),
        (&lite, prefill.clone(), Sdpa),
        (&lite, decode.clone(), Eager),
        (&lite, decode.clone(), Sdpa),
        (&lite, absorbed(&prefill), Eager),
        (&lite, absorbed(&decode), Sdpa),
        (&lite_mscale, decode.clone(), Eager),
        (&v2, prefill.clone(), Sdpa),
        (&v2, decode.clone(), Eager),
        (&v2, absorbed(&decode), Eager),
        (&v2_eps, decode.clone(), Sdpa),
        (&v3, prefill.clone(), Eager),
        (&v3, decode.clone(), Sdpa),
        (&v3, absorbed(&decode), Eager),
    ] {
        let naive = workload.mla == MlaForm::Naive;
        let (hf, vendor, mut adapters) = match workload.phase {
            modelmeter::Phase::Prefill { .. } => (b * s, if naive { b * s } else { 0 }, vec![]),
            modelmeter::Phase::Decode { .. } => (
                b * (c + 1),
                if naive { b } else { 0 },
                vec!["mla_latent_cache"],
            ),
        };
        if config.rope_scaling.as_ref().unwrap().mscale_all_dim == 0.0 {
            adapters.insert(0, "yarn_attention_factor");
        }
        cases.add(ModuleKind::Attention, config, workload, attention);
        expect.push(Expect {
            adapters,
            kv_b_proj_tokens: Some((hf, vendor)),
            both_attention_classes: true,
            ..Expect::default()
        });
    }
    // Whole decoder layers: V2-family layers on DeepseekV2DecoderLayer, V3 on
    // DeepseekV3DecoderLayer (its MoE with DeepseekV3MoE).
    for (config, kind, workload, attention, class, v3_router) in [
        (
            &lite,
            moe(&lite),
            decode.clone(),
            Sdpa,
            "DeepseekV2DecoderLayer",
            false,
        ),
        (
            &v2,
            moe(&v2),
            prefill.clone(),
            Eager,
            "DeepseekV2DecoderLayer",
            false,
        ),
        (
            &v3,
            dense(&v3),
            prefill.clone(),
            Sdpa,
            "DeepseekV3DecoderLayer",
            false,
        ),
        (
            &v3,
            moe(&v3),
            prefill.clone(),
            Sdpa,
            "DeepseekV3DecoderLayer",
            true,
        ),
        (
            &v3,
            moe(&v3),
            decode.clone(),
            Eager,
            "DeepseekV3DecoderLayer",
            true,
        ),
    ] {
        let decoding = matches!(workload.phase, modelmeter::Phase::Decode { .. });
        let routed = kind == moe(config);
        cases.add(kind, config, workload, attention);
        expect.push(Expect {
            hf_class: Some(class),
            adapters: if decoding {
                vec!["mla_latent_cache"]
            } else {
                vec![]
            },
            v3_router,
            routed,
            ..Expect::default()
        });
    }
    // Routers and MoE: greedy (V2-Lite) and group_limited_greedy (V2) softmax on the V2
    // classes, sigmoid + e_score_correction_bias + noaux_tc (V3) on the V3 classes.
    let mut v3_top1 = v3.clone();
    v3_top1.moe.as_mut().unwrap().num_experts_per_tok = 1;
    let mut v2_norm = v2.clone();
    v2_norm.moe.as_mut().unwrap().norm_topk_prob = true;
    // A top-k wider than the chosen groups (one group of two experts, k > 2): both routers
    // pick experts outside it at weight 0, which the normalisation must keep at 0.
    let mut v2_narrow_norm = v2_norm.clone();
    let moe = v2_narrow_norm.moe.as_mut().unwrap();
    assert!(moe.num_experts_per_tok > 2 && moe.n_routed_experts % 2 == 0);
    moe.routing.n_group = moe.n_routed_experts / 2;
    moe.routing.topk_group = 1;
    let mut v3_plain = v3.clone();
    let m = v3_plain.moe.as_mut().unwrap();
    m.norm_topk_prob = false;
    m.n_shared_experts = 0;
    for (config, family, adapters) in [
        (&lite, "V2", &[][..]),
        (&v2, "V2", &[][..]),
        (&v3, "V3", &[][..]),
        // The vendor normalises only when top_k > 1; transformers' V3 router always.
        (&v3_top1, "V3", &["v3_norm_topk_prob_top1"][..]),
        // Transformers' V2 router never normalises.
        (&v2_norm, "V2", &["norm_topk_prob"][..]),
        (&v2_narrow_norm, "V2", &["norm_topk_prob"][..]),
        (&v3_plain, "V3", &[][..]),
    ] {
        let (gate, moe_class) = match family {
            "V2" => ("DeepseekV2TopkRouter", "DeepseekV2Moe"),
            _ => ("DeepseekV3TopkRouter", "DeepseekV3MoE"),
        };
        for (kind, class) in [(ModuleKind::MoEGate, gate), (ModuleKind::MoE, moe_class)] {
            cases.add(kind, config, Workload::prefill(2, 24).unwrap(), Sdpa);
            expect.push(Expect {
                hf_class: Some(class),
                adapters: adapters.to_vec(),
                v3_router: family == "V3",
                routed: kind == ModuleKind::MoE,
                ..Expect::default()
            });
        }
    }
    let results = run_parity(&cases.dirs).unwrap();
    assert_eq!(results.len(), expect.len());
    for (r, e) in results.iter().zip(&expect) {
        check(r, e);
    }
}

#[test]
fn a_wrong_mla_cache_fails_the_parity_check() {
    // transformers prefills its own latent cache, so a wrong exported cache leaves the
    // output right: the decompressed cache comparison is what catches it.
    let mut cases = Cases::new("badcache");
    let dir = cases.add(
        ModuleKind::Attention,
        &mla("deepseek-v3"),
        Workload::decode(1, 5).unwrap(),
        AttentionImpl::Eager,
    );
    let path = dir.join("case.safetensors");
    let tensors: Vec<(String, tch::Tensor)> = tch::Tensor::read_safetensors(&path)
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            if n == "past_value" {
                (n, &t * 1.001)
            } else {
                (n, t)
            }
        })
        .collect();
    tch::Tensor::write_safetensors(&tensors, &path).unwrap();
    let r = &run_parity(&cases.dirs).unwrap()[0];
    assert!(!r.ok, "{r:?}");
    assert!(r.rel_err.unwrap() < 1e-5, "{r:?}");
    assert!(r.cache_rel_err.unwrap() > 1e-5, "{r:?}");
}

#[test]
fn routings_without_a_transformers_router_are_rejected_with_the_reason() {
    let mut cases = Cases::new("norouter");
    for (scoring, method) in [
        (ScoringFunc::Softmax, TopkMethod::NoauxTc),
        (ScoringFunc::Sigmoid, TopkMethod::GroupLimitedGreedy),
    ] {
        let mut config = mla("deepseek-v3");
        let routing = &mut config.moe.as_mut().unwrap().routing;
        routing.scoring_func = scoring;
        routing.topk_method = method;
        cases.add(
            ModuleKind::MoEGate,
            &config,
            Workload::prefill(1, 4).unwrap(),
            AttentionImpl::Sdpa,
        );
    }
    for r in run_parity(&cases.dirs).unwrap() {
        assert!(!r.ok && r.rel_err.is_none(), "{r:?}");
        let e = r.error.unwrap_or_default();
        assert!(e.contains("no transformers router implements"), "{e}");
        assert!(e.contains("no noaux_tc branch"), "{e}");
        assert!(
            e.contains("reads neither topk_method nor scoring_func"),
            "{e}"
        );
    }
}

#[test]
fn the_v3_fill_difference_shows_where_it_is_predicted() {
    // With every choice score negative (e_score_correction_bias −2 against sigmoid scores
    // below 1), the vendor's 0.0 fill picks experts outside the chosen groups and
    // transformers' −inf fill does not: the experts differ on every token, exactly where
    // the script predicts it. (The seeded cases above have no such token.)
    let mut cases = Cases::new("fill");
    let dir = cases.root.path().join("gate");
    export_edited_case(
        &dir,
        ModuleKind::MoEGate,
        &mla("deepseek-v3"),
        &Workload::prefill(1, 8).unwrap(),
        AttentionImpl::Sdpa,
        11,
        |prepared| {
            let RefModule::MoEGate(gate) = &prepared.module else {
                unreachable!("a gate case")
            };
            let (_, mut bias) = gate
                .parameters()
                .into_iter()
                .find(|(n, _)| n == "e_score_correction_bias")
                .expect("noaux_tc has the bias");
            let _ = bias.f_fill_(-2.0)?;
            Ok(())
        },
    )
    .unwrap();
    cases.dirs.push(dir);
    let r = &run_parity(&cases.dirs).unwrap()[0];
    assert!(!r.ok, "{r:?}");
    assert_eq!(r.idx_match, Some(false), "{r:?}");
    assert_eq!(r.v3_fill_sensitive_rows, Some(8), "{r:?}");
}

#[test]
fn the_named_differences_are_present_in_transformers() {
    let found = known_differences().unwrap();
    let names: Vec<&str> = found.iter().map(|d| d.difference.as_str()).collect();
    assert_eq!(
        names,
        [
            "mla_latent_cache",
            "v2_rotary_interleaved",
            "v2_router_ignores_norm_topk_prob",
            "v2_router_has_no_noaux_tc",
            "v3_router_ignores_topk_method_and_scoring_func",
            "v3_router_normalises_top1",
            "v3_router_fills_minus_inf",
            "yarn_attention_factor",
        ]
    );
    for d in &found {
        assert!(d.present, "{d:?}");
    }
}
