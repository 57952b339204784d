//! What a verification ran on, for the report header and the JSON `environment`.

use serde::Serialize;

use modelmeter::layers::AttentionImpl;
use modelmeter::{Dtype, Workload};
use modelmeter_reference::ffi;

use crate::device::{DeviceInfo, DeviceSpec};

/// The environment block of a report.
#[derive(Clone, Debug, Serialize)]
pub struct Environment {
    /// `cpu` or `cuda:N`.
    pub device: String,
    pub device_name: String,
    /// Memory the run may use (host available memory, or GPU free memory), if known.
    /// Volatile (it changes from run to run), so not part of the environment block: the
    /// JSON report has it in a separate `host` object only with `--report-host-details`.
    #[serde(skip)]
    pub device_memory_bytes: Option<u64>,
    /// The cgroup or rlimit bound `device_memory_bytes` is under, when it is not the
    /// machine's available memory ([`crate::device::DeviceInfo::memory_bound`]); volatile
    /// likewise.
    #[serde(skip)]
    pub device_memory_bound: Option<String>,
    pub libtorch_version: String,
    /// The CUDA and cuDNN versions libtorch was built with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cuda_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cudnn_version: Option<String>,
    pub dtype: Dtype,
    /// The attention core asked for; `None` (null) for the absorbed MLA form, which has
    /// none (`modelmeter::layers::attention_core`), and for a sweep, whose cases each
    /// draw their own (`cases[].attention`).
    pub attention: Option<AttentionImpl>,
    /// The fused attention kernels libtorch dispatched to (the SDPA kernel that ran).
    pub sdpa_kernels: Vec<String>,
    /// Whether libtorch allowed TF32 for fp32 matmuls.
    pub tf32_allowed: bool,
    /// CUDA only: the caching allocator's configuration (`PYTORCH_CUDA_ALLOC_CONF`) the
    /// run had; `verify-decoder` adds `expandable_segments:True` (crate::cuda_allocator).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cuda_alloc_conf: Option<String>,
    pub seed: u64,
    pub threads: i32,
    pub modelmeter_version: &'static str,
    /// Test hooks that changed this run (debug builds only); empty in real runs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub test_hooks: Vec<String>,
    /// Whether the JSON report carries the volatile [`Environment::host_details`]
    /// (`--report-host-details`); off by default, so that the same seed and inputs give
    /// byte-identical reports.
    #[serde(skip)]
    pub include_host_details: bool,
}

impl Environment {
    /// Reads libtorch's build settings and the device description.
    pub fn collect(
        spec: DeviceSpec,
        info: &DeviceInfo,
        workload: &Workload,
        attention: Option<AttentionImpl>,
        seed: u64,
    ) -> Environment {
        let config = ffi::libtorch_config().unwrap_or_default();
        let setting = |key: &str| {
            config
                .split([',', '\n'])
                .find_map(|item| item.trim().strip_prefix(key).map(|v| v.trim().to_string()))
                .filter(|v| !v.is_empty())
        };
        Environment {
            device: spec.to_string(),
            device_name: info.name.clone(),
            device_memory_bytes: info.memory_bytes.as_ref().ok().copied(),
            device_memory_bound: info.memory_bound.clone(),
            libtorch_version: setting("TORCH_VERSION=").unwrap_or_else(|| "unknown".into()),
            cuda_version: setting("CUDA_VERSION="),
            cudnn_version: setting("CUDNN_VERSION="),
            dtype: workload.dtype,
            attention,
            sdpa_kernels: Vec::new(),
            // The workload decides; each layer's run sets libtorch's switch from it and
            // the runner checks that the counter saw the same.
            tf32_allowed: workload.allow_tf32,
            cuda_alloc_conf: match spec {
                DeviceSpec::Cuda(_) => crate::cuda_allocator::current(),
                DeviceSpec::Cpu => None,
            },
            seed,
            threads: tch::get_num_threads(),
            modelmeter_version: env!("CARGO_PKG_VERSION"),
            test_hooks: Vec::new(),
            include_host_details: false,
        }
    }

    /// Facts about the host that change from run to run (free memory), for the JSON
    /// report's separate `host` object.
    pub fn host_details(&self) -> serde_json::Value {
        let mut host = serde_json::json!({ "device_memory_bytes": self.device_memory_bytes });
        if let Some(bound) = &self.device_memory_bound {
            host["device_memory_bound"] = bound.as_str().into();
        }
        host
    }

    /// Adds the attention kernels seen in a run.
    pub fn saw_kernels<'a>(&mut self, kernels: impl IntoIterator<Item = &'a String>) {
        for k in kernels {
            if !self.sdpa_kernels.contains(k) {
                self.sdpa_kernels.push(k.clone());
            }
        }
    }
}
