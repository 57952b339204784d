//! What one verification run checks: the config, the workload, the layers (pairings),
//! the device, the tolerance and the seed.

use modelmeter::layers::AttentionImpl;
use modelmeter::{ModelConfig, Workload};
use tch::Device;

use crate::hooks::TestHooks;
use crate::pairing::{self, Pairing, REGISTRY};

/// What one verification run checks.
#[derive(Clone, Debug)]
pub struct Plan {
    pub config: ModelConfig,
    pub workload: Workload,
    pub attention: AttentionImpl,
    pub device: Device,
    pub tolerance: f64,
    pub layers: Vec<Pairing>,
    pub seed: u64,
    /// Test-only alterations (none unless a test sets them; the binary never does).
    pub hooks: TestHooks,
}

/// A small MoE config for unit tests: two layers (the first dense), four heads over two
/// KV heads, eight routed experts with two per token and one shared expert.
#[cfg(test)]
pub(crate) fn small_moe_config() -> ModelConfig {
    ModelConfig::from_json_str(
        "small",
        r#"{"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 96, "moe_intermediate_size": 32, "n_routed_experts": 8,
            "num_experts_per_tok": 2, "n_shared_experts": 1, "num_hidden_layers": 2,
            "first_k_dense_replace": 1, "vocab_size": 100}"#,
    )
    .expect("a valid config")
}

#[cfg(test)]
impl Plan {
    /// A plan for unit tests: `config` at `workload` on the CPU, SDPA, no layers, the
    /// default tolerance and seed, no hooks.
    pub(crate) fn on_cpu(config: ModelConfig, workload: Workload) -> Plan {
        Plan {
            config,
            workload,
            attention: AttentionImpl::Sdpa,
            device: Device::Cpu,
            tolerance: 0.05,
            layers: Vec::new(),
            seed: 0,
            hooks: TestHooks::default(),
        }
    }
}

/// The layers of `config` that the runner can check, in report order.
pub fn applicable_layers(config: &ModelConfig) -> Vec<Pairing> {
    pairing::present(&REGISTRY, config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_only_configs_skip_moe_layers() {
        let mut c = ModelConfig::deepseek_ocr();
        c.moe = None;
        c.layer_kinds = vec![modelmeter::MlpKind::Dense; 12];
        use modelmeter::layers::LayerId;
        let kinds: Vec<LayerId> = applicable_layers(&c).iter().map(|p| p.layer).collect();
        assert!(!kinds.contains(&LayerId::MoE));
        assert!(!kinds.contains(&LayerId::DecoderMoe));
        assert!(kinds.contains(&LayerId::Attention));
        assert_eq!(applicable_layers(&ModelConfig::deepseek_ocr()).len(), 7);
    }
}
