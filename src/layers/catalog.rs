//! The catalogue of analytic layers: which layers a config has (and, when it lacks one,
//! the true reason), their report names and their constructors. The one place that
//! decides "which layers does this config have": `modelmeter analyze` lists them, and
//! `verify-decoder` pairs each with its reference module (verify/src/pairing.rs).

use serde::Serialize;

use crate::config::{MlpKind, ModelConfig};
use crate::error::Result;
use crate::layers::mla_class_name;
use crate::layers::{
    AttentionImpl, DeepseekV2Attention, DeepseekV2DecoderLayer, DeepseekV2MLP, DeepseekV2MoE,
    DeepseekV2RMSNorm, Layer, LlamaAttention, MoEGate, MLA_CLASS_NAMES,
};
use crate::workload::{MlaForm, Workload};

/// The vendor class of `config`'s attention as `form` and `attention` run it: the Llama
/// classes for multi-head attention, one of [`MLA_CLASS_NAMES`] for MLA. What reports
/// call the attention layer and the attention of their header.
pub fn attention_class_name(
    config: &ModelConfig,
    form: MlaForm,
    attention: AttentionImpl,
) -> &'static str {
    match config.mla {
        Some(_) => mla_class_name(form, attention),
        None => attention.class_name(),
    }
}

/// Every vendor class an attention layer may be: the Llama classes of multi-head attention
/// (SDPA, eager) and [`MLA_CLASS_NAMES`]. Each names the attention layer
/// ([`LayerId::parse`]).
pub fn attention_class_names() -> impl Iterator<Item = &'static str> {
    [AttentionImpl::Sdpa, AttentionImpl::Eager]
        .map(AttentionImpl::class_name)
        .into_iter()
        .chain(MLA_CLASS_NAMES)
}

/// The attention core `config`'s attention runs as `form` and `attention` ask: `None`
/// for the absorbed MLA form, which has no core to pick (its scores and weighted sum are
/// explicit matmuls), `Some(attention)` otherwise. What reports write as `attention`.
pub fn attention_core(
    config: &ModelConfig,
    form: MlaForm,
    attention: AttentionImpl,
) -> Option<AttentionImpl> {
    match (&config.mla, form) {
        (Some(_), MlaForm::Absorb) => None,
        _ => Some(attention),
    }
}

/// One analytic layer of a DeepSeek-V2 decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum LayerId {
    RmsNorm,
    Mlp,
    MoEGate,
    MoE,
    Attention,
    /// The first decoder layer with a dense MLP.
    DecoderDense,
    /// The first decoder layer with a MoE MLP.
    DecoderMoe,
}

impl LayerId {
    /// Every layer, in report order.
    pub const ALL: [LayerId; 7] = [
        LayerId::RmsNorm,
        LayerId::Mlp,
        LayerId::MoEGate,
        LayerId::MoE,
        LayerId::Attention,
        LayerId::DecoderDense,
        LayerId::DecoderMoe,
    ];

    /// The report name: the vendor class (the attention's depends on the implementation;
    /// the decoder layers carry their MLP kind). For an MLA config the attention layer
    /// built names itself (`DeepseekV2Attention` …, see `MLA_CLASS_NAMES`).
    pub fn name(self, attention: AttentionImpl) -> &'static str {
        match self {
            LayerId::RmsNorm => "DeepseekV2RMSNorm",
            LayerId::Mlp => "DeepseekV2MLP",
            LayerId::MoEGate => "MoEGate",
            LayerId::MoE => "DeepseekV2MoE",
            LayerId::Attention => attention.class_name(),
            LayerId::DecoderDense => "DeepseekV2DecoderLayer_dense",
            LayerId::DecoderMoe => "DeepseekV2DecoderLayer_moe",
        }
    }

    /// The report name of this layer of `config` run as `form` and `attention`: an MLA
    /// config's attention is one of [`MLA_CLASS_NAMES`] ([`attention_class_name`]).
    pub fn name_for(
        self,
        config: &ModelConfig,
        form: MlaForm,
        attention: AttentionImpl,
    ) -> &'static str {
        match self {
            LayerId::Attention => attention_class_name(config, form, attention),
            _ => self.name(attention),
        }
    }

    /// The layer called `name` (any attention class name, MLA's included, selects the
    /// attention).
    pub fn parse(name: &str) -> Option<LayerId> {
        if attention_class_names().any(|class| class == name) {
            return Some(LayerId::Attention);
        }
        let attention = [AttentionImpl::Sdpa, AttentionImpl::Eager];
        LayerId::ALL
            .into_iter()
            .find(|id| attention.iter().any(|a| id.name(*a) == name))
    }

    /// The config's layer index this layer runs as: the first decoder layer of its MLP
    /// kind for the decoder layers and for the modules only one kind has (the dense MLP;
    /// the gate and the MoE), 0 for the others. `Err` with the true reason when the
    /// config has no such layer: a module that no decoder layer of the config runs (the
    /// dense-width MLP of a config whose layers are all MoE) is not the config's.
    pub fn layer_index(self, config: &ModelConfig) -> std::result::Result<u64, String> {
        let first = |kind: MlpKind, what: &str| {
            config.first_layer_of(kind).ok_or_else(|| {
                format!(
                    "config {} has no {what} decoder layer (its {} layers are all {})",
                    config.name,
                    config.layer_kinds.len(),
                    match kind {
                        MlpKind::Dense => "MoE: first_k_dense_replace = 0",
                        MlpKind::Moe if config.moe.is_none() => "dense: no routed experts",
                        // Experts, but no layer is placed on them.
                        MlpKind::Moe => {
                            "dense: first_k_dense_replace and moe_layer_freq (or mlp_layer_types) place no MoE layer"
                        }
                    }
                )
            })
        };
        match self {
            LayerId::DecoderDense | LayerId::Mlp => first(MlpKind::Dense, "dense"),
            LayerId::MoEGate | LayerId::MoE if config.moe.is_none() => Err(format!(
                "config {} has no routed experts (n_routed_experts is absent, null or 0)",
                config.name
            )),
            LayerId::DecoderMoe | LayerId::MoEGate | LayerId::MoE => first(MlpKind::Moe, "MoE"),
            LayerId::RmsNorm | LayerId::Attention => Ok(0),
        }
    }

    /// Whether `config` has this layer.
    pub fn is_in(self, config: &ModelConfig) -> bool {
        self.layer_index(config).is_ok()
    }

    /// The analytic layer for `workload`.
    pub fn build(
        self,
        config: &ModelConfig,
        workload: &Workload,
        attention: AttentionImpl,
    ) -> Result<Box<dyn Layer>> {
        let absent = |why: String| crate::Error::invalid("layer", self.name(attention), &why);
        let index = self.layer_index(config).map_err(absent)?;
        Ok(match self {
            LayerId::RmsNorm => Box::new(DeepseekV2RMSNorm::new(config, workload)),
            LayerId::Mlp => Box::new(DeepseekV2MLP::new(config, workload)),
            LayerId::MoEGate => Box::new(MoEGate::new(config, workload)?),
            LayerId::MoE => Box::new(DeepseekV2MoE::new(config, workload)?),
            LayerId::Attention if config.mla.is_some() => {
                Box::new(DeepseekV2Attention::new(config, workload, attention)?)
            }
            LayerId::Attention => Box::new(LlamaAttention::new(config, workload, attention)),
            LayerId::DecoderDense | LayerId::DecoderMoe => Box::new(DeepseekV2DecoderLayer::new(
                config, workload, index, attention,
            )?),
        })
    }
}

/// The analytic layers `config` has, in report order.
pub fn layers_of(
    config: &ModelConfig,
    workload: &Workload,
    attention: AttentionImpl,
) -> Result<Vec<Box<dyn Layer>>> {
    LayerId::ALL
        .into_iter()
        .filter(|id| id.is_in(config))
        .map(|id| id.build(config, workload, attention))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_absorbed_mla_form_has_no_attention_core() {
        let mha = ModelConfig::deepseek_ocr();
        let mla = ModelConfig::builtin("deepseek-v2-lite").unwrap().unwrap();
        for attention in [AttentionImpl::Sdpa, AttentionImpl::Eager] {
            for form in [MlaForm::Naive, MlaForm::Absorb] {
                assert_eq!(attention_core(&mha, form, attention), Some(attention));
            }
            assert_eq!(
                attention_core(&mla, MlaForm::Naive, attention),
                Some(attention)
            );
            assert_eq!(attention_core(&mla, MlaForm::Absorb, attention), None);
        }
    }

    #[test]
    fn names_round_trip_and_match_the_layers_built() {
        let c = ModelConfig::deepseek_ocr();
        let w = Workload::prefill(1, 4).unwrap();
        for attention in [AttentionImpl::Sdpa, AttentionImpl::Eager] {
            for id in LayerId::ALL {
                assert_eq!(LayerId::parse(id.name(attention)), Some(id));
                assert_eq!(
                    id.build(&c, &w, attention).unwrap().name(),
                    id.name(attention)
                );
            }
        }
        assert_eq!(LayerId::parse("DeepseekV2Mlp"), None);
    }

    #[test]
    fn absent_layers_give_the_true_reason() {
        let mut all_moe = ModelConfig::deepseek_ocr();
        all_moe.layer_kinds = vec![MlpKind::Moe; 12];
        let why = LayerId::DecoderDense.layer_index(&all_moe).unwrap_err();
        assert!(
            why.contains("no dense decoder layer") && why.contains("all MoE"),
            "{why}"
        );
        assert!(LayerId::MoEGate.is_in(&all_moe));
        // No layer runs the dense-width MLP: it is not the config's (shared experts are the
        // MoE's own MLP, of width m · n_shared).
        let why = LayerId::Mlp.layer_index(&all_moe).unwrap_err();
        assert!(why.contains("no dense decoder layer"), "{why}");

        let mut dense = ModelConfig::deepseek_ocr();
        dense.moe = None;
        dense.layer_kinds = vec![MlpKind::Dense; 12];
        for id in [LayerId::MoEGate, LayerId::MoE, LayerId::DecoderMoe] {
            assert!(!id.is_in(&dense), "{id:?}");
        }
        // The gate and the MoE are the experts' own modules: the reason is the experts'
        // absence, not a decoder-layer placement.
        for id in [LayerId::MoEGate, LayerId::MoE] {
            let why = id.layer_index(&dense).unwrap_err();
            assert!(
                why.contains("has no routed experts (n_routed_experts is absent, null or 0)"),
                "{id:?}: {why}"
            );
        }
        let why = LayerId::DecoderMoe.layer_index(&dense).unwrap_err();
        assert!(why.contains("all dense: no routed experts"), "{why}");
        // Experts that no layer uses (first_k_dense_replace ≥ the layer count): the vendor
        // model builds no gate and no MoE, so neither they nor the decoder layer are the
        // config's, and the reason is the placement.
        let mut unplaced = ModelConfig::deepseek_ocr();
        unplaced.layer_kinds = vec![MlpKind::Dense; 12];
        for id in [LayerId::MoEGate, LayerId::MoE, LayerId::DecoderMoe] {
            let why = id.layer_index(&unplaced).unwrap_err();
            assert!(
                why.contains("first_k_dense_replace and moe_layer_freq")
                    && !why.contains("no routed experts"),
                "{id:?}: {why}"
            );
        }
        assert!(LayerId::Mlp.is_in(&unplaced));
        let w = Workload::prefill(1, 4).unwrap();
        let names: Vec<String> = layers_of(&dense, &w, AttentionImpl::Sdpa)
            .unwrap()
            .iter()
            .map(|l| l.name())
            .collect();
        assert_eq!(
            names,
            [
                "DeepseekV2RMSNorm",
                "DeepseekV2MLP",
                "LlamaFlashAttention2",
                "DeepseekV2DecoderLayer_dense"
            ]
        );
    }

    #[test]
    fn the_attention_class_is_the_name_of_the_layer_built() {
        let lite = ModelConfig::builtin("deepseek-v2-lite").unwrap().unwrap();
        for config in [ModelConfig::deepseek_ocr(), lite] {
            for form in [MlaForm::Naive, MlaForm::Absorb] {
                let w = Workload::prefill(1, 4).unwrap();
                let w = match config.mla {
                    Some(_) => w.with_mla(form),
                    None => w,
                };
                for attention in [AttentionImpl::Sdpa, AttentionImpl::Eager] {
                    let built = LayerId::Attention.build(&config, &w, attention).unwrap();
                    let name = attention_class_name(&config, w.mla, attention);
                    assert_eq!(built.name(), name, "{} {form:?}", config.name);
                    assert_eq!(LayerId::Attention.name_for(&config, w.mla, attention), name);
                    assert_eq!(LayerId::parse(name), Some(LayerId::Attention));
                }
            }
        }
    }

    #[test]
    fn decoder_layers_run_at_their_first_index() {
        let c = ModelConfig::deepseek_ocr();
        assert_eq!(LayerId::DecoderDense.layer_index(&c), Ok(0));
        assert_eq!(LayerId::DecoderMoe.layer_index(&c), Ok(1));
    }
}
