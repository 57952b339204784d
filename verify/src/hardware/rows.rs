//! The hardware rows of a layer: what Nsight Compute counted in the layer's range beside
//! what the FLOP counter booked in the same forward, and where the layer sits on the
//! device's roofline. The rules (docs/hardware.md):
//!
//! * `hw_tensor_flops` against the counted `tensor_core_flops`. The counter of the
//!   source the workload's tensor-core work runs on ([`Context::tensor_source`]) must be
//!   reported, or the row fails as unavailable (the other sources' 0 proves nothing).
//!   Counted 0 must measure 0 and counted > 0 must measure > 0, always. Otherwise the ratio hardware/counted
//!   passes within [`TENSOR_BAND`], its lower end lowered by the share of the counted work
//!   that a causal fused attention kernel may skip (masked tiles), and both ends raised
//!   for fp32 attention on the memory-efficient kernel, which runs each product as
//!   [`FAST_FP32_MMAS_PER_PRODUCT`] TF32 MMAs (3xTF32; the H200 measured 2,390,753,280
//!   TF32 ops for a causal 1,342,177,280-FLOP core at B = 1, H = 10, S = 512, d = 128:
//!   three times the 64×128 tiles on or below the diagonal). Above the band it is `info`,
//!   not a failure, where GEMMs with fewer than [`SMALL_GEMM_ROWS`] token rows carry
//!   counted work (decode steps; routed experts that received few tokens): the hardware
//!   pads those to its tile rows (8.07× the FLOPs at one token on the H200), up to
//!   [`MAX_TILE_ROWS`] where that bound is known. Below the band it fails.
//! * `hw_cuda_core_flops` (2·FMA + ADD + MUL, FP32 and, where ncu has them, FP16/FP64)
//!   against the counted `cuda_core_flops`: `info`, except when fp32 GEMMs are at least
//!   [`SIMT_GEMM_SHARE`] of the counted CUDA-core work: then the same band as above.
//! * `hw_dram_bytes`, `hw_l2_bytes` against the counted (unfused) `io_bytes`: `info`.
//! * `hw_time_ns` against the roofline's lower bound for the work the hardware counted at
//!   the device's peaks: `info`, with achieved throughputs in the note.
//!
//! A figure ncu did not report is *unavailable* (shown as such, never as 0).

use serde::Serialize;

use modelmeter::conventions::FAST_FP32_MMAS_PER_PRODUCT;

use super::peaks::DevicePeaks;
use super::ranges::{AttributedRange, RangeRecord, TimeSpan};
use super::{metrics, HardwareFigures, TensorSource};
use crate::check::Check;
use crate::compare::{rel_diff, MetricRow, Status};

/// Hardware/counted tensor FLOPs that pass: the H200 measured 1.0125 for the MLP's bf16
/// GEMMs (tile padding of N = 6,848 to 6,912) and 0.9375 for cuDNN's causal attention
/// (masked tiles skipped), both at B = 1, S = 512; ±10 % holds both with room for other
/// tile choices, and the lower end is further lowered by the causal share (see
/// [`Context::causal_skippable_flops`]).
pub const TENSOR_BAND: (f64, f64) = (0.9, 1.1);

/// A GEMM with fewer token rows than this is small: cuBLAS pads it to its tile rows
/// (`nvjet_sm90_tst_64x8`: 8 rows, 8.07× the FLOPs at one token; routed experts at
/// B = 1, S = 512 with 48 rows each on average: 1.23× the MoE's counted work; both
/// measured on the H200), so the band's upper end does not hold for the layer.
pub const SMALL_GEMM_ROWS: u64 = 64;

/// The most token rows a GEMM tile pads a small GEMM to (cuBLAS' and CUTLASS's largest
/// Hopper tiles are 256 rows): routed experts' small GEMMs cannot execute more than this
/// many rows each, which bounds the `info` above the band (a larger ratio fails).
pub const MAX_TILE_ROWS: u64 = 256;

/// The share of the counted CUDA-core FLOPs that fp32 GEMMs must reach for the
/// `hw_cuda_core_flops` row to be checked against the band (the MoE gate's SIMT sgemm).
pub const SIMT_GEMM_SHARE: f64 = 0.9;

/// What the rules need to know of a layer beyond its figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Context {
    /// Tokens per step, B·S_q.
    pub tokens: u64,
    /// Counted tensor-core FLOPs of fused causal attention cores that lie above the
    /// diagonal (masked): a kernel that skips masked tiles need not execute them.
    pub causal_skippable_flops: u64,
    /// Counted tensor-core FLOPs in GEMMs with fewer than [`SMALL_GEMM_ROWS`] token rows
    /// (every GEMM of a decode-sized step; the attention core of a step of fewer query
    /// tokens; the routed experts that received few tokens).
    pub small_gemm_flops: u64,
    /// The most those small GEMMs could execute, each padded to [`MAX_TILE_ROWS`] rows:
    /// known for routed experts (by their measured rows); `None` where no bound is known
    /// (one-token steps: the H200's fused decode attention executed 56.6× its counted
    /// work).
    pub small_gemm_ceiling_flops: Option<u64>,
    /// Counted tensor-core FLOPs of fp32 attention cores on the memory-efficient kernel
    /// (each product run as [`FAST_FP32_MMAS_PER_PRODUCT`] TF32 MMAs), and of those the
    /// masked share a causal kernel may skip (also in `causal_skippable_flops`).
    pub fast_f32_flops: u64,
    pub fast_f32_skippable_flops: u64,
    /// Counted CUDA-core FLOPs of GEMM-like ops (fp32 matmuls with TF32 off).
    pub simt_gemm_flops: u64,
    /// The tensor-pipe source the workload's tensor-core work runs on (bf16 workload:
    /// bf16, fp16: fp16, fp32: tf32; [`TensorSource::of_dtype`]). Its counter must be
    /// reported for `hw_tensor_flops` to judge: the other sources' 0s say nothing about
    /// work on an uncounted one. `None` (not known): every source is required.
    pub tensor_source: Option<TensorSource>,
}

/// The counted work of the profiled forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Counted {
    pub tensor_core_flops: u64,
    pub cuda_core_flops: u64,
    pub io_bytes: u64,
}

impl Counted {
    /// What the child's range list says the counter booked in `record`'s forward.
    pub fn of(record: &RangeRecord) -> Counted {
        Counted {
            tensor_core_flops: record.tensor_core_flops,
            cuda_core_flops: record.cuda_core_flops,
            io_bytes: record.io_bytes,
        }
    }
}

/// Achieved throughputs over the range's GPU time (`None` where a figure is unavailable).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Achieved {
    pub tensor_flops_per_s: Option<f64>,
    pub cuda_core_flops_per_s: Option<f64>,
    pub dram_bytes_per_s: Option<f64>,
    pub l2_bytes_per_s: Option<f64>,
}

/// The roofline position of a range on a known device.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Roofline {
    pub peaks: DevicePeaks,
    /// The shortest time the counted hardware work could take at the peaks: the larger
    /// of compute (each pipe at its peak) and DRAM traffic at peak bandwidth.
    pub bound_ns: f64,
    /// `compute` or `memory`: which side sets the bound.
    pub limiter: &'static str,
    /// bound / measured time: 1 is on the roof.
    pub fraction_of_roofline: f64,
}

/// The `hardware` object of a layer in the JSON report.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerHardware {
    /// 0-based position of the layer's range in the profiled run.
    pub range: usize,
    /// ncu's `ID` of the range's result row.
    pub ncu_id: String,
    /// Summed counters (`null`: ncu did not report the metric).
    pub figures: HardwareFigures,
    /// What the FLOP counter booked in the same forward.
    pub counted: Counted,
    pub achieved: Achieved,
    /// `null` on a device without known peaks, or without the time or DRAM figures.
    pub roofline: Option<Roofline>,
    /// What `figures.time_ns` measured: `range_elapsed` (range modes: gaps between
    /// kernels included) or `kernels` (kernel replay: the kernels' own time).
    pub time: TimeSpan,
}

/// `67.4 µs`: a duration for tables.
pub fn duration(ns: u64) -> String {
    let ns = ns as f64;
    if ns >= 1e9 {
        format!("{:.3} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.3} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.1} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

fn ratio(hardware: u64, counted: u64) -> Option<f64> {
    (counted > 0).then(|| hardware as f64 / counted as f64)
}

fn row(
    metric: Check,
    counted: u64,
    hardware: Option<u64>,
    status: Status,
    note: String,
) -> MetricRow {
    MetricRow {
        metric,
        analytic: counted,
        measured: hardware.unwrap_or(0),
        rel_diff: hardware.and_then(|h| rel_diff(counted, h)),
        status,
        note: Some(note),
        unavailable: hardware.is_none(),
    }
}

/// `unavailable: ncu reported no {what} for this range (why; not 0)`. The cause is the
/// run's own where it left any of `metrics` (the spellings the figure is read from) out
/// of ncu's command ([`HardwareFigures::left_out`]: the replay mode, say); otherwise the
/// causes an absent value can have.
fn unavailable(figures: &HardwareFigures, what: &str, metrics: &[&str]) -> String {
    let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
    for left in figures
        .left_out
        .iter()
        .filter(|l| metrics.contains(&l.metric.as_str()))
    {
        match groups.iter_mut().find(|(why, _)| *why == left.why) {
            Some((_, names)) => names.push(&left.metric),
            None => groups.push((&left.why, vec![&left.metric])),
        }
    }
    let cause = if groups.is_empty() {
        "ncu's CSV has no value for it: not asked for, or the device or this ncu lacks the metric"
            .to_string()
    } else {
        groups
            .iter()
            .map(|(why, names)| format!("left out of the ncu run: {} ({why})", names.join(", ")))
            .collect::<Vec<_>>()
            .join("; ")
    };
    format!("unavailable: ncu reported no {what} for this range ({cause}; not 0)")
}

/// The hardware/counted band for the counted tensor FLOPs of a layer in `context`: the
/// lower end scaled by the work that must run (less what a causal kernel may skip), the
/// upper end by all of it, with the fp32 efficient-attention cores' products run
/// [`FAST_FP32_MMAS_PER_PRODUCT`] times.
fn band(counted: u64, context: &Context) -> (f64, f64) {
    let extra = (FAST_FP32_MMAS_PER_PRODUCT - 1) as f64;
    let c = counted.max(1) as f64;
    let fast_kept = context
        .fast_f32_flops
        .saturating_sub(context.fast_f32_skippable_flops);
    let must =
        counted.saturating_sub(context.causal_skippable_flops) as f64 + extra * fast_kept as f64;
    let may = counted as f64 + extra * context.fast_f32_flops as f64;
    (TENSOR_BAND.0 * must / c, TENSOR_BAND.1 * may / c)
}

/// Pass within the band, `info` above it where `small` counted FLOPs are in small GEMMs
/// (up to what padding them to [`MAX_TILE_ROWS`] explains, where `ceiling` says so),
/// fail otherwise; both zero-ness rules first.
fn banded(
    what: &str,
    counted: u64,
    hardware: u64,
    (low, high): (f64, f64),
    small: u64,
    ceiling: Option<u64>,
) -> (Status, String) {
    match (counted, hardware) {
        (0, 0) => (Status::Pass, format!("no {what} counted and none executed")),
        (0, h) => (
            Status::Fail,
            format!("no {what} counted, but the hardware executed {h}: the engine rule books this work elsewhere"),
        ),
        (c, 0) => (
            Status::Fail,
            format!("{c} {what} counted, but the hardware executed none: the work ran on another engine"),
        ),
        (c, h) => {
            let r = h as f64 / c as f64;
            let band = format!("hardware/counted = {r:.4}, band [{low:.4}, {high:.4}]");
            if (low..=high).contains(&r) {
                (Status::Pass, band)
            } else if r > high && small > 0 {
                let share = small as f64 / c as f64 * 100.0;
                // Padding every small GEMM to the largest tile: the most it can explain.
                let most = ceiling.map(|ceiling| {
                    high * (c.saturating_sub(small) as f64 + ceiling as f64) / c as f64
                });
                match most {
                    Some(most) if r > most => (
                        Status::Fail,
                        format!("{band}: above it by more than padding explains: {small} of the counted FLOPs ({share:.1}%) are in GEMMs with fewer than {SMALL_GEMM_ROWS} token rows, and padding each to {MAX_TILE_ROWS}-row tiles allows at most {most:.4}"),
                    ),
                    _ => (
                        Status::Info,
                        format!("{band}: above it, but {small} of the counted FLOPs ({share:.1}%) are in GEMMs with fewer than {SMALL_GEMM_ROWS} token rows, which the hardware pads to its tile rows: work the analytic model does not claim{}", most.map_or(String::new(), |m| format!(" (padding to {MAX_TILE_ROWS}-row tiles allows up to {m:.4})"))),
                    ),
                }
            } else {
                (Status::Fail, format!("{band}: outside it"))
            }
        }
    }
}

/// `; by source: bf16 27262976000, fp16 unavailable`: the sources that executed work or
/// that ncu did not report (empty when every source reported 0).
fn by_source(figures: &HardwareFigures) -> String {
    let sources: Vec<String> = TensorSource::ALL
        .iter()
        .filter_map(|s| match figures.tensor_ops_of(*s) {
            Some(0) => None,
            Some(v) => Some(format!("{} {v}", s.name())),
            None => Some(format!("{} unavailable", s.name())),
        })
        .collect();
    if sources.is_empty() {
        String::new()
    } else {
        format!("; by source: {}", sources.join(", "))
    }
}

/// The `hw_tensor_flops` row. It fails, unavailable, when ncu did not report the source
/// the workload's tensor-core work runs on ([`Context::tensor_source`]; every source
/// when that is not known): a sum over the other sources would read 0 and pass a layer
/// whose work went uncounted.
pub fn tensor_row(counted: &Counted, figures: &HardwareFigures, context: &Context) -> MetricRow {
    let c = counted.tensor_core_flops;
    let Some(h) = figures.tensor_ops() else {
        return row(
            Check::HwTensorFlops,
            c,
            None,
            Status::Fail,
            unavailable(
                figures,
                "tensor-pipe counter (sm__ops_path_tensor_src_*)",
                &TensorSource::ALL.map(TensorSource::metric),
            ) + ": the tensor-core work cannot be checked",
        );
    };
    let required: &[TensorSource] = match &context.tensor_source {
        Some(source) => std::slice::from_ref(source),
        None => &TensorSource::ALL,
    };
    let missing: Vec<&str> = required
        .iter()
        .filter(|s| figures.tensor_ops_of(**s).is_none())
        .map(|s| s.metric())
        .collect();
    if !missing.is_empty() {
        let why = match context.tensor_source {
            Some(source) => format!(
                ": it counts the {} operands this workload's tensor-core work runs on, so that work cannot be checked (the other sources' {h} cannot tell no work from work ncu did not count)",
                source.name()
            ),
            None => ": which source this workload's tensor-core work runs on is not known, so every source is needed to check it".to_string(),
        };
        return row(
            Check::HwTensorFlops,
            c,
            None,
            Status::Fail,
            unavailable(figures, &missing.join(", "), &missing) + &why + &by_source(figures),
        );
    }
    let band = band(c, context);
    let (status, mut note) = banded(
        "tensor-core FLOPs",
        c,
        h,
        band,
        context.small_gemm_flops,
        context.small_gemm_ceiling_flops,
    );
    if context.causal_skippable_flops > 0 {
        note.push_str(&format!(
            " (the lower end allows for {} masked causal FLOPs a fused kernel may skip)",
            context.causal_skippable_flops
        ));
    }
    if context.fast_f32_flops > 0 {
        note.push_str(&format!(
            " ({} FLOPs of fp32 efficient attention run as {FAST_FP32_MMAS_PER_PRODUCT} TF32 MMAs per product, 3xTF32)",
            context.fast_f32_flops
        ));
    }
    note.push_str(&by_source(figures));
    row(Check::HwTensorFlops, c, Some(h), status, note)
}

/// The `hw_cuda_core_flops` row.
pub fn cuda_core_row(counted: &Counted, figures: &HardwareFigures, context: &Context) -> MetricRow {
    let c = counted.cuda_core_flops;
    let share = context.simt_gemm_flops as f64 / c.max(1) as f64;
    let checked = c > 0 && share >= SIMT_GEMM_SHARE;
    let Some(h) = figures.simt_flops() else {
        let mut note = unavailable(
            figures,
            "FP32 instruction counters (…_op_{ffma,fadd,fmul}_pred_on)",
            &[metrics::FFMA, metrics::FADD, metrics::FMUL].concat(),
        );
        if checked {
            // The one check this row makes is skipped: say so, and how to make it.
            note.push_str(&format!(
                "; with them this row would be checked (fp32 GEMMs are {:.1}% of the counted CUDA-core work): --ncu-replay kernel collects them",
                share * 100.0
            ));
        }
        return row(Check::HwCudaCoreFlops, c, None, Status::Info, note);
    };
    let mut parts = vec![format!(
        "2·FMA + ADD + MUL thread instructions: FP32 {}",
        figures.cuda_core_flops.unwrap_or(0)
    )];
    for (name, v) in [("FP16", figures.half_flops), ("FP64", figures.double_flops)] {
        parts.push(match v {
            Some(v) => format!("{name} {v}"),
            None => format!("{name} unavailable"),
        });
    }
    let breakdown = parts.join(", ");
    let (status, note) = if checked {
        // A decode-sized step pads its SIMT GEMMs to tile rows too.
        let small = if context.tokens < SMALL_GEMM_ROWS {
            c
        } else {
            0
        };
        let (status, why) = banded("CUDA-core FLOPs", c, h, TENSOR_BAND, small, None);
        (
            status,
            format!("fp32 GEMMs are {:.1}% of the counted CUDA-core work, so the band applies: {why}; {breakdown}", share * 100.0),
        )
    } else {
        let r = ratio(h, c).map_or("no CUDA-core FLOPs counted".to_string(), |r| {
            format!("hardware/counted = {r:.4}")
        });
        (
            Status::Info,
            format!("informational, {r}: elementwise FLOPs are conventions and transcendentals run on the SFU; {breakdown}"),
        )
    };
    row(Check::HwCudaCoreFlops, c, Some(h), status, note)
}

/// The `hw_dram_bytes` and `hw_l2_bytes` rows.
pub fn byte_rows(counted: &Counted, figures: &HardwareFigures) -> [MetricRow; 2] {
    let c = counted.io_bytes;
    let one = |metric, hardware: Option<u64>, what: &str, names: &[&str], why: &str| match hardware
    {
        None => row(
            metric,
            c,
            None,
            Status::Info,
            unavailable(figures, what, names),
        ),
        Some(h) => {
            let r = ratio(h, c).map_or("no bytes counted".to_string(), |r| {
                format!("hardware/counted io_bytes = {r:.4}")
            });
            row(
                metric,
                c,
                Some(h),
                Status::Info,
                format!("informational, {r}: {why}"),
            )
        }
    };
    [
        one(
            Check::HwDramBytes,
            figures.dram_bytes(),
            "DRAM byte counters (dram__bytes_{read,write}.sum)",
            &[metrics::DRAM_READ_BYTES, metrics::DRAM_WRITE_BYTES],
            "io_bytes count every op's reads and writes unfused; L2 absorbs small layers' intermediates",
        ),
        one(
            Check::HwL2Bytes,
            figures.l2_bytes,
            "L2 byte counter (lts__t_bytes.sum)",
            &[metrics::L2_BYTES],
            "every request through L2, including re-reads of tiles that io_bytes count once",
        ),
    ]
}

/// Achieved throughputs of a range.
pub fn achieved(figures: &HardwareFigures) -> Achieved {
    let seconds = figures.time_ns.filter(|t| *t > 0).map(|t| t as f64 / 1e9);
    let per_s = |v: Option<u64>| Some(v? as f64 / seconds?);
    Achieved {
        tensor_flops_per_s: per_s(figures.tensor_ops()),
        cuda_core_flops_per_s: per_s(figures.simt_flops()),
        dram_bytes_per_s: per_s(figures.dram_bytes()),
        l2_bytes_per_s: per_s(figures.l2_bytes),
    }
}

/// The roofline position of a range on `peaks`; `None` without time or DRAM figures.
pub fn roofline(figures: &HardwareFigures, peaks: &DevicePeaks) -> Option<Roofline> {
    let time_ns = figures.time_ns.filter(|t| *t > 0)? as f64;
    let dram = figures.dram_bytes()? as f64;
    let f = |v: Option<u64>| v.unwrap_or(0) as f64;
    let compute_s = (f(figures.tensor_ops_bf16) + f(figures.tensor_ops_fp16))
        / peaks.tensor_16bit_flops_per_s
        + f(figures.tensor_ops_tf32) / peaks.tensor_tf32_flops_per_s
        + f(figures.simt_flops()) / peaks.fp32_flops_per_s;
    let memory_s = dram / peaks.dram_bytes_per_s;
    let bound_ns = compute_s.max(memory_s) * 1e9;
    Some(Roofline {
        peaks: *peaks,
        bound_ns,
        limiter: if compute_s >= memory_s {
            "compute"
        } else {
            "memory"
        },
        fraction_of_roofline: bound_ns / time_ns,
    })
}

fn rate(v: Option<f64>, unit: &str) -> String {
    v.map_or("unavailable".to_string(), |v| {
        format!("{:.2} {unit}", v / 1e12)
    })
}

/// The `hw_time_ns` row: measured GPU time (of the kind `span` says) against the
/// roofline bound (analytic column, 0 without known peaks).
pub fn time_row(
    figures: &HardwareFigures,
    peaks: Option<&DevicePeaks>,
    span: TimeSpan,
) -> MetricRow {
    let Some(t) = figures.time_ns else {
        return row(
            Check::HwTimeNs,
            0,
            None,
            Status::Info,
            unavailable(
                figures,
                "GPU time (gpu__time_duration.sum)",
                &[metrics::TIME],
            ),
        );
    };
    let a = achieved(figures);
    let mut note = format!(
        "achieved {} tensor, {} CUDA-core, {} DRAM, {} L2",
        rate(a.tensor_flops_per_s, "TFLOP/s"),
        rate(a.cuda_core_flops_per_s, "TFLOP/s"),
        rate(a.dram_bytes_per_s, "TB/s"),
        rate(a.l2_bytes_per_s, "TB/s"),
    );
    let bound = peaks.and_then(|p| roofline(figures, p));
    match (&bound, peaks) {
        (Some(r), Some(p)) => note.push_str(&format!(
            "; {} peaks {:.0} TFLOP/s 16-bit tensor, {:.0} tf32, {:.0} FP32, {:.2} TB/s DRAM: the analytic column is the roofline bound ({}-bound), {:.1}% of the roof reached",
            p.model,
            p.tensor_16bit_flops_per_s / 1e12,
            p.tensor_tf32_flops_per_s / 1e12,
            p.fp32_flops_per_s / 1e12,
            p.dram_bytes_per_s / 1e12,
            r.limiter,
            r.fraction_of_roofline * 100.0
        )),
        (None, Some(p)) => note.push_str(&format!(
            "; no roofline position on the {}: the DRAM figures are unavailable",
            p.model
        )),
        (_, None) => note.push_str("; no roofline position: this device's peaks are not in the table (hardware::peaks)"),
    }
    if bound.as_ref().is_some_and(|r| r.fraction_of_roofline > 1.0) {
        note.push_str("; above 100 % of the roof is faster than the hardware allows: the time or the counts are not this work's (a wrong unit, another range's figures), or the peaks table (hardware::peaks) is not this GPU's");
    }
    if span == TimeSpan::RangeElapsed {
        note.push_str("; the time is the profiler range's elapsed time, gaps between kernels and the profiler's own work included, so the rates and the roofline position understate the kernels (--ncu-replay kernel measures the kernels' own time)");
    }
    let analytic = bound.map_or(0, |r| r.bound_ns.round() as u64);
    MetricRow {
        metric: Check::HwTimeNs,
        analytic,
        measured: t,
        rel_diff: rel_diff(analytic, t),
        status: Status::Info,
        note: Some(note),
        unavailable: false,
    }
}

/// All hardware rows of one layer and its `hardware` object. `counted_here` is what this
/// report's own run counted, which must equal the profiled run's: figures of other work
/// (another workload, a routing that differed) are not this layer's, and its
/// `hw_tensor_flops` row fails saying so.
pub fn layer_rows(
    range: &AttributedRange,
    context: &Context,
    peaks: Option<&DevicePeaks>,
    counted_here: Option<Counted>,
) -> (Vec<MetricRow>, LayerHardware) {
    let counted = Counted::of(&range.record);
    let f = &range.figures;
    let mut tensor = tensor_row(&counted, f, context);
    if let Some(here) = counted_here.filter(|h| *h != counted) {
        tensor.status = Status::Fail;
        tensor.add_note(&format!(
            "the profiled forward counted {} tensor-core FLOPs, {} CUDA-core FLOPs and {} bytes moved, this report's run {}, {} and {}: the figures are of other work (another workload, or a routing that differed), not this run's",
            counted.tensor_core_flops,
            counted.cuda_core_flops,
            counted.io_bytes,
            here.tensor_core_flops,
            here.cuda_core_flops,
            here.io_bytes
        ));
    }
    let [dram, l2] = byte_rows(&counted, f);
    let rows = vec![
        tensor,
        cuda_core_row(&counted, f, context),
        dram,
        l2,
        time_row(f, peaks, range.time),
    ];
    let hardware = LayerHardware {
        range: range.index,
        ncu_id: range.ncu_id.clone(),
        figures: f.clone(),
        counted,
        achieved: achieved(f),
        roofline: peaks.and_then(|p| roofline(f, p)),
        time: range.time,
    };
    (rows, hardware)
}

/// A failing `hw_tensor_flops` row for a layer without figures.
pub fn missing_row(why: &str) -> MetricRow {
    MetricRow {
        metric: Check::HwTensorFlops,
        analytic: 0,
        measured: 0,
        rel_diff: None,
        status: Status::Fail,
        note: Some(format!("no hardware figures for this layer: {why}")),
        unavailable: true,
    }
}

#[cfg(test)]
mod tests {
    use super::super::ncu_csv::{parse, ParseOptions};
    use super::super::peaks::H200_SXM;
    use super::*;

    fn figures(text: &str) -> HardwareFigures {
        let table = parse(text, &ParseOptions::per_kernel()).expect("parses");
        HardwareFigures::of_range(&table, None).expect("figures")
    }

    /// A bf16 workload's context: its tensor-core work runs on bf16 operands (the
    /// fixtures report bf16 and tf32, not fp16).
    fn bf16() -> Context {
        Context {
            tensor_source: Some(TensorSource::Bf16),
            ..Context::default()
        }
    }

    const MLP: &str = include_str!("../../../fixtures/ncu-h200/ncu_mlp_bfloat16.csv");
    const GATE_BF16: &str = include_str!("../../../fixtures/ncu-h200/ncu_gate_bfloat16.csv");
    const ATTN: &str = include_str!("../../../fixtures/ncu-h200/ncu_attn_bfloat16.csv");

    /// The H200 run of the issue, row by row: B = 1, S = 512, bf16.
    const PREFILL: u64 = 512;

    fn counted(tensor: u64, cuda: u64) -> Counted {
        Counted {
            tensor_core_flops: tensor,
            cuda_core_flops: cuda,
            io_bytes: 100_000_000,
        }
    }

    #[test]
    fn the_mlp_passes_with_its_tile_padding() {
        // 6·N·h·i = 6 · 512 · 1280 · 6848.
        let analytic = 6 * 512 * 1280 * 6848;
        assert_eq!(analytic, 26_927_431_680u64);
        let ctx = Context {
            tokens: PREFILL,
            ..bf16()
        };
        let row = tensor_row(&counted(analytic, 0), &figures(MLP), &ctx);
        assert_eq!((row.analytic, row.measured), (analytic, 27_262_976_000));
        assert_eq!(row.status, Status::Pass, "{:?}", row.note);
        let note = row.note.unwrap();
        assert!(note.contains("hardware/counted = 1.0125"), "{note}");
        // No causal or fp32 efficient-attention work: neither allowance is mentioned.
        assert!(
            !note.contains("masked causal") && !note.contains("3xTF32"),
            "{note}"
        );
    }

    /// The informational rows give hardware/counted, or say nothing was counted (never
    /// a ratio over 0).
    #[test]
    fn informational_rows_give_the_ratio_or_say_nothing_was_counted() {
        let f = figures(MLP);
        // DRAM 88,595,456 + 581,376 bytes against 100,000,000 counted.
        let [dram, _] = byte_rows(&counted(0, 0), &f);
        let note = dram.note.unwrap();
        assert!(
            note.starts_with("informational, hardware/counted io_bytes = 0.8918: "),
            "{note}"
        );
        let nothing = Counted {
            io_bytes: 0,
            ..counted(0, 0)
        };
        // (This export has no L2 figure: that row is unavailable.)
        let [dram, _] = byte_rows(&nothing, &f);
        let note = dram.note.unwrap();
        assert!(
            note.starts_with("informational, no bytes counted: "),
            "{note}"
        );
        let gate = figures(GATE_BF16);
        let cuda = cuda_core_row(&counted(0, 100_000_000), &gate, &bf16());
        let note = cuda.note.unwrap();
        assert!(
            note.starts_with("informational, hardware/counted = 0.8564: "),
            "{note}"
        );
        let cuda = cuda_core_row(&counted(0, 0), &gate, &bf16());
        let note = cuda.note.unwrap();
        assert!(
            note.starts_with("informational, no CUDA-core FLOPs counted: "),
            "{note}"
        );
    }

    /// The CUDA-core row is judged only where fp32 GEMMs are most of its counted work;
    /// a step of fewer than SMALL_GEMM_ROWS tokens pads them, so above the band it informs.
    #[test]
    fn the_cuda_core_row_is_checked_only_where_fp32_gemms_dominate() {
        let gate = figures(GATE_BF16); // 85,642,240 FP32 FLOPs executed
        let row = |c: u64, simt: u64, tokens: u64| {
            let ctx = Context {
                tokens,
                simt_gemm_flops: simt,
                ..bf16()
            };
            cuda_core_row(&counted(0, c), &gate, &ctx)
        };
        // Half of it GEMMs: informational, whatever the ratio.
        let half = row(100_000_000, 50_000_000, PREFILL);
        assert_eq!(half.status, Status::Info);
        assert!(half.note.unwrap().starts_with("informational"));
        // All of it, and the hardware executed 1.71× that: fails at a prefill...
        let above = row(50_000_000, 50_000_000, PREFILL);
        assert_eq!(above.status, Status::Fail, "{:?}", above.note);
        assert!(above.note.unwrap().contains("the band applies"));
        // ...and from SMALL_GEMM_ROWS tokens up; below it, the padding informs.
        assert_eq!(
            row(50_000_000, 50_000_000, SMALL_GEMM_ROWS).status,
            Status::Fail
        );
        let small = row(50_000_000, 50_000_000, SMALL_GEMM_ROWS - 1);
        assert_eq!(small.status, Status::Info);
        assert!(small
            .note
            .unwrap()
            .contains("which the hardware pads to its tile rows"));
        assert_eq!(row(50_000_000, 50_000_000, 1).status, Status::Info);
    }

    /// A ratio exactly at what padding every small GEMM explains is information; above it,
    /// a failure.
    #[test]
    fn padding_explains_up_to_and_including_its_bound() {
        // Counted 2, all of it small; padded to tiles at most 4, so 1.25 × 4 / 2 = 2.5.
        let at = banded("x", 2, 5, (0.9, 1.25), 2, Some(4));
        assert_eq!(at.0, Status::Info, "{}", at.1);
        assert!(
            at.1.contains("(padding to 256-row tiles allows up to 2.5000)"),
            "{}",
            at.1
        );
        let over = banded("x", 2, 6, (0.9, 1.25), 2, Some(4));
        assert_eq!(over.0, Status::Fail, "{}", over.1);
        assert!(over.1.contains("allows at most 2.5000"), "{}", over.1);
    }

    /// Figures of every pipe: `[bf16, fp16, tf32]` tensor ops, `simt` FP32 FLOPs (no
    /// FP16 or FP64), `dram` bytes read (none written), over `time_ns`.
    fn pipes(tensor: [u64; 3], simt: u64, dram: u64, time_ns: u64) -> HardwareFigures {
        HardwareFigures {
            tensor_ops_bf16: Some(tensor[0]),
            tensor_ops_fp16: Some(tensor[1]),
            tensor_ops_tf32: Some(tensor[2]),
            cuda_core_flops: Some(simt),
            half_flops: None,
            double_flops: None,
            dram_read_bytes: Some(dram),
            dram_write_bytes: Some(0),
            time_ns: Some(time_ns),
            ..figures(MLP)
        }
    }

    /// Every pipe at its own peak on the H200: each term below is 1 µs of work.
    #[test]
    fn the_roofline_sums_every_pipe_at_its_own_peak() {
        let f = pipes(
            [989_500_000, 989_500_000, 494_500_000],
            67_000_000,
            4_800_000,
            8_000,
        );
        let r = roofline(&f, &H200_SXM).unwrap();
        assert!((r.bound_ns - 4_000.0).abs() < 1e-6, "{}", r.bound_ns);
        assert_eq!(r.limiter, "compute");
        assert!((r.fraction_of_roofline - 0.5).abs() < 1e-12);
        // Ten times the DRAM traffic: 10 µs of it, memory-bound.
        let memory = HardwareFigures {
            dram_read_bytes: Some(48_000_000),
            ..f.clone()
        };
        let r = roofline(&memory, &H200_SXM).unwrap();
        assert!((r.bound_ns - 10_000.0).abs() < 1e-6, "{}", r.bound_ns);
        assert_eq!(r.limiter, "memory");
        // A time of 0 is no time: no rates and no roofline position.
        let instant = HardwareFigures {
            time_ns: Some(0),
            ..f
        };
        let a = achieved(&instant);
        assert_eq!((a.tensor_flops_per_s, a.dram_bytes_per_s), (None, None));
        assert_eq!(roofline(&instant, &H200_SXM), None);
    }

    /// Exactly on the roof is possible; only above it is the note's warning given.
    #[test]
    fn a_range_exactly_on_the_roof_is_not_called_impossible() {
        let on_roof = pipes([0; 3], 0, 4_800, 1);
        assert_eq!(
            roofline(&on_roof, &H200_SXM).unwrap().fraction_of_roofline,
            1.0
        );
        assert!(!note_says_impossible(&on_roof));
        let row = time_row(&on_roof, Some(&H200_SXM), TimeSpan::Kernels);
        assert!(row
            .note
            .unwrap()
            .starts_with("achieved 0.00 TFLOP/s tensor, 0.00 TFLOP/s CUDA-core, 4.80 TB/s DRAM, "));
        let faster = HardwareFigures {
            dram_read_bytes: Some(4_801),
            ..on_roof
        };
        assert!(note_says_impossible(&faster));
    }

    #[test]
    fn figures_of_other_work_fail_the_layer() {
        let analytic = 6 * 512 * 1280 * 6848;
        let range = AttributedRange {
            index: 0,
            ncu_id: "0".into(),
            record: RangeRecord {
                layer: "DeepseekV2MLP".into(),
                tensor_core_flops: analytic,
                cuda_core_flops: 0,
                io_bytes: 100_000_000,
            },
            figures: figures(MLP),
            time: TimeSpan::RangeElapsed,
        };
        let ctx = Context {
            tokens: PREFILL,
            ..bf16()
        };
        let tensor = |here: Option<Counted>| layer_rows(&range, &ctx, None, here).0[0].clone();
        // The same work here as in the profiled forward (or nothing to compare): judged on
        // the figures.
        assert_eq!(tensor(Some(counted(analytic, 0))).status, Status::Pass);
        assert_eq!(tensor(None).status, Status::Pass);
        // Any counted value that differs: the figures are another run's.
        for here in [
            counted(analytic / 64, 0),
            counted(analytic, 1),
            Counted {
                io_bytes: 1,
                ..counted(analytic, 0)
            },
        ] {
            let row = tensor(Some(here));
            assert_eq!(row.status, Status::Fail, "{here:?}");
            assert!(row.note.unwrap().contains("figures are of other work"));
        }
    }

    #[test]
    fn the_gate_executes_no_tensor_core_work_and_its_sgemm_is_checked() {
        let f = figures(GATE_BF16);
        let gemm = 2 * 512 * 1280 * 64; // 83,886,080
        let ctx = Context {
            tokens: PREFILL,
            simt_gemm_flops: gemm,
            ..bf16()
        };
        // Counted as CUDA-core work: hardware 0 tensor ops is a pass.
        let row = tensor_row(&counted(0, gemm + 500_000), &f, &ctx);
        assert_eq!((row.measured, row.status), (0, Status::Pass));
        // Booked to tensor cores by a wrong rule: the hardware says no.
        let wrong = tensor_row(&counted(gemm, 0), &f, &ctx);
        assert_eq!(wrong.status, Status::Fail);
        assert!(wrong.note.unwrap().contains("executed none"));
        // The SIMT GEMM dominates the CUDA-core work: checked, 85,642,240 within the band.
        let cuda = cuda_core_row(&counted(0, gemm + 500_000), &f, &ctx);
        assert_eq!((cuda.measured, cuda.status), (85_642_240, Status::Pass));
        assert!(cuda.note.unwrap().contains("the band applies"));
        // Without SASS instruction counts (application range replay) it is not checked,
        // and the row says that it would be, and how.
        let none = HardwareFigures {
            cuda_core_flops: None,
            ..f
        };
        let cuda = cuda_core_row(&counted(0, gemm + 500_000), &none, &ctx);
        assert_eq!(cuda.status, Status::Info);
        let note = cuda.note.unwrap();
        assert!(
            note.starts_with("unavailable") && note.contains("--ncu-replay kernel collects them"),
            "{note}"
        );
    }

    #[test]
    fn causal_attention_passes_only_with_its_skippable_share() {
        let f = figures(ATTN);
        let full = 8_053_063_680u64; // what every counter books (the full rectangle)
        let ratio = f.tensor_ops().unwrap() as f64 / full as f64;
        assert!((ratio - 0.9375).abs() < 1e-4, "{ratio}");
        // Core QKᵀ and PV: 4·B·H·S²·d; above the diagonal (S − 1)/(2S) of it.
        let core = 4 * 10 * 512 * 512 * 128u64;
        let skippable = core * 511 / 1024;
        let with = Context {
            tokens: PREFILL,
            causal_skippable_flops: skippable,
            ..bf16()
        };
        assert_eq!(
            tensor_row(&counted(full, 0), &f, &with).status,
            Status::Pass
        );
        let strict = Context {
            tokens: PREFILL,
            ..bf16()
        };
        assert_eq!(
            tensor_row(&counted(full, 0), &f, &strict).status,
            Status::Pass,
            "the H200's 0.9375 is inside [0.9, 1.1] anyway"
        );
        // The allowance lowers the band's lower end to 0.9 · (1 − skippable/full) ≈ 0.825.
        let (low, high) = band(full, &with);
        assert!((low - 0.9 * (full - skippable) as f64 / full as f64).abs() < 1e-12);
        assert!(low > 0.82 && low < 0.83, "{low}");
        assert_eq!(high, 1.1);
        // A kernel that skipped more of the masked tiles: 0.85 of the counted work. Only
        // the causal allowance lets it pass.
        let skipping = HardwareFigures {
            tensor_ops_bf16: Some(full * 85 / 100),
            tensor_ops_fp16: Some(0),
            tensor_ops_tf32: Some(0),
            ..f.clone()
        };
        let strict_row = tensor_row(&counted(full, 0), &skipping, &strict);
        assert_eq!(strict_row.status, Status::Fail, "{:?}", strict_row.note);
        assert!(strict_row
            .note
            .unwrap()
            .contains("hardware/counted = 0.8500, band [0.9000, 1.1000]"));
        let allowed = tensor_row(&counted(full, 0), &skipping, &with);
        assert_eq!(allowed.status, Status::Pass, "{:?}", allowed.note);
        assert!(allowed.note.unwrap().contains("masked causal FLOPs"));
        // Below even the lowered end: a fail with the allowance too.
        let too_few = HardwareFigures {
            tensor_ops_bf16: Some(full * 80 / 100),
            ..skipping
        };
        assert_eq!(
            tensor_row(&counted(full, 0), &too_few, &with).status,
            Status::Fail
        );
        let far = tensor_row(&counted(full * 2, 0), &f, &with);
        assert_eq!(far.status, Status::Fail);
    }

    #[test]
    fn decode_sized_padding_is_information_not_failure() {
        // 8.07×: one token through the MLP's first GEMM on the H200.
        let f = HardwareFigures {
            tensor_ops_bf16: Some(141_557_760),
            ..figures(MLP)
        };
        let analytic = 2 * 1280 * 6848;
        let one_token = Context {
            tokens: 1,
            small_gemm_flops: analytic,
            ..bf16()
        };
        let row = tensor_row(&counted(analytic, 0), &f, &one_token);
        assert_eq!(row.status, Status::Info);
        assert!(row.note.unwrap().contains("fewer than 64 token rows"));
        let many = Context {
            tokens: 64,
            ..bf16()
        };
        assert_eq!(
            tensor_row(&counted(analytic, 0), &f, &many).status,
            Status::Fail
        );
        // Padding only adds work: below the band is a failure even with small GEMMs.
        let less = HardwareFigures {
            tensor_ops_bf16: Some(analytic / 2),
            ..figures(MLP)
        };
        assert_eq!(
            tensor_row(&counted(analytic, 0), &less, &one_token).status,
            Status::Fail
        );
    }

    #[test]
    fn routed_experts_with_few_rows_explain_the_moe_above_the_band() {
        // The H200 (2026-11-28, run-4): DeepseekV2MoE, bf16, B = 1, S = 512: 3,072 routed
        // rows over 64 experts (48 each on average), 1.2318 × the counted work.
        let (c, h) = (28_185_722_880u64, 34_718_351_360u64);
        let f = HardwareFigures {
            tensor_ops_bf16: Some(h),
            ..figures(MLP)
        };
        // Routed: 2·3·h·m per row, 3,072 rows; every expert under 64 rows.
        let routed = 6 * 1280 * 896 * 3072;
        let ctx = Context {
            tokens: PREFILL,
            small_gemm_flops: routed,
            ..bf16()
        };
        let row = tensor_row(&counted(c, 0), &f, &ctx);
        assert_eq!(row.status, Status::Info, "{:?}", row.note);
        assert!(row.note.unwrap().contains("75.0%"));
        // Bounded: padding each small expert to 256-row tiles explains at most so much;
        // a ratio past it fails (here a bound of twice the small work: 1.1 · 1.75).
        let bounded = Context {
            small_gemm_ceiling_flops: Some(2 * routed),
            ..ctx
        };
        assert_eq!(
            tensor_row(&counted(c, 0), &f, &bounded).status,
            Status::Info
        );
        let far = HardwareFigures {
            tensor_ops_bf16: Some(2 * c),
            ..figures(MLP)
        };
        let row = tensor_row(&counted(c, 0), &far, &bounded);
        assert_eq!(row.status, Status::Fail, "{:?}", row.note);
        assert!(row.note.unwrap().contains("more than padding explains"));
        // Without small GEMMs the same ratio is a failure.
        let plain = Context {
            tokens: PREFILL,
            ..bf16()
        };
        assert_eq!(tensor_row(&counted(c, 0), &f, &plain).status, Status::Fail);
    }

    #[test]
    fn fp32_efficient_attention_runs_three_tf32_mmas_per_product() {
        // The H200 (2026-11-27 probe and 2026-11-28 run-4): causal, B = 1, H = 10,
        // S = 512, d = 128, fp32: 2,390,753,280 TF32 ops for the 1,342,177,280 booked.
        let core = 4 * 10 * 512 * 512 * 128u64;
        assert_eq!(core, 1_342_177_280);
        let f = HardwareFigures {
            tensor_ops_bf16: Some(0),
            tensor_ops_tf32: Some(2_390_753_280),
            ..figures(MLP)
        };
        let skippable = core * 511 / 1024;
        let fast = Context {
            tokens: PREFILL,
            causal_skippable_flops: skippable,
            fast_f32_flops: core,
            fast_f32_skippable_flops: skippable,
            tensor_source: Some(TensorSource::Tf32),
            ..Context::default()
        };
        let row = tensor_row(&counted(core, 0), &f, &fast);
        assert_eq!(row.status, Status::Pass, "{:?}", row.note);
        assert!(row.note.unwrap().contains("3xTF32"));
        let (low, high) = band(core, &fast);
        assert!(
            (high - 3.3).abs() < 1e-9 && low > 1.3 && low < 1.4,
            "{low} {high}"
        );
        // Read as plain TF32 (one MMA per product) the 1.78 would fail.
        let plain = Context {
            tokens: PREFILL,
            causal_skippable_flops: skippable,
            tensor_source: Some(TensorSource::Tf32),
            ..Context::default()
        };
        assert_eq!(
            tensor_row(&counted(core, 0), &f, &plain).status,
            Status::Fail
        );
    }

    #[test]
    fn the_source_the_work_runs_on_must_be_measured() {
        // What ncu 2025.3.1 wrote on the H200: bf16 and tf32, no fp16 column. The gate
        // counted 0 tensor FLOPs and 0 executed on the reported sources.
        let f = figures(GATE_BF16);
        assert_eq!(
            (f.tensor_ops_bf16, f.tensor_ops_fp16, f.tensor_ops_tf32),
            (Some(0), None, Some(0))
        );
        let fp16 = Context {
            tensor_source: Some(TensorSource::Fp16),
            ..Context::default()
        };
        // An fp16 workload: its GEMMs run on the unmeasured fp16 source, so "0 = 0" says
        // nothing: not a pass.
        let row = tensor_row(&counted(0, 1), &f, &fp16);
        assert_eq!((row.status, row.unavailable), (Status::Fail, true));
        let note = row.note.unwrap();
        assert!(note.starts_with("unavailable"), "{note}");
        assert!(
            note.contains("sm__ops_path_tensor_src_fp16_dst_fp32.sum"),
            "{note}"
        );
        assert!(note.contains("fp16 operands"), "{note}");
        // Nor is a layer with counted work a failure of the work: it is not measured.
        let mlp = HardwareFigures {
            tensor_ops_fp16: None,
            ..figures(MLP)
        };
        let row = tensor_row(&counted(26_927_431_680, 0), &mlp, &fp16);
        assert_eq!((row.status, row.unavailable), (Status::Fail, true));
        assert!(!row.note.unwrap().contains("executed none"));
        // A bf16 workload with the fp16 column missing: judged as before, the missing
        // source listed.
        let row = tensor_row(&counted(0, 1), &f, &bf16());
        assert_eq!((row.status, row.unavailable), (Status::Pass, false));
        assert!(row.note.unwrap().contains("fp16 unavailable"));
        let row = tensor_row(&counted(26_927_431_680, 0), &figures(MLP), &bf16());
        assert_eq!(row.status, Status::Pass);
        // Not known which source: every one is required.
        let row = tensor_row(&counted(0, 1), &f, &Context::default());
        assert_eq!((row.status, row.unavailable), (Status::Fail, true));
        assert!(row.note.unwrap().contains("not known"));
        let all = HardwareFigures {
            tensor_ops_fp16: Some(0),
            ..f
        };
        let row = tensor_row(&counted(0, 1), &all, &Context::default());
        assert_eq!(row.status, Status::Pass);
    }

    #[test]
    fn an_unavailable_note_gives_the_runs_own_reason() {
        // App-range replay leaves the SASS instruction metrics out of ncu's command.
        let left_out =
            super::super::profile::left_out_up_front(super::super::profile::NcuReplay::AppRange);
        assert!(!left_out.is_empty());
        let f = HardwareFigures {
            ffma: None,
            fadd: None,
            fmul: None,
            cuda_core_flops: None,
            half_flops: None,
            double_flops: None,
            left_out,
            ..figures(MLP)
        };
        let note = cuda_core_row(&counted(0, 10), &f, &bf16()).note.unwrap();
        assert!(note.starts_with("unavailable"), "{note}");
        assert!(
            note.contains(
                "left out of the ncu run: smsp__sass_thread_inst_executed_op_ffma_pred_on.sum"
            ),
            "{note}"
        );
        assert!(
            note.contains("only in kernel replay, not in app-range replay"),
            "{note}"
        );
        assert!(!note.contains("lacks the metric"), "{note}");
        // One reason, said once for the three metrics it covers.
        assert_eq!(note.matches("only in kernel replay").count(), 1, "{note}");
        // A metric the run did not leave out: the causes an absent value can have.
        let time = time_row(
            &HardwareFigures { time_ns: None, ..f },
            None,
            TimeSpan::RangeElapsed,
        );
        let note = time.note.unwrap();
        assert!(note.contains("not asked for, or the device"), "{note}");
        assert!(!note.contains("left out"), "{note}");
    }

    #[test]
    fn unavailable_is_not_zero() {
        let none = HardwareFigures {
            tensor_ops_bf16: None,
            tensor_ops_fp16: None,
            tensor_ops_tf32: None,
            cuda_core_flops: None,
            dram_read_bytes: None,
            l2_bytes: None,
            time_ns: None,
            ..figures(MLP)
        };
        let c = counted(0, 10);
        let t = tensor_row(&c, &none, &Context::default());
        assert_eq!((t.status, t.rel_diff), (Status::Fail, None));
        assert!(t.note.unwrap().starts_with("unavailable"));
        let cuda = cuda_core_row(&c, &none, &Context::default());
        assert_eq!(cuda.status, Status::Info);
        // Tables say so: not "0 FLOP" and "inf".
        assert!(cuda.unavailable && t.unavailable);
        assert_eq!(
            (cuda.measured_text(), cuda.rel_text()),
            ("unavailable".to_string(), "—".to_string())
        );
        assert!(cuda.note.unwrap().starts_with("unavailable"));
        for r in byte_rows(&c, &none) {
            assert!(r.note.unwrap().starts_with("unavailable"), "{}", r.metric);
        }
        let time = time_row(&none, Some(&H200_SXM), TimeSpan::Kernels);
        assert!(time.note.unwrap().starts_with("unavailable"));
        assert_eq!(achieved(&none).tensor_flops_per_s, None);
        assert_eq!(roofline(&none, &H200_SXM), None);
    }

    #[test]
    fn the_mlp_on_the_h200_roofline() {
        let f = figures(MLP);
        let r = roofline(&f, &H200_SXM).expect("time and DRAM known");
        // 27.26 GFLOP at 989.5 TFLOP/s = 27.6 µs; 89.2 MB at 4.8 TB/s = 18.6 µs; the
        // range took 67.36 µs.
        assert_eq!(r.limiter, "compute");
        let compute_ns = 27_262_976_000.0 / 989.5e12 * 1e9 + 79_101_952.0 / 67e12 * 1e9;
        assert!((r.bound_ns - compute_ns).abs() < 1.0, "{}", r.bound_ns);
        assert!((r.fraction_of_roofline - compute_ns / 67_360.0).abs() < 1e-9);
        let a = achieved(&f);
        let tflops = a.tensor_flops_per_s.unwrap() / 1e12;
        assert!(
            (tflops - 27_262_976_000.0 / 67_360e-9 / 1e12).abs() < 1e-6,
            "{tflops}"
        );
        let row = time_row(&f, Some(&H200_SXM), TimeSpan::Kernels);
        assert_eq!(
            (row.measured, row.analytic),
            (67_360, compute_ns.round() as u64)
        );
        assert!(row.note.unwrap().contains("compute-bound"));
        // A range mode's time includes the gaps between kernels: the note says so.
        let kernels = time_row(&f, Some(&H200_SXM), TimeSpan::Kernels);
        assert!(!kernels.note.unwrap().contains("elapsed"));
        let elapsed = time_row(&f, Some(&H200_SXM), TimeSpan::RangeElapsed);
        assert!(elapsed
            .note
            .unwrap()
            .contains("--ncu-replay kernel measures"));
        let unknown = time_row(&f, None, TimeSpan::Kernels);
        assert_eq!(unknown.analytic, 0);
        assert!(unknown.note.unwrap().contains("not in the table"));
        assert!(!note_says_impossible(&f));
        // A time shorter than the roof allows (here: a tenth of the bound) is impossible,
        // and the note says what it suggests.
        let too_fast = HardwareFigures {
            time_ns: Some((compute_ns / 10.0) as u64),
            ..f.clone()
        };
        assert!(note_says_impossible(&too_fast));
    }

    fn note_says_impossible(f: &HardwareFigures) -> bool {
        time_row(f, Some(&H200_SXM), TimeSpan::Kernels)
            .note
            .unwrap()
            .contains("faster than the hardware allows")
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(duration(67_360), "67.4 µs");
        assert_eq!(duration(999), "999 ns");
        assert_eq!(duration(2_500_000), "2.500 ms");
        assert_eq!(duration(3_000_000_000), "3.000 s");
    }
}
