//! The rows `verify-decoder` checks per layer, as one typed list: the approximate
//! FlopCounterMode-compatible total, the exact metrics, the activation peak (within the
//! tolerance), the two completeness rows, and with `--oracle` the witness's two rows
//! (the `hw_*` rows of `--hardware-counters` are [`crate::hardware`]'s).
//! The compare loop, the table (units), JSON and JUnit all iterate [`EXACT`] or name a
//! [`Check`]; adding a verified metric means a [`Metric`] in the analytic crate and an
//! entry in [`EXACT`] that says where the run measured it.

use modelmeter::{Metric, Unit};
use modelmeter_reference::LayerRun;
use serde::{Serialize, Serializer};

/// One row of a layer's verification.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Check {
    /// The analytic total against the FlopCounterMode-compatible total (approximate by
    /// nature: FlopCounterMode sees no elementwise work).
    Flops,
    /// An exact metric: analytic and measured must agree to the FLOP or byte.
    Exact(Metric),
    /// Executed ops the conventions table cannot cost (a failing row when any ran).
    UncountedOps,
    /// The fused attention kernel predicted vs the one that ran (a failing row when they
    /// differ).
    AttentionKernel,
    /// The high-water mark of live activation bytes during the forward (op outputs only)
    /// against the analytic liveness peak: within the tolerance, since kernel-internal
    /// allocations the op lists do not name may differ (docs/memory.md).
    PeakActivationBytes,
    /// `--oracle`: torch's FlopCounterMode on the transformers module vs this project's
    /// FlopCounterMode-compatible count (exact).
    OracleFlops,
    /// `--oracle`: the relative error between the transformers module's output and the
    /// reference module's (in `rel_diff`).
    OracleOutput,
    /// `--hardware-counters`: tensor-pipe operations Nsight Compute counted in the layer's
    /// range against the counted `tensor_core_flops` (a band, see docs/hardware.md).
    HwTensorFlops,
    /// `--hardware-counters`: 2·FMA + ADD + MUL thread instructions against the counted
    /// `cuda_core_flops` (informational, except where fp32 GEMMs dominate).
    HwCudaCoreFlops,
    /// `--hardware-counters`: DRAM bytes read + written against the counted `io_bytes`
    /// (informational).
    HwDramBytes,
    /// `--hardware-counters`: bytes through L2 against the counted `io_bytes`
    /// (informational).
    HwL2Bytes,
    /// `--hardware-counters`: the range's GPU time against the roofline's lower bound for
    /// the work the hardware counted (informational).
    HwTimeNs,
}

/// What a row counts, for printing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowUnit {
    Flop,
    Byte,
    /// A plain count (ops, kernels).
    Count,
    /// A duration in nanoseconds.
    Nanosecond,
}

/// An exact metric and where a measured run holds its value.
#[derive(Clone, Copy)]
pub struct Exact {
    pub metric: Metric,
    pub measured: fn(&LayerRun) -> u64,
}

/// The exact metrics a layer is checked on, in report order, each with its measured
/// source.
pub const EXACT: [Exact; 8] = [
    Exact {
        metric: Metric::MatmulFlops,
        measured: |run| run.counts.flops.matmul_flops,
    },
    Exact {
        metric: Metric::ElementwiseFlops,
        measured: |run| run.counts.flops.elementwise_flops,
    },
    Exact {
        metric: Metric::TensorCoreFlops,
        measured: |run| run.counts.flops.tensor_core_flops,
    },
    Exact {
        metric: Metric::CudaCoreFlops,
        measured: |run| run.counts.flops.cuda_core_flops,
    },
    Exact {
        metric: Metric::IoBytes,
        measured: |run| run.counts.io_bytes,
    },
    Exact {
        metric: Metric::WeightBytes,
        measured: |run| run.weight_bytes,
    },
    Exact {
        metric: Metric::ActivationBytes,
        measured: |run| run.output_allocated_bytes,
    },
    Exact {
        metric: Metric::KvCacheBytes,
        measured: |run| run.kv_cache_bytes,
    },
];

/// Every row a layer that ran reports (the completeness rows only when they fail), in
/// report order.
pub fn reported() -> impl Iterator<Item = Check> {
    std::iter::once(Check::Flops)
        .chain(EXACT.into_iter().map(|e| Check::Exact(e.metric)))
        .chain(std::iter::once(Check::PeakActivationBytes))
}

impl Check {
    /// The row's name in reports (`flops`, `matmul_flops`, …).
    pub fn name(self) -> &'static str {
        match self {
            Check::Flops => "flops",
            Check::Exact(m) => m.name(),
            Check::PeakActivationBytes => "peak_activation_bytes",
            Check::UncountedOps => "uncounted_ops",
            Check::AttentionKernel => "attention_kernel",
            Check::OracleFlops => "oracle_flops",
            Check::OracleOutput => "oracle_output",
            Check::HwTensorFlops => "hw_tensor_flops",
            Check::HwCudaCoreFlops => "hw_cuda_core_flops",
            Check::HwDramBytes => "hw_dram_bytes",
            Check::HwL2Bytes => "hw_l2_bytes",
            Check::HwTimeNs => "hw_time_ns",
        }
    }

    /// Whether the row's relative difference means something: not for the completeness
    /// rows, whose two values count different things (ops no rule costs, kernels
    /// predicted and run), so their `rel_diff` is null and tables show `—`.
    pub fn is_ratio(self) -> bool {
        !matches!(self, Check::UncountedOps | Check::AttentionKernel)
    }

    /// How the row is judged, as JUnit's message says it: within `tolerance` (the rows
    /// approximate by nature), exactly, or by a rule of its own that its note states.
    pub fn judged_by(self, tolerance: f64) -> String {
        match self {
            Check::Flops | Check::PeakActivationBytes => format!("tolerance {tolerance}"),
            Check::Exact(_) | Check::OracleFlops => "exact".into(),
            Check::UncountedOps => "any is a failure".into(),
            Check::AttentionKernel => "the kernels must be the same".into(),
            Check::OracleOutput
            | Check::HwTensorFlops
            | Check::HwCudaCoreFlops
            | Check::HwDramBytes
            | Check::HwL2Bytes
            | Check::HwTimeNs => "its own bound, in the note".into(),
        }
    }

    /// What the row's values count.
    pub fn unit(self) -> RowUnit {
        match self {
            Check::Flops | Check::OracleFlops | Check::HwTensorFlops | Check::HwCudaCoreFlops => {
                RowUnit::Flop
            }
            Check::HwDramBytes | Check::HwL2Bytes | Check::PeakActivationBytes => RowUnit::Byte,
            Check::HwTimeNs => RowUnit::Nanosecond,
            Check::Exact(m) => match m.unit() {
                Unit::Flop => RowUnit::Flop,
                Unit::Byte => RowUnit::Byte,
            },
            Check::UncountedOps | Check::AttentionKernel | Check::OracleOutput => RowUnit::Count,
        }
    }

    /// `v` in this row's unit, as the tables print it (`1.25 GFLOP`, `3.000 MiB`).
    pub fn show(self, v: u64) -> String {
        match self.unit() {
            RowUnit::Byte => modelmeter::units::bytes(v),
            RowUnit::Count => v.to_string(),
            RowUnit::Flop => modelmeter::units::flops(v),
            RowUnit::Nanosecond => crate::hardware::rows::duration(v),
        }
    }
}

impl Serialize for Check {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl std::fmt::Display for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_have_names_and_units() {
        let names: Vec<&str> = reported().map(Check::name).collect();
        assert_eq!(
            names,
            [
                "flops",
                "matmul_flops",
                "elementwise_flops",
                "tensor_core_flops",
                "cuda_core_flops",
                "io_bytes",
                "weight_bytes",
                "activation_bytes",
                "kv_cache_bytes",
                "peak_activation_bytes"
            ]
        );
        assert_eq!(Check::Exact(Metric::WeightBytes).unit(), RowUnit::Byte);
        assert_eq!(Check::Flops.unit(), RowUnit::Flop);
        assert_eq!(Check::AttentionKernel.unit(), RowUnit::Count);
        assert_eq!(Check::HwTimeNs.unit(), RowUnit::Nanosecond);
        assert_eq!(Check::HwL2Bytes.unit(), RowUnit::Byte);
        assert_eq!(Check::HwTensorFlops.name(), "hw_tensor_flops");
        assert_eq!(
            serde_json::to_string(&Check::UncountedOps).unwrap(),
            "\"uncounted_ops\""
        );
    }

    /// Each unit as the tables print it, and a row's name as Display writes it.
    #[test]
    fn values_show_in_their_rows_unit() {
        assert_eq!(
            Check::Exact(Metric::WeightBytes).show(3 << 20),
            modelmeter::units::bytes(3 << 20)
        );
        assert_eq!(
            Check::Flops.show(1_250_000_000),
            modelmeter::units::flops(1_250_000_000)
        );
        assert_eq!(Check::UncountedOps.show(7), "7");
        assert_eq!(
            Check::HwTimeNs.show(1_500),
            crate::hardware::rows::duration(1_500)
        );
        assert_ne!(
            Check::Flops.show(1_250_000_000),
            Check::UncountedOps.show(1_250_000_000)
        );
        assert_eq!(
            Check::PeakActivationBytes.to_string(),
            "peak_activation_bytes"
        );
        assert_eq!(format!("{}", Check::Exact(Metric::IoBytes)), "io_bytes");
    }

    /// How each kind of row is judged, as the README's table states it: the flops row and
    /// the peak within the tolerance, the exact rows and the oracle's count exactly, the
    /// completeness rows by their own rule and without a ratio.
    #[test]
    fn each_row_is_judged_as_documented() {
        assert_eq!(Check::Flops.judged_by(0.1), "tolerance 0.1");
        assert_eq!(Check::PeakActivationBytes.judged_by(0.1), "tolerance 0.1");
        assert_eq!(Check::Exact(Metric::IoBytes).judged_by(0.1), "exact");
        assert_eq!(Check::OracleFlops.judged_by(0.1), "exact");
        assert_eq!(Check::UncountedOps.judged_by(0.1), "any is a failure");
        assert_eq!(
            Check::AttentionKernel.judged_by(0.1),
            "the kernels must be the same"
        );
        for completeness in [Check::UncountedOps, Check::AttentionKernel] {
            assert!(!completeness.is_ratio(), "{completeness:?}");
        }
        for ratio in [
            Check::Flops,
            Check::Exact(Metric::MatmulFlops),
            Check::PeakActivationBytes,
            Check::HwTensorFlops,
        ] {
            assert!(ratio.is_ratio(), "{ratio:?}");
        }
    }
}
