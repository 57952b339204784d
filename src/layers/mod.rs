//! Analytic models of the DeepSeek-V2 decoder layers, one file per vendor class.
//!
//! Each layer writes down, op by op, the ATen calls the vendor code makes for one
//! forward call (`modeling_deepseekv2.py` and the transformers 4.46 Llama attention it
//! imports; `modeling_deepseek.py` for the MLA attention of DeepSeek-V2/V3), with closed-form shapes from the config and workload. Every call is costed
//! by the conventions table, so the metrics are exact integers that a measured run of
//! the same code reproduces to the FLOP.

mod attention;
mod catalog;
mod decoder_layer;
mod decoder_stack;
mod mla;
mod mlp;
mod moe;
mod moe_gate;
mod rms_norm;
mod rotary_embedding;
mod sdpa_kernel;
mod vendor_ops;

pub use attention::{AttentionImpl, LlamaAttention, ATTENTION_CORE_ROLE};
pub use catalog::{
    attention_class_name, attention_class_names, attention_core, layers_of, LayerId,
};
pub use decoder_layer::{DecoderLayerDims, DeepseekV2DecoderLayer};
pub use decoder_stack::{accumulate, DeepseekV2Decoder, Generation, GenerationMetrics, StackPart};
pub use mla::{mla_class_name, DeepseekV2Attention, MLA_CLASS_NAMES};
pub use mlp::DeepseekV2MLP;
pub use moe::{DeepseekV2MoE, ROUTED_EXPERTS_ROLE};
pub use moe_gate::MoEGate;
pub use rms_norm::DeepseekV2RMSNorm;
pub use rotary_embedding::LlamaRotaryEmbedding;
pub use sdpa_kernel::SdpaKernel;

use crate::error::Result;
use crate::metrics::{Cost, Metrics};

/// An analytic layer: the cost of one forward call, as a tree down to ATen ops.
pub trait Layer {
    /// The name reports use (the vendor class, e.g. `DeepseekV2MLP`).
    fn name(&self) -> String;

    /// The op-by-op cost tree of one forward call.
    fn cost(&self) -> Result<Cost>;

    /// The metrics of one forward call (the root of [`Layer::cost`]), from the same op
    /// list without keeping the per-op tree or the tensors' liveness
    /// (`metrics::metrics_only`).
    fn metrics(&self) -> Result<Metrics> {
        Ok(crate::metrics::metrics_only(|| self.cost())?.metrics)
    }
}
