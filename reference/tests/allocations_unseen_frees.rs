//! What the CPU allocator reports for a block it did not see allocated. Its own test
//! binary (one process, one test): the answer depends on what c10's CPU reporter learnt
//! in earlier regions of the process, so no other test may open regions first.

use modelmeter_reference::allocations::measure;
use tch::{Device, Kind, Tensor};

#[test]
fn cpu_free_of_a_block_allocated_outside_any_region_is_not_reported() {
    // No region has run in this process yet, so c10 never learnt this block's size, and
    // a free of unknown size is not reported at all (c10 logs a warning instead). Its
    // free is invisible: neither a free nor a pre-region free.
    let before = Tensor::ones([10, 10], (Kind::Float, Device::Cpu));
    let (_, allocs) = measure(|| drop(before)).unwrap();
    assert!(allocs.events.is_empty(), "{:?}", allocs.events);
    assert_eq!(allocs.device(Device::Cpu).pre_region_frees, 0);
}
