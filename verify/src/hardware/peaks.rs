//! Peak throughputs of the GPUs the hardware rows know, for a roofline position per
//! layer: how far the achieved FLOP/s and bytes/s are from what the device can do.
//!
//! Sources: NVIDIA's H100 Tensor Core GPU datasheet (H100 SXM5, H100 PCIe, H100 NVL) and
//! the H200 Tensor Core GPU product brief (H200 SXM, H200 NVL). The datasheets give
//! tensor-core figures "with sparsity"; the dense figures here are half of them (the
//! datasheets' footnote). All are at boost clock: a run under `ncu --clock-control none`
//! sees whatever clock the GPU runs at, so a layer can approach but should not pass them.

use serde::Serialize;

/// Dense peak throughputs of one GPU model, in base units per second.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct DevicePeaks {
    /// The model, as NVIDIA names it.
    pub model: &'static str,
    /// bf16 and fp16 tensor-core FLOP/s (dense, fp32 accumulation).
    pub tensor_16bit_flops_per_s: f64,
    /// tf32 tensor-core FLOP/s (dense).
    pub tensor_tf32_flops_per_s: f64,
    /// fp32 CUDA-core FLOP/s (non-tensor).
    pub fp32_flops_per_s: f64,
    /// HBM bandwidth, bytes/s.
    pub dram_bytes_per_s: f64,
    /// Where the figures come from.
    pub source: &'static str,
}

const T: f64 = 1e12;

const DATASHEET_H100: &str =
    "NVIDIA H100 Tensor Core GPU datasheet (dense = half the sparsity figures)";
const BRIEF_H200: &str =
    "NVIDIA H200 Tensor Core GPU product brief (dense = half the sparsity figures)";

/// H100 SXM5 80 GB: BF16 1,979 TFLOP/s sparse, TF32 989, FP32 67, HBM3 3.35 TB/s.
pub const H100_SXM: DevicePeaks = DevicePeaks {
    model: "H100 SXM",
    tensor_16bit_flops_per_s: 989.5 * T,
    tensor_tf32_flops_per_s: 494.5 * T,
    fp32_flops_per_s: 67.0 * T,
    dram_bytes_per_s: 3.35 * T,
    source: DATASHEET_H100,
};

/// H100 PCIe 80 GB: BF16 1,513 TFLOP/s sparse, TF32 756, FP32 51, HBM2e 2.0 TB/s.
pub const H100_PCIE: DevicePeaks = DevicePeaks {
    model: "H100 PCIe",
    tensor_16bit_flops_per_s: 756.5 * T,
    tensor_tf32_flops_per_s: 378.0 * T,
    fp32_flops_per_s: 51.0 * T,
    dram_bytes_per_s: 2.0 * T,
    source: DATASHEET_H100,
};

/// H100 NVL 94 GB: BF16 1,671 TFLOP/s sparse, TF32 835, FP32 60, HBM3 3.9 TB/s.
pub const H100_NVL: DevicePeaks = DevicePeaks {
    model: "H100 NVL",
    tensor_16bit_flops_per_s: 835.5 * T,
    tensor_tf32_flops_per_s: 417.5 * T,
    fp32_flops_per_s: 60.0 * T,
    dram_bytes_per_s: 3.9 * T,
    source: DATASHEET_H100,
};

/// H200 SXM 141 GB: the H100 SXM's compute (BF16 1,979 TFLOP/s sparse, TF32 989,
/// FP32 67) with HBM3e at 4.8 TB/s.
pub const H200_SXM: DevicePeaks = DevicePeaks {
    model: "H200 SXM",
    tensor_16bit_flops_per_s: 989.5 * T,
    tensor_tf32_flops_per_s: 494.5 * T,
    fp32_flops_per_s: 67.0 * T,
    dram_bytes_per_s: 4.8 * T,
    source: BRIEF_H200,
};

/// H200 NVL 141 GB: BF16 1,671 TFLOP/s sparse, TF32 835, FP32 60, HBM3e 4.8 TB/s.
pub const H200_NVL: DevicePeaks = DevicePeaks {
    model: "H200 NVL",
    tensor_16bit_flops_per_s: 835.5 * T,
    tensor_tf32_flops_per_s: 417.5 * T,
    fp32_flops_per_s: 60.0 * T,
    dram_bytes_per_s: 4.8 * T,
    source: BRIEF_H200,
};

/// The peaks of the device libtorch names `name` (`NVIDIA H200`, `NVIDIA H100 80GB
/// HBM3`, …); `None` for a GPU this table does not know (its rows then show achieved
/// throughput without a roofline position).
pub fn of_device(name: &str) -> Option<DevicePeaks> {
    let name = name.to_ascii_uppercase();
    let table = [
        ("H200 NVL", H200_NVL),
        ("H200", H200_SXM),
        ("H100 NVL", H100_NVL),
        ("H100 PCIE", H100_PCIE),
        ("H100", H100_SXM),
    ];
    table
        .into_iter()
        .find(|(key, _)| name.contains(key))
        .map(|(_, peaks)| peaks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_as_libtorch_reports_them() {
        assert_eq!(of_device("NVIDIA H200"), Some(H200_SXM));
        assert_eq!(of_device("NVIDIA H200 NVL"), Some(H200_NVL));
        assert_eq!(of_device("NVIDIA H100 80GB HBM3"), Some(H100_SXM));
        assert_eq!(of_device("NVIDIA H100 PCIe"), Some(H100_PCIE));
        assert_eq!(of_device("NVIDIA H100 NVL"), Some(H100_NVL));
        assert_eq!(of_device("NVIDIA A100-SXM4-80GB"), None);
        assert_eq!(of_device("cpu"), None);
    }

    /// Each figure as its source prints it (TFLOP/s with sparsity for the tensor cores,
    /// dense FP32 TFLOP/s, HBM TB/s), written out here rather than read from the table.
    #[test]
    fn the_figures_are_the_sources_own() {
        for (p, sparse_16bit, sparse_tf32, fp32, hbm) in [
            (H100_SXM, 1979.0, 989.0, 67.0, 3.35),
            (H100_PCIE, 1513.0, 756.0, 51.0, 2.0),
            (H100_NVL, 1671.0, 835.0, 60.0, 3.9),
            (H200_SXM, 1979.0, 989.0, 67.0, 4.8),
            (H200_NVL, 1671.0, 835.0, 60.0, 4.8),
        ] {
            let tera = |x: f64| x / 1e12;
            approx::assert_relative_eq!(
                tera(2.0 * p.tensor_16bit_flops_per_s),
                sparse_16bit,
                max_relative = 1e-12
            );
            approx::assert_relative_eq!(
                tera(2.0 * p.tensor_tf32_flops_per_s),
                sparse_tf32,
                max_relative = 1e-12
            );
            approx::assert_relative_eq!(tera(p.fp32_flops_per_s), fp32, max_relative = 1e-12);
            approx::assert_relative_eq!(tera(p.dram_bytes_per_s), hbm, max_relative = 1e-12);
        }
    }

    #[test]
    fn the_tables_are_consistent() {
        for p in [H100_SXM, H100_PCIE, H100_NVL, H200_SXM, H200_NVL] {
            // TF32 is half the 16-bit rate on Hopper; tensor cores outrun FP32 SIMT.
            assert!((p.tensor_16bit_flops_per_s / p.tensor_tf32_flops_per_s - 2.0).abs() < 0.01);
            assert!(
                p.tensor_tf32_flops_per_s > p.fp32_flops_per_s,
                "{}",
                p.model
            );
        }
    }
}
