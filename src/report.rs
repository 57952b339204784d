//! The `modelmeter analyze` report: every layer of one workload, as a human table or as
//! `modelmeter.analyze/1` JSON.

use serde_json::{json, Value};

use crate::config::ModelConfig;
use crate::error::Result;
use crate::layers::GenerationMetrics;
use crate::layers::{
    attention_class_name, attention_core, layers_of, AttentionImpl, DeepseekV2Decoder, Generation,
    Layer,
};
use crate::liveness::Peak;
use crate::metrics::{Cost, Metrics};
use crate::units;
use crate::workload::{Platform, Workload};

/// The JSON schema tag of [`AnalyzeReport::to_json`].
pub const ANALYZE_SCHEMA: &str = "modelmeter.analyze/1";

/// Every analytic layer of a config for one workload, plus the whole stack.
#[derive(Clone, Debug)]
pub struct AnalyzeReport {
    pub config: ModelConfig,
    pub workload: Workload,
    pub attention: AttentionImpl,
    /// In report order: RMSNorm, MLP, gate, MoE, attention, dense layer, MoE layer
    /// (layers the config does not have are left out).
    pub layers: Vec<Cost>,
    pub stack: Cost,
    /// Prefill plus `new_tokens` decode steps, when asked for.
    pub generation: Option<(u64, GenerationMetrics)>,
}

/// Builds the report; `new_tokens` adds a generation summary (prefill workloads only).
pub fn analyze(
    config: &ModelConfig,
    workload: &Workload,
    attention: AttentionImpl,
    new_tokens: Option<u64>,
) -> Result<AnalyzeReport> {
    // On a GPU the activation bytes and peaks are the caching allocator's blocks, as
    // verify-decoder measures them there.
    let cuda = workload.platform == Platform::Cuda;
    let costs = layers_of(config, workload, attention)?
        .iter()
        .map(|l| Ok(l.cost()?.on_device(cuda)))
        .collect::<Result<Vec<_>>>()?;
    let stack = DeepseekV2Decoder::new(config, workload, attention)
        .cost()?
        .on_device(cuda);
    // A decode step starts no generation: none is reported.
    let generation =
        match new_tokens.and_then(|n| Generation::after_prefill(config, workload, n, attention)) {
            Some(g) => Some((g.new_tokens, g.metrics()?)),
            None => None,
        };
    Ok(AnalyzeReport {
        config: config.clone(),
        workload: workload.clone(),
        attention,
        layers: costs,
        stack,
        generation,
    })
}

impl AnalyzeReport {
    /// The `modelmeter.analyze/1` JSON object; every count is an exact integer.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "schema": ANALYZE_SCHEMA,
            "config": self.config,
            "workload": self.workload,
            "attention": attention_core(&self.config, self.workload.mla, self.attention),
            "layers": self.layers,
            "stack": self.stack,
        });
        if let Some((new_tokens, g)) = &self.generation {
            // The closed form sums tensors: its activation_bytes are tensor bytes on every
            // platform, which the object says in-band (the stack's are blocks on CUDA).
            v["generation"] = json!({
                "new_tokens": new_tokens,
                "activation_bytes_are": "tensor_bytes",
                "prefill": g.prefill,
                "decode": g.decode,
                "total": g.total,
            });
        }
        v["conventions"] = crate::conventions::conventions_json();
        v
    }

    /// Human tables: one summary row per layer, then each layer's breakdown to `depth`.
    pub fn to_text(&self, depth: usize) -> String {
        let attention = attention_class_name(&self.config, self.workload.mla, self.attention);
        // The platform picks the engines and the allocator's blocks: the same config and
        // workload read differently on each, so the title names it.
        let mut out = format!(
            "modelmeter analyze — {} — {} on {} — attention {attention}\n\n",
            crate::error::one_line(&self.config.name),
            self.workload.describe(),
            self.workload.platform,
        );
        let mut rows = vec![header("layer")];
        for c in self.layers.iter().chain(std::iter::once(&self.stack)) {
            rows.push(row(&c.name, &c.metrics, Some(&c.peak)));
        }
        out.push_str(&units::table(&rows, &RIGHT));
        for c in self.layers.iter().chain(std::iter::once(&self.stack)) {
            if depth == 0 {
                break;
            }
            out.push_str(&format!("\n{}\n", c.name));
            let mut rows = vec![header("part")];
            breakdown(c, 1, depth, &mut rows);
            out.push_str(&units::table(&rows, &RIGHT));
        }
        if let Some((n, g)) = &self.generation {
            // The closed form sums tensors: on a GPU its activations are not rounded to
            // blocks as the rows above are.
            let unrounded = if self.workload.platform == Platform::Cuda {
                " (activations: tensor bytes, not rounded to CUDA blocks)"
            } else {
                ""
            };
            out.push_str(&format!(
                "\ngeneration: prefill + {n} decode steps{unrounded}\n"
            ));
            let mut rows = vec![
                header("stage"),
                row("prefill", &g.prefill, None),
                row("decode (all steps)", &g.decode, None),
                row("total", &g.total, None),
            ];
            // The closed form has no peak (nor has it in the JSON): no column for one.
            for r in &mut rows {
                r.remove(PEAK_COLUMN);
            }
            out.push_str(&units::table(&rows, &RIGHT[..RIGHT.len() - 1]));
        }
        out
    }
}

const RIGHT: [bool; 10] = [false, true, true, true, true, true, true, true, true, true];

/// Where `peak act.` is in [`header`] and [`row`] (a table of generations, which have no
/// peak, leaves it out).
pub(crate) const PEAK_COLUMN: usize = 8;

pub(crate) fn header(first: &str) -> Vec<String> {
    [
        first,
        "matmul",
        "elementwise",
        "tensor core",
        "CUDA core",
        "io",
        "weights",
        "activations",
        "peak act.",
        "KV cache",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// One row; `peak` for a layer or sub-layer (op calls and sums have none: `-`).
pub(crate) fn row(name: &str, m: &Metrics, peak: Option<&Peak>) -> Vec<String> {
    vec![
        name.to_string(),
        units::flops(m.matmul_flops),
        units::flops(m.elementwise_flops),
        units::flops(m.tensor_core_flops),
        units::flops(m.cuda_core_flops),
        units::bytes(m.io_bytes),
        units::bytes(m.weight_bytes),
        units::bytes(m.activation_bytes),
        peak.map_or("-".to_string(), |p| units::bytes(p.peak_bytes)),
        units::bytes(m.kv_cache_bytes),
    ]
}

fn breakdown(c: &Cost, level: usize, depth: usize, rows: &mut Vec<Vec<String>>) {
    for child in &c.children {
        let label = match child.op {
            Some(op) => format!("{}{} [{op}]", "  ".repeat(level - 1), child.name),
            None => format!("{}{}", "  ".repeat(level - 1), child.name),
        };
        let peak = child.op.is_none().then_some(&child.peak);
        rows.push(row(&label, &child.metrics, peak));
        if level < depth {
            breakdown(child, level + 1, depth, rows);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MlpKind;
    use crate::workload::MlaForm;

    #[test]
    fn on_a_gpu_activations_and_peaks_are_the_allocators_blocks() {
        let c = ModelConfig::deepseek_ocr();
        let decode = Workload::decode(1, 512).unwrap();
        let mut rounded = 0;
        for platform in [Platform::Cuda, Platform::Cpu] {
            let w = decode.clone().on(platform);
            let report = analyze(&c, &w, AttentionImpl::Sdpa, None).unwrap();
            let built = layers_of(&c, &w, AttentionImpl::Sdpa).unwrap();
            for (shown, layer) in report.layers.iter().zip(&built) {
                let cost = layer.cost().unwrap();
                let cuda = platform == Platform::Cuda;
                let (bytes, peak) = if cuda {
                    (cost.cuda_activation_bytes, cost.cuda_peak)
                } else {
                    (cost.metrics.activation_bytes, cost.peak)
                };
                assert_eq!(shown.metrics.activation_bytes, bytes, "{}", cost.name);
                assert_eq!(shown.peak, peak, "{}", cost.name);
                if cuda && bytes != cost.metrics.activation_bytes {
                    rounded += 1;
                }
                // Everything else is the layer's own.
                let mut same = shown.metrics;
                same.activation_bytes = cost.metrics.activation_bytes;
                assert_eq!(same, cost.metrics);
            }
        }
        assert!(rounded > 0, "no layer's blocks differ from its bytes");
    }

    #[test]
    fn json_names_the_attention_core_only_where_one_runs() {
        let lite = ModelConfig::builtin("deepseek-v2-lite").unwrap().unwrap();
        let decode = Workload::decode(1, 16).unwrap();
        for (config, form, core) in [
            (&lite, MlaForm::Naive, json!("eager")),
            (&lite, MlaForm::Absorb, Value::Null),
            (&ModelConfig::deepseek_ocr(), MlaForm::Naive, json!("eager")),
        ] {
            let w = decode.clone().with_mla(form);
            let j = analyze(config, &w, AttentionImpl::Eager, None)
                .unwrap()
                .to_json();
            assert_eq!(j["attention"], core, "{} {form:?}", config.name);
        }
    }

    #[test]
    fn json_names_every_layer_and_keeps_integers_exact() {
        let r = analyze(
            &ModelConfig::deepseek_ocr(),
            &Workload::prefill(1, 512).unwrap(),
            AttentionImpl::Sdpa,
            Some(3),
        )
        .unwrap();
        let j = r.to_json();
        assert_eq!(j["schema"], ANALYZE_SCHEMA);
        let names: Vec<&str> = j["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "DeepseekV2RMSNorm",
                "DeepseekV2MLP",
                "MoEGate",
                "DeepseekV2MoE",
                "LlamaFlashAttention2",
                "DeepseekV2DecoderLayer_dense",
                "DeepseekV2DecoderLayer_moe"
            ]
        );
        assert_eq!(
            j["layers"][1]["metrics"]["matmul_flops"].as_u64(),
            Some(26_927_431_680)
        );
        assert!(j["stack"]["metrics"]["kv_cache_bytes"].is_u64());
        // That every number of the report is an exact unsigned integer, at every depth,
        // is checked on the CLI's JSON (tests/analyze_cli.rs).
        assert_eq!(j["generation"]["new_tokens"].as_u64(), Some(3));
        assert_eq!(j["generation"]["activation_bytes_are"], "tensor_bytes");
    }

    #[test]
    fn dense_only_configs_leave_out_moe_layers() {
        let mut c = ModelConfig::deepseek_ocr();
        c.moe = None;
        c.layer_kinds = vec![MlpKind::Dense; 12];
        let r = analyze(
            &c,
            &Workload::prefill(1, 4).unwrap(),
            AttentionImpl::Eager,
            None,
        )
        .unwrap();
        let names: Vec<&str> = r.layers.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "DeepseekV2RMSNorm",
                "DeepseekV2MLP",
                "LlamaAttention",
                "DeepseekV2DecoderLayer_dense"
            ]
        );
    }

    #[test]
    fn text_has_a_row_per_layer() {
        let r = analyze(
            &ModelConfig::deepseek_ocr(),
            &Workload::prefill(1, 512).unwrap(),
            AttentionImpl::Sdpa,
            Some(2),
        )
        .unwrap();
        let text = r.to_text(1);
        assert!(text.contains("DeepseekV2MoE"));
        assert!(text.contains("26.93 GFLOP"));
        assert!(text.contains(
            "generation: prefill + 2 decode steps (activations: tensor bytes, not rounded to CUDA blocks)\n"
        ));
        assert!(text.contains("\nlayer ") && text.contains(" matmul  elementwise "));
        let cpu = analyze(
            &ModelConfig::deepseek_ocr(),
            &Workload::prefill(1, 512).unwrap().on(Platform::Cpu),
            AttentionImpl::Sdpa,
            Some(2),
        )
        .unwrap()
        .to_text(0);
        assert!(
            cpu.contains("generation: prefill + 2 decode steps\n"),
            "{cpu}"
        );
        // The layers have a peak column; the generation, which has no peak, has none.
        let (layers, generation) = cpu.split_once("generation:").unwrap();
        assert!(layers.contains("activations  peak act."), "{cpu}");
        let stage = generation.lines().find(|l| l.starts_with("stage")).unwrap();
        assert!(stage.ends_with("activations   KV cache"), "{cpu}");
        let total = generation.lines().find(|l| l.starts_with("total")).unwrap();
        assert!(!total.contains(" - "), "{cpu}");
        // Depth 1 adds a table of parts under each layer and the stack (the MLP's own
        // ops among them); depth 0 is the summary table alone.
        let parts = |text: &str| text.matches("\npart ").count();
        assert_eq!(parts(&text), r.layers.len() + 1, "{text}");
        assert!(text.contains("\nDeepseekV2MoE\npart "), "{text}");
        let summary = r.to_text(0);
        assert_eq!(parts(&summary), 0, "{summary}");
        // Depth 2 opens each part once more, indented under it (the dense decoder
        // layer's MLP, its projections); depth 1 does not.
        let nested = "\n  gate_proj [aten::mm] ";
        assert!(r.to_text(2).contains(nested));
        assert!(!text.contains(nested), "{text}");
        assert!(text.contains("\ngate_proj [aten::mm] "), "{text}");
    }
}
