//! The one join between the analytic and the measured side: which layers
//! `verify-decoder` can check, and for each its analytic layer (the catalogue in
//! `modelmeter::layers`) and the reference module it is compared with.
//!
//! Nothing else pairs them: the reference crate knows only its modules, the analytic
//! crate only its layers. Adding a verifiable layer means one [`Pairing`] here.

use modelmeter::layers::{AttentionImpl, Layer, LayerId};
use modelmeter::{ModelConfig, Workload};
use modelmeter_reference::ModuleKind;

/// A verifiable layer: an analytic layer and the reference module that runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pairing {
    pub layer: LayerId,
}

/// Every layer `verify-decoder` checks, in report order.
pub const REGISTRY: [Pairing; 7] = [
    Pairing {
        layer: LayerId::Mlp,
    },
    Pairing {
        layer: LayerId::MoEGate,
    },
    Pairing {
        layer: LayerId::MoE,
    },
    Pairing {
        layer: LayerId::RmsNorm,
    },
    Pairing {
        layer: LayerId::DecoderDense,
    },
    Pairing {
        layer: LayerId::DecoderMoe,
    },
    Pairing {
        layer: LayerId::Attention,
    },
];

impl Pairing {
    /// The report name.
    pub fn name(self, attention: AttentionImpl) -> &'static str {
        self.layer.name(attention)
    }

    /// `Ok` when `config` has this layer and a reference module can run it, else the true
    /// reason why not.
    pub fn presence(self, config: &ModelConfig) -> Result<(), String> {
        self.layer.layer_index(config)?;
        match reference_gap(self.layer, config) {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    /// The analytic layer it is compared with.
    pub fn analytic(
        self,
        config: &ModelConfig,
        workload: &Workload,
        attention: AttentionImpl,
    ) -> modelmeter::Result<Box<dyn Layer>> {
        self.layer.build(config, workload, attention)
    }

    /// The reference module that runs it, or why `config` has none.
    pub fn module(self, config: &ModelConfig) -> Result<ModuleKind, String> {
        let index = self.layer.layer_index(config)?;
        if let Some(why) = reference_gap(self.layer, config) {
            return Err(why);
        }
        Ok(match self.layer {
            LayerId::RmsNorm => ModuleKind::RmsNorm,
            LayerId::Mlp => ModuleKind::Mlp,
            LayerId::MoEGate => ModuleKind::MoEGate,
            LayerId::MoE => ModuleKind::MoE,
            LayerId::Attention => ModuleKind::Attention,
            LayerId::DecoderDense | LayerId::DecoderMoe => ModuleKind::DecoderLayer(index),
        })
    }
}

/// Why no reference module can run `layer` of `config` although the analytic crate
/// models it: the reference crate has no MLA attention and no gate beyond greedy softmax
/// routing yet. `None` when a reference module exists.
fn reference_gap(layer: LayerId, config: &ModelConfig) -> Option<String> {
    let attention = matches!(
        layer,
        LayerId::Attention | LayerId::DecoderDense | LayerId::DecoderMoe
    );
    if attention && config.mla.is_some() {
        return Some(format!(
            "config {} uses Multi-head Latent Attention (MLA), and MLA reference modules are \
             not built yet (the analytic model is in `modelmeter analyze`)",
            config.name
        ));
    }
    let routed = matches!(layer, LayerId::MoEGate | LayerId::MoE | LayerId::DecoderMoe);
    match &config.moe {
        Some(moe) if routed && !moe.routing.is_greedy_softmax() => Some(format!(
            "config {} routes with topk_method {} and scoring_func {}, and the reference \
             MoEGate runs greedy softmax routing only (reference modules for the other \
             methods are not built yet)",
            config.name,
            moe.routing.topk_method.name(),
            moe.routing.scoring_func.name()
        )),
        _ => None,
    }
}

/// The pairings of `registry` that `config` has, in registry order.
pub fn present(registry: &[Pairing], config: &ModelConfig) -> Vec<Pairing> {
    registry
        .iter()
        .copied()
        .filter(|p| p.presence(config).is_ok())
        .collect()
}

/// The pairings `names` select from `registry` (all that `config` has when `names` is
/// empty; with `any_config`, presence is not checked: a sweep's configs vary). An error
/// names the unknown layer and the valid names, or says truly why the config lacks it.
pub fn select(
    registry: &[Pairing],
    names: &[&str],
    config: &ModelConfig,
    attention: AttentionImpl,
    any_config: bool,
) -> Result<Vec<Pairing>, String> {
    if names.is_empty() {
        if any_config {
            return Ok(registry.to_vec());
        }
        // Layers the config has but no reference can run: refuse rather than check the
        // rest and report a pass for the whole config.
        let gaps: Vec<String> = registry
            .iter()
            .filter(|p| p.layer.is_in(config))
            .filter_map(|p| reference_gap(p.layer, config).map(|why| (p, why)))
            .map(|(p, why)| {
                let name = match p.layer {
                    LayerId::Attention if config.mla.is_some() => {
                        modelmeter::layers::mla_class_name(modelmeter::MlaForm::Naive, attention)
                    }
                    _ => p.name(attention),
                };
                format!("{name}: {why}")
            })
            .collect();
        if !gaps.is_empty() {
            let checkable: Vec<&str> = present(registry, config)
                .iter()
                .map(|p| p.name(attention))
                .collect();
            let hint = if checkable.is_empty() {
                "no layer of it can be checked yet".to_string()
            } else {
                format!(
                    "check the layers that have one with --layers {}",
                    checkable.join(",")
                )
            };
            return Err(format!(
                "config {} cannot be verified whole: {}; {hint}",
                config.name,
                gaps.join("; ")
            ));
        }
        return Ok(present(registry, config));
    }
    let valid: Vec<&str> = registry.iter().map(|p| p.name(attention)).collect();
    let mut out = Vec::new();
    for name in names {
        let pairing = registry
            .iter()
            .copied()
            .find(|p| LayerId::parse(name) == Some(p.layer))
            .ok_or_else(|| {
                format!(
                    "--layers: unknown layer {name}; valid: {}",
                    valid.join(", ")
                )
            })?;
        if !any_config {
            pairing
                .presence(config)
                .map_err(|why| format!("--layers: {name} cannot be checked: {why}"))?;
        }
        if !out.contains(&pairing) {
            out.push(pairing);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelmeter::MlpKind;

    fn builtin(name: &str) -> ModelConfig {
        ModelConfig::builtin(name).unwrap().unwrap()
    }

    #[test]
    fn mla_layers_are_refused_until_reference_modules_exist() {
        let lite = builtin("deepseek-v2-lite");
        let e = select(&REGISTRY, &[], &lite, AttentionImpl::Sdpa, false).unwrap_err();
        assert!(
            e.contains("cannot be verified whole")
                && e.contains("MLA reference modules are not built yet")
                && e.contains("DeepseekV2DecoderLayer_moe")
                && e.contains("DeepseekV2FlashAttention2: ")
                && e.contains("--layers DeepseekV2MLP,MoEGate,DeepseekV2MoE,DeepseekV2RMSNorm"),
            "{e}"
        );
        for name in [
            "DeepseekV2Attention",
            "LlamaFlashAttention2",
            "DeepseekV2DecoderLayer_dense",
        ] {
            let e = select(&REGISTRY, &[name], &lite, AttentionImpl::Eager, false).unwrap_err();
            assert!(
                e.contains("MLA reference modules are not built yet"),
                "{name}: {e}"
            );
        }
        let ok = select(
            &REGISTRY,
            &["DeepseekV2MLP", "MoEGate"],
            &lite,
            AttentionImpl::Sdpa,
            false,
        )
        .unwrap();
        assert_eq!(ok.len(), 2, "V2-Lite's greedy softmax gate has a reference");
        let attention = REGISTRY
            .iter()
            .find(|p| p.layer == LayerId::Attention)
            .unwrap();
        assert!(attention.module(&lite).is_err());
        // V3: the gate, the MoE and every decoder layer lack a reference.
        let v3 = builtin("deepseek-v3");
        let e = select(&REGISTRY, &["MoEGate"], &v3, AttentionImpl::Sdpa, false).unwrap_err();
        assert!(
            e.contains("noaux_tc") && e.contains("greedy softmax routing only"),
            "{e}"
        );
        let names: Vec<&str> = present(&REGISTRY, &v3)
            .iter()
            .map(|p| p.name(AttentionImpl::Sdpa))
            .collect();
        assert_eq!(names, ["DeepseekV2MLP", "DeepseekV2RMSNorm"]);
        // DeepSeek-OCR: unchanged, every layer checkable.
        let ocr = ModelConfig::deepseek_ocr();
        assert_eq!(
            select(&REGISTRY, &[], &ocr, AttentionImpl::Sdpa, false)
                .unwrap()
                .len(),
            7
        );
    }

    #[test]
    fn the_default_config_has_every_layer_in_report_order() {
        let names: Vec<&str> = present(&REGISTRY, &ModelConfig::deepseek_ocr())
            .iter()
            .map(|p| p.name(AttentionImpl::Sdpa))
            .collect();
        assert_eq!(
            names,
            [
                "DeepseekV2MLP",
                "MoEGate",
                "DeepseekV2MoE",
                "DeepseekV2RMSNorm",
                "DeepseekV2DecoderLayer_dense",
                "DeepseekV2DecoderLayer_moe",
                "LlamaFlashAttention2"
            ]
        );
    }

    #[test]
    fn analytic_and_module_names_agree_for_every_pairing() {
        let c = ModelConfig::deepseek_ocr();
        let w = Workload::prefill(1, 4).unwrap();
        for p in REGISTRY {
            for a in [AttentionImpl::Sdpa, AttentionImpl::Eager] {
                assert_eq!(p.analytic(&c, &w, a).unwrap().name(), p.name(a));
            }
        }
        assert_eq!(
            REGISTRY[4].module(&c),
            Ok(ModuleKind::DecoderLayer(0)),
            "dense layer"
        );
        assert_eq!(REGISTRY[5].module(&c), Ok(ModuleKind::DecoderLayer(1)));
    }

    #[test]
    fn a_layer_left_out_of_the_registry_is_a_clear_error() {
        let without_gate: Vec<Pairing> = REGISTRY
            .into_iter()
            .filter(|p| p.layer != LayerId::MoEGate)
            .collect();
        let c = ModelConfig::deepseek_ocr();
        let e = select(&without_gate, &["MoEGate"], &c, AttentionImpl::Sdpa, false).unwrap_err();
        assert!(e.contains("unknown layer MoEGate"), "{e}");
        assert!(
            e.contains("DeepseekV2MLP") && !e.contains("valid: MoEGate"),
            "{e}"
        );
        let all = select(&without_gate, &[], &c, AttentionImpl::Sdpa, false).unwrap();
        assert_eq!(all.len(), 6);
    }

    #[test]
    fn a_missing_layer_gets_its_true_reason() {
        let mut all_moe = ModelConfig::deepseek_ocr();
        all_moe.layer_kinds = vec![MlpKind::Moe; 12];
        let e = select(
            &REGISTRY,
            &["DeepseekV2DecoderLayer_dense"],
            &all_moe,
            AttentionImpl::Sdpa,
            false,
        )
        .unwrap_err();
        assert!(e.contains("no dense decoder layer"), "{e}");
        assert!(!e.contains("routed experts"), "{e}");

        let mut dense = ModelConfig::deepseek_ocr();
        dense.moe = None;
        dense.layer_kinds = vec![MlpKind::Dense; 12];
        let e = select(&REGISTRY, &["MoEGate"], &dense, AttentionImpl::Sdpa, false).unwrap_err();
        assert!(e.contains("no routed experts"), "{e}");
        let kinds = present(&REGISTRY, &dense);
        assert_eq!(kinds.len(), 4);
        assert!(kinds.iter().all(|p| p.module(&dense).is_ok()));
    }
}
