//! Liveness of a layer's activations: which tensors are allocated at each point of the
//! vendor code, and the high-water mark of their bytes (`peak_activation_bytes`).
//!
//! The rule (docs/memory.md, "Peak activation memory"): a tensor is live from the op that
//! allocates it until the vendor's Python drops its last reference — a temporary right
//! after the op that consumes it, a local when it is reassigned or the function returns —
//! which the layers say with [`crate::metrics::CostBuilder::release`]. Views allocate
//! nothing and keep their base alive; in-place ops write into their argument. A sub-layer
//! is a call: its own peak sits on top of what its caller holds, and what it returns (its
//! output) and keeps (new KV-cache tensors) stays allocated after it. Kernel scratch and
//! wrapped scalars, which no op list names, are not modelled.
//!
//! Beside that peak, [`Peak::allocator_peak_bytes`] adds the temporaries an op allocates
//! inside itself and frees before it returns, where the conventions name them
//! ([`crate::conventions::converted_input_bytes`]: `softmax(x, dtype=float32)` of bf16 or
//! fp16 scores converts them first): not an op output, so outside `peak_activation_bytes`
//! on both sides, but memory the device must have (the memory pre-check's figure).
//!
//! Every size is tracked twice: as the tensor's bytes (the CPU allocator) and as its CUDA
//! caching-allocator block ([`crate::allocator::cuda_round_size`]).

use std::cell::RefCell;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::conventions::StorageId;
use crate::error::{Error, Result};

/// The memory footprint of one call, in bytes above the level at its start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Peak {
    /// High-water mark of the live bytes the call allocated.
    pub peak_bytes: u64,
    /// Bytes of what the call returns, still allocated after it (its caller may free it).
    pub returned_bytes: u64,
    /// Bytes the call leaves allocated for later calls (new KV-cache tensors).
    pub kept_bytes: u64,
    /// `peak_bytes` with each op's named temporaries live while it runs (the module docs):
    /// the high-water mark the allocator sees, kernel scratch and wrapped scalars aside.
    /// Not in reports: no metric compares it (the `peak_activation_bytes` row's note
    /// shows it beside the allocator's own peak).
    #[serde(skip)]
    pub allocator_peak_bytes: u64,
}

impl Peak {
    /// True for an op leaf's (all zero).
    pub fn is_empty(&self) -> bool {
        *self == Peak::default()
    }

    /// `n` calls one after another, each keeping its output: the last call's peak on
    /// top of the n − 1 outputs before it (the routed experts' outputs, kept for a `cat`).
    pub fn repeated(self, n: u64, what: &str) -> Result<Peak> {
        if n == 0 {
            return Ok(Peak::default());
        }
        let overflow = || Error::overflow(format!("peak activation bytes of {n} calls of {what}"));
        let each = self
            .returned_bytes
            .checked_add(self.kept_bytes)
            .ok_or_else(overflow)?;
        Ok(Peak {
            peak_bytes: each
                .checked_mul(n - 1)
                .and_then(|b| b.checked_add(self.peak_bytes))
                .ok_or_else(overflow)?,
            allocator_peak_bytes: each
                .checked_mul(n - 1)
                .and_then(|b| b.checked_add(self.allocator_peak_bytes))
                .ok_or_else(overflow)?,
            returned_bytes: self.returned_bytes.checked_mul(n).ok_or_else(overflow)?,
            kept_bytes: self.kept_bytes.checked_mul(n).ok_or_else(overflow)?,
        })
    }
}

/// A size as each allocator sees it: `[tensor bytes, CUDA block bytes]`.
pub(crate) type Sizes = [u64; 2];

#[derive(Clone, Copy, Debug)]
struct Allocation {
    sizes: Sizes,
    live: bool,
}

/// Builder ids, unique in the process (a `TensorMeta` may cross threads): each thread
/// takes a block of [`ID_BLOCK`] ids at a time from this counter and hands them out
/// itself, so evaluations on many threads do not contend for one cache line.
static NEXT_BLOCK: AtomicU64 = AtomicU64::new(1);

/// Ids per block a thread takes from [`NEXT_BLOCK`].
const ID_BLOCK: u64 = 1 << 16;

thread_local! {
    /// This thread's next id and the end of its block.
    static IDS: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
}

/// A builder id no other builder in the process has.
fn next_builder() -> NonZeroU64 {
    let id = IDS.with(|ids| {
        let (mut next, mut end) = ids.get();
        if next == end {
            next = NEXT_BLOCK.fetch_add(ID_BLOCK, Ordering::Relaxed);
            end = next + ID_BLOCK;
        }
        ids.set((next + 1, end));
        next
    });
    NonZeroU64::new(id).expect("ids start at 1 and 2^64 are never made")
}

/// The growable parts of a [`Liveness`], handed from one builder to the next on the
/// same thread: a layer evaluation makes a dozen builders, and design-space sweeps
/// evaluate layers millions of times, so their buffers are reused, not reallocated.
#[derive(Debug, Default)]
struct Buffers {
    allocations: Vec<Allocation>,
    returned: Vec<Option<StorageId>>,
    kept: Vec<Option<StorageId>>,
}

thread_local! {
    /// Buffers of finished builders, ready for the next ones.
    static SPARE: RefCell<Vec<Buffers>> = const { RefCell::new(Vec::new()) };
}

/// At most this many spare [`Buffers`] per thread (more than builders ever nest).
const SPARE_LIMIT: usize = 32;

/// The allocations of one cost builder, in op order, and what its call returns and keeps.
#[derive(Debug)]
pub(crate) struct Liveness {
    builder: NonZeroU64,
    /// `allocations`: in op order; `returned`: what the call returns (see
    /// [`Liveness::returns`]); `kept`: its own allocations it leaves allocated.
    buffers: Buffers,
    /// Whether the call said what it returns.
    returns_said: bool,
    live: Sizes,
    peak: Sizes,
    /// `peak` with the ops' temporaries ([`Liveness::temporary`]) and the sub-layers'.
    allocator_peak: Sizes,
    /// Bytes kept by sub-layers (KV cache): live until the end, never released here.
    kept: Sizes,
}

impl Drop for Liveness {
    fn drop(&mut self) {
        let mut buffers = std::mem::take(&mut self.buffers);
        buffers.allocations.clear();
        buffers.returned.clear();
        buffers.kept.clear();
        // During thread teardown the spares may be gone already: then the buffers go too.
        let _ = SPARE.try_with(|spare| {
            let mut spare = spare.borrow_mut();
            if spare.len() < SPARE_LIMIT {
                spare.push(buffers);
            }
        });
    }
}

fn add(a: Sizes, b: Sizes) -> Result<Sizes> {
    let overflow = || Error::overflow("live activation bytes");
    Ok([
        a[0].checked_add(b[0]).ok_or_else(overflow)?,
        a[1].checked_add(b[1]).ok_or_else(overflow)?,
    ])
}

fn max(a: Sizes, b: Sizes) -> Sizes {
    [a[0].max(b[0]), a[1].max(b[1])]
}

impl Liveness {
    pub(crate) fn new() -> Liveness {
        let buffers = SPARE
            .try_with(|spare| spare.borrow_mut().pop())
            .ok()
            .flatten()
            .unwrap_or_else(|| Buffers {
                // Most layers allocate fewer than 32 tensors: one allocation, no regrowth.
                allocations: Vec::with_capacity(32),
                ..Buffers::default()
            });
        Liveness {
            builder: next_builder(),
            buffers,
            returns_said: false,
            live: [0, 0],
            peak: [0, 0],
            allocator_peak: [0, 0],
            kept: [0, 0],
        }
    }

    /// A tensor of `sizes` is allocated now.
    pub(crate) fn allocate(&mut self, sizes: Sizes) -> Result<StorageId> {
        self.live = add(self.live, sizes)?;
        self.peak = max(self.peak, self.live);
        self.allocator_peak = max(self.allocator_peak, self.live);
        let allocations = &mut self.buffers.allocations;
        allocations.push(Allocation { sizes, live: true });
        Ok(StorageId {
            builder: self.builder,
            index: allocations.len() - 1,
        })
    }

    /// The op that just allocated its outputs also holds a temporary of `sizes` while it
    /// runs, freed before it returns: it counts in the allocator's peak only.
    pub(crate) fn temporary(&mut self, sizes: Sizes) -> Result<()> {
        self.allocator_peak = max(self.allocator_peak, add(self.live, sizes)?);
        Ok(())
    }

    /// Whether `id` is one of this builder's allocations and still live.
    pub(crate) fn is_live(&self, id: Option<StorageId>) -> bool {
        id.filter(|id| id.builder == self.builder)
            .and_then(|id| self.buffers.allocations.get(id.index))
            .is_some_and(|a| a.live)
    }

    /// The allocation `id` is freed now. A tensor this builder did not allocate (the
    /// layer's input, a cast that changed nothing, a tensor of no builder) is not its to
    /// free and is skipped; releasing an allocation twice is a modelling mistake, an
    /// error naming `layer` and the tensor `tensor()` describes.
    pub(crate) fn release(
        &mut self,
        id: Option<StorageId>,
        layer: &str,
        tensor: impl FnOnce() -> String,
    ) -> Result<()> {
        let Some(id) = id.filter(|id| id.builder == self.builder) else {
            return Ok(());
        };
        let a = self
            .buffers
            .allocations
            .get_mut(id.index)
            .filter(|a| a.live)
            .ok_or_else(|| Error::op_shape(layer, format!("{} is released twice", tensor())))?;
        a.live = false;
        self.live = [self.live[0] - a.sizes[0], self.live[1] - a.sizes[1]];
        Ok(())
    }

    /// A sub-layer call with footprints `peak` (bytes, CUDA blocks) that returns tensors
    /// of `returned` sizes: its peak on top of what is live now; afterwards its kept
    /// bytes stay and each returned tensor is a new allocation of this builder, handed to
    /// `held` in order (`None` for one that holds nothing the call allocated).
    pub(crate) fn call(
        &mut self,
        peak: [Peak; 2],
        returned: &[Sizes],
        mut held: impl FnMut(Option<StorageId>),
    ) -> Result<()> {
        let during = add(self.live, [peak[0].peak_bytes, peak[1].peak_bytes])?;
        self.peak = max(self.peak, during);
        let allocator = [peak[0].allocator_peak_bytes, peak[1].allocator_peak_bytes];
        self.allocator_peak = max(self.allocator_peak, add(self.live, allocator)?);
        let kept = [peak[0].kept_bytes, peak[1].kept_bytes];
        self.kept = add(self.kept, kept)?;
        self.live = add(self.live, kept)?;
        for &sizes in returned {
            held(if sizes == [0, 0] {
                None
            } else {
                Some(self.allocate(sizes)?)
            });
        }
        Ok(())
    }

    /// The call returns the tensors held by `ids` (replacing what it said before).
    pub(crate) fn returns(&mut self, ids: impl IntoIterator<Item = Option<StorageId>>) {
        self.buffers.returned.clear();
        self.buffers.returned.extend(ids);
        self.returns_said = true;
    }

    /// The call leaves the tensors held by `ids` allocated (as well as those said before).
    pub(crate) fn keeps(&mut self, ids: impl IntoIterator<Item = Option<StorageId>>) {
        self.buffers.kept.extend(ids);
    }

    /// The footprints of the finished call (bytes, CUDA blocks): it returns what
    /// [`Liveness::returns`] said and keeps what [`Liveness::keeps`] said (its own
    /// allocations); every other local is freed on return. When it never said what it
    /// returns, everything still live counts as returned. Also each returned tensor's
    /// sizes, in order (one entry for all of them when it never said).
    pub(crate) fn finish(&self) -> ([Peak; 2], Vec<Sizes>) {
        let Buffers {
            allocations,
            returned: returned_ids,
            kept: kept_ids,
        } = &self.buffers;
        // Each allocation counts once, however many of the tensors it holds are named:
        // the kept ones first, then the returned ones, each unless named before.
        let named = |i: usize| match i.checked_sub(kept_ids.len()) {
            None => kept_ids[i],
            Some(r) => returned_ids[r],
        };
        let size_of = |i: usize| -> Sizes {
            let id = named(i);
            match id {
                Some(own) if self.is_live(id) && (0..i).all(|j| named(j) != id) => {
                    allocations[own.index].sizes
                }
                _ => [0, 0],
            }
        };
        let kept_own = (0..kept_ids.len()).fold([0, 0], |t, i| {
            let s = size_of(i);
            [t[0] + s[0], t[1] + s[1]]
        });
        let kept = [self.kept[0] + kept_own[0], self.kept[1] + kept_own[1]];
        let parts: Vec<Sizes> = if self.returns_said {
            (kept_ids.len()..kept_ids.len() + returned_ids.len())
                .map(size_of)
                .collect()
        } else {
            vec![[self.live[0] - kept[0], self.live[1] - kept[1]]]
        };
        let returned = parts.iter().fold([0, 0], |t, s| [t[0] + s[0], t[1] + s[1]]);
        let peaks = [0, 1].map(|i| Peak {
            peak_bytes: self.peak[i],
            allocator_peak_bytes: self.allocator_peak[i],
            returned_bytes: returned[i],
            kept_bytes: kept[i],
        });
        (peaks, parts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_ids_are_unique_across_threads() {
        // A fixed count, not one derived from ID_BLOCK (a block of 0 or 1 ids would make
        // a derived count vacuous): each thread crosses at least one block boundary.
        let per_thread: u64 = 100_000;
        assert!(per_thread > ID_BLOCK, "crosses a block");
        let ids: Vec<u64> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(move || {
                        (0..per_thread)
                            .map(|_| next_builder().get())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        let unique: std::collections::HashSet<u64> = ids.iter().copied().collect();
        assert_eq!(ids.len() as u64, 4 * per_thread);
        assert_eq!(unique.len(), ids.len());
    }

    #[test]
    fn peak_is_the_high_water_mark_of_live_allocations() {
        let mut l = Liveness::new();
        let a = l.allocate([10, 512]).unwrap();
        let b = l.allocate([20, 512]).unwrap();
        l.release(Some(a), "L", || "a".into()).unwrap();
        let c = l.allocate([5, 512]).unwrap();
        // Said twice, the last word counts: `b` is freed on return, `c` returned.
        l.returns([Some(b), Some(c)]);
        l.returns([Some(c)]);
        let ([bytes, blocks], parts) = l.finish();
        assert_eq!(parts, vec![[5, 512]]);
        assert_eq!(bytes.peak_bytes, 30);
        assert_eq!(blocks.peak_bytes, 1024);
        assert_eq!(bytes.returned_bytes, 5);
        assert!(
            l.release(Some(a), "L", || "a".into()).is_err(),
            "released twice"
        );
        l.release(None, "L", || "an input".into()).unwrap();
        // Another builder with allocations of its own at the same indexes: `b` is not
        // one of them, and releasing it there neither fails nor frees anything.
        let mut other = Liveness::new();
        let own = [
            other.allocate([1, 512]).unwrap(),
            other.allocate([2, 512]).unwrap(),
        ];
        assert!(!other.is_live(Some(b)), "another builder's tensor");
        other.release(Some(b), "L", || "b".into()).unwrap();
        assert!(l.is_live(Some(b)), "not freed by another builder");
        assert!(own.iter().all(|&id| other.is_live(Some(id))));
    }

    #[test]
    fn a_call_sits_on_top_of_what_its_caller_holds() {
        let mut l = Liveness::new();
        let _x = l.allocate([100, 512]).unwrap();
        let child = Peak {
            peak_bytes: 50,
            returned_bytes: 8,
            kept_bytes: 4,
            allocator_peak_bytes: 70,
        };
        let mut out = Vec::new();
        l.call([child, child], &[[8, 512]], |s| out.push(s))
            .unwrap();
        assert_eq!(out.len(), 1);
        l.returns(out);
        let ([bytes, _], _) = l.finish();
        assert_eq!(bytes.peak_bytes, 150);
        assert_eq!(
            bytes.allocator_peak_bytes, 170,
            "the child's temporaries too"
        );
        assert_eq!(bytes.returned_bytes, 8);
        assert_eq!(bytes.kept_bytes, 4, "the child's KV cache stays");
    }

    /// An op's temporary sits on top of what is live when it runs, its own outputs
    /// included, and only in the allocator's peak.
    #[test]
    fn a_temporary_counts_in_the_allocators_peak_only() {
        let mut l = Liveness::new();
        let input = l.allocate([10, 512]).unwrap();
        let out = l.allocate([40, 512]).unwrap();
        l.temporary([40, 512]).unwrap();
        l.release(Some(input), "L", || "input".into()).unwrap();
        let _cast = l.allocate([20, 512]).unwrap();
        l.release(Some(out), "L", || "out".into()).unwrap();
        let ([bytes, blocks], _) = l.finish();
        assert_eq!(bytes.peak_bytes, 60, "out and its cast");
        assert_eq!(
            bytes.allocator_peak_bytes, 90,
            "input, out and the temporary"
        );
        assert_eq!(blocks.allocator_peak_bytes, 3 * 512);
        // Smaller than what is live later: the peak is the later one.
        let mut l = Liveness::new();
        let _a = l.allocate([10, 512]).unwrap();
        l.temporary([5, 512]).unwrap();
        let _b = l.allocate([10, 512]).unwrap();
        assert_eq!(l.finish().0[0].allocator_peak_bytes, 20);
    }

    #[test]
    fn repeated_calls_keep_each_output() {
        let p = Peak {
            peak_bytes: 30,
            returned_bytes: 10,
            kept_bytes: 0,
            allocator_peak_bytes: 45,
        };
        let three = p.repeated(3, "expert").unwrap();
        assert_eq!(three.peak_bytes, 50);
        assert_eq!(three.allocator_peak_bytes, 65);
        assert_eq!(three.returned_bytes, 30);
        assert_eq!(p.repeated(0, "expert").unwrap(), Peak::default());
        // What each call keeps (a KV cache) stays too: under the last call's peak are the
        // two earlier calls' outputs and caches, 2 · (10 + 4); and all three caches stay.
        let caching = Peak { kept_bytes: 4, ..p };
        assert_eq!(
            caching.repeated(3, "layer").unwrap(),
            Peak {
                peak_bytes: 30 + 2 * (10 + 4),
                returned_bytes: 30,
                kept_bytes: 12,
                allocator_peak_bytes: 45 + 2 * (10 + 4),
            }
        );
    }

    /// A tensor named both kept and returned, or twice, counts once; a named tensor already
    /// freed counts nothing; a call that never said what it returns returns whatever is
    /// still live but kept. Sizes by hand.
    #[test]
    fn each_allocation_counts_once_and_only_while_live() {
        let mut l = Liveness::new();
        let cache = l.allocate([7, 512]).unwrap();
        let out = l.allocate([3, 512]).unwrap();
        let freed = l.allocate([100, 512]).unwrap();
        l.release(Some(freed), "L", || "freed".into()).unwrap();
        l.keeps([Some(cache)]);
        l.returns([Some(out), Some(cache), Some(out), Some(freed)]);
        let ([bytes, blocks], parts) = l.finish();
        assert_eq!(parts, vec![[3, 512], [0, 0], [0, 0], [0, 0]]);
        assert_eq!((bytes.kept_bytes, bytes.returned_bytes), (7, 3));
        assert_eq!((blocks.kept_bytes, blocks.returned_bytes), (512, 512));
        assert_eq!(bytes.peak_bytes, 110);

        // Returns never said: the live bytes less the kept ones, as one part.
        let mut l = Liveness::new();
        let cache = l.allocate([7, 512]).unwrap();
        let _out = l.allocate([3, 1024]).unwrap();
        l.keeps([Some(cache)]);
        let ([bytes, blocks], parts) = l.finish();
        assert_eq!(parts, vec![[3, 1024]]);
        assert_eq!((bytes.returned_bytes, blocks.returned_bytes), (3, 1024));
        assert_eq!((bytes.kept_bytes, blocks.kept_bytes), (7, 512));
    }
}
