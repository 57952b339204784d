//! The FLOP counter on real libtorch ops, against hand formulas and the conventions
//! table. On the CPU in fp32 by default; `MODELMETER_TEST_DEVICE=cuda:0` and
//! `MODELMETER_TEST_DTYPE=bf16` run the same checks on a GPU (scripts/device-check).

use modelmeter_reference::counter::Booking;
use modelmeter_reference::{Counts, FlopCounter};
use tch::{Device, Kind, Tensor};

fn device() -> Device {
    match std::env::var("MODELMETER_TEST_DEVICE").as_deref() {
        Ok("cpu") | Err(_) => Device::Cpu,
        Ok(other) => Device::Cuda(
            other
                .trim_start_matches("cuda:")
                .parse()
                .expect("MODELMETER_TEST_DEVICE=cpu|cuda:N"),
        ),
    }
}

fn kind() -> Kind {
    match std::env::var("MODELMETER_TEST_DTYPE").as_deref() {
        Ok("bf16") => Kind::BFloat16,
        _ => Kind::Float,
    }
}

fn opts() -> (Kind, Device) {
    (kind(), device())
}

fn count<T>(f: impl FnOnce() -> T) -> (T, Counts) {
    let region = FlopCounter::start().unwrap();
    let out = f();
    (out, region.finish().unwrap())
}

fn randn(shape: &[i64]) -> Tensor {
    Tensor::randn(shape, opts())
}

fn assert_complete(c: &Counts) {
    assert!(
        c.is_complete(),
        "unknown ops {:?}, errors {:?}",
        c.unknown_ops,
        c.errors
    );
}

#[test]
fn matmul_family_matches_hand_formulas() {
    let (a, b) = (randn(&[8, 16]), randn(&[16, 4]));
    let (_, c) = count(|| a.mm(&b));
    assert_eq!(c.flops.matmul_flops, 2 * 8 * 16 * 4);
    assert_eq!(c.flops.flop_counter_mode_flops, c.flops.matmul_flops);
    assert_eq!(c.flops.elementwise_flops, 0);

    let bias = randn(&[4]);
    let (_, c) = count(|| bias.addmm(&a, &b));
    assert_eq!(c.flops.matmul_flops, 2 * 8 * 16 * 4);
    assert_eq!(
        c.flops.flop_counter_mode_flops,
        2 * 8 * 16 * 4,
        "FlopCounterMode ignores the bias"
    );
    assert_eq!(
        c.flops.elementwise_flops,
        8 * 4,
        "the bias add is elementwise work"
    );

    let (x, y) = (randn(&[3, 8, 16]), randn(&[3, 16, 4]));
    let (_, c) = count(|| x.bmm(&y));
    assert_eq!(c.flops.matmul_flops, 2 * 3 * 8 * 16 * 4);
    let z = randn(&[3, 8, 4]);
    let (_, c) = count(|| z.baddbmm(&x, &y, 1.0, 1.0));
    assert_eq!(c.flops.matmul_flops, 2 * 3 * 8 * 16 * 4);
    assert_eq!(c.flops.elementwise_flops, 3 * 8 * 4);
    assert_complete(&c);
}

#[test]
fn bias_free_3d_linear_is_one_mm() {
    let x = randn(&[2, 5, 16]);
    let w = randn(&[32, 16]);
    let (_, c) = count(|| x.linear::<Tensor>(&w, None));
    assert_eq!(
        c.flops.matmul_flops, 10_240,
        "FlopCounterMode's value for nn.Linear(16, 32) on [2,5,16]"
    );
    assert_eq!(c.records.len(), 1);
    assert_eq!(c.records[0].name, "aten::mm");
    assert_complete(&c);
}

#[test]
fn batched_4d_matmul_is_one_bmm() {
    let (q, k) = (randn(&[2, 3, 8, 16]), randn(&[2, 3, 16, 8]));
    let (_, c) = count(|| q.matmul(&k));
    assert_eq!(c.flops.matmul_flops, 2 * 2 * 3 * 8 * 16 * 8);
    let names: Vec<&str> = c.records.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["aten::bmm"]);
}

#[test]
fn sdpa_is_counted_even_where_flop_counter_mode_cannot_see_it() {
    let (b, h, s, d) = (2i64, 4i64, 32i64, 16i64);
    let q = randn(&[b, h, s, d]);
    for causal in [false, true] {
        let (_, c) = count(|| {
            Tensor::scaled_dot_product_attention::<Tensor>(
                &q, &q, &q, None, 0.0, causal, None, false,
            )
        });
        let scores = (b * h * s * s) as u64;
        assert_eq!(
            c.flops.matmul_flops,
            4 * scores * d as u64,
            "causal={causal}: full rectangle"
        );
        assert_eq!(
            c.flops.elementwise_flops,
            6 * scores,
            "scale + softmax inside the kernel"
        );
        let kernels = c.attention_kernels();
        assert_eq!(kernels.len(), 1, "{kernels:?}");
        if device() == Device::Cpu {
            assert_eq!(
                kernels[0],
                "aten::_scaled_dot_product_flash_attention_for_cpu"
            );
            assert_eq!(
                c.flops.flop_counter_mode_flops, 0,
                "FlopCounterMode misses the CPU kernel"
            );
        } else {
            assert_eq!(
                c.flops.flop_counter_mode_flops, c.flops.matmul_flops,
                "{kernels:?} is in the registry"
            );
        }
        assert_complete(&c);
    }
}

#[test]
fn convolution_is_counted_once_through_its_nested_chain() {
    let x = randn(&[2, 3, 16, 16]);
    let w = randn(&[8, 3, 3, 3]);
    let (_, c) = count(|| x.conv2d::<Tensor>(&w, None, [1, 1], [1, 1], [1, 1], 1));
    assert_eq!(c.flops.matmul_flops, 2 * 2 * 8 * 3 * 9 * 16 * 16);
    assert_eq!(c.records.len(), 1);
    assert_eq!(c.records[0].name, "aten::convolution");
    // cuDNN's TF32 switch is on by default in libtorch, so an fp32 convolution is booked
    // to tensor cores (bf16 always is); the matmul switch (off) does not apply to it.
    assert!(c.tf32.cudnn, "libtorch's default");
    assert!(!c.tf32.matmul, "libtorch's default");
    assert_eq!(c.flops.tensor_core_flops, c.flops.matmul_flops);
    assert!(
        c.events_seen > 2,
        "the nested chain was observed ({} events)",
        c.events_seen
    );
}

#[test]
fn linear_backward_counts_grad_input_and_grad_weight() {
    let x = randn(&[4, 8]).set_requires_grad(true);
    let w = randn(&[16, 8]).set_requires_grad(true);
    let y = x.linear::<Tensor>(&w, None);
    let loss = y.sum(Kind::Float);
    let (_, c) = count(|| loss.backward());
    let backward_mm: u64 = c
        .records
        .iter()
        .filter(|r| r.backward && r.name == "aten::mm")
        .map(|r| r.flops.matmul_flops)
        .sum();
    assert_eq!(
        backward_mm,
        2 * (2 * 4 * 8 * 16),
        "grad input [4,16]@[16,8] + grad weight [16,4]@[4,8]"
    );
    assert_eq!(c.flops.flop_counter_mode_flops, backward_mm);
    assert!(c
        .records
        .iter()
        .filter(|r| r.name == "aten::mm")
        .all(|r| r.backward));
}

#[test]
fn gradient_accumulation_is_counted_as_backward_on_any_thread() {
    // x feeds two products: the autograd engine adds their gradients for x itself, outside
    // any backward node (InputBuffer::add inside evaluate_function). Backward called on
    // another thread (as the engine's device threads run it on a GPU) must count the same.
    let run = |other_thread: bool| {
        let x = randn(&[4, 8]).set_requires_grad(true);
        let loss = ((&x * 2.0) + (&x * 3.0)).sum(Kind::Float);
        let (_, c) = count(|| {
            if other_thread {
                std::thread::spawn(move || loss.backward()).join().unwrap()
            } else {
                loss.backward()
            }
        });
        assert!(c.is_complete(), "{:?}", c.errors);
        c
    };
    let (here, there) = (run(false), run(true));
    for c in [&here, &there] {
        let adds: Vec<_> = c
            .records
            .iter()
            .filter(|r| r.name.starts_with("aten::add"))
            .collect();
        assert!(
            adds.iter().any(|r| r.flops.elementwise_flops == 32),
            "the [4, 8] accumulation is counted: {adds:?}"
        );
        assert!(c.records.iter().all(|r| r.backward), "{:?}", c.records);
    }
    assert_eq!(here.flops, there.flops);
}

#[test]
fn elementwise_ops_follow_the_conventions_table() {
    let x = randn(&[6, 10]);
    let y = randn(&[6, 10]);
    let column = randn(&[6, 1]);
    let n = 60u64;
    type Case<'a> = (&'a str, Box<dyn Fn() -> Tensor + 'a>, u64);
    let cases: Vec<Case> = vec![
        ("add", Box::new(|| &x + &y), n),
        ("mul", Box::new(|| &x * &y), n),
        ("silu", Box::new(|| x.silu()), 4 * n),
        ("softmax", Box::new(|| x.softmax(-1, Kind::Float)), 5 * n),
        ("rsqrt", Box::new(|| x.abs().rsqrt()), n + n),
        ("pow", Box::new(|| x.pow_tensor_scalar(2)), n),
        (
            "mean",
            Box::new(|| x.mean_dim(&[-1i64][..], true, Kind::Float)),
            n,
        ),
        ("topk", Box::new(|| x.topk(3, -1, true, false).0), n),
        ("add scalar", Box::new(|| &x + 1e-6), n),
        ("broadcast mul", Box::new(|| &x * &column), n),
    ];
    for (label, f, want) in cases {
        let (_, c) = count(f);
        assert_eq!(c.flops.elementwise_flops, want, "{label}");
        assert_eq!(
            c.flops.cuda_core_flops, want,
            "{label}: elementwise work is CUDA-core work"
        );
        assert_eq!(
            c.flops.matmul_flops + c.flops.flop_counter_mode_flops,
            0,
            "{label}"
        );
        assert_complete(&c);
    }
}

#[test]
fn views_copies_and_integer_bookkeeping_cost_nothing() {
    let x = randn(&[4, 6]);
    let idx = Tensor::from_slice(&[3i64, 1, 0]).to_device(device());
    let (_, c) = count(|| {
        let v = x.view([6, 4]).transpose(0, 1).unsqueeze(0).contiguous();
        let _ = v.to_kind(Kind::BFloat16);
        let _ = x.index_select(0, &idx);
        let _ = Tensor::cat(&[&x, &x], 0);
        let _ = idx.argsort(0, false);
        let _ = (&idx + 1).sum(Kind::Int64);
        v
    });
    assert_eq!(c.total_flops(), 0);
    assert!(c.records.is_empty());
    assert_complete(&c);
    // Not a blind observer: the ten ops called above (view, transpose, unsqueeze,
    // contiguous, to, index_select, cat, argsort, add, sum) were all seen, and the ones
    // that move data were costed in bytes though not in FLOPs.
    assert!(
        c.events_seen >= 10,
        "only {} op events seen for the ten ops run",
        c.events_seen
    );
    assert_eq!(c.ops_without_outputs, 0);
    assert!(c.io_bytes > 0);
    let size = match kind() {
        Kind::BFloat16 => 2,
        _ => 4,
    };
    let moved = |op: &str| c.io_bytes_by_op.get(op).copied();
    // cat: both [4, 6] parts read, the [8, 6] result written.
    assert_eq!(moved("aten::cat"), Some((2 * 24 + 48) * size));
    // contiguous of a transposed view: a real copy, 24 elements read and written.
    assert_eq!(moved("aten::contiguous"), Some(2 * 24 * size));
    // The cast to bf16 reads the input and writes bf16; from bf16 it hands its input back.
    let cast = match kind() {
        Kind::BFloat16 => 0,
        _ => 24 * size + 24 * 2,
    };
    assert_eq!(moved("aten::to"), Some(cast));
    for view in ["aten::view", "aten::transpose", "aten::unsqueeze"] {
        assert_eq!(moved(view), Some(0), "{view} is counted and moves nothing");
    }
}

#[test]
fn regions_do_not_leak_and_outside_ops_are_not_counted() {
    let (a, b) = (randn(&[8, 8]), randn(&[8, 8]));
    let _before = a.mm(&b);
    let (_, first) = count(|| a.mm(&b));
    let _between = a.mm(&b);
    let (_, second) = count(|| (a.mm(&b), a.mm(&b)));
    let _after = a.mm(&b);
    assert_eq!(first.flops.matmul_flops, 1024);
    assert_eq!(second.flops.matmul_flops, 2048);
    // Dropping a region without finishing disarms it: the next one starts clean.
    {
        let _region = FlopCounter::start().unwrap();
        let _ = a.mm(&b);
    }
    let (_, third) = count(|| a.mm(&b));
    assert_eq!(third.flops.matmul_flops, 1024);
}

#[test]
fn ops_of_other_threads_are_not_counted() {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let worker = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (a, b) = (randn(&[16, 16]), randn(&[16, 16]));
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = a.mm(&b);
            }
        })
    };
    let (a, b) = (randn(&[8, 8]), randn(&[8, 8]));
    for _ in 0..20 {
        let (_, c) = count(|| a.mm(&b));
        assert_eq!(c.flops.matmul_flops, 1024);
        assert_eq!(c.records.len(), 1);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    worker.join().unwrap();
}

#[test]
fn a_second_region_on_the_same_thread_is_an_error() {
    let region = FlopCounter::start().unwrap();
    assert!(FlopCounter::start().is_err());
    region.finish().unwrap();
}

#[test]
fn records_carry_shapes_dtypes_device_and_engine() {
    let a = Tensor::randn([4, 8], (Kind::BFloat16, device()));
    let b = Tensor::randn([8, 2], (Kind::BFloat16, device()));
    let (_, c) = count(|| a.mm(&b));
    let r = &c.records[0];
    assert_eq!(r.shapes, vec![vec![4, 8], vec![8, 2]]);
    assert_eq!(r.dtypes, vec![modelmeter::Dtype::Bf16; 2]);
    let want = match device() {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".to_string(),
    };
    assert_eq!(r.device.as_deref(), Some(want.as_str()));
    assert_eq!(c.records.len(), 1);
    assert_eq!(r.name, "aten::mm");
    assert_eq!(
        r.flops.tensor_core_flops, 128,
        "bf16 GEMMs are tensor-core work"
    );
    assert_eq!(r.flops.cuda_core_flops, 0);
    assert_eq!(r.engine, Booking::TensorCore);
    let a = Tensor::randn([4, 8], (Kind::Float, device()));
    let b = Tensor::randn([8, 2], (Kind::Float, device()));
    let (_, c) = count(|| a.mm(&b));
    assert_eq!(c.records.len(), 1);
    assert_eq!(
        c.records[0].flops.cuda_core_flops, 128,
        "fp32 GEMMs with TF32 off are CUDA-core work"
    );
    assert!(!c.tf32.matmul);
    assert_eq!(c.records[0].flops.tensor_core_flops, 0);
    assert_eq!(c.records[0].engine, Booking::CudaCore);
    // Elementwise work is CUDA-core work whatever the dtype.
    let (x, y) = (randn(&[4, 8]), randn(&[4, 8]));
    let (_, c) = count(|| &x + &y);
    assert_eq!(c.records.len(), 1);
    assert_eq!(c.records[0].engine, Booking::CudaCore);
    // A GEMM with a bias add: matmul on tensor cores, the add on CUDA cores.
    let a = Tensor::randn([4, 8], (Kind::BFloat16, device()));
    let b = Tensor::randn([8, 2], (Kind::BFloat16, device()));
    let bias = Tensor::randn([2], (Kind::BFloat16, device()));
    let (_, c) = count(|| bias.addmm(&a, &b));
    assert_eq!(c.records.len(), 1);
    assert_eq!(c.records[0].flops.tensor_core_flops, 128);
    assert_eq!(c.records[0].flops.cuda_core_flops, 4 * 2);
    assert_eq!(c.records[0].engine, Booking::Split);
}

/// A forward op after a backward in the same region, on the same thread, is forward work:
/// the backward's nodes have ended by then.
#[test]
fn a_forward_op_after_a_backward_in_one_region_is_forward() {
    let w = randn(&[4, 4]).set_requires_grad(true);
    let (_, c) = count(|| {
        w.mm(&w).sum(Kind::Float).backward();
        let _no_grad = tch::no_grad_guard();
        w.mm(&w)
    });
    assert!(c.is_complete(), "{:?}", c.errors);
    assert!(c.records.iter().any(|r| r.backward), "{:?}", c.records);
    let first = c.records.first().unwrap();
    let last = c.records.last().unwrap();
    assert_eq!((first.name.as_str(), first.backward), ("aten::mm", false));
    assert_eq!(
        (last.name.as_str(), last.backward),
        ("aten::mm", false),
        "{:?}",
        c.records
    );
}

/// The per-op summary a report lists (`Counts::by_op`) and the bytes by op (what a
/// differing `io_bytes` row is explained with) add every call up, and name each dtype and
/// device once: three GEMMs, two in fp32 and one in bf16, are one `aten::mm` entry.
#[test]
fn the_per_op_summary_adds_every_call_and_names_each_dtype_once() {
    let a = Tensor::randn([4, 8], (Kind::Float, device()));
    let b = Tensor::randn([8, 2], (Kind::Float, device()));
    let (ah, bh) = (a.to_kind(Kind::BFloat16), b.to_kind(Kind::BFloat16));
    let (_, c) = count(|| (a.mm(&b), a.mm(&b), ah.mm(&bh)));
    assert_complete(&c);
    let ops = c.by_op();
    assert_eq!(ops.len(), 1, "{ops:?}");
    let mm = &ops[0];
    assert_eq!((mm.name.as_str(), mm.calls), ("aten::mm", 3));
    assert_eq!(mm.flops.matmul_flops, 3 * 2 * 4 * 8 * 2);
    assert_eq!(
        mm.dtypes,
        vec![modelmeter::Dtype::F32, modelmeter::Dtype::Bf16]
    );
    let want = match device() {
        Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".to_string(),
    };
    assert_eq!(mm.devices, vec![want]);
    // Each reads [4, 8] and [8, 2] and writes [4, 2]: 56 elements, 4 or 2 bytes each.
    assert_eq!(
        c.io_bytes_by_op.get("aten::mm"),
        Some(&(2 * 56 * 4 + 56 * 2))
    );
    assert_eq!(c.io_bytes, 2 * 56 * 4 + 56 * 2);
}

#[test]
fn an_op_with_a_long_argument_list_is_read_whole() {
    // 100 tensors of one `cat`: a log line of several kilobytes, far past the observer's
    // first line buffer, written and parsed in one piece.
    let parts: Vec<Tensor> = (1..=100).map(|i| randn(&[i, 3])).collect();
    let (out, c) = count(|| Tensor::cat(&parts, 0));
    assert_eq!(out.size(), [5050, 3]);
    assert_complete(&c);
    let size = match kind() {
        Kind::BFloat16 => 2,
        _ => 4,
    };
    // Every part read, the concatenation written.
    assert_eq!(c.io_bytes, 2 * 5050 * 3 * size);
    assert_eq!(c.ops_without_outputs, 0);
}

#[test]
fn bytes_moved_by_real_ops_match_hand_numbers() {
    let size = match kind() {
        Kind::BFloat16 => 2,
        _ => 4,
    };
    let (a, b) = (randn(&[64, 32]), randn(&[32, 16]));
    let (_, c) = count(|| a.mm(&b));
    assert_eq!(c.io_bytes, (64 * 32 + 32 * 16 + 64 * 16) * size);
    assert_eq!(c.ops_without_outputs, 0);

    // cat of two [10, 4]: both read, [20, 4] written.
    let (x, y) = (randn(&[10, 4]), randn(&[10, 4]));
    let (_, c) = count(|| Tensor::cat(&[&x, &y], 0));
    assert_eq!(c.io_bytes, (2 * 40 + 80) * size);

    // In place: x and y read, x written; nothing else.
    let mut z = randn(&[10, 4]);
    let (_, c) = count(|| {
        let _ = z.f_mul_(&y).unwrap();
    });
    assert_eq!(c.io_bytes, 3 * 40 * size);

    // Views move nothing; so does a `to` or `contiguous` that hands back its input.
    let (_, c) = count(|| {
        let v = a.view([32, 64]).transpose(0, 1);
        let same = a.to_kind(kind());
        let already = a.contiguous();
        (v, same, already)
    });
    assert_eq!(c.io_bytes, 0, "{:?}", c.io_bytes_by_op);

    // A `contiguous` that copies reads and writes the tensor; a cast reads one dtype and
    // writes another.
    let (_, c) = count(|| a.transpose(0, 1).contiguous());
    assert_eq!(c.io_bytes, 2 * 64 * 32 * size);
    let (_, c) = count(|| a.to_kind(Kind::Double));
    assert_eq!(c.io_bytes, 64 * 32 * (size + 8));
    assert_complete(&c);
}

/// The shim encodes `convolution_backward`'s output mask (a bool list) for the rule, which
/// counts only the gradients asked for; torch's FlopCounterMode (2.11) is the witness:
/// conv2d([2,3,16,16], [8,3,3,3], padding 1).sum() backward costs 442,368 FLOPs with both
/// gradients and 221,184 with the weight's alone.
#[test]
fn convolution_backward_counts_the_gradients_its_mask_asks_for() {
    for (input_grad, want) in [(true, 442_368u64), (false, 221_184)] {
        let x = randn(&[2, 3, 16, 16]).set_requires_grad(input_grad);
        let w = randn(&[8, 3, 3, 3]).set_requires_grad(true);
        let loss = x
            .conv2d::<Tensor>(&w, None, [1, 1], [1, 1], [1, 1], 1)
            .sum(Kind::Float);
        let (_, c) = count(|| loss.backward());
        assert_complete(&c);
        let conv: Vec<_> = c
            .records
            .iter()
            .filter(|r| r.name == "aten::convolution_backward")
            .collect();
        assert_eq!(conv.len(), 1, "{:?}", c.records);
        assert_eq!(conv[0].flops.matmul_flops, want, "input grad {input_grad}");
        assert_eq!(c.flops.flop_counter_mode_flops, want);
    }
}

/// Two attention calls that pick the same kernel name it once.
#[test]
fn two_attention_calls_name_their_kernel_once() {
    let q = randn(&[1, 2, 8, 16]);
    let (_, c) = count(|| {
        let sdpa = |q: &Tensor| {
            Tensor::scaled_dot_product_attention::<Tensor>(q, q, q, None, 0.0, true, None, false)
        };
        (sdpa(&q), sdpa(&q))
    });
    assert_eq!(
        c.attention_kernels().len(),
        1,
        "{:?}",
        c.attention_kernels()
    );
}

/// An op that returns a number, not a tensor (`item()`), still reads its input: it hands
/// nothing back, so its bytes are not those of an alias.
#[test]
fn an_op_that_returns_a_scalar_still_reads_its_input() {
    let s = randn(&[3]).sum(kind());
    let (_, c) = count(|| s.double_value(&[]));
    let size = match kind() {
        Kind::BFloat16 => 2,
        _ => 4,
    };
    let read: u64 = c.io_bytes_by_op.values().sum();
    assert_eq!(read, size, "{:?}", c.io_bytes_by_op);
}
