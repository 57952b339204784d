//! The allocation observer: open a region around some libtorch work, get back every
//! allocation and free libtorch's allocators reported in it (CPU and CUDA), with sizes,
//! devices, running totals and the region's peak.
//!
//! ```
//! # fn main() -> modelmeter_reference::Result<()> {
//! use modelmeter_reference::allocations::AllocationRegion;
//! let opts = (tch::Kind::Float, tch::Device::Cpu);
//! let (a, b) = (tch::Tensor::ones([64, 32], opts), tch::Tensor::ones([32, 16], opts));
//! let region = AllocationRegion::start()?;
//! let c = a.f_mm(&b)?;
//! let allocations = region.finish()?;
//! let cpu = allocations.device(tch::Device::Cpu);
//! assert_eq!(cpu.allocated_bytes, 64 * 16 * 4);
//! assert_eq!(cpu.live_at_end_bytes, 64 * 16 * 4); // `c` is still alive
//! # drop(c); Ok(()) }
//! ```
//!
//! How it sees allocations: libtorch's allocators report each allocation and free to the
//! object in the calling thread's `PROFILER_STATE` debug-info slot
//! (`c10::reportMemoryUsageToProfiler`); the shim `csrc/alloc_observer.cpp` puts a recorder
//! there while a region is open. What follows from that (docs/memory.md):
//! - the CPU allocator reports the bytes requested (no alignment padding), only while the
//!   recorder asks for memory profiling; zero-byte tensors allocate nothing;
//! - the CUDA caching allocator reports its block sizes, rounded as in
//!   [`cuda_round_size`];
//! - reports come from the thread that allocates or frees. The slot travels to the
//!   autograd engine's threads (backward) but not to `at::parallel_for` workers, whose
//!   own allocations (rare: kernels allocate their outputs before going parallel) are
//!   invisible;
//! - a free of a block allocated before the region is counted apart
//!   ([`DeviceAllocations::pre_region_frees`]). On the CPU libtorch reports such a free
//!   only when the block was itself allocated under a recorder (an earlier region):
//!   frees of blocks allocated with no region open are invisible there.
//!
//! Regions nest and may overlap on one thread: each sees every report made between its
//! own start and finish, whatever other regions open or close meanwhile. A region is
//! bound to the thread that opened it (it is not `Send`). It is independent of the FLOP
//! counter's region ([`crate::FlopCounter`]): both can be open around the same forward.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::marker::PhantomData;

use serde::{Serialize, Serializer};

use crate::error::{Error, Result};
use crate::ffi::{AllocRecorder, RawAllocEvent};

pub use modelmeter::allocator::{cuda_round_size, CUDA_MIN_BLOCK_SIZE, CUDA_SMALL_SIZE};

/// The device of an allocation, as libtorch's allocator named it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MemoryDevice {
    Cpu,
    Cuda(u16),
    /// Any other `c10::DeviceType` (its number) and index (-1: none).
    Other {
        device_type: i16,
        index: i16,
    },
}

impl MemoryDevice {
    /// The allocator device of a libtorch device.
    pub fn of(device: tch::Device) -> MemoryDevice {
        match device {
            tch::Device::Cpu => MemoryDevice::Cpu,
            // c10 device indices are 8-bit, so this never truncates.
            tch::Device::Cuda(i) => MemoryDevice::Cuda(i as u16),
            tch::Device::Mps => MemoryDevice::Other {
                device_type: 13,
                index: -1,
            },
            tch::Device::Vulkan => MemoryDevice::Other {
                device_type: 10,
                index: -1,
            },
        }
    }

    fn from_raw(device_type: i16, index: i16) -> MemoryDevice {
        match (device_type, u16::try_from(index)) {
            (0, _) => MemoryDevice::Cpu,
            (1, Ok(i)) => MemoryDevice::Cuda(i),
            _ => MemoryDevice::Other { device_type, index },
        }
    }
}

impl fmt::Display for MemoryDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryDevice::Cpu => write!(f, "cpu"),
            MemoryDevice::Cuda(i) => write!(f, "cuda:{i}"),
            MemoryDevice::Other { device_type, index } => {
                write!(f, "device_type{device_type}:{index}")
            }
        }
    }
}

impl Serialize for MemoryDevice {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What an allocator reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Allocation,
    Free,
    /// An allocation that failed for want of memory (`bytes` were requested).
    OutOfMemory,
}

/// What the op outputs of a region allocated on one device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OutputFootprint {
    /// Bytes of the allocations that made op outputs.
    pub bytes: u64,
    /// How many allocations those were.
    pub count: u64,
    /// High-water mark of their live bytes (kernel scratch and wrapped scalars left
    /// out): the measured side of `peak_activation_bytes`.
    pub peak_live_bytes: u64,
}

/// One report of a libtorch allocator, in the order the reports arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct AllocationEvent {
    pub kind: EventKind,
    /// The block's address (0 for [`EventKind::OutOfMemory`]).
    pub address: u64,
    /// The block's bytes as the allocator reports them: requested bytes on the CPU, the
    /// rounded block on CUDA.
    pub bytes: u64,
    pub device: MemoryDevice,
    /// `at::RecordFunction::currentThreadId()` of the thread that allocated or freed.
    pub thread: u64,
    /// The clock shared with the op observer when the report arrived: orders allocations
    /// against op ends (`OpOutput::sequence`).
    pub sequence: u64,
    /// The allocator's own running total of allocated bytes after the event. On CUDA:
    /// all live blocks of the device. On the CPU: only blocks allocated while some
    /// recorder asked for profiling (c10's profiled CPU reporter), so not the process's
    /// total.
    pub total_allocated: u64,
    /// The allocator's reserved bytes (CUDA: segments held from the driver; CPU: 0).
    pub total_reserved: u64,
}

impl AllocationEvent {
    fn from_raw(raw: &RawAllocEvent) -> AllocationEvent {
        let kind = match (raw.kind, raw.bytes < 0) {
            (1, _) => EventKind::OutOfMemory,
            (_, true) => EventKind::Free,
            (_, false) => EventKind::Allocation,
        };
        AllocationEvent {
            kind,
            address: raw.address,
            bytes: raw.bytes.unsigned_abs(),
            device: MemoryDevice::from_raw(raw.device_type, raw.device_index),
            thread: raw.thread,
            sequence: raw.sequence,
            total_allocated: raw.total_allocated,
            total_reserved: raw.total_reserved,
        }
    }
}

/// What a region saw on one device. Byte counts are as the allocator reports them (see
/// [`AllocationEvent::bytes`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DeviceAllocations {
    /// Allocations made in the region, and their bytes.
    pub allocations: u64,
    pub allocated_bytes: u64,
    /// Frees of blocks allocated in the region, and their bytes.
    pub frees: u64,
    pub freed_bytes: u64,
    /// High-water mark of the bytes of blocks allocated in the region and still live:
    /// what the region needed at once above its starting level, ignoring pre-region frees.
    pub peak_live_bytes: u64,
    /// Blocks allocated in the region still live at its end (`allocated − freed`).
    pub live_at_end_bytes: u64,
    /// Frees of blocks allocated before the region (their bytes as the allocator
    /// reported them). On the CPU only blocks that c10 saw allocated under a recorder.
    pub pre_region_frees: u64,
    pub pre_region_freed_bytes: u64,
    /// High-water mark of the net change since the start, pre-region frees included
    /// (they make room): `max(0, max over time of Σ allocated − Σ freed)`.
    pub peak_net_bytes: u64,
    /// Allocations that failed for want of memory, and the bytes they asked for.
    pub out_of_memory: u64,
    pub out_of_memory_bytes: u64,
}

/// Everything a region saw.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Allocations {
    /// Per device, in device order.
    pub devices: BTreeMap<MemoryDevice, DeviceAllocations>,
    /// Every report, in arrival order.
    pub events: Vec<AllocationEvent>,
    /// Inconsistencies and lost reports; any entry makes the numbers incomplete.
    pub errors: Vec<String>,
}

impl Allocations {
    /// The bookkeeping of a region from its reports, in arrival order.
    pub fn from_events(events: Vec<AllocationEvent>) -> Allocations {
        let mut devices: BTreeMap<MemoryDevice, DeviceAllocations> = BTreeMap::new();
        let mut live: HashMap<(MemoryDevice, u64), u64> = HashMap::new();
        // Current live and net bytes per device (net may go below the start).
        let mut level: BTreeMap<MemoryDevice, (u64, i128)> = BTreeMap::new();
        let mut errors = Vec::new();
        let mut overflow = false;
        let mut add = |total: &mut u64, bytes: u64| match total.checked_add(bytes) {
            Some(t) => *total = t,
            None => overflow = true,
        };
        for e in &events {
            let d = devices.entry(e.device).or_default();
            let (live_now, net) = level.entry(e.device).or_default();
            match e.kind {
                EventKind::Allocation => {
                    if let Some(old) = live.insert((e.device, e.address), e.bytes) {
                        errors.push(format!(
                            "{}: block {:#x} allocated again ({} bytes) while live ({old} bytes)",
                            e.device, e.address, e.bytes
                        ));
                        *live_now -= old;
                    }
                    d.allocations += 1;
                    add(&mut d.allocated_bytes, e.bytes);
                    add(live_now, e.bytes);
                    *net += i128::from(e.bytes);
                }
                EventKind::Free => match live.remove(&(e.device, e.address)) {
                    Some(size) => {
                        if size != e.bytes {
                            errors.push(format!(
                                "{}: block {:#x} allocated with {size} bytes, freed with {}",
                                e.device, e.address, e.bytes
                            ));
                        }
                        d.frees += 1;
                        add(&mut d.freed_bytes, size);
                        *live_now -= size;
                        *net -= i128::from(size);
                    }
                    None => {
                        d.pre_region_frees += 1;
                        add(&mut d.pre_region_freed_bytes, e.bytes);
                        *net -= i128::from(e.bytes);
                    }
                },
                EventKind::OutOfMemory => {
                    d.out_of_memory += 1;
                    add(&mut d.out_of_memory_bytes, e.bytes);
                }
            }
            d.peak_live_bytes = d.peak_live_bytes.max(*live_now);
            let net = u64::try_from(*net).unwrap_or(if *net < 0 { 0 } else { u64::MAX });
            d.peak_net_bytes = d.peak_net_bytes.max(net);
        }
        for (device, (live_now, _)) in level {
            if let Some(d) = devices.get_mut(&device) {
                d.live_at_end_bytes = live_now;
            }
        }
        if overflow {
            errors.push("allocated bytes overflow 64-bit integers".into());
        }
        Allocations {
            devices,
            events,
            errors,
        }
    }

    /// What the region saw on `device` (all zero when nothing was reported there).
    pub fn device(&self, device: tch::Device) -> DeviceAllocations {
        self.devices
            .get(&MemoryDevice::of(device))
            .copied()
            .unwrap_or_default()
    }

    /// The allocations on `device` that made op outputs: for each output block, the
    /// latest allocation of that address before its op ended. What is left of
    /// `allocated_bytes` is transient: scratch inside kernels, wrapped scalars.
    pub fn output_footprint(
        &self,
        device: tch::Device,
        outputs: &[crate::counter::OutputBlock],
    ) -> OutputFootprint {
        let device = MemoryDevice::of(device);
        let mut latest: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
        for e in &self.events {
            if e.kind == EventKind::Allocation && e.device == device {
                latest
                    .entry(e.address)
                    .or_default()
                    .push((e.sequence, e.bytes));
            }
        }
        let mut used = std::collections::BTreeSet::new();
        let mut footprint = OutputFootprint::default();
        for o in outputs {
            let Some(allocs) = latest.get(&o.address) else {
                continue;
            };
            let made = allocs
                .iter()
                .filter(|(seq, _)| *seq < o.ended_at)
                .max_by_key(|(seq, _)| *seq);
            if let Some(&(seq, size)) = made {
                if used.insert(seq) {
                    footprint.bytes = footprint.bytes.saturating_add(size);
                    footprint.count += 1;
                }
            }
        }
        // Replay the region: the live bytes of those allocations, event by event.
        let (mut live, mut blocks) = (0u64, BTreeMap::new());
        for e in self.events.iter().filter(|e| e.device == device) {
            match e.kind {
                EventKind::Allocation if used.contains(&e.sequence) => {
                    live = live.saturating_add(e.bytes);
                    blocks.insert(e.address, e.bytes);
                    footprint.peak_live_bytes = footprint.peak_live_bytes.max(live);
                }
                EventKind::Free => {
                    if let Some(bytes) = blocks.remove(&e.address) {
                        live = live.saturating_sub(bytes);
                    }
                }
                _ => {}
            }
        }
        footprint
    }

    /// True when no report was lost and the reports were consistent.
    pub fn is_complete(&self) -> bool {
        self.errors.is_empty()
    }
}

/// The calling thread's recorder and how many regions use it.
struct ThreadRecorder {
    recorder: AllocRecorder,
    open_regions: usize,
}

/// The calling thread's recorder, if a region is open. Its own drop runs only when the
/// thread exits with a region still open (one leaked with `mem::forget`, or kept in
/// another thread-local): libtorch's thread-local state the recorder is installed in may
/// already be destroyed by then, so the recorder is leaked, never stopped from there.
struct RecorderSlot(RefCell<Option<ThreadRecorder>>);

impl Drop for RecorderSlot {
    fn drop(&mut self) {
        if let Some(thread) = self.0.get_mut().take() {
            std::mem::forget(thread);
        }
    }
}

thread_local! {
    static RECORDER: RecorderSlot = const { RecorderSlot(RefCell::new(None)) };
}

/// An open allocation region on the calling thread; [`AllocationRegion::finish`] returns
/// what it saw. Dropping it unfinished closes it too. Not `Send`: libtorch's slot is
/// thread-local, so a region is finished on the thread that opened it.
pub struct AllocationRegion {
    first_event: usize,
    dropped_at_start: u64,
    finished: bool,
    _thread_bound: PhantomData<*const ()>,
}

impl AllocationRegion {
    /// Opens a region on the calling thread. The first open region of a thread installs
    /// the recorder in libtorch's `PROFILER_STATE` slot (an error when torch's own
    /// profiler holds it); further regions share it and see the reports from their own
    /// start on.
    pub fn start() -> Result<AllocationRegion> {
        RECORDER.with(|cell| {
            let mut slot = cell.0.borrow_mut();
            if slot.is_none() {
                *slot = Some(ThreadRecorder {
                    recorder: AllocRecorder::start()?,
                    open_regions: 0,
                });
            }
            let thread = slot.as_mut().expect("installed above");
            let counted = thread.recorder.count();
            let (first_event, dropped_at_start) = match counted {
                Ok(c) => c,
                Err(e) => {
                    if thread.open_regions == 0 {
                        if let Some(t) = slot.take() {
                            let _ = t.recorder.stop();
                        }
                    }
                    return Err(e);
                }
            };
            thread.open_regions += 1;
            Ok(AllocationRegion {
                first_event,
                dropped_at_start,
                finished: false,
                _thread_bound: PhantomData,
            })
        })
    }

    /// Closes the region and does the bookkeeping of every report since its start.
    pub fn finish(mut self) -> Result<Allocations> {
        self.finished = true;
        let read = RECORDER.with(|cell| {
            let slot = cell.0.borrow();
            match slot.as_ref() {
                Some(t) => t.recorder.read(self.first_event),
                None => Err(Error::Allocations(
                    "no allocation recorder is installed on this thread".into(),
                )),
            }
        });
        let released = release_region();
        let (raw, dropped) = read?;
        released?;
        let mut allocations =
            Allocations::from_events(raw.iter().map(AllocationEvent::from_raw).collect());
        let lost = dropped.saturating_sub(self.dropped_at_start);
        if lost > 0 {
            allocations.errors.push(format!(
                "{lost} allocator reports were lost (out of memory while recording)"
            ));
        }
        Ok(allocations)
    }
}

impl Drop for AllocationRegion {
    fn drop(&mut self) {
        if !self.finished {
            let _ = release_region();
        }
    }
}

/// One region of the calling thread closed: uninstalls the recorder after the last.
fn release_region() -> Result<()> {
    // try_with: a region dropped while the thread's locals are torn down finds nothing.
    RECORDER
        .try_with(|cell| {
            let mut slot = cell.0.borrow_mut();
            let Some(thread) = slot.as_mut() else {
                return Ok(());
            };
            thread.open_regions = thread.open_regions.saturating_sub(1);
            if thread.open_regions > 0 {
                return Ok(());
            }
            match slot.take() {
                Some(t) => t.recorder.stop(),
                None => Ok(()),
            }
        })
        .unwrap_or(Ok(()))
}

/// Runs `f` inside an allocation region; the region is always closed.
pub fn measure<T>(f: impl FnOnce() -> T) -> Result<(T, Allocations)> {
    let region = AllocationRegion::start()?;
    let out = f();
    Ok((out, region.finish()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind, address: u64, bytes: u64) -> AllocationEvent {
        AllocationEvent {
            kind,
            address,
            bytes,
            device: MemoryDevice::Cpu,
            thread: 1,
            sequence: 0,
            total_allocated: 0,
            total_reserved: 0,
        }
    }
    use EventKind::{Allocation as A, Free as F};

    #[test]
    fn bookkeeping_counts_region_blocks_and_pre_region_frees() {
        let a = Allocations::from_events(vec![
            event(A, 0x10, 100),
            event(A, 0x20, 50),
            event(F, 0x10, 100),
            event(F, 0x99, 70), // allocated before the region
            event(A, 0x30, 30),
        ]);
        let d = a.device(tch::Device::Cpu);
        assert_eq!(d.allocations, 3);
        assert_eq!(d.allocated_bytes, 180);
        assert_eq!((d.frees, d.freed_bytes), (1, 100));
        assert_eq!((d.pre_region_frees, d.pre_region_freed_bytes), (1, 70));
        assert_eq!(d.peak_live_bytes, 150);
        assert_eq!(d.live_at_end_bytes, 80);
        // Net: 100, 150, 50, -20, 10 → peak 150.
        assert_eq!(d.peak_net_bytes, 150);
        assert!(a.is_complete());
        assert_eq!(a.device(tch::Device::Cuda(0)), DeviceAllocations::default());
    }

    /// A free of a region's own block takes its size off the net level too: a later
    /// allocation's net peak stands on what is left.
    #[test]
    fn the_net_peak_after_a_free_counts_from_what_is_left() {
        let a = Allocations::from_events(vec![
            event(A, 0x10, 100),
            event(A, 0x20, 50),
            event(F, 0x10, 100),
            event(A, 0x30, 200),
        ]);
        let d = a.device(tch::Device::Cpu);
        // Net and live alike: 100, 150, 50, 250.
        assert_eq!((d.peak_net_bytes, d.peak_live_bytes), (250, 250));
    }

    /// A device without an index is reported with index -1 (c10's `Device`): `of` names
    /// MPS and Vulkan devices as the allocator's reports do.
    #[test]
    fn devices_without_an_index_match_the_allocators_reports() {
        assert_eq!(
            MemoryDevice::of(tch::Device::Mps),
            MemoryDevice::from_raw(13, -1)
        );
        assert_eq!(
            MemoryDevice::of(tch::Device::Vulkan),
            MemoryDevice::from_raw(10, -1)
        );
    }

    /// Dropping a region unfinished closes it: the thread's profiler slot is free again.
    #[test]
    fn a_dropped_region_gives_the_slot_back() {
        drop(AllocationRegion::start().unwrap());
        AllocRecorder::start().unwrap().stop().unwrap();
    }

    #[test]
    fn peaks_are_per_device_and_net_peak_counts_room_made() {
        let mut cuda = event(A, 0x10, 512);
        cuda.device = MemoryDevice::Cuda(0);
        let a = Allocations::from_events(vec![
            event(F, 0x99, 1000),
            event(A, 0x10, 600),
            cuda,
            event(A, 0x20, 600),
        ]);
        let d = a.device(tch::Device::Cpu);
        assert_eq!(d.peak_live_bytes, 1200);
        assert_eq!(d.peak_net_bytes, 200, "-1000 + 600 + 600");
        let c = a.device(tch::Device::Cuda(0));
        assert_eq!((c.allocated_bytes, c.peak_live_bytes), (512, 512));
    }

    #[test]
    fn inconsistent_reports_are_errors_not_panics() {
        let a = Allocations::from_events(vec![
            event(A, 0x10, 100),
            event(A, 0x10, 40),
            event(F, 0x10, 41),
        ]);
        assert_eq!(a.errors.len(), 2, "{:?}", a.errors);
        assert!(!a.is_complete(), "inconsistent reports are not complete");
        let d = a.device(tch::Device::Cpu);
        assert_eq!(d.live_at_end_bytes, 0);
        assert_eq!(d.peak_live_bytes, 100);
        // The free takes off the block's own size (40), not the size the report names.
        assert_eq!(d.freed_bytes, 40);
        let oom = Allocations::from_events(vec![event(EventKind::OutOfMemory, 0, 1 << 40)]);
        let d = oom.device(tch::Device::Cpu);
        assert_eq!((d.out_of_memory, d.out_of_memory_bytes), (1, 1 << 40));
        assert_eq!(d.allocated_bytes, 0);
    }

    #[test]
    fn a_second_recorder_on_a_thread_is_refused_with_a_message() {
        // Real libtorch: the slot holds the region's recorder, so the shim refuses
        // another one with a message instead of stacking it, and the region goes on.
        let region = AllocationRegion::start().unwrap();
        let err = AllocRecorder::start().err().expect("the slot is taken");
        assert!(err.to_string().contains("slot is taken"), "{err}");
        let t = tch::Tensor::zeros([4], (tch::Kind::Float, tch::Device::Cpu));
        let a = region.finish().unwrap();
        assert_eq!(a.device(tch::Device::Cpu).allocated_bytes, 16);
        drop(t);
        // Closed: a new recorder may be installed again.
        AllocRecorder::start().unwrap().stop().unwrap();
    }

    #[test]
    fn devices_serialize_as_names() {
        let a = Allocations::from_events(vec![event(A, 1, 8)]);
        let json = serde_json::to_value(&a).unwrap();
        assert_eq!(json["devices"]["cpu"]["allocated_bytes"], 8);
        assert_eq!(json["events"][0]["device"], "cpu");
        assert_eq!(MemoryDevice::from_raw(1, 2).to_string(), "cuda:2");
        assert_eq!(MemoryDevice::from_raw(0, -1), MemoryDevice::Cpu);
    }

    #[test]
    fn raw_reports_are_classified_by_kind_and_sign() {
        use crate::ffi::RawAllocEvent;
        let raw = |kind, bytes| RawAllocEvent {
            address: 0x10,
            bytes,
            kind,
            device_type: 1,
            device_index: 0,
            ..RawAllocEvent::default()
        };
        let a = AllocationEvent::from_raw(&raw(0, 512));
        assert_eq!((a.kind, a.bytes), (EventKind::Allocation, 512));
        let f = AllocationEvent::from_raw(&raw(0, -512));
        assert_eq!((f.kind, f.bytes), (EventKind::Free, 512));
        let oom = AllocationEvent::from_raw(&raw(1, 1 << 30));
        assert_eq!((oom.kind, oom.bytes), (EventKind::OutOfMemory, 1 << 30));
        assert_eq!(oom.device, MemoryDevice::Cuda(0));
    }

    #[test]
    fn output_footprint_takes_each_outputs_own_allocation_once_and_replays_only_those() {
        use crate::counter::OutputBlock;
        let at = |kind, address, bytes, sequence| AllocationEvent {
            sequence,
            ..event(kind, address, bytes)
        };
        let a = Allocations::from_events(vec![
            at(A, 0x10, 100, 1), // an earlier tensor at 0x10, freed at 3
            at(A, 0x20, 7, 2),   // scratch, never an output
            at(F, 0x10, 100, 3),
            at(A, 0x10, 40, 4), // output of op 1 (ends at 5)
            at(A, 0x30, 60, 6), // output of op 2 (ends at 7)
            at(F, 0x20, 7, 8),
            at(F, 0x10, 40, 9),
            at(A, 0x10, 500, 10), // a later tensor at the same address, not an output
            at(F, 0x10, 500, 11),
            at(A, 0x40, 80, 12), // output of op 3 (ends at 13)
        ]);
        let outputs = [
            OutputBlock {
                address: 0x10,
                ended_at: 5,
            },
            OutputBlock {
                address: 0x30,
                ended_at: 7,
            },
            // A second output in the same block as op 2's (same allocation): once.
            OutputBlock {
                address: 0x30,
                ended_at: 7,
            },
            OutputBlock {
                address: 0x40,
                ended_at: 13,
            },
        ];
        let f = a.output_footprint(tch::Device::Cpu, &outputs);
        assert_eq!((f.bytes, f.count), (180, 3));
        // Live outputs: 40, 40 + 60, 60 (op 1's freed), 60 + 80; the earlier tensor, the
        // scratch and the later tensor at 0x10 are not outputs, and 0x10's second free
        // takes nothing off.
        assert_eq!(f.peak_live_bytes, 140);
    }
}
