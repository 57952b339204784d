//! `DeepseekV2DecoderLayer` (pre-norm):
//! `x = x + attn(input_layernorm(x)); x = x + mlp(post_attention_layernorm(x))`,
//! where `mlp` is `DeepseekV2MoE` or `DeepseekV2MLP` as the config says for the layer,
//! and `attn` is the Llama-style multi-head attention (DeepSeek-OCR) or MLA
//! (`DeepseekV2Attention`, when the config sets the MLA dimensions).

use serde_json::json;

use crate::config::{MlpKind, ModelConfig, MoeConfig};
use crate::error::Result;
use crate::layers::attention::{AttentionImpl, LlamaAttention};
use crate::layers::mla::DeepseekV2Attention;
use crate::layers::mlp::DeepseekV2MLP;
use crate::layers::moe::DeepseekV2MoE;
use crate::layers::rms_norm::DeepseekV2RMSNorm;
use crate::layers::vendor_ops::t;
use crate::layers::Layer;
use crate::metrics::{Cost, CostBuilder};
use crate::workload::Workload;

/// One decoder layer of the config, by index.
#[derive(Clone, Debug, PartialEq)]
pub struct DeepseekV2DecoderLayer {
    config: ModelConfig,
    workload: Workload,
    kind: MlpKind,
    attention: AttentionImpl,
}

impl DeepseekV2DecoderLayer {
    /// Layer `index` of `config` (dense or MoE as the config places it).
    pub fn new(
        config: &ModelConfig,
        workload: &Workload,
        index: u64,
        attention: AttentionImpl,
    ) -> Result<DeepseekV2DecoderLayer> {
        let kind = config.layer_kind(index)?;
        Ok(DeepseekV2DecoderLayer {
            config: config.clone(),
            workload: workload.clone(),
            kind,
            attention,
        })
    }

    /// The layer's feed-forward kind.
    pub fn kind(&self) -> MlpKind {
        self.kind
    }

    /// The original ModelMeter constructor: a layer from bare dimensions
    /// (`DeepseekV2DecoderLayer(hidden_size, num_heads, seq_len, intermediate_size,
    /// num_experts, …)`), prefill, batch 1 unless given. With experts it is an MoE layer
    /// whose experts have width `moe_intermediate_size` (default: `intermediate_size`,
    /// as the original analyzer built it).
    pub fn from_dims(dims: &DecoderLayerDims) -> Result<DeepseekV2DecoderLayer> {
        let moe_width = dims.moe_intermediate_size.unwrap_or(dims.intermediate_size);
        let config = ModelConfig::from_json_value(
            "DecoderLayerDims",
            &json!({
                "hidden_size": dims.hidden_size,
                "num_attention_heads": dims.num_heads,
                "num_key_value_heads": dims.num_key_value_heads.unwrap_or(dims.num_heads),
                "intermediate_size": dims.intermediate_size,
                "moe_intermediate_size": moe_width,
                // 0 experts: a dense layer, whose config has no MoE fields; 0 shared
                // experts: none (null, as the vendor code reads it).
                "n_routed_experts": (dims.num_experts > 0).then_some(dims.num_experts),
                "num_experts_per_tok": (dims.num_experts > 0).then_some(dims.k_active),
                "n_shared_experts": MoeConfig::n_shared_experts_field(dims.num_shared_experts),
                "num_hidden_layers": 1,
                "first_k_dense_replace": 0,
                "vocab_size": 1,
            }),
        )?;
        let workload = Workload::prefill(dims.batch_size, dims.seq_len)?;
        DeepseekV2DecoderLayer::new(&config, &workload, 0, AttentionImpl::Sdpa)
    }
}

/// Bare dimensions for [`DeepseekV2DecoderLayer::from_dims`]; unset fields take the
/// DeepSeek-OCR values (k = 6 active experts, 2 shared experts, batch 1).
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderLayerDims {
    pub hidden_size: u64,
    pub num_heads: u64,
    pub seq_len: u64,
    pub intermediate_size: u64,
    /// 0 builds a dense layer.
    pub num_experts: u64,
    pub batch_size: u64,
    pub num_key_value_heads: Option<u64>,
    pub k_active: u64,
    pub num_shared_experts: u64,
    pub moe_intermediate_size: Option<u64>,
}

impl Default for DecoderLayerDims {
    fn default() -> DecoderLayerDims {
        DecoderLayerDims {
            hidden_size: 1280,
            num_heads: 10,
            seq_len: 512,
            intermediate_size: 6848,
            num_experts: 64,
            batch_size: 1,
            num_key_value_heads: None,
            k_active: 6,
            num_shared_experts: 2,
            moe_intermediate_size: None,
        }
    }
}

impl Layer for DeepseekV2DecoderLayer {
    fn name(&self) -> String {
        match self.kind {
            MlpKind::Dense => "DeepseekV2DecoderLayer_dense".into(),
            MlpKind::Moe => "DeepseekV2DecoderLayer_moe".into(),
        }
    }

    fn cost(&self) -> Result<Cost> {
        let (c, w) = (&self.config, &self.workload);
        let mut b = CostBuilder::new(self.name(), w.allow_tf32);
        let norm = DeepseekV2RMSNorm::new(c, w);
        let hidden = t(&[w.batch, w.query_len(), c.hidden_size], w.dtype);
        // `residual = hidden_states` keeps each sum alive while the next block runs;
        // each block's output is dropped by the reassignment after the add.
        // Both norms run over the same shape: one op list, costed once.
        let input_norm = norm.cost_as("input_layernorm")?;
        let post_norm = input_norm.renamed("post_attention_layernorm");
        let [normed] = b.call(input_norm, [&hidden])?;
        let [attended] = b.call(attention_cost(c, w, self.attention)?, [&hidden])?;
        b.release(&[&normed])?;
        let residual = b.elementwise(
            "residual + self_attn",
            "aten::add",
            [&hidden, &attended],
            w.dtype,
        )?;
        b.release(&[&attended])?;
        let feed_forward = match self.kind {
            MlpKind::Dense => DeepseekV2MLP::new(c, w).cost()?,
            MlpKind::Moe => DeepseekV2MoE::new(c, w)?.cost()?,
        };
        let [normed] = b.call(post_norm, [&hidden])?;
        let [mlp] = b.call(feed_forward, [&hidden])?;
        b.release(&[&normed])?;
        let out = b.elementwise("residual + mlp", "aten::add", [&residual, &mlp], w.dtype)?;
        b.release(&[&mlp])?;
        b.returns(&[&out]);
        Ok(b.finish())
    }
}

/// The attention the config names: MLA when it has MLA dimensions, else Llama-style MHA.
pub(crate) fn attention_cost(
    config: &ModelConfig,
    workload: &Workload,
    attention: AttentionImpl,
) -> Result<Cost> {
    match config.mla {
        Some(_) => DeepseekV2Attention::new(config, workload, attention)?.cost(),
        None => LlamaAttention::new(config, workload, attention).cost(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(index: u64) -> Cost {
        let c = ModelConfig::deepseek_ocr();
        let w = Workload::prefill(1, 512).unwrap();
        DeepseekV2DecoderLayer::new(&c, &w, index, AttentionImpl::Sdpa)
            .unwrap()
            .cost()
            .unwrap()
    }

    #[test]
    fn dense_and_moe_layers_match_the_reference_measurements() {
        let dense = layer(0);
        assert_eq!(dense.name, "DeepseekV2DecoderLayer_dense");
        assert_eq!(dense.metrics.matmul_flops, 34_980_495_360 + 65_536);
        assert_eq!(dense.metrics.weight_bytes, 32_852_480 * 2);
        let moe = layer(1);
        assert_eq!(moe.name, "DeepseekV2DecoderLayer_moe");
        assert_eq!(moe.metrics.matmul_flops, 36_322_672_640 + 65_536);
        assert_eq!(moe.metrics.weight_bytes, 233_720_320 * 2);
    }

    #[test]
    fn original_modelmeter_smoke_call() {
        let layer = DeepseekV2DecoderLayer::from_dims(&DecoderLayerDims {
            hidden_size: 4096,
            num_heads: 32,
            seq_len: 512,
            intermediate_size: 11008,
            num_experts: 64,
            ..DecoderLayerDims::default()
        })
        .unwrap();
        assert_eq!(layer.kind(), MlpKind::Moe);
        let m = layer.metrics().unwrap();
        let (n, h, i, e, k) = (512u64, 4096u64, 11008u64, 64u64, 6u64);
        let attention = 8 * n * h * h + 4 * 32 * n * n * 128;
        let moe = 6 * n * k * h * i + 6 * n * h * (2 * i);
        // The gate (2·N·h·E) and rotary (N·d) matmuls are fp32: not tensor-core work.
        assert_eq!(m.tensor_core_flops, attention + moe);
        assert_eq!(m.matmul_flops, attention + moe + 2 * n * h * e + n * 128);
    }

    #[test]
    fn no_experts_is_a_dense_layer_and_no_shared_experts_is_none() {
        let dims = |num_experts, num_shared_experts| {
            DeepseekV2DecoderLayer::from_dims(&DecoderLayerDims {
                hidden_size: 64,
                num_heads: 4,
                seq_len: 8,
                intermediate_size: 96,
                num_experts,
                num_shared_experts,
                moe_intermediate_size: Some(16),
                ..DecoderLayerDims::default()
            })
            .unwrap()
        };
        // "0 builds a dense layer": its MLP of width 96, whatever k says.
        let dense = dims(0, 2);
        assert_eq!(dense.kind(), MlpKind::Dense);
        let (n, h) = (8u64, 64u64);
        let attention = 8 * n * h * h + 4 * 4 * n * n * 16;
        assert_eq!(
            dense.metrics().unwrap().tensor_core_flops,
            attention + 6 * n * h * 96
        );
        // No shared experts: the routed ones alone (6 per token, width 16).
        let routed_only = dims(8, 0);
        assert_eq!(routed_only.kind(), MlpKind::Moe);
        assert_eq!(
            routed_only.metrics().unwrap().tensor_core_flops,
            attention + 6 * n * 6 * h * 16
        );
        assert_eq!(
            dims(8, 2).metrics().unwrap().tensor_core_flops,
            attention + 6 * n * 6 * h * 16 + 6 * n * h * 32
        );
    }

    #[test]
    fn out_of_range_layer_index_is_an_error() {
        let c = ModelConfig::deepseek_ocr();
        let w = Workload::prefill(1, 8).unwrap();
        let e = DeepseekV2DecoderLayer::new(&c, &w, 12, AttentionImpl::Sdpa).unwrap_err();
        assert!(e.to_string().contains("0 ..= 11"), "{e}");
    }
}
