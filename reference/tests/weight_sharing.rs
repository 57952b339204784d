//! Weights shared between modules ([`WeightCache`]): a standalone module and its twin in a
//! decoder layer draw the same parameters under the same names, a shared tensor changes
//! no count and no value, and each module kind says which parameters it may draw.

use std::rc::Rc;

use modelmeter::layers::AttentionImpl;
use modelmeter::{Dtype, MlaForm, ModelConfig, Workload};
use modelmeter_reference::harness::{
    run_layer, run_layer_sharing, LayerRun, ModuleKind, RefModule,
};
use modelmeter_reference::{Setup, WeightCache};
use serde_json::json;
use tch::Device;

/// DeepSeek-V2's shapes, small: layer 0 dense, layer 1 MoE (8 routed experts, 1 shared).
fn small() -> ModelConfig {
    ModelConfig::from_json_value(
        "small",
        &json!({
            "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 4,
            "intermediate_size": 384, "moe_intermediate_size": 96, "n_routed_experts": 8,
            "num_experts_per_tok": 3, "n_shared_experts": 1, "norm_topk_prob": false,
            "num_hidden_layers": 2, "first_k_dense_replace": 1, "vocab_size": 10,
            "attention_bias": false, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        }),
    )
    .unwrap()
}

const SETUP: Setup = Setup {
    device: Device::Cpu,
    seed: 3,
};

fn workload() -> Workload {
    Workload::prefill(1, 16)
        .unwrap()
        .with_dtype(Dtype::F32)
        .unwrap()
}

fn assert_same_run(shared: &LayerRun, alone: &LayerRun) {
    assert_eq!(
        shared.counts.records, alone.counts.records,
        "{}",
        alone.name
    );
    assert_eq!(shared.weight_bytes, alone.weight_bytes, "{}", alone.name);
    assert_eq!(
        shared.tokens_per_expert, alone.tokens_per_expert,
        "{}",
        alone.name
    );
    assert_eq!(
        shared.output_peak_live_bytes, alone.output_peak_live_bytes,
        "{}",
        alone.name
    );
    assert!(
        shared.output.equal(&alone.output),
        "{}: the outputs differ bit for bit",
        alone.name
    );
}

#[test]
fn the_moe_layer_reuses_the_standalone_moes_experts_and_counts_the_same() {
    let config = small();
    let w = workload();
    let attn = AttentionImpl::Sdpa;
    let cache = Rc::new(WeightCache::new());
    let moe = run_layer_sharing(ModuleKind::MoE, &config, &w, attn, &SETUP, cache.clone()).unwrap();
    let next = ModuleKind::DecoderLayer(1);
    cache.finish_module(|name| next.may_draw(&config, name));
    let kept = cache.kept_bytes();
    // The gate, 8 experts and the shared expert: every parameter of the MoE.
    assert_eq!(kept, moe.weight_bytes);
    let layer = run_layer_sharing(next, &config, &w, attn, &SETUP, cache.clone()).unwrap();
    assert_eq!(
        cache.reused_bytes(),
        kept,
        "the layer took every kept tensor"
    );
    assert_same_run(
        &moe,
        &run_layer(ModuleKind::MoE, &config, &w, attn, &SETUP).unwrap(),
    );
    assert_same_run(&layer, &run_layer(next, &config, &w, attn, &SETUP).unwrap());
}

#[test]
fn what_a_module_does_not_take_is_dropped_once_it_is_built() {
    // The dense layer keeps the attention's weights for the MLP as well as its own MLP's
    // (its `may_draw` claims neither here): the MLP takes its part; the attention's kept
    // tensors must not stay alive while the MLP runs.
    let config = small();
    let w = workload();
    let attn = AttentionImpl::Sdpa;
    let cache = Rc::new(WeightCache::new());
    run_layer_sharing(
        ModuleKind::DecoderLayer(0),
        &config,
        &w,
        attn,
        &SETUP,
        cache.clone(),
    )
    .unwrap();
    cache.finish_module(|_| true); // keep everything the layer used
    let layer_bytes = cache.kept_bytes();
    let mlp = run_layer_sharing(ModuleKind::Mlp, &config, &w, attn, &SETUP, cache.clone()).unwrap();
    assert!(mlp.weight_bytes < layer_bytes);
    assert_eq!(cache.reused_bytes(), mlp.weight_bytes);
    assert_eq!(
        cache.kept_bytes(),
        mlp.weight_bytes,
        "only the MLP's own are left"
    );
}

#[test]
fn a_standalone_module_draws_what_its_twin_in_a_decoder_layer_draws() {
    // With the same seed the standalone modules and the decoder layers' parts are the
    // same tensors: what makes sharing possible at all.
    let config = small();
    let w = workload();
    let attn = AttentionImpl::Sdpa;
    for (alone, layer) in [
        (ModuleKind::Mlp, ModuleKind::DecoderLayer(0)),
        (ModuleKind::Attention, ModuleKind::DecoderLayer(0)),
        (ModuleKind::RmsNorm, ModuleKind::DecoderLayer(1)),
        (ModuleKind::MoEGate, ModuleKind::DecoderLayer(1)),
        (ModuleKind::MoE, ModuleKind::DecoderLayer(1)),
    ] {
        let cache = Rc::new(WeightCache::new());
        run_layer_sharing(alone, &config, &w, attn, &SETUP, cache.clone()).unwrap();
        let drawn = cache.kept_bytes();
        cache.finish_module(|name| layer.may_draw(&config, name));
        assert_eq!(
            cache.kept_bytes(),
            drawn,
            "{alone:?}: all of it is {layer:?}'s too"
        );
        run_layer_sharing(layer, &config, &w, attn, &SETUP, cache.clone()).unwrap();
        assert_eq!(cache.reused_bytes(), drawn, "{alone:?} in {layer:?}");
    }
}

#[test]
fn every_module_draws_only_what_its_kind_says_it_may() {
    // `may_draw` decides what a cache keeps for the next module; a name it forgot would
    // only cost a second draw, but a test keeps the list honest.
    let config = small();
    let kinds = [
        ModuleKind::RmsNorm,
        ModuleKind::Mlp,
        ModuleKind::MoEGate,
        ModuleKind::MoE,
        ModuleKind::Attention,
        ModuleKind::DecoderLayer(0),
        ModuleKind::DecoderLayer(1),
    ];
    for kind in kinds {
        let cache = Rc::new(WeightCache::new());
        RefModule::build_sharing(
            kind,
            &config,
            AttentionImpl::Sdpa,
            MlaForm::Naive,
            Dtype::F32,
            &SETUP,
            Some(cache.clone()),
        )
        .unwrap();
        let names = cache.names_in_use();
        assert!(!names.is_empty(), "{kind:?} drew nothing");
        for name in &names {
            assert!(kind.may_draw(&config, name), "{kind:?} drew {name}");
        }
        // Apart from the decoder layers (which contain the others) and the MoE (which
        // contains the gate), no kind may claim another's parameters.
        let contains = |a: ModuleKind, b: ModuleKind| {
            matches!(a, ModuleKind::DecoderLayer(_))
                || (a == ModuleKind::MoE && b == ModuleKind::MoEGate)
        };
        for other in kinds
            .iter()
            .filter(|k| **k != kind && !contains(**k, kind) && !contains(kind, **k))
        {
            for name in &names {
                assert!(
                    !other.may_draw(&config, name),
                    "{other:?} claims {kind:?}'s {name}"
                );
            }
        }
    }
}
