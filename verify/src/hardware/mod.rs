//! Hardware counters: per-range figures read from Nsight Compute (`ncu`) exports.
//!
//! The analytic models and the FLOP counter say what a layer *should* execute; hardware
//! counters say what the GPU *did*: tensor-core operations by source type, FP32
//! instructions on the CUDA cores, DRAM and L2 traffic, time. This module reads them from
//! `ncu --csv --page raw` text ([`ncu_csv`]) and sums them per range into a small typed
//! [`HardwareFigures`].
//!
//! `verify-decoder --hardware-counters` runs the selected layers under ncu's application
//! range replay by default (`--replay-mode app-range`; `--ncu-replay range` replays each
//! range in place), one range per layer, or with `--ncu-replay kernel` one ncu run per
//! layer that profiles each kernel ([`profile`]); the profiled child writes the order of
//! its ranges ([`ranges`]); the parent attributes ncu's results to layers in that order
//! and adds the hardware rows beside the counted ones ([`rows`]), with the device's peaks
//! for a roofline position ([`peaks`]). The parser is tested on real per-kernel exports
//! from an H200 (`fixtures/ncu-h200/`) and on its range-mode exports
//! (`verify/tests/fixtures/h200-2026-11-28-hw/`); see docs/hardware.md.

pub mod ncu_csv;
pub mod peaks;
pub mod profile;
pub mod ranges;
pub mod rows;

use ncu_csv::{NcuCsv, NcuCsvError};
use serde::Serialize;

/// The ncu metric names the figures are read from.
pub mod metrics {
    /// Tensor-core operations with bf16 sources and fp32 accumulation.
    pub const TENSOR_OPS_BF16: &str = "sm__ops_path_tensor_src_bf16_dst_fp32.sum";
    /// Tensor-core operations with fp16 sources and fp32 accumulation.
    pub const TENSOR_OPS_FP16: &str = "sm__ops_path_tensor_src_fp16_dst_fp32.sum";
    /// Tensor-core operations with tf32 sources and fp32 accumulation.
    pub const TENSOR_OPS_TF32: &str = "sm__ops_path_tensor_src_tf32_dst_fp32.sum";
    /// FP32 fused multiply-add thread instructions (predicated on). The first name is the
    /// one to ask ncu for; the `sm__` spelling (summed over SMs instead of sub-partitions,
    /// the same count) is what the H200 fixtures hold, and is read when the first is absent.
    pub const FFMA: [&str; 2] = [
        "smsp__sass_thread_inst_executed_op_ffma_pred_on.sum",
        "sm__sass_thread_inst_executed_op_ffma_pred_on.sum",
    ];
    /// FP32 add thread instructions; spellings as for [`FFMA`].
    pub const FADD: [&str; 2] = [
        "smsp__sass_thread_inst_executed_op_fadd_pred_on.sum",
        "sm__sass_thread_inst_executed_op_fadd_pred_on.sum",
    ];
    /// FP32 multiply thread instructions; spellings as for [`FFMA`].
    pub const FMUL: [&str; 2] = [
        "smsp__sass_thread_inst_executed_op_fmul_pred_on.sum",
        "sm__sass_thread_inst_executed_op_fmul_pred_on.sum",
    ];
    /// Bytes read from DRAM.
    pub const DRAM_READ_BYTES: &str = "dram__bytes_read.sum";
    /// Bytes written to DRAM.
    pub const DRAM_WRITE_BYTES: &str = "dram__bytes_write.sum";
    /// Bytes through the L2 cache (all requests to the LTS slices).
    pub const L2_BYTES: &str = "lts__t_bytes.sum";
    /// GPU time of the kernel or range.
    pub const TIME: &str = "gpu__time_duration.sum";
    /// FP16 fused multiply-add thread instructions (ncu's half-precision roofline counts
    /// each as 2 FLOPs, as for FP32).
    pub const HFMA: [&str; 1] = ["smsp__sass_thread_inst_executed_op_hfma_pred_on.sum"];
    /// FP16 add thread instructions.
    pub const HADD: [&str; 1] = ["smsp__sass_thread_inst_executed_op_hadd_pred_on.sum"];
    /// FP16 multiply thread instructions.
    pub const HMUL: [&str; 1] = ["smsp__sass_thread_inst_executed_op_hmul_pred_on.sum"];
    /// FP64 fused multiply-add thread instructions.
    pub const DFMA: [&str; 1] = ["smsp__sass_thread_inst_executed_op_dfma_pred_on.sum"];
    /// FP64 add thread instructions.
    pub const DADD: [&str; 1] = ["smsp__sass_thread_inst_executed_op_dadd_pred_on.sum"];
    /// FP64 multiply thread instructions.
    pub const DMUL: [&str; 1] = ["smsp__sass_thread_inst_executed_op_dmul_pred_on.sum"];

    /// Everything [`super::HardwareFigures`] reads, spelled as `ncu --metrics` wants it.
    ///
    /// The tensor counters are Hopper's un-split ones: on gh100 the
    /// `sm__ops_path_tensor_op_{hgmma,hmma}_…` variants split the same operations by
    /// instruction family, and the un-split sum equals 2·M·N·K exactly on a calibration
    /// GEMM (docs/research/flop-counter.md, section 5).
    pub const NCU_METRICS: [&str; 16] = [
        TENSOR_OPS_BF16,
        TENSOR_OPS_FP16,
        TENSOR_OPS_TF32,
        FFMA[0],
        FADD[0],
        FMUL[0],
        HFMA[0],
        HADD[0],
        HMUL[0],
        DFMA[0],
        DADD[0],
        DMUL[0],
        DRAM_READ_BYTES,
        DRAM_WRITE_BYTES,
        L2_BYTES,
        TIME,
    ];
}

/// The source type of tensor-core operations, as ncu's
/// `sm__ops_path_tensor_src_<source>_dst_fp32` counters split them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorSource {
    Bf16,
    Fp16,
    Tf32,
}

impl TensorSource {
    /// Every source the figures read, in the order notes list them.
    pub const ALL: [TensorSource; 3] = [TensorSource::Bf16, TensorSource::Fp16, TensorSource::Tf32];

    /// `bf16`, `fp16`, `tf32`: the name in ncu's counter and in notes.
    pub fn name(self) -> &'static str {
        match self {
            TensorSource::Bf16 => "bf16",
            TensorSource::Fp16 => "fp16",
            TensorSource::Tf32 => "tf32",
        }
    }

    /// The ncu metric that counts this source's operations.
    pub fn metric(self) -> &'static str {
        match self {
            TensorSource::Bf16 => metrics::TENSOR_OPS_BF16,
            TensorSource::Fp16 => metrics::TENSOR_OPS_FP16,
            TensorSource::Tf32 => metrics::TENSOR_OPS_TF32,
        }
    }

    /// The source a workload of `dtype` runs its tensor-core work on: bf16 and fp16
    /// operands feed the tensor cores as they are, fp32 ones as TF32 (TF32 GEMMs, and the
    /// 3xTF32 of fp32 efficient attention). `None` for a dtype with none of these (fp64,
    /// integers): which source it would use is not known here.
    pub fn of_dtype(dtype: modelmeter::Dtype) -> Option<TensorSource> {
        match dtype {
            modelmeter::Dtype::Bf16 => Some(TensorSource::Bf16),
            modelmeter::Dtype::F16 => Some(TensorSource::Fp16),
            modelmeter::Dtype::F32 => Some(TensorSource::Tf32),
            _ => None,
        }
    }
}

/// A metric the run left out of ncu's command, and why: the figures read from it are
/// unavailable for that reason (never 0), which the rows' notes and the JSON report say.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LeftOut {
    /// The metric as ncu names it (`smsp__sass_thread_inst_executed_op_ffma_pred_on.sum`).
    pub metric: String,
    /// Why it was left out, in words (the replay mode in which ncu cannot collect it).
    pub why: String,
}

/// One range's hardware figures, each summed over the range's rows.
///
/// `None` means ncu gave no value: the metric was not collected (left out of the run's
/// command, see [`HardwareFigures::left_out`]; not asked for by whoever ran ncu; or the
/// device lacks it) or some row had an empty or `n/a` cell. It never means 0.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HardwareFigures {
    /// The range's name; `None` for rows with no range (every row of a per-kernel export).
    pub range: Option<String>,
    /// How many result rows were summed (kernels, or ranges under range replay).
    pub rows: usize,
    /// Tensor-core operations with bf16 sources ([`metrics::TENSOR_OPS_BF16`]).
    pub tensor_ops_bf16: Option<u64>,
    /// Tensor-core operations with fp16 sources ([`metrics::TENSOR_OPS_FP16`]).
    pub tensor_ops_fp16: Option<u64>,
    /// Tensor-core operations with tf32 sources ([`metrics::TENSOR_OPS_TF32`]).
    pub tensor_ops_tf32: Option<u64>,
    /// FP32 FMA thread instructions ([`metrics::FFMA`]).
    pub ffma: Option<u64>,
    /// FP32 add thread instructions ([`metrics::FADD`]).
    pub fadd: Option<u64>,
    /// FP32 multiply thread instructions ([`metrics::FMUL`]).
    pub fmul: Option<u64>,
    /// The CUDA-core FLOP estimate 2·FFMA + FADD + FMUL (an FMA is two FLOPs); `None`
    /// unless all three are known.
    pub cuda_core_flops: Option<u64>,
    /// FP16 CUDA-core FLOPs, 2·HFMA + HADD + HMUL; `None` unless all three are known.
    pub half_flops: Option<u64>,
    /// FP64 CUDA-core FLOPs, 2·DFMA + DADD + DMUL; `None` unless all three are known.
    pub double_flops: Option<u64>,
    /// Bytes read from DRAM.
    pub dram_read_bytes: Option<u64>,
    /// Bytes written to DRAM.
    pub dram_write_bytes: Option<u64>,
    /// Bytes through L2.
    pub l2_bytes: Option<u64>,
    /// GPU time in nanoseconds, converted with the units row.
    pub time_ns: Option<u64>,
    /// The metrics the run that measured this range left out of ncu's command, with why
    /// (empty where the run left none out, or, for a folder read with
    /// `--hardware-counters-from`, where that is not known). Set by whoever ran ncu;
    /// [`HardwareFigures::of_range`] reads only the CSV and leaves it empty.
    pub left_out: Vec<LeftOut>,
}

/// Units a count may be printed in; anything else (a scaled unit such as `Mbyte`, which
/// `ncu --print-units auto` can print) is refused rather than misread by a factor.
const PLAIN_COUNT: (&[&str], &str) = (&[""], "no unit (a plain count)");
const INSTRUCTIONS: (&[&str], &str) = (&["", "inst"], "inst");
const BYTES: (&[&str], &str) = (&["byte"], "byte (run ncu with --print-units base)");

impl HardwareFigures {
    /// The figures of range `range` of `table` (`None`: the rows with no range).
    ///
    /// Errors: the range has no rows, a cell is not a whole number, a sum overflows, or a
    /// metric is in a unit the figure cannot be read in.
    pub fn of_range(table: &NcuCsv, range: Option<&str>) -> Result<HardwareFigures, NcuCsvError> {
        let rows = table.range(range)?.rows().len();
        let count = |names: &[&str], (units, expected): (&[&str], &'static str)| {
            let Some(name) = names.iter().find(|n| table.column(n).is_some()) else {
                return Ok(None);
            };
            if let Some(column) = table.column(name) {
                if !units.contains(&column.unit.trim()) {
                    return Err(NcuCsvError::UnexpectedUnit {
                        column: column.name.clone(),
                        unit: column.unit.clone(),
                        expected,
                    });
                }
            }
            table.total_count(range, name)
        };
        // 2·FMA + ADD + MUL, when all three are known.
        let simt_flops = |fma: Option<u64>, add: Option<u64>, mul: Option<u64>, what: &str| match (
            fma, add, mul,
        ) {
            (Some(fma), Some(add), Some(mul)) => fma
                .checked_mul(2)
                .and_then(|f| f.checked_add(add))
                .and_then(|f| f.checked_add(mul))
                .map(Some)
                .ok_or_else(|| NcuCsvError::Overflow {
                    column: what.to_string(),
                    range: range.map(str::to_string),
                }),
            _ => Ok(None),
        };
        let ffma = count(&metrics::FFMA, INSTRUCTIONS)?;
        let fadd = count(&metrics::FADD, INSTRUCTIONS)?;
        let fmul = count(&metrics::FMUL, INSTRUCTIONS)?;
        let cuda_core_flops = simt_flops(ffma, fadd, fmul, "2·FFMA + FADD + FMUL")?;
        let half_flops = simt_flops(
            count(&metrics::HFMA, INSTRUCTIONS)?,
            count(&metrics::HADD, INSTRUCTIONS)?,
            count(&metrics::HMUL, INSTRUCTIONS)?,
            "2·HFMA + HADD + HMUL",
        )?;
        let double_flops = simt_flops(
            count(&metrics::DFMA, INSTRUCTIONS)?,
            count(&metrics::DADD, INSTRUCTIONS)?,
            count(&metrics::DMUL, INSTRUCTIONS)?,
            "2·DFMA + DADD + DMUL",
        )?;
        let figures = HardwareFigures {
            range: range.map(str::to_string),
            rows,
            tensor_ops_bf16: count(&[metrics::TENSOR_OPS_BF16], PLAIN_COUNT)?,
            tensor_ops_fp16: count(&[metrics::TENSOR_OPS_FP16], PLAIN_COUNT)?,
            tensor_ops_tf32: count(&[metrics::TENSOR_OPS_TF32], PLAIN_COUNT)?,
            ffma,
            fadd,
            fmul,
            cuda_core_flops,
            half_flops,
            double_flops,
            dram_read_bytes: count(&[metrics::DRAM_READ_BYTES], BYTES)?,
            dram_write_bytes: count(&[metrics::DRAM_WRITE_BYTES], BYTES)?,
            l2_bytes: count(&[metrics::L2_BYTES], BYTES)?,
            time_ns: table.total_nanoseconds(range, metrics::TIME)?,
            left_out: Vec::new(),
        };
        // The sums the accessors form ([`HardwareFigures::tensor_ops`], `simt_flops`,
        // `dram_bytes`) must fit too: figures whose sums would not are refused here, so
        // that the accessors never saturate into a wrong number.
        let overflow = |what: &str| NcuCsvError::Overflow {
            column: what.to_string(),
            range: range.map(str::to_string),
        };
        let sum = |parts: &[Option<u64>]| {
            parts
                .iter()
                .flatten()
                .try_fold(0u64, |a, b| a.checked_add(*b))
        };
        sum(&[
            figures.tensor_ops_bf16,
            figures.tensor_ops_fp16,
            figures.tensor_ops_tf32,
        ])
        .ok_or_else(|| overflow("tensor-core operations over their sources"))?;
        sum(&[
            figures.cuda_core_flops,
            figures.half_flops,
            figures.double_flops,
        ])
        .ok_or_else(|| overflow("CUDA-core FLOPs over their precisions"))?;
        sum(&[figures.dram_read_bytes, figures.dram_write_bytes])
            .ok_or_else(|| overflow("DRAM bytes read + written"))?;
        Ok(figures)
    }

    /// The tensor-core operations with `source` operands; `None` when ncu gave no value.
    pub fn tensor_ops_of(&self, source: TensorSource) -> Option<u64> {
        match source {
            TensorSource::Bf16 => self.tensor_ops_bf16,
            TensorSource::Fp16 => self.tensor_ops_fp16,
            TensorSource::Tf32 => self.tensor_ops_tf32,
        }
    }

    /// All tensor-core operations (bf16 + fp16 + tf32 sources) over the sources ncu
    /// reported; `None` when it reported none of them. A source it did not report adds
    /// nothing here, so a check must first know that the sources the work runs on are
    /// among those reported (`rows::tensor_row` does).
    pub fn tensor_ops(&self) -> Option<u64> {
        let known: Vec<u64> = [
            self.tensor_ops_bf16,
            self.tensor_ops_fp16,
            self.tensor_ops_tf32,
        ]
        .into_iter()
        .flatten()
        .collect();
        // of_range refused figures whose sum would not fit: saturating never changes it.
        (!known.is_empty()).then(|| known.iter().fold(0u64, |a, b| a.saturating_add(*b)))
    }

    /// CUDA-core FLOPs over the precisions ncu reported (FP32, and FP16/FP64 where
    /// known); `None` without the FP32 figure.
    pub fn simt_flops(&self) -> Option<u64> {
        let fp32 = self.cuda_core_flops?;
        // of_range refused figures whose sum would not fit: saturating never changes it.
        Some(
            [self.half_flops, self.double_flops]
                .into_iter()
                .flatten()
                .fold(fp32, u64::saturating_add),
        )
    }

    /// DRAM bytes read + written; `None` unless both are known.
    pub fn dram_bytes(&self) -> Option<u64> {
        // of_range refused figures whose sum would not fit: saturating never changes it.
        Some(self.dram_read_bytes?.saturating_add(self.dram_write_bytes?))
    }

    /// The figures of every range of `table`, in [`NcuCsv::ranges`] order.
    pub fn per_range(table: &NcuCsv) -> Result<Vec<HardwareFigures>, NcuCsvError> {
        table
            .ranges()
            .iter()
            .map(|range| HardwareFigures::of_range(table, range.name()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::ncu_csv::{parse, ParseOptions};
    use super::*;

    const MLP: &str = include_str!("../../../fixtures/ncu-h200/ncu_mlp_bfloat16.csv");
    const GATE_BF16: &str = include_str!("../../../fixtures/ncu-h200/ncu_gate_bfloat16.csv");
    const GATE_FP32: &str = include_str!("../../../fixtures/ncu-h200/ncu_gate_float32.csv");
    const ATTN: &str = include_str!("../../../fixtures/ncu-h200/ncu_attn_bfloat16.csv");

    fn figures(text: &str) -> HardwareFigures {
        let table = parse(text, &ParseOptions::per_kernel()).expect("parses");
        let all = HardwareFigures::per_range(&table).expect("figures");
        assert_eq!(all.len(), 1, "a per-kernel export is one range");
        all.into_iter().next().expect("one range")
    }

    #[test]
    fn mlp_figures_on_the_h200() {
        assert_eq!(
            figures(MLP),
            HardwareFigures {
                range: None,
                rows: 6,
                tensor_ops_bf16: Some(27_262_976_000),
                tensor_ops_fp16: None, // not asked of ncu: unavailable, not 0
                tensor_ops_tf32: Some(0),
                ffma: Some(35_061_760),
                fadd: Some(4_816_896),
                fmul: Some(4_161_536),
                cuda_core_flops: Some(79_101_952), // 2 · 35,061,760 + 4,816,896 + 4,161,536
                half_flops: None,                  // not asked of ncu
                double_flops: None,
                dram_read_bytes: Some(88_595_456),
                dram_write_bytes: Some(581_376),
                l2_bytes: None,
                time_ns: Some(67_360),
                left_out: Vec::new(),
            }
        );
    }

    #[test]
    fn gate_and_attention_figures_on_the_h200() {
        // Sums computed independently (Python's csv module) from the same files; the bf16
        // tensor ops and FFMA are those fixtures/ncu-h200/README.md gives.
        for (gate, kernels, dram_read, time_ns) in [
            (GATE_BF16, 7, 6_667_776, 36_992),
            (GATE_FP32, 5, 5_128_960, 27_296),
        ] {
            let f = figures(gate);
            assert_eq!(f.rows, kernels);
            assert_eq!(f.tensor_ops_bf16, Some(0));
            assert_eq!(f.ffma, Some(42_237_952));
            assert_eq!(f.fadd, Some(638_976));
            assert_eq!(f.fmul, Some(527_360));
            assert_eq!(f.cuda_core_flops, Some(85_642_240));
            assert_eq!(f.dram_read_bytes, Some(dram_read));
            assert_eq!(f.time_ns, Some(time_ns));
        }
        let attn = figures(ATTN);
        assert_eq!(attn.tensor_ops_bf16, Some(7_549_747_200));
        assert_eq!(attn.ffma, Some(1_361_920));
        assert_eq!(attn.fadd, Some(3_368_960));
        assert_eq!(attn.fmul, Some(6_615_040));
        assert_eq!(attn.cuda_core_flops, Some(12_707_840));
        assert_eq!(attn.dram_read_bytes, Some(37_535_488));
        assert_eq!(attn.time_ns, Some(90_784));
        assert_eq!(attn.rows, 15);
    }

    /// A range-replay-like export: the `smsp__` spellings, an L2 column, time in usecond,
    /// two ranges and rows with no range.
    const TWO_RANGES: &str = "\
==PROF== Connected to process 7 (/usr/bin/python3)
==PROF== Disconnected from process 7
\"ID\",\"Kernel Name\",\"NVTX\",\"sm__ops_path_tensor_src_fp16_dst_fp32.sum\",\"smsp__sass_thread_inst_executed_op_ffma_pred_on.sum\",\"smsp__sass_thread_inst_executed_op_fadd_pred_on.sum\",\"smsp__sass_thread_inst_executed_op_fmul_pred_on.sum\",\"lts__t_bytes.sum\",\"gpu__time_duration.sum\"
\"\",\"\",\"\",\"\",\"inst\",\"inst\",\"inst\",\"byte\",\"usecond\"
\"0\",\"copy\",\"\",\"0\",\"10\",\"1\",\"2\",\"1,024\",\"1.50\"
\"1\",\"gemm\",\"layers.0\",\"1,048,576\",\"0\",\"0\",\"0\",\"4,096\",\"10.25\"
\"2\",\"gemm\",\"layers.1\",\"2,097,152\",\"5\",\"0\",\"0\",\"8,192\",\"20\"
\"3\",\"silu\",\"layers.0\",\"0\",\"100\",\"20\",\"30\",\"512\",\"2.75\"
";

    #[test]
    fn figures_per_range() {
        let table = parse(TWO_RANGES, &ParseOptions::ranges_from("NVTX")).expect("parses");
        let all = HardwareFigures::per_range(&table).expect("figures");
        let names: Vec<Option<&str>> = all.iter().map(|f| f.range.as_deref()).collect();
        assert_eq!(names, [None, Some("layers.0"), Some("layers.1")]);
        let layer0 = &all[1];
        assert_eq!(layer0.rows, 2);
        assert_eq!(layer0.tensor_ops_fp16, Some(1_048_576));
        assert_eq!(layer0.tensor_ops_bf16, None);
        assert_eq!(layer0.ffma, Some(100));
        assert_eq!(layer0.cuda_core_flops, Some(2 * 100 + 20 + 30));
        assert_eq!(layer0.l2_bytes, Some(4_608));
        assert_eq!(layer0.dram_read_bytes, None);
        assert_eq!(layer0.time_ns, Some(13_000));
        assert_eq!(all[2].time_ns, Some(20_000));
        assert_eq!(all[2].cuda_core_flops, Some(10));
        assert_eq!(all[0].cuda_core_flops, Some(2 * 10 + 1 + 2));
        assert_eq!(all[0].time_ns, Some(1_500));
    }

    #[test]
    fn scaled_units_are_refused_not_misread() {
        let text = TWO_RANGES.replace("\"byte\"", "\"Kbyte\"");
        let table = parse(&text, &ParseOptions::ranges_from("NVTX")).expect("parses");
        assert_eq!(
            HardwareFigures::of_range(&table, Some("layers.0")),
            Err(NcuCsvError::UnexpectedUnit {
                column: "lts__t_bytes.sum".into(),
                unit: "Kbyte".into(),
                expected: BYTES.1,
            })
        );
    }

    #[test]
    fn cuda_core_flops_overflow_is_an_error() {
        let big = "9,223,372,036,854,775,808"; // 2^63: 2·FFMA overflows u64
        let text = TWO_RANGES.replacen(
            "\"0\",\"0\",\"0\",\"4,096\"",
            &format!("\"{big}\",\"0\",\"0\",\"4,096\""),
            1,
        );
        let table = parse(&text, &ParseOptions::ranges_from("NVTX")).expect("parses");
        assert!(matches!(
            HardwareFigures::of_range(&table, Some("layers.0")),
            Err(NcuCsvError::Overflow { .. })
        ));
        assert_eq!(
            HardwareFigures::of_range(&table, Some("layers.9")),
            Err(NcuCsvError::UnknownRange {
                range: Some("layers.9".into())
            })
        );
    }

    #[test]
    fn sums_over_columns_that_would_overflow_are_refused() {
        // Each column fits, their sum does not: the accessors would saturate.
        let near = u64::MAX - 10;
        let text = format!(
            "\"ID\",\"Kernel Name\",\"{}\",\"{}\"\n\"\",\"\",\"byte\",\"byte\"\n\"0\",\"k\",\"{near}\",\"100\"\n",
            metrics::DRAM_READ_BYTES,
            metrics::DRAM_WRITE_BYTES
        );
        let table = parse(&text, &ParseOptions::per_kernel()).expect("parses");
        let e = HardwareFigures::of_range(&table, None).unwrap_err();
        assert!(
            matches!(&e, NcuCsvError::Overflow { column, .. } if column.contains("DRAM")),
            "{e:?}"
        );
    }

    #[test]
    fn the_metric_list_for_ncu_names_each_figure() {
        for name in [
            metrics::TENSOR_OPS_BF16,
            metrics::TENSOR_OPS_FP16,
            metrics::TENSOR_OPS_TF32,
            metrics::FFMA[0],
            metrics::FADD[0],
            metrics::FMUL[0],
            metrics::HFMA[0],
            metrics::HADD[0],
            metrics::HMUL[0],
            metrics::DFMA[0],
            metrics::DADD[0],
            metrics::DMUL[0],
            metrics::DRAM_READ_BYTES,
            metrics::DRAM_WRITE_BYTES,
            metrics::L2_BYTES,
            metrics::TIME,
        ] {
            assert!(metrics::NCU_METRICS.contains(&name), "{name}");
        }
        let mut unique = metrics::NCU_METRICS.to_vec();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), metrics::NCU_METRICS.len());
    }
}
