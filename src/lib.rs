//! # modelmeter
//!
//! Exact analytic metrics of the DeepSeek-V2 decoder layers (the language model inside
//! DeepSeek-OCR): FLOPs split by op class (matmul / elementwise) and by the NVIDIA
//! engine that executes them (tensor cores / CUDA cores), bytes moved, weight,
//! activation and KV-cache memory — from a Hugging Face `config.json` and a workload.
//!
//! ```
//! use modelmeter::{layers::{DeepseekV2MLP, Layer}, ModelConfig, Workload};
//!
//! let config = ModelConfig::deepseek_ocr();
//! let workload = Workload::prefill(1, 512)?;
//! let mlp = DeepseekV2MLP::new(&config, &workload).metrics()?;
//! assert_eq!(mlp.matmul_flops, 26_927_431_680); // 6·N·h·i
//! # Ok::<(), modelmeter::Error>(())
//! ```
//!
//! Every metric is an exact `u64` in base units (FLOPs, bytes); arithmetic is checked,
//! so an overflow is an [`Error`], never a wrapped number. Each op's FLOP rule lives in
//! one table, [`conventions`], which the measured side (crate `modelmeter-reference`)
//! uses too.

pub mod allocator;
pub mod checked;
#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
mod config_reader;
pub mod conventions;
pub mod dtype;
pub mod error;
pub mod layers;
pub mod liveness;
pub mod metrics;
pub mod mla_config;
pub mod overflow;
pub mod report;
pub mod routing;
pub mod shape;
pub mod sweep;
pub mod threads;
pub mod units;
pub mod workload;

pub use config::{MlpKind, ModelConfig, MoeConfig};
pub use dtype::Dtype;
pub use error::{Error, Result};
pub use metrics::{Cost, Metric, Metrics, Unit};
pub use mla_config::{MlaConfig, YarnScaling};
pub use routing::{Routing, ScoringFunc, TopkMethod};
pub use workload::{MlaForm, Phase, Platform, Profile, Workload};
