//! The dispatcher-level FLOP counter: arm it around some libtorch work, get back every
//! counted op with its FLOPs, costed by the analytic crate's conventions table.
//!
//! ```
//! # fn main() -> modelmeter_reference::Result<()> {
//! use modelmeter_reference::FlopCounter;
//! let a = tch::Tensor::ones([64, 32], (tch::Kind::Float, tch::Device::Cpu));
//! let region = FlopCounter::start()?;
//! let _c = a.f_mm(&a.f_transpose(0, 1)?)?;
//! let counts = region.finish()?;
//! assert_eq!(counts.flops.matmul_flops, 2 * 64 * 32 * 64);
//! # Ok(()) }
//! ```
//!
//! Counting rule: an op is counted when it has a non-composite rule in the conventions
//! table and no enclosing op on its thread has one (composite ops such as
//! `aten::linear` are counted through the ops they dispatch; a kernel's inner ops are
//! covered by its own rule). This is what makes the matmul totals equal PyTorch's
//! `FlopCounterMode`, which never sees composite ops nor ops inside a kernel.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use modelmeter::conventions::{
    convention, is_fused_attention, is_in_place, Arg, OpConvention, OpCost, Rule, Tf32,
};
use modelmeter::Dtype;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::ffi;
use crate::op_log::{self, OpEvent};

/// One region at a time per process: regions on other threads wait.
static REGION: Mutex<()> = Mutex::new(());

thread_local! {
    static REGION_OPEN_HERE: Cell<bool> = const { Cell::new(false) };
}

/// Entry point of the counter.
pub struct FlopCounter;

impl FlopCounter {
    /// Arms the counter for the ops of the calling thread (and the backward they
    /// create, whatever thread the autograd engine runs it on: its nodes and the gradient
    /// sums the engine adds around them). Waits while another
    /// thread has a region open (for ever if that region was leaked with `mem::forget`:
    /// finish or drop every region); an error if this thread already has one.
    pub fn start() -> Result<Region> {
        if REGION_OPEN_HERE.with(Cell::get) {
            return Err(Error::Observer(
                "a counted region is already open on this thread".into(),
            ));
        }
        let guard = REGION
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let tf32 = ffi::tf32()?;
        ffi::start()?;
        REGION_OPEN_HERE.with(|c| c.set(true));
        Ok(Region {
            _guard: guard,
            tf32,
            finished: false,
        })
    }
}

/// An armed counting region; [`Region::finish`] disarms it and returns the counts.
/// Dropping it unfinished disarms it too.
pub struct Region {
    _guard: MutexGuard<'static, ()>,
    tf32: Tf32,
    finished: bool,
}

impl Region {
    /// Disarms the counter and costs every op seen since [`FlopCounter::start`].
    pub fn finish(mut self) -> Result<Counts> {
        self.finished = true;
        REGION_OPEN_HERE.with(|c| c.set(false));
        let log = ffi::stop()?;
        Ok(Counts::from_log(&op_log::parse(&log), self.tf32))
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if !self.finished {
            REGION_OPEN_HERE.with(|c| c.set(false));
            let _ = ffi::stop();
        }
    }
}

/// Which engine the FLOPs of a counted op are booked to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Booking {
    TensorCore,
    CudaCore,
    /// Matmul part on tensor cores, elementwise part on CUDA cores.
    Split,
    /// No FLOPs.
    None,
}

/// A counted op: the outermost op with a rule on its thread.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OpRecord {
    pub name: String,
    pub thread: u64,
    /// Ran inside an autograd node or the engine's evaluation of one (backward pass: the
    /// node's ops, and the sums of gradients the engine adds outside it).
    pub backward: bool,
    pub device: Option<String>,
    /// Shapes of the tensor arguments, in order.
    pub shapes: Vec<Vec<u64>>,
    /// Dtypes of the tensor arguments, in order.
    pub dtypes: Vec<Dtype>,
    /// Its FLOPs. `flop_counter_mode_flops` is by FlopCounterMode's registry formula (0
    /// outside the registry); for a direct call of the inner `[B, S, H, D]` attention
    /// kernels this is the correct count, which FlopCounterMode itself misreads
    /// (docs/conventions.md).
    #[serde(flatten)]
    pub flops: OpCost,
    pub engine: Booking,
}

/// Totals and records of one counted region.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Counts {
    /// The totals: `matmul_flops` are FlopCounterMode's registry ops plus the CPU SDPA
    /// kernel; `flop_counter_mode_flops` the FlopCounterMode-compatible total (registry
    /// ops only, matmul FLOPs only); elementwise work under the conventions table.
    #[serde(flatten)]
    pub flops: OpCost,
    /// libtorch's TF32 switches during the region (they pick the engine of fp32 work).
    pub tf32: Tf32,
    /// Counted ops that cost FLOPs, in the order they ran (per thread); zero-cost copies
    /// and views are counted but not recorded.
    pub records: Vec<OpRecord>,
    /// Ops with no rule in the conventions table, by name and calls; their FLOPs are
    /// unknown, so any comparison must treat the totals as incomplete.
    pub unknown_ops: BTreeMap<String, usize>,
    /// Observer or costing failures; like unknown ops they make the totals incomplete.
    pub errors: Vec<String>,
    /// Every op start the observer saw (counted, nested, views …).
    pub events_seen: usize,
    /// Bytes the counted ops read and wrote, unfused ([`OpConvention::io_bytes`] on the
    /// arguments and outputs the dispatcher saw); an op that handed back its input
    /// unchanged (`x.to(x.dtype)`, `contiguous()` of a contiguous tensor) moved nothing.
    pub io_bytes: u64,
    /// The same bytes by op name, for finding where two sides differ.
    pub io_bytes_by_op: BTreeMap<String, u64>,
    /// Counted ops whose outputs were never seen (they did not end inside the region):
    /// `io_bytes` misses their bytes, so it is complete only when this is 0.
    pub ops_without_outputs: usize,
    /// The blocks that hold the outputs of the counted ops (not those handed back or
    /// written in place), with the shared clock at each op's end: which allocations made
    /// op outputs ([`crate::allocations::Allocations::output_footprint`]).
    pub output_blocks: Vec<OutputBlock>,
}

/// The block holding a counted op's output, and when the op ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct OutputBlock {
    pub address: u64,
    /// The clock shared with the allocation observer at the op's end.
    pub ended_at: u64,
}

/// The per-thread open frames while walking the log: (depth, covered by a rule).
type Frames = Vec<(usize, bool)>;

impl Counts {
    fn from_log(log: &op_log::OpLog, tf32: Tf32) -> Counts {
        let mut counts = Counts {
            tf32,
            errors: log.errors.clone(),
            events_seen: log.events.len(),
            ..Counts::default()
        };
        let mut frames: BTreeMap<u64, Frames> = BTreeMap::new();
        let mut backward_depth: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
        for event in &log.events {
            let stack = frames.entry(event.thread).or_default();
            while stack.last().is_some_and(|(d, _)| *d >= event.depth) {
                stack.pop();
            }
            let nodes = backward_depth.entry(event.thread).or_default();
            while nodes.last().is_some_and(|d| *d >= event.depth) {
                nodes.pop();
            }
            let covered = stack.last().is_some_and(|(_, c)| *c);
            let ruled = counts.visit(event, covered, !nodes.is_empty(), tf32);
            if event.backward {
                nodes.push(event.depth);
            }
            stack.push((event.depth, covered || ruled));
        }
        counts
    }

    /// Costs one event; true when it has a (non-composite) rule covering its children.
    fn visit(&mut self, event: &OpEvent, covered: bool, in_backward: bool, tf32: Tf32) -> bool {
        if event.backward || event.name.starts_with("autograd::") {
            return false; // autograd bookkeeping frames, not ops
        }
        // Only ATen ops have rules; anything else that runs is an unknown op too.
        let conv = event
            .name
            .starts_with("aten::")
            .then(|| convention(event.name))
            .flatten();
        let Some(conv) = conv else {
            if !covered {
                *self.unknown_ops.entry(event.name.to_string()).or_default() += 1;
            }
            return false;
        };
        if conv.rule == Rule::Composite {
            return false;
        }
        if covered {
            return true;
        }
        self.count_bytes(event, conv);
        match conv.cost(&event.args, tf32) {
            Ok(cost) => self.record(event, in_backward, cost),
            Err(e) => self.errors.push(e.to_string()),
        }
        true
    }

    /// Adds the bytes a counted op moved to the totals.
    fn count_bytes(&mut self, event: &OpEvent, conv: &OpConvention) {
        if event.outputs.is_none() {
            self.ops_without_outputs += 1;
            return;
        }
        let tensors = event.output_tensors();
        let in_place = is_in_place(event.name);
        let handed_back =
            !in_place && !tensors.is_empty() && tensors.iter().all(|(_, alias)| *alias);
        if !handed_back && !in_place {
            if let Some(ended_at) = event.ended_at {
                for output in event.outputs.iter().flatten() {
                    if let (Some(address), false) = (output.address, output.aliases_input) {
                        self.output_blocks.push(OutputBlock { address, ended_at });
                    }
                }
            }
        }
        let bytes = if handed_back {
            Ok(0)
        } else {
            conv.io_bytes(&event.args, tensors.iter().map(|(t, _)| *t))
        };
        let total = bytes.and_then(|b| {
            // The name is copied once per op name, not once per call.
            let by_op = match self.io_bytes_by_op.get_mut(event.name) {
                Some(by_op) => by_op,
                None => self
                    .io_bytes_by_op
                    .entry(event.name.to_string())
                    .or_default(),
            };
            *by_op = by_op.saturating_add(b);
            modelmeter::checked::sum("io_bytes", &[self.io_bytes, b])
        });
        match total {
            Ok(t) => self.io_bytes = t,
            Err(e) => self.errors.push(format!("{}: {e}", event.name)),
        }
    }

    fn record(&mut self, event: &OpEvent, backward: bool, cost: OpCost) {
        if cost == OpCost::default() {
            return; // zero-cost copies and views are not worth a record
        }
        match self.flops.checked_add(&cost) {
            Some(total) => self.flops = total,
            None => self.errors.push(format!(
                "{}: the counted totals overflow 64-bit integers",
                event.name
            )),
        }
        let (shapes, dtypes) = event
            .args
            .iter()
            .filter_map(|a| match a {
                Arg::Tensor(t) => Some((t.shape.to_vec(), t.dtype)),
                _ => None,
            })
            .unzip();
        let engine = match (cost.tensor_core_flops, cost.cuda_core_flops) {
            (0, 0) => Booking::None,
            (_, 0) => Booking::TensorCore,
            (0, _) => Booking::CudaCore,
            _ => Booking::Split,
        };
        self.records.push(OpRecord {
            name: event.name.to_string(),
            thread: event.thread,
            backward,
            device: event.device.as_deref().map(str::to_string),
            shapes,
            dtypes,
            flops: cost,
            engine,
        });
    }

    /// All counted FLOPs.
    pub fn total_flops(&self) -> u64 {
        self.flops.total()
    }

    /// True when every op had a rule and nothing failed: the totals are complete.
    pub fn is_complete(&self) -> bool {
        self.unknown_ops.is_empty() && self.errors.is_empty()
    }

    /// Per op name: calls and summed FLOPs, for reports.
    pub fn by_op(&self) -> Vec<OpSummary> {
        let mut map: BTreeMap<&str, OpSummary> = BTreeMap::new();
        for r in &self.records {
            let s = map.entry(&r.name).or_insert_with(|| OpSummary {
                name: r.name.clone(),
                ..OpSummary::default()
            });
            s.calls += 1;
            // The region's totals report any overflow; a summary saturates at the top.
            s.flops = s.flops.checked_add(&r.flops).unwrap_or(OpCost {
                matmul_flops: u64::MAX,
                elementwise_flops: u64::MAX,
                flop_counter_mode_flops: u64::MAX,
                tensor_core_flops: u64::MAX,
                cuda_core_flops: u64::MAX,
            });
            for d in &r.dtypes {
                if !s.dtypes.contains(d) {
                    s.dtypes.push(*d);
                }
            }
            if let Some(dev) = &r.device {
                if !s.devices.contains(dev) {
                    s.devices.push(dev.clone());
                }
            }
        }
        map.into_values().collect()
    }

    /// Names of the fused attention kernels that ran (the SDPA kernel libtorch chose).
    pub fn attention_kernels(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .records
            .iter()
            .filter(|r| is_fused_attention(&r.name))
            .map(|r| r.name.clone())
            .collect();
        names.dedup();
        names
    }
}

/// Counted calls and FLOPs of one op name.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct OpSummary {
    pub name: String,
    pub calls: usize,
    #[serde(flatten)]
    pub flops: OpCost,
    pub dtypes: Vec<Dtype>,
    pub devices: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(log: &str) -> Counts {
        Counts::from_log(&op_log::parse(log), Tf32::matmul(false))
    }

    #[test]
    fn outermost_ruled_op_counts_and_composites_pass_through() {
        // linear → matmul → mm; the mm's own children are not visited for counting.
        let c = counts(
            "1\t0\tF\taten::linear\tTFloat@cpu[2,5,16];TFloat@cpu[32,16];N\n\
             1\t1\tF\taten::t\tTFloat@cpu[32,16]\n\
             1\t2\tF\taten::transpose\tTFloat@cpu[32,16];i0;i1\n\
             1\t1\tF\taten::matmul\tTFloat@cpu[2,5,16];TFloat@cpu[16,32]\n\
             1\t2\tF\taten::view\tTFloat@cpu[2,5,16];I[10,16]\n\
             1\t2\tF\taten::mm\tTFloat@cpu[10,16];TFloat@cpu[16,32]\n\
             1\t3\tF\taten::mm\tTFloat@cpu[10,16];TFloat@cpu[16,32]\n\
             1\t2\tF\taten::_unsafe_view\tTFloat@cpu[10,32];I[2,5,32]\n",
        );
        assert_eq!(c.flops.matmul_flops, 10240);
        assert_eq!(c.flops.flop_counter_mode_flops, 10240);
        assert_eq!(c.records.len(), 1);
        assert!(c.is_complete());
    }

    #[test]
    fn bytes_come_from_outputs_and_handed_back_inputs_move_nothing() {
        let c = counts(
            "1\t0\tF\taten::mul\tTFloat@cpu[4];TFloat@cpu[4]\n\
             O\t0\t1\tTFloat@cpu[4]\n\
             1\t0\tF\taten::to\tTFloat@cpu[4];i6\n\
             O\t1\t2\t=TFloat@cpu[4]\n\
             1\t0\tF\taten::mul_\tTFloat@cpu[4];TFloat@cpu[4]\n\
             O\t2\t3\t=TFloat@cpu[4]\n\
             1\t0\tF\taten::add\tTFloat@cpu[4];TFloat@cpu[4]\n",
        );
        // mul: 2 read + 1 written; to: handed back; mul_: in place, 2 read + 1 written.
        assert_eq!(c.io_bytes, 6 * 16);
        assert_eq!(c.io_bytes_by_op.get("aten::to"), Some(&0));
        // The add never ended: its bytes are unknown, and said so.
        assert_eq!(c.ops_without_outputs, 1);
    }

    /// Only an output the op allocated is an output block (with the clock at the op's
    /// end): not an input handed back, not an in-place op's `self`.
    #[test]
    fn output_blocks_are_the_blocks_an_op_allocated() {
        let c = counts(
            "1\t0\tF\taten::mul\tTFloat@cpu[4];TFloat@cpu[4]\n\
             O\t0\t5\tTFloat@cpu[4]#1f0\n\
             1\t0\tF\taten::to\tTFloat@cpu[4];i6\n\
             O\t1\t6\t=TFloat@cpu[4]#100\n\
             1\t0\tF\taten::mul_\tTFloat@cpu[4];TFloat@cpu[4]\n\
             O\t2\t7\t=TFloat@cpu[4]#1f0\n",
        );
        assert_eq!(
            c.output_blocks,
            [OutputBlock {
                address: 0x1f0,
                ended_at: 5
            }]
        );
    }

    /// The region's counts keep libtorch's TF32 switches as they were and every error the
    /// observer wrote (an `X` line): such counts are not complete.
    #[test]
    fn the_counts_keep_the_switches_and_the_observers_errors() {
        let tf32 = Tf32 {
            matmul: true,
            cudnn: false,
        };
        let log = op_log::parse(
            "1\t0\tF\taten::mul\tTFloat@cpu[4];TFloat@cpu[4]\n\
             X\taten::mm: boom\n",
        );
        let c = Counts::from_log(&log, tf32);
        assert_eq!(c.tf32, tf32);
        assert_eq!(c.errors, ["aten::mm: boom"]);
        assert_eq!((c.events_seen, c.flops.elementwise_flops), (1, 4));
        assert!(!c.is_complete());
    }

    #[test]
    fn unknown_ops_are_listed_unless_covered() {
        let c = counts(
            "1\t0\tF\taten::frobnicate\tTFloat@cpu[4]\n\
             1\t0\tF\taten::mul\tTFloat@cpu[4];TFloat@cpu[4]\n\
             1\t1\tF\taten::frobnicate\tTFloat@cpu[4]\n\
             1\t0\tF\tprim::Weird\t\n",
        );
        assert_eq!(c.flops.elementwise_flops, 4);
        assert_eq!(c.unknown_ops.get("aten::frobnicate"), Some(&1));
        assert_eq!(c.unknown_ops.get("prim::Weird"), Some(&1));
        assert!(!c.is_complete());
    }

    #[test]
    fn threads_nest_independently_and_backward_is_marked() {
        let c = counts(
            "1\t0\tF\taten::mm\tTFloat@cpu[2,2];TFloat@cpu[2,2]\n\
             2\t0\tF\tautograd::engine::evaluate_function: MmBackward0\t\n\
             2\t1\tB\tMmBackward0\tTFloat@cpu[2,2]\n\
             2\t2\tF\taten::mm\tTFloat@cpu[2,2];TFloat@cpu[2,2]\n\
             1\t1\tF\taten::mm\tTFloat@cpu[2,2];TFloat@cpu[2,2]\n",
        );
        assert_eq!(c.records.len(), 2, "the nested thread-1 mm is covered");
        assert!(!c.records[0].backward);
        assert!(c.records[1].backward);
        assert_eq!(c.records[1].thread, 2);
    }

    #[test]
    fn a_ruled_ops_inner_composite_or_unknown_frame_stays_covered() {
        // mm (ruled) → matmul (composite) → mul; mm → frobnicate (no rule) → add: both
        // inner ops run inside the mm's kernel, so only the mm counts.
        let c = counts(
            "1\t0\tF\taten::mm\tTFloat@cpu[2,2];TFloat@cpu[2,2]\n\
             1\t1\tF\taten::matmul\tTFloat@cpu[2,2];TFloat@cpu[2,2]\n\
             1\t2\tF\taten::mul\tTFloat@cpu[2,2];TFloat@cpu[2,2]\n\
             1\t1\tF\taten::frobnicate\tTFloat@cpu[2,2]\n\
             1\t2\tF\taten::add\tTFloat@cpu[2,2];TFloat@cpu[2,2]\n",
        );
        assert_eq!(c.records.len(), 1, "{:?}", c.records);
        assert_eq!((c.flops.matmul_flops, c.flops.elementwise_flops), (16, 0));
        assert!(c.is_complete(), "{:?}", c.unknown_ops);
    }

    #[test]
    fn an_autograd_frame_written_as_forward_is_bookkeeping_not_an_unknown_op() {
        let c = counts("2\t0\tF\tautograd::engine::evaluate_function: MmBackward0\t\n");
        assert!(c.is_complete(), "{:?}", c.unknown_ops);
    }
}
