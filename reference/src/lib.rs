//! # modelmeter-reference
//!
//! The measured half of modelmeter: DeepSeek-V2 decoder modules written with `tch`
//! (libtorch), mirroring the vendor `modeling_deepseekv2.py` of DeepSeek-OCR (the MLA
//! modules: DeepSeek-V2/V3's `modeling_deepseek.py`), run on
//! `cuda:N` or the CPU under a dispatcher-level FLOP counter ([`FlopCounter`]). The
//! counter costs every op libtorch executes with the conventions table of the analytic
//! crate, so measured and analytic metrics can be compared exactly.
//!
//! One file per vendor class: [`rms_norm`], [`mlp`], [`moe_gate`], [`moe`],
//! [`attention`] (with its rotary embedding and KV cache), [`mla`] (DeepSeek-V2/V3's
//! Multi-head Latent Attention, with [`mla_rotary`]), [`decoder_layer`], and the
//! whole causal LM with greedy generation, [`model`];
//! [`harness`] builds and runs them for a config and workload; [`parity`] checks them
//! against Hugging Face transformers.

pub mod allocations;
pub mod attention;
pub mod counter;
pub mod cuda_backend;
pub mod decoder_layer;
pub mod draws;
pub mod error;
pub mod ffi;
pub mod harness;
pub mod host_memory;
pub mod mla;
pub mod mla_rotary;
pub mod mlp;
pub mod model;
pub mod moe;
pub mod moe_gate;
pub mod op_log;
pub mod parity;
pub mod rms_norm;
pub mod self_attention;
pub mod weights;

pub use allocations::{AllocationRegion, Allocations};
pub use counter::{Counts, FlopCounter, OpRecord, OpSummary, Region};
pub use error::{Error, Result};
pub use harness::{run_layer, LayerRun, ModuleKind, RunTimings};
pub use weights::{Setup, WeightCache};

use tch::Tensor;

/// A module's parameters, named as in the vendor module (`gate_proj.weight`).
pub trait Parameters {
    /// Every parameter with its vendor name, relative to the module.
    fn parameters(&self) -> Vec<(String, Tensor)>;

    /// Bytes of all parameters: numel × element size of each tensor.
    fn weight_bytes(&self) -> u64 {
        self.parameters()
            .iter()
            .map(|(_, t)| weights::tensor_bytes(t))
            .sum()
    }
}

/// `params` with `prefix.` in front of every name.
pub(crate) fn prefixed(prefix: &str, params: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    params
        .into_iter()
        .map(|(n, t)| (format!("{prefix}.{n}"), t))
        .collect()
}
