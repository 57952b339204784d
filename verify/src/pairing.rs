//! The one join between the analytic and the measured side: which layers
//! `verify-decoder` can check, and for each its analytic layer (the catalogue in
//! `modelmeter::layers`) and the reference module it is compared with.
//!
//! Nothing else pairs them: the reference crate knows only its modules, the analytic
//! crate only its layers. Adding a verifiable layer means one [`Pairing`] here.

use modelmeter::layers::{
    attention_class_name, attention_class_names, AttentionImpl, Layer, LayerId,
};
use modelmeter::{MlaForm, ModelConfig, Workload};
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
    /// The report name (for an MLA config's attention: use [`Pairing::name_for`]).
    pub fn name(self, attention: AttentionImpl) -> &'static str {
        self.layer.name(attention)
    }

    /// The report name of this layer of `config` run as `form` and `attention`
    /// ([`LayerId::name_for`]: an MLA config's attention is one of `MLA_CLASS_NAMES`).
    pub fn name_for(
        self,
        config: &ModelConfig,
        form: MlaForm,
        attention: AttentionImpl,
    ) -> &'static str {
        self.layer.name_for(config, form, attention)
    }

    /// `Ok` when `config` has this layer, else the true reason why not. Every layer the
    /// analytic crate models has a reference module: multi-head and MLA attention (naive
    /// and absorbed), and every `topk_method` / `scoring_func` of the gate.
    pub fn presence(self, config: &ModelConfig) -> Result<(), String> {
        self.layer.layer_index(config).map(|_| ())
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

    /// The reference module that runs it (the attention class follows the config), or
    /// why `config` has none.
    pub fn module(self, config: &ModelConfig) -> Result<ModuleKind, String> {
        let index = self.layer.layer_index(config)?;
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

/// The pairings of `registry` that `config` has, in registry order.
pub fn present(registry: &[Pairing], config: &ModelConfig) -> Vec<Pairing> {
    registry
        .iter()
        .copied()
        .filter(|p| p.presence(config).is_ok())
        .collect()
}

/// The pairings `names` select from `registry` (all that `config` has when `names` is
/// empty), for a run of `config` as `form` and `attention`. An error names the unknown
/// layer and the valid names, or says truly why the config lacks it; an attention class
/// the run would not verify (`LlamaAttention` under `--attn sdpa`) is refused with the
/// options that run it, not swapped for the one it runs. With `any_config` (a sweep:
/// every case brings its own config and attention) presence is not checked and any
/// attention class names the attention layer.
pub fn select(
    registry: &[Pairing],
    names: &[&str],
    config: &ModelConfig,
    form: MlaForm,
    attention: AttentionImpl,
    any_config: bool,
) -> Result<Vec<Pairing>, String> {
    if names.is_empty() {
        if any_config {
            return Ok(registry.to_vec());
        }
        return Ok(present(registry, config));
    }
    // A sweep's cases draw their own configs and attentions: there every attention class
    // names the attention layer, so every one is valid.
    let valid: Vec<&str> = registry
        .iter()
        .flat_map(|p| match (any_config, p.layer) {
            (true, LayerId::Attention) => attention_class_names().collect(),
            _ => vec![p.name_for(config, form, attention)],
        })
        .collect();
    // Given but empty (`--layers ''`, `--layers A,,B`) is a mistake, not "all layers".
    if names.iter().any(|n| n.trim().is_empty()) {
        return Err(format!(
            "--layers = {:?} has an empty layer name; give comma-separated names (leave --layers out for all layers): {}",
            names.join(","),
            valid.join(", ")
        ));
    }
    let mut out = Vec::new();
    for name in names {
        let pairing = registry
            .iter()
            .copied()
            .find(|p| LayerId::parse(name) == Some(p.layer))
            .ok_or_else(|| {
                format!(
                    "--layers: unknown layer {name}; valid: {}{}",
                    valid.join(", "),
                    if any_config {
                        " (in a sweep any attention class selects the attention layer, whose class each case draws)"
                    } else {
                        ""
                    }
                )
            })?;
        if !any_config {
            pairing
                .presence(config)
                .map_err(|why| format!("--layers: {name} cannot be checked: {why}"))?;
            let runs = pairing.name_for(config, form, attention);
            if *name != runs {
                return Err(format!(
                    "--layers: {name} is not the attention this run verifies ({runs}); {}",
                    attention_hint(name, config, form)
                ));
            }
        }
        if !out.contains(&pairing) {
            out.push(pairing);
        }
    }
    Ok(out)
}

/// The options under which `name` is the attention a run of `config` verifies, or the
/// attention classes `config` has when no option makes it `name`.
fn attention_hint(name: &str, config: &ModelConfig, form: MlaForm) -> String {
    let runs = [
        (AttentionImpl::Sdpa, MlaForm::Naive, "--attn sdpa"),
        (AttentionImpl::Eager, MlaForm::Naive, "--attn eager"),
        (AttentionImpl::Sdpa, MlaForm::Absorb, "--mla absorb"),
    ];
    match runs
        .iter()
        .find(|(a, f, _)| attention_class_name(config, *f, *a) == name)
    {
        Some((_, MlaForm::Naive, flags)) if !form.is_naive() => {
            format!("run it with {flags} --mla naive")
        }
        Some((_, _, flags)) => format!("run it with {flags}"),
        None => {
            let mut has: Vec<&str> = Vec::new();
            for (a, f, _) in runs {
                let class = attention_class_name(config, f, a);
                if !has.contains(&class) {
                    has.push(class);
                }
            }
            format!(
                "config {} has {} attention: {}",
                config.name,
                if config.mla.is_some() {
                    "MLA"
                } else {
                    "multi-head"
                },
                has.join(", ")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use modelmeter::MlpKind;

    fn builtin(name: &str) -> ModelConfig {
        ModelConfig::builtin(name).unwrap().unwrap()
    }

    /// What an error says when `--layer` names an attention class the run does not
    /// verify: the options that make it the run's, or the classes the config has.
    #[test]
    fn attention_hints_name_the_options_that_would_run_the_class() {
        let lite = builtin("deepseek-v2-lite");
        let ocr = ModelConfig::deepseek_ocr();
        for (name, config, form, hint) in [
            (
                "DeepseekV2Attention",
                &lite,
                MlaForm::Naive,
                "run it with --attn eager",
            ),
            (
                "DeepseekV2FlashAttention2",
                &lite,
                MlaForm::Naive,
                "run it with --attn sdpa",
            ),
            (
                "DeepseekV2FlashAttention2",
                &lite,
                MlaForm::Absorb,
                "run it with --attn sdpa --mla naive",
            ),
            (
                "DeepseekV2Attention_absorb",
                &lite,
                MlaForm::Naive,
                "run it with --mla absorb",
            ),
            (
                "LlamaAttention",
                &ocr,
                MlaForm::Naive,
                "run it with --attn eager",
            ),
        ] {
            assert_eq!(attention_hint(name, config, form), hint, "{name}");
        }
        let none = attention_hint("DeepseekV2Attention", &ocr, MlaForm::Naive);
        assert_eq!(
            none,
            format!(
                "config {} has multi-head attention: LlamaFlashAttention2, LlamaAttention",
                ocr.name
            )
        );
        let mla = attention_hint("LlamaAttention", &lite, MlaForm::Naive);
        assert!(
            mla.ends_with(
                "has MLA attention: DeepseekV2FlashAttention2, DeepseekV2Attention, DeepseekV2Attention_absorb"
            ),
            "{mla}"
        );
    }

    #[test]
    fn mla_and_v3_routing_configs_pair_every_layer() {
        for name in ["deepseek-v2-lite", "deepseek-v2", "deepseek-v3"] {
            let c = builtin(name);
            let all = select(
                &REGISTRY,
                &[],
                &c,
                MlaForm::Naive,
                AttentionImpl::Sdpa,
                false,
            )
            .unwrap();
            assert_eq!(all.len(), 7, "{name}");
            assert!(all.iter().all(|p| p.module(&c).is_ok()), "{name}");
        }
        let lite = builtin("deepseek-v2-lite");
        let attention = REGISTRY
            .iter()
            .find(|p| p.layer == LayerId::Attention)
            .unwrap();
        assert_eq!(attention.module(&lite), Ok(ModuleKind::Attention));
        for (form, attn, expected) in [
            (
                MlaForm::Naive,
                AttentionImpl::Sdpa,
                "DeepseekV2FlashAttention2",
            ),
            (MlaForm::Naive, AttentionImpl::Eager, "DeepseekV2Attention"),
            (
                MlaForm::Absorb,
                AttentionImpl::Sdpa,
                "DeepseekV2Attention_absorb",
            ),
        ] {
            assert_eq!(attention.name_for(&lite, form, attn), expected);
            let w = Workload::prefill(1, 4).unwrap().with_mla(form);
            assert_eq!(
                attention.analytic(&lite, &w, attn).unwrap().name(),
                expected
            );
        }
        // The MHA config keeps its Llama names.
        let ocr = ModelConfig::deepseek_ocr();
        assert_eq!(
            attention.name_for(&ocr, MlaForm::Absorb, AttentionImpl::Sdpa),
            "LlamaFlashAttention2"
        );
        // --layers accepts the MLA class names.
        let picked = select(
            &REGISTRY,
            &["DeepseekV2Attention", "MoEGate"],
            &builtin("deepseek-v3"),
            MlaForm::Naive,
            AttentionImpl::Eager,
            false,
        )
        .unwrap();
        assert_eq!(picked.len(), 2);
        // A name given twice runs (and counts) once.
        let picked = select(
            &REGISTRY,
            &["MoEGate", "DeepseekV2MLP", "MoEGate"],
            &builtin("deepseek-v3"),
            MlaForm::Naive,
            AttentionImpl::Eager,
            false,
        )
        .unwrap();
        let names: Vec<&str> = picked
            .iter()
            .map(|p| p.name(AttentionImpl::Eager))
            .collect();
        assert_eq!(names, ["MoEGate", "DeepseekV2MLP"]);
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
        let e = select(
            &without_gate,
            &["MoEGate"],
            &c,
            MlaForm::Naive,
            AttentionImpl::Sdpa,
            false,
        )
        .unwrap_err();
        assert!(e.contains("unknown layer MoEGate"), "{e}");
        assert!(
            e.contains("DeepseekV2MLP") && !e.contains("valid: MoEGate"),
            "{e}"
        );
        let all = select(
            &without_gate,
            &[],
            &c,
            MlaForm::Naive,
            AttentionImpl::Sdpa,
            false,
        )
        .unwrap();
        assert_eq!(all.len(), 6);
    }

    #[test]
    fn in_a_sweep_every_attention_class_names_the_attention_layer_and_is_listed() {
        let c = ModelConfig::deepseek_ocr();
        let sweep = |names: &[&str]| {
            select(
                &REGISTRY,
                names,
                &c,
                MlaForm::Naive,
                AttentionImpl::Sdpa,
                true,
            )
        };
        for class in ["LlamaAttention", "DeepseekV2Attention_absorb"] {
            let picked = sweep(&[class]).unwrap();
            assert_eq!(
                picked.iter().map(|p| p.layer).collect::<Vec<_>>(),
                [LayerId::Attention],
                "{class}"
            );
        }
        // The error's list is what a sweep accepts (the default config's would omit MLA's).
        let e = sweep(&["Attention"]).unwrap_err();
        for class in ["LlamaFlashAttention2", "LlamaAttention"]
            .into_iter()
            .chain(modelmeter::layers::MLA_CLASS_NAMES)
        {
            assert!(e.contains(class), "{class}: {e}");
        }
        assert!(e.contains("whose class each case draws"), "{e}");
        // Outside a sweep the list is the run's own names, without that remark.
        let e = select(
            &REGISTRY,
            &["Attention"],
            &c,
            MlaForm::Naive,
            AttentionImpl::Sdpa,
            false,
        )
        .unwrap_err();
        assert!(
            !e.contains("DeepseekV2Attention") && !e.contains("each case"),
            "{e}"
        );
    }

    #[test]
    fn a_missing_layer_gets_its_true_reason() {
        let mut all_moe = ModelConfig::deepseek_ocr();
        all_moe.layer_kinds = vec![MlpKind::Moe; 12];
        let e = select(
            &REGISTRY,
            &["DeepseekV2DecoderLayer_dense"],
            &all_moe,
            MlaForm::Naive,
            AttentionImpl::Sdpa,
            false,
        )
        .unwrap_err();
        assert!(e.contains("no dense decoder layer"), "{e}");
        assert!(!e.contains("routed experts"), "{e}");

        let mut dense = ModelConfig::deepseek_ocr();
        dense.moe = None;
        dense.layer_kinds = vec![MlpKind::Dense; 12];
        let e = select(
            &REGISTRY,
            &["MoEGate"],
            &dense,
            MlaForm::Naive,
            AttentionImpl::Sdpa,
            false,
        )
        .unwrap_err();
        assert!(e.contains("no routed experts"), "{e}");
        let kinds = present(&REGISTRY, &dense);
        assert_eq!(kinds.len(), 4);
        assert!(kinds.iter().all(|p| p.module(&dense).is_ok()));
    }
}
