//! Devices: what the user may name, whether libtorch can use it, and what it is.

use std::fmt;
use std::process::Command;

use modelmeter::{units, Platform};
use modelmeter_reference::cuda_backend::Backend;
use tch::Device;

/// A device as named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl DeviceSpec {
    /// The spec naming the libtorch `device` a plan runs on (only `cpu` and `cuda:N` are
    /// ever planned: [`DeviceSpec::parse`]); messages and the oracle name it this way,
    /// not as tch's `Cpu` / `Cuda(0)`.
    pub fn of(device: Device) -> DeviceSpec {
        match device {
            Device::Cuda(i) => DeviceSpec::Cuda(i),
            _ => DeviceSpec::Cpu,
        }
    }

    /// The largest CUDA device index libtorch can address (`c10::DeviceIndex` is an
    /// `int8_t`): a larger N would wrap to another device on the way to libtorch.
    pub const MAX_CUDA_INDEX: usize = Platform::MAX_CUDA_INDEX as usize;

    /// Parses `cpu`, `cuda` (= `cuda:0`) or `cuda:N` (N up to [`Self::MAX_CUDA_INDEX`]).
    pub fn parse(text: &str) -> Result<DeviceSpec, String> {
        match Platform::parse_device(text).map_err(|e| e.to_string())? {
            (Platform::Cpu, _) => Ok(DeviceSpec::Cpu),
            (Platform::Cuda, index) => Ok(DeviceSpec::Cuda(usize::from(index))),
        }
    }

    /// `cuda:0` when libtorch sees a GPU, else `cpu`, with the reason: a machine whose
    /// NVIDIA driver is there but whose CUDA backend did not load says so, instead of
    /// quietly running on the CPU.
    pub fn default_choice() -> (DeviceSpec, String) {
        use modelmeter_reference::cuda_backend::{devices, state};
        DeviceSpec::choice_for(state(), devices())
    }

    /// [`DeviceSpec::default_choice`] for what start-up did about the CUDA backend and the
    /// devices libtorch then counts.
    fn choice_for(backend: Backend, devices: Result<i64, String>) -> (DeviceSpec, String) {
        match (backend, devices) {
            (_, Ok(n)) if n > 0 => (DeviceSpec::Cuda(0), "default: CUDA is available".into()),
            (Backend::Failed(why), _) => (
                DeviceSpec::Cpu,
                format!(
                    "default: this machine has an NVIDIA driver, but libtorch's CUDA backend \
                     did not load ({why}), so the CPU"
                ),
            ),
            (Backend::NoDriver, _) => (
                DeviceSpec::Cpu,
                "default: no NVIDIA driver on this machine".into(),
            ),
            (Backend::Loaded, _) => (
                DeviceSpec::Cpu,
                "default: libtorch sees no CUDA device".into(),
            ),
        }
    }

    /// The libtorch device, or why it cannot be used.
    pub fn open(self) -> Result<Device, String> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(i) => {
                let count = modelmeter_reference::cuda_backend::devices().map_err(|why| {
                    format!(
                        "--device {self}: libtorch cannot use CUDA here ({why}); \
                         run with --device cpu, or on a machine with an NVIDIA GPU"
                    )
                })?;
                if count <= 0 {
                    Err(format!(
                        "--device {self}: no CUDA device is visible to libtorch on this machine; \
                         run with --device cpu, or on a machine with an NVIDIA GPU"
                    ))
                } else if i64::try_from(i).map_or(true, |i| i >= count) {
                    Err(format!(
                        "--device {self}: only {count} CUDA device(s) visible (cuda:0 .. cuda:{})",
                        count - 1
                    ))
                } else {
                    Ok(Device::Cuda(i))
                }
            }
        }
    }

    /// The device's name and the memory a run may use, as far as they can be read.
    pub fn describe(self) -> DeviceInfo {
        match self {
            DeviceSpec::Cpu => {
                let available = cpu_available_memory()
                    .ok_or_else(|| "MemAvailable could not be read from /proc/meminfo".into());
                // A cgroup or rlimit tighter than the machine's available memory binds.
                let bound = crate::host_limits::tightest()
                    .filter(|b| available.as_ref().map_or(true, |a| b.free_bytes < *a));
                DeviceInfo {
                    name: cpu_name().unwrap_or_else(|| std::env::consts::ARCH.to_string()),
                    memory_bytes: match &bound {
                        Some(b) => Ok(b.free_bytes),
                        None => available,
                    },
                    memory_bound: bound.map(|b| b.what),
                }
            }
            DeviceSpec::Cuda(i) => DeviceInfo {
                name: gpu_name(i).unwrap_or_else(|| "NVIDIA GPU (nvidia-smi unavailable)".into()),
                memory_bytes: modelmeter_reference::ffi::cuda_memory(i)
                    .map(|(free, _total)| free)
                    .map_err(|e| e.to_string()),
                memory_bound: None,
            },
        }
    }
}

/// Name and usable memory of a device.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceInfo {
    pub name: String,
    /// Available host memory for the CPU (or what is left under a tighter cgroup or rlimit
    /// bound, [`crate::host_limits`]); free memory for a GPU (from the CUDA runtime); why
    /// it could not be read otherwise.
    pub memory_bytes: Result<u64, String>,
    /// The bound `memory_bytes` is under when it is not the machine's available memory
    /// ("under its cgroup's memory.max (…)"), for messages.
    pub memory_bound: Option<String>,
}

impl DeviceInfo {
    /// "`N` free", with the bound it is under when there is one: what the memory
    /// pre-check's refusals say the device has.
    pub fn free_text(&self, available: u64) -> String {
        match &self.memory_bound {
            Some(bound) => format!("{} free {bound}", units::bytes(available)),
            None => format!("{} free", units::bytes(available)),
        }
    }

    /// What a refusal adds to its advice when a cgroup or rlimit bound is what did not
    /// fit: raising it is the other way out.
    pub fn raise_hint(&self) -> &'static str {
        match self.memory_bound {
            Some(_) => "; or raise that limit",
            None => "",
        }
    }
}

fn cpu_name() -> Option<String> {
    let model = model_name(&std::fs::read_to_string("/proc/cpuinfo").ok()?)?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    Some(format!("{model} ({cores} threads)"))
}

/// The first `model name` of a `/proc/cpuinfo` text.
fn model_name(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|l| {
        l.strip_prefix("model name")
            .and_then(|r| r.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    })
}

fn cpu_available_memory() -> Option<u64> {
    mem_available(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    crate::host_limits::kib_field(meminfo, "MemAvailable:")?.checked_mul(1024)
}

/// Name of the i-th visible GPU, from `nvidia-smi` (honours `CUDA_VISIBLE_DEVICES`, as
/// libtorch does).
fn gpu_name(index: usize) -> Option<String> {
    let id = match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(list) if !list.trim().is_empty() => list.split(',').nth(index)?.trim().to_string(),
        _ => index.to_string(),
    };
    let out = Command::new("nvidia-smi")
        .args(["--query-gpu=name", "--format=csv,noheader", "-i", &id])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.lines().next()?.trim().to_string()).filter(|n| !n.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_device_says_why_it_is_not_the_gpu() {
        let (spec, why) = DeviceSpec::choice_for(Backend::Loaded, Ok(2));
        assert_eq!(
            (spec, why.as_str()),
            (DeviceSpec::Cuda(0), "default: CUDA is available")
        );
        let (spec, why) = DeviceSpec::choice_for(Backend::Loaded, Ok(0));
        assert_eq!(spec, DeviceSpec::Cpu);
        assert!(why.contains("sees no CUDA device"), "{why}");
        let (spec, why) = DeviceSpec::choice_for(
            Backend::NoDriver,
            Err("no NVIDIA driver (libcuda.so.1) on this machine".into()),
        );
        assert_eq!(spec, DeviceSpec::Cpu);
        assert!(why.contains("no NVIDIA driver"), "{why}");
        // A GPU machine whose backend failed must not read like a machine without a GPU.
        let (spec, why) = DeviceSpec::choice_for(
            Backend::Failed("libcudnn.so.9: cannot open shared object file".into()),
            Err("libcudnn.so.9: cannot open shared object file".into()),
        );
        assert_eq!(spec, DeviceSpec::Cpu);
        assert!(
            why.contains("NVIDIA driver")
                && why.contains("did not load")
                && why.contains("libcudnn"),
            "{why}"
        );
    }

    #[test]
    fn parses_the_documented_spellings() {
        assert_eq!(DeviceSpec::parse("cpu"), Ok(DeviceSpec::Cpu));
        assert_eq!(DeviceSpec::parse("cuda"), Ok(DeviceSpec::Cuda(0)));
        assert_eq!(DeviceSpec::parse("cuda:3"), Ok(DeviceSpec::Cuda(3)));
        let e = DeviceSpec::parse("tpu").unwrap_err();
        assert!(
            e.contains("tpu") && e.contains("cpu, cuda or cuda:N"),
            "{e}"
        );
        assert!(DeviceSpec::parse("cuda:-1").is_err());
        assert!(DeviceSpec::parse("cuda:x").is_err());
        // Indices libtorch cannot address are refused here, not wrapped to cuda:0 or -1
        // on the way (c10::DeviceIndex is an int8_t; tch passes a C int).
        assert_eq!(DeviceSpec::parse("cuda:127"), Ok(DeviceSpec::Cuda(127)));
        for n in ["128", "256", "9223372036854775808", "18446744073709551615"] {
            let e = DeviceSpec::parse(&format!("cuda:{n}")).unwrap_err();
            assert!(
                e.contains(&format!("cuda:{n}")) && e.contains("N from 0 to 127"),
                "{e}"
            );
        }
        let e = DeviceSpec::parse("").unwrap_err();
        assert!(e.starts_with("--device = \"\" is invalid"), "{e}");
    }

    #[test]
    fn proc_files_are_read_as_the_kernel_writes_them() {
        let cpuinfo = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9654 96-Core Processor\nflags\t\t: fpu\n\nprocessor\t: 1\nmodel name\t: other\n";
        assert_eq!(
            model_name(cpuinfo).as_deref(),
            Some("AMD EPYC 9654 96-Core Processor")
        );
        assert_eq!(model_name("processor\t: 0\n"), None);
        let meminfo =
            "MemTotal:       24576000 kB\nMemFree:         1000 kB\nMemAvailable:   23000000 kB\n";
        assert_eq!(mem_available(meminfo), Some(23_000_000 * 1024));
        assert_eq!(mem_available("MemAvailable:   lots kB\n"), None);
        assert_eq!(
            mem_available("MemAvailable: 18446744073709551615 kB\n"),
            None
        );
    }
}
