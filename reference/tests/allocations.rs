//! The allocation observer on real libtorch allocations, against hand numbers. CPU only:
//! the CPU allocator reports the bytes each tensor asks for (numel × element size), with
//! no alignment padding.

use modelmeter_reference::allocations::{
    measure, AllocationRegion, Allocations, DeviceAllocations, EventKind,
};
use modelmeter_reference::FlopCounter;
use tch::{Device, Kind, Tensor};

const CPU: Device = Device::Cpu;
const F32: (Kind, Device) = (Kind::Float, Device::Cpu);

fn cpu(a: &Allocations) -> DeviceAllocations {
    assert!(a.is_complete(), "{:?}", a.errors);
    a.device(CPU)
}

/// Sizes of the allocations, in order.
fn allocated(a: &Allocations) -> Vec<u64> {
    a.events
        .iter()
        .filter(|e| e.kind == EventKind::Allocation)
        .map(|e| e.bytes)
        .collect()
}

#[test]
fn mm_allocates_exactly_its_output() {
    let (a, b) = (Tensor::ones([64, 32], F32), Tensor::ones([32, 16], F32));
    let _ = a.mm(&b); // warm-up: first-call initialisation allocates nothing later
    let (c, allocs) = measure(|| a.mm(&b)).unwrap();
    assert_eq!(allocated(&allocs), [64 * 16 * 4]);
    let d = cpu(&allocs);
    assert_eq!(d.allocations, 1);
    assert_eq!(d.allocated_bytes, 4096);
    assert_eq!(d.live_at_end_bytes, 4096);
    assert_eq!(d.peak_live_bytes, 4096);
    assert_eq!((d.frees, d.pre_region_frees), (0, 0));
    let e = allocs.events[0];
    assert_eq!(
        e.address,
        c.data_ptr() as u64,
        "the reported block is the tensor's data"
    );
    assert_eq!(e.total_reserved, 0, "the CPU allocator reserves nothing");
    assert!(
        e.total_allocated >= 4096,
        "c10's running total includes the block"
    );
    assert_eq!(allocs.device(Device::Cuda(0)), DeviceAllocations::default());
}

#[test]
fn cat_allocates_the_concatenation_without_padding() {
    let (a, b) = (Tensor::ones([10, 4], F32), Tensor::ones([10, 4], F32));
    let (_c, allocs) = measure(|| Tensor::cat(&[&a, &b], 0)).unwrap();
    assert_eq!(allocated(&allocs), [2 * 10 * 4 * 4]);
    assert_eq!(cpu(&allocs).live_at_end_bytes, 320);

    // Odd sizes are not rounded: 3 bytes of uint8, 7 × 2 bytes of bf16.
    let (_t, allocs) = measure(|| Tensor::zeros([3], (Kind::Uint8, CPU))).unwrap();
    assert_eq!(allocated(&allocs), [3]);
    let (_t, allocs) = measure(|| Tensor::zeros([7], (Kind::BFloat16, CPU))).unwrap();
    assert_eq!(allocated(&allocs), [14]);
    // An empty tensor allocates nothing.
    let (_t, allocs) = measure(|| Tensor::zeros([0, 5], F32)).unwrap();
    assert!(allocs.events.is_empty(), "{:?}", allocs.events);
}

#[test]
fn in_place_ops_and_views_allocate_nothing() {
    let mut a = Tensor::ones([8, 8], F32);
    let b = Tensor::ones([8, 8], F32);
    let (_, allocs) = measure(|| {
        let _ = a.f_mul_(&b).unwrap();
    })
    .unwrap();
    assert!(allocs.events.is_empty(), "{:?}", allocs.events);

    let (views, allocs) = measure(|| {
        (
            a.view([64]),
            a.transpose(0, 1),
            a.narrow(0, 2, 3),
            a.unsqueeze(0),
        )
    })
    .unwrap();
    assert!(allocs.events.is_empty(), "{:?}", allocs.events);
    drop(views);
}

#[test]
fn in_place_op_with_a_scalar_allocates_and_frees_two_scalar_tensors() {
    // mul_(Scalar) wraps the scalar into a 0-dim double tensor (8 bytes), and
    // TensorIterator casts it to the float operand's dtype (4 bytes); both are freed
    // before the op returns: visible in allocated, freed and the peak, nothing left.
    let mut a = Tensor::ones([8, 8], F32);
    let (_, allocs) = measure(|| {
        let _ = a.f_mul_scalar_(2.0).unwrap();
    })
    .unwrap();
    let d = cpu(&allocs);
    assert_eq!(allocated(&allocs), [8, 4]);
    assert_eq!(
        (d.allocated_bytes, d.freed_bytes, d.live_at_end_bytes),
        (12, 12, 0)
    );
    assert_eq!(d.peak_live_bytes, 12);
}

#[test]
fn a_temporary_shows_in_allocated_freed_and_peak() {
    let x = Tensor::ones([16, 16], F32); // 1024 bytes
    let (y, allocs) = measure(|| {
        let t = &x + 1.0; // 1024, freed below (plus 8 + 4 for the scalar, freed at once)
        let y = t.sum(Kind::Float); // 4 bytes, kept
        drop(t);
        y
    })
    .unwrap();
    let d = cpu(&allocs);
    let sizes = allocated(&allocs);
    assert!(sizes.contains(&1024) && sizes.contains(&4), "{sizes:?}");
    assert_eq!(d.live_at_end_bytes, 4);
    assert_eq!(d.allocated_bytes - d.freed_bytes, 4);
    assert!(d.freed_bytes >= 1024);
    assert!(
        d.peak_live_bytes >= 1024 + 4,
        "peak {} holds the temporary and the sum",
        d.peak_live_bytes
    );
    drop(y);
}

#[test]
fn frees_of_blocks_allocated_in_an_earlier_region_are_pre_region_frees() {
    // c10's CPU reporter learnt this block's size when it was allocated under a recorder,
    // so its free in a later region is reported, with its size. (Frees of blocks
    // allocated with no recorder: tests/allocations_unseen_frees.rs.)
    let (kept, _) = measure(|| Tensor::ones([10, 10], F32)).unwrap();
    let (_, allocs) = measure(|| drop(kept)).unwrap();
    let d = cpu(&allocs);
    assert_eq!((d.pre_region_frees, d.pre_region_freed_bytes), (1, 400));
    assert_eq!((d.frees, d.freed_bytes, d.allocated_bytes), (0, 0, 0));
    assert_eq!(d.peak_net_bytes, 0, "the level only fell");
    assert_eq!(allocs.events.len(), 1);
    assert_eq!(allocs.events[0].kind, EventKind::Free);
    assert_eq!(allocs.events[0].bytes, 400);
}

#[test]
fn nested_and_overlapping_regions_each_see_their_own_span() {
    let outer = AllocationRegion::start().unwrap();
    let a = Tensor::zeros([25], F32); // 100 bytes, outer only
    let inner = AllocationRegion::start().unwrap();
    let b = Tensor::zeros([50], F32); // 200 bytes, both
    drop(a); // inner: a pre-region free; outer: a free of its own block
    let inner = inner.finish().unwrap();
    let c = Tensor::zeros([75], F32); // 300 bytes, outer only
    let outer = outer.finish().unwrap();

    let i = cpu(&inner);
    assert_eq!((i.allocated_bytes, i.live_at_end_bytes), (200, 200));
    assert_eq!((i.pre_region_frees, i.pre_region_freed_bytes), (1, 100));
    let o = cpu(&outer);
    assert_eq!(o.allocated_bytes, 600);
    assert_eq!((o.freed_bytes, o.live_at_end_bytes), (100, 500));
    assert_eq!(o.peak_live_bytes, 500);
    assert_eq!(o.pre_region_frees, 0);

    // Overlapping: the first region closes while the second is still open.
    let first = AllocationRegion::start().unwrap();
    let d = Tensor::zeros([10], F32); // 40, both
    let second = AllocationRegion::start().unwrap();
    let first = first.finish().unwrap();
    let e = Tensor::zeros([20], F32); // 80, second only
    let second = second.finish().unwrap();
    assert_eq!(cpu(&first).allocated_bytes, 40);
    assert_eq!(cpu(&second).allocated_bytes, 80);

    // All closed: nothing is recorded, and a fresh region starts clean.
    let (_, allocs) = measure(|| Tensor::zeros([5], F32)).unwrap();
    assert_eq!(allocated(&allocs), [20]);
    drop((b, c, d, e));
}

#[test]
fn a_dropped_region_closes_and_the_next_one_opens() {
    let region = AllocationRegion::start().unwrap();
    let _t = Tensor::zeros([4], F32);
    drop(region);
    let (_u, allocs) = measure(|| Tensor::zeros([8], F32)).unwrap();
    assert_eq!(allocated(&allocs), [32]);
}

#[test]
fn a_thread_that_exits_with_a_region_left_open_stops_nothing_from_its_teardown() {
    // A region leaked with mem::forget stays open until its thread exits; by then
    // libtorch's thread-local state may be gone, so the recorder is left alone (stopping
    // it there read freed memory under valgrind). Other threads measure on as before.
    std::thread::spawn(|| {
        let region = AllocationRegion::start().unwrap();
        let _t = Tensor::zeros([4], F32);
        std::mem::forget(region);
    })
    .join()
    .unwrap();
    let (_u, allocs) = measure(|| Tensor::zeros([8], F32)).unwrap();
    assert_eq!(allocated(&allocs), [32]);
}

#[test]
fn composes_with_the_flop_counter_in_either_order() {
    let (a, b) = (Tensor::ones([8, 16], F32), Tensor::ones([16, 4], F32));
    let _ = a.mm(&b);
    let allocs = AllocationRegion::start().unwrap();
    let flops = FlopCounter::start().unwrap();
    let c = a.mm(&b);
    let counts = flops.finish().unwrap();
    let allocs = allocs.finish().unwrap();
    assert_eq!(counts.flops.matmul_flops, 2 * 8 * 16 * 4);
    assert_eq!(allocated(&allocs), [8 * 4 * 4]);

    let flops = FlopCounter::start().unwrap();
    let allocs = AllocationRegion::start().unwrap();
    let d = a.mm(&b);
    let allocs = allocs.finish().unwrap();
    let counts = flops.finish().unwrap();
    assert_eq!(counts.flops.matmul_flops, 2 * 8 * 16 * 4);
    assert_eq!(allocated(&allocs), [8 * 4 * 4]);
    drop((c, d));
}

#[test]
fn other_threads_are_not_observed() {
    // The recorder lives in the opening thread's slot: a plain thread's allocations are
    // invisible (as are at::parallel_for workers'), and a region on that thread is its own.
    let (_, allocs) = measure(|| {
        std::thread::spawn(|| {
            let (t, theirs) = measure(|| Tensor::zeros([100], F32)).unwrap();
            assert_eq!(allocated(&theirs), [400]);
            drop(t);
        })
        .join()
        .unwrap();
    })
    .unwrap();
    assert!(allocs.events.is_empty(), "{:?}", allocs.events);
}

#[test]
fn backward_allocations_on_the_cpu_are_seen() {
    // A CPU-only backward runs on the calling thread (or an autograd thread carrying its
    // debug info), so its gradients are reported to the region.
    let w = Tensor::ones([4, 3], F32).set_requires_grad(true);
    let x = Tensor::ones([2, 4], F32);
    let (_, allocs) = measure(|| {
        let y = x.mm(&w).sum(Kind::Float);
        y.backward();
    })
    .unwrap();
    let d = cpu(&allocs);
    let grad_bytes = 4 * 3 * 4;
    assert!(
        d.live_at_end_bytes >= grad_bytes,
        "w.grad (48 bytes) is live at the end: {d:?}"
    );
    assert!(allocated(&allocs).contains(&grad_bytes), "{allocs:?}");
}

#[test]
fn intra_op_threads_hide_no_allocation_of_the_reference_layers() {
    // at::parallel_for workers do not carry the recorder, so an allocation made inside a
    // parallel region would be invisible. With one intra-op thread every parallel_for
    // runs inline on the calling thread; if a multi-threaded run (tensors big enough to
    // go parallel) reports the same allocations, the kernels of the reference layers
    // allocate only on the calling thread.
    use modelmeter::layers::AttentionImpl;
    use modelmeter::{Dtype, ModelConfig, Workload};
    use modelmeter_reference::harness::{ModuleKind, Prepared};
    use modelmeter_reference::Setup;

    let config = ModelConfig::deepseek_ocr();
    let workload = Workload::prefill(1, 64)
        .unwrap()
        .with_dtype(Dtype::F32)
        .unwrap();
    let setup = Setup {
        device: CPU,
        seed: 7,
    };
    let _no_grad = tch::no_grad_guard();
    let threads = tch::get_num_threads();
    for kind in [ModuleKind::DecoderLayer(0), ModuleKind::DecoderLayer(1)] {
        let run = |n: i32| {
            tch::set_num_threads(n);
            assert_eq!(tch::get_num_threads(), n);
            let mut prepared =
                Prepared::new(kind, &config, &workload, AttentionImpl::Sdpa, &setup).unwrap();
            let _ = prepared.forward().unwrap(); // warm-up
            let (out, allocs) = measure(|| prepared.forward().unwrap()).unwrap();
            drop(out);
            assert!(allocs.is_complete(), "{:?}", allocs.errors);
            let mut sizes = allocated(&allocs);
            sizes.sort_unstable();
            (sizes, allocs.device(CPU))
        };
        let (one, one_totals) = run(1);
        let (many, many_totals) = run(4);
        let label = kind.label();
        assert!(one_totals.allocations > 10, "{label}: {one_totals:?}");
        assert_eq!(one_totals.allocations, many_totals.allocations, "{label}");
        assert_eq!(one_totals.frees, many_totals.frees, "{label}");
        assert_eq!(one_totals.live_at_end_bytes, many_totals.live_at_end_bytes);
        // The one size that differs: the CPU flash-attention kernel's scratch buffer,
        // one slice per intra-op thread, allocated by the calling thread.
        let only_one: Vec<u64> = one.iter().copied().filter(|x| !many.contains(x)).collect();
        let only_many: Vec<u64> = many.iter().copied().filter(|x| !one.contains(x)).collect();
        assert_eq!(only_one.len(), 1, "{label}: {only_one:?} vs {only_many:?}");
        assert_eq!(only_many, [4 * only_one[0]], "{label}");
    }
    tch::set_num_threads(threads);
}

/// The GPU named by MODELMETER_TEST_DEVICE=cuda:N; a GPU-only test fails without it (it
/// is `#[ignore]`d, so it runs only when asked for: scripts/device-check asks).
fn test_cuda_device() -> Device {
    let name = std::env::var("MODELMETER_TEST_DEVICE").unwrap_or_default();
    let index = name.strip_prefix("cuda:").and_then(|n| n.parse().ok());
    let index = index.unwrap_or_else(|| {
        panic!("MODELMETER_TEST_DEVICE={name:?}: this test needs a GPU, set it to cuda:N")
    });
    Device::Cuda(index)
}

#[test]
#[ignore = "needs a GPU: MODELMETER_TEST_DEVICE=cuda:N cargo test -- --ignored (scripts/device-check runs it)"]
fn cuda_reports_the_caching_allocators_rounded_blocks() {
    use modelmeter_reference::allocations::{cuda_round_size, MemoryDevice, CUDA_SMALL_SIZE};
    let device = test_cuda_device();
    let opts = (Kind::Float, device);
    let (a, b) = (Tensor::ones([64, 32], opts), Tensor::ones([32, 16], opts));
    let _ = a.mm(&b); // warm-up: cuBLAS allocates its workspace on first use
    let (c, allocs) = measure(|| a.mm(&b)).unwrap();
    assert!(allocs.is_complete(), "{:?}", allocs.errors);
    assert_eq!(allocated(&allocs), [cuda_round_size(4096, 0).unwrap()]);
    let e = allocs.events[0];
    assert_eq!(e.device, MemoryDevice::of(device));
    assert_eq!(e.address, c.data_ptr() as u64);
    assert!(e.total_reserved >= e.total_allocated && e.total_allocated >= 4096);
    assert_eq!(allocs.device(CPU), DeviceAllocations::default());

    let (x, y) = (Tensor::ones([10, 4], opts), Tensor::ones([10, 4], opts));
    let (_c, allocs) = measure(|| Tensor::cat(&[&x, &y], 0)).unwrap();
    assert_eq!(allocated(&allocs), [512], "320 bytes take a 512-byte block");

    // Small pool: always exactly the rounded size; freed with the same size.
    let (_, allocs) = measure(|| drop(Tensor::zeros([1000], (Kind::Uint8, device)))).unwrap();
    let d = allocs.device(device);
    assert_eq!(
        (d.allocated_bytes, d.freed_bytes, d.peak_live_bytes),
        (1024, 1024, 1024)
    );

    // Large pool: at least the rounded size, at most 1 MiB more (an unsplit remainder).
    let n = CUDA_SMALL_SIZE + 1;
    let (_t, allocs) = measure(|| Tensor::zeros([n as i64], (Kind::Uint8, device))).unwrap();
    let block = allocated(&allocs)[0];
    let rounded = cuda_round_size(n, 0).unwrap();
    assert!(
        (rounded..=rounded + CUDA_SMALL_SIZE).contains(&block),
        "{block} for {n}"
    );

    // Frees of blocks allocated before the region are always reported on CUDA.
    let before = Tensor::zeros([100], opts);
    let (_, allocs) = measure(|| drop(before)).unwrap();
    let d = allocs.device(device);
    assert_eq!((d.pre_region_frees, d.pre_region_freed_bytes), (1, 512));
}
