//! Counter-based random draws for seeded parameters: value `i` of a stream is a pure
//! function of the stream and `i`, so a parameter's values do not depend on how many
//! threads fill it, in which order parameters are built, or on which device they end up.
//!
//! Each value is approximately standard normal: the sum of four independent 16-bit
//! uniforms taken from one SplitMix64 output, centred and scaled to unit variance
//! (Irwin–Hall with n = 4, bounded at ±2√3). The weights are synthetic, so only their
//! scale matters (unit-scale activations, a spread of router logits); a draw costs a few
//! integer operations instead of libtorch's serial Box–Muller, and the fill runs on every
//! core, compiled for the CPU's widest vector unit. A value costs ~3.6 ns on one core of
//! the 2-core build machine with x86-64's baseline instructions and ~1.1 ns with AVX-512
//! (DeepSeek-OCR's 64 experts, 220 M values: ~0.12 s on both cores, plus the page faults
//! of first touching 880 MB), against 1.8 s for `randn` and the scaling pass.

use half::slice::HalfFloatSliceExt;

/// SplitMix64's increment: its state for index `i + 1` is its state for `i` plus this.
const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's state for value `index` of `stream` (before the finaliser).
#[inline(always)]
fn state(stream: u64, index: u64) -> u64 {
    stream.wrapping_add(index.wrapping_add(1).wrapping_mul(GOLDEN_GAMMA))
}

/// SplitMix64's finaliser of a state: 64 well-mixed bits.
#[inline(always)]
fn finalise(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_4d1c_e4e5_b9b1);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// SplitMix64's output for `stream` and `index`: 64 well-mixed bits.
#[inline(always)]
fn mix(stream: u64, index: u64) -> u64 {
    finalise(state(stream, index))
}

/// Value `index` of `stream`: mean 0, variance 1 (to within 2⁻³²).
#[inline(always)]
pub fn normal(stream: u64, index: u64) -> f32 {
    irwin_hall(mix(stream, index))
}

/// The value of 64 mixed bits: four 16-bit uniforms summed, centred and scaled.
#[inline(always)]
fn irwin_hall(z: u64) -> f32 {
    let sum = (z & 0xffff) + ((z >> 16) & 0xffff) + ((z >> 32) & 0xffff) + (z >> 48);
    // Each 16-bit uniform k has mean 32767.5 and variance (65536² − 1) / 12.
    const MEAN: f32 = 4.0 * 32_767.5;
    const SCALE: f32 = 1.732_050_8 / 65_536.0; // √(12 / 4) / 65536
    (sum as f32 - MEAN) * SCALE
}

/// Where a fill writes: the fp32 values, or each rounded to bf16 or fp16 as libtorch's
/// casts round (to nearest, ties to even; `half`'s conversions), so that a parameter drawn
/// in its model dtype holds the bits of the fp32 draw cast by `to_kind`.
#[derive(Debug)]
pub enum Out<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [half::bf16]),
    F16(&'a mut [half::f16]),
}

impl<'a> Out<'a> {
    /// How many values it takes.
    pub fn len(&self) -> usize {
        match self {
            Out::F32(v) => v.len(),
            Out::Bf16(v) => v.len(),
            Out::F16(v) => v.len(),
        }
    }

    /// Whether it takes none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Its first `mid` values and the rest.
    fn split_at(self, mid: usize) -> (Out<'a>, Out<'a>) {
        match self {
            Out::F32(v) => {
                let (a, b) = v.split_at_mut(mid);
                (Out::F32(a), Out::F32(b))
            }
            Out::Bf16(v) => {
                let (a, b) = v.split_at_mut(mid);
                (Out::Bf16(a), Out::Bf16(b))
            }
            Out::F16(v) => {
                let (a, b) = v.split_at_mut(mid);
                (Out::F16(a), Out::F16(b))
            }
        }
    }
}

/// One parameter's draw: `out[i] = shift + scale · normal(stream, i)` for i = 0, 1, …
/// (rounded to `out`'s dtype).
#[derive(Debug)]
pub struct Fill<'a> {
    pub stream: u64,
    pub out: Out<'a>,
    pub scale: f32,
    pub shift: f32,
}

/// Fills `out` with `shift + scale · normal(stream, i)` for i = 0, 1, …, on as many
/// threads as libtorch's intra-op pool has (`OMP_NUM_THREADS`, `set_num_threads`; at least
/// one): the same values whatever the thread count.
pub fn fill_normal(stream: u64, out: &mut [f32], scale: f32, shift: f32) {
    fill_all(vec![Fill {
        stream,
        out: Out::F32(out),
        scale,
        shift,
    }])
}

/// Draws every fill of `fills` ([`fill_normal`] of each), their values split evenly over
/// libtorch's intra-op thread count whatever their sizes: a module's many parameters (64
/// experts × 3 weights) in one pass, with no thread started and joined per parameter.
pub fn fill_all(fills: Vec<Fill<'_>>) {
    let threads = usize::try_from(tch::get_num_threads()).unwrap_or(1);
    fill_all_with(threads, fills)
}

/// [`fill_all`] on `threads` threads (at least one).
fn fill_all_with(threads: usize, fills: Vec<Fill<'_>>) {
    let threads = threads.max(1);
    let total: usize = fills.iter().map(|f| f.out.len()).sum();
    // Small draws are not worth a thread.
    let share = total.div_ceil(threads).max(1 << 16);
    // Each thread's work: pieces of fills, (stream, index of the first value, values,
    // scale, shift), cut where the running count crosses a multiple of `share`.
    type Piece<'a> = (u64, usize, Out<'a>, f32, f32);
    let mut work: Vec<Vec<Piece<'_>>> = vec![Vec::new()];
    let mut room = share;
    for Fill {
        stream,
        mut out,
        scale,
        shift,
    } in fills
    {
        let mut first = 0;
        while !out.is_empty() {
            if room == 0 {
                work.push(Vec::new());
                room = share;
            }
            let len = room.min(out.len());
            let (piece, rest) = out.split_at(len);
            room -= len;
            work.last_mut()
                .expect("work starts with one list")
                .push((stream, first, piece, scale, shift));
            first += len;
            out = rest;
        }
    }
    let run = |pieces: Vec<Piece<'_>>| {
        for (stream, first, piece, scale, shift) in pieces {
            // Each thread faults in its own pieces' pages (crate::host_memory).
            match piece {
                Out::F32(out) => {
                    let _populated = crate::host_memory::prefault(out);
                    fill_span(stream, first, out, scale, shift)
                }
                Out::Bf16(out) => fill_rounded(stream, first, out, scale, shift),
                Out::F16(out) => fill_rounded(stream, first, out, scale, shift),
            }
        }
    };
    if work.len() == 1 {
        return work.into_iter().for_each(run);
    }
    // The lists wait in a queue that every thread, this one included, drains: a thread
    // that cannot be started (a process or memory limit) leaves its share to the others
    // instead of failing the draw.
    let helpers = work.len() - 1;
    let queue = std::sync::Mutex::new(work);
    let drain = || loop {
        let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop();
        match next {
            Some(pieces) => run(pieces),
            None => break,
        }
    };
    modelmeter::threads::on_threads(helpers, &drain);
}

/// Values a thread draws in fp32 at a time before rounding them into a bf16 or fp16
/// parameter (64 KiB: in the core's cache).
const ROUNDED_CHUNK: usize = 1 << 14;

/// [`fill_span`] into a bf16 or fp16 `out`: each chunk of values drawn in fp32 and rounded
/// by `half`'s slice conversion (vectorised where the CPU can).
fn fill_rounded<T>(stream: u64, start: usize, out: &mut [T], scale: f32, shift: f32)
where
    [T]: HalfFloatSliceExt,
{
    let _populated = crate::host_memory::prefault(out);
    let mut values = vec![0f32; ROUNDED_CHUNK.min(out.len())];
    for (k, chunk) in out.chunks_mut(ROUNDED_CHUNK).enumerate() {
        let values = &mut values[..chunk.len()];
        fill_span(stream, start + k * ROUNDED_CHUNK, values, scale, shift);
        chunk.convert_from_f32_slice(values);
    }
}

/// `out[i] = shift + scale · normal(stream, start + i)`, compiled for the widest vector
/// unit this CPU has: the loop is integer arithmetic and single fp32 roundings (Rust never
/// fuses a multiply and an add), so every variant writes the same bits; on AVX-512 the
/// 64-bit multiplies are one instruction each and the fill runs about 3× faster than the
/// portable build (x86-64's baseline has no vector 64-bit multiply).
fn fill_span(stream: u64, start: usize, out: &mut [f32], scale: f32, shift: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx512() {
            // SAFETY: the CPU has the features the function is compiled for (just checked).
            return unsafe { fill_span_avx512(stream, start, out, scale, shift) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            return unsafe { fill_span_avx2(stream, start, out, scale, shift) };
        }
    }
    fill_span_portable(stream, start, out, scale, shift)
}

/// Values a step of [`fill_span_portable`] draws at once (two 512-bit vectors of states).
const LANES: usize = 16;

/// The loop of [`fill_span`], inlined into each compiled variant: [`normal`] of each index,
/// with SplitMix64's first step (a multiply per value) replaced by adding its increment
/// to each of [`LANES`] running states, the same wrapping sums; ~20 % faster on AVX-512
/// (docs/performance.md, twenty-first session).
#[inline(always)]
fn fill_span_portable(stream: u64, start: usize, out: &mut [f32], scale: f32, shift: f32) {
    let len = out.len();
    let mut blocks = out.chunks_exact_mut(LANES);
    let mut states: [u64; LANES] = std::array::from_fn(|l| state(stream, (start + l) as u64));
    let step = GOLDEN_GAMMA.wrapping_mul(LANES as u64);
    for block in &mut blocks {
        for (v, z) in block.iter_mut().zip(states.iter_mut()) {
            *v = shift + scale * irwin_hall(finalise(*z));
            *z = z.wrapping_add(step);
        }
    }
    let rest = blocks.into_remainder();
    let first = start + (len - rest.len());
    for (i, v) in rest.iter_mut().enumerate() {
        *v = shift + scale * normal(stream, (first + i) as u64);
    }
}

/// Whether this CPU has the AVX-512 features [`fill_span_avx512`] is compiled for.
#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512dq")
        && std::arch::is_x86_feature_detected!("avx512vl")
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512vl")]
unsafe fn fill_span_avx512(stream: u64, start: usize, out: &mut [f32], scale: f32, shift: f32) {
    fill_span_portable(stream, start, out, scale, shift)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn fill_span_avx2(stream: u64, start: usize, out: &mut [f32], scale: f32, shift: f32) {
    fill_span_portable(stream, start, out, scale, shift)
}

/// Values per chunk of a fill on a device: bounds the int64 temporaries (8 bytes per
/// value, a few alive at once) whatever the parameter's size.
const DEVICE_CHUNK: i64 = 1 << 24;

/// `(z >> n)` as an unsigned (logical) shift of an int64 tensor holding u64 bits: libtorch
/// shifts int64 arithmetically, so the sign bits are masked off.
fn logical_shift_right(z: &tch::Tensor, n: u32) -> tch::Result<tch::Tensor> {
    let mask = ((1u64 << (64 - n)) - 1) as i64;
    z.f_bitwise_right_shift_tensor_scalar(i64::from(n))?
        .f_bitwise_and(mask)
}

/// [`fill_normal`] as tensor operations on `device`: `count` fp32 values
/// `shift + scale · normal(stream, i)`, computed where they will live (on a GPU a few
/// elementwise kernels instead of a CPU loop and a copy). Bit for bit the values of
/// [`normal`]: the mixing is 64-bit integer arithmetic (libtorch's int64 multiply wraps
/// like `wrapping_mul`), and the float steps are the same single roundings in fp32.
pub fn normal_on(
    device: tch::Device,
    stream: u64,
    count: i64,
    scale: f32,
    shift: f32,
) -> tch::Result<tch::Tensor> {
    normal_in_chunks(device, stream, count, scale, shift, DEVICE_CHUNK)
}

fn normal_in_chunks(
    device: tch::Device,
    stream: u64,
    count: i64,
    scale: f32,
    shift: f32,
    chunk: i64,
) -> tch::Result<tch::Tensor> {
    use tch::{Kind, Tensor};
    let out = Tensor::f_empty([count], (Kind::Float, device))?;
    let mut start = 0i64;
    while start < count {
        let len = chunk.min(count - start);
        let index = Tensor::f_arange_start(start, start + len, (Kind::Int64, device))?;
        // mix(stream, index), as in `mix` above, on u64 bits held in int64.
        // One binding reassigned, so each step's int64 tensor is freed as the next exists.
        let mut z = index
            .f_add_scalar(1)?
            .f_mul_scalar(GOLDEN_GAMMA as i64)?
            .f_add_scalar(stream as i64)?;
        drop(index);
        z = z
            .f_bitwise_xor_tensor(&logical_shift_right(&z, 30)?)?
            .f_mul_scalar(0xbf58_4d1c_e4e5_b9b1u64 as i64)?;
        z = z
            .f_bitwise_xor_tensor(&logical_shift_right(&z, 27)?)?
            .f_mul_scalar(0x94d0_49bb_1331_11ebu64 as i64)?;
        z = z.f_bitwise_xor_tensor(&logical_shift_right(&z, 31)?)?;
        let sum = z
            .f_bitwise_and(0xffff)?
            .f_add(&logical_shift_right(&z, 16)?.f_bitwise_and(0xffff)?)?
            .f_add(&logical_shift_right(&z, 32)?.f_bitwise_and(0xffff)?)?
            .f_add(&logical_shift_right(&z, 48)?)?;
        drop(z);
        // (sum - MEAN) · SCALE, then shift + scale · that: each step one fp32 rounding.
        let values = sum
            .f_to_kind(Kind::Float)?
            .f_sub_scalar(f64::from(4.0f32 * 32_767.5))?
            .f_mul_scalar(f64::from(1.732_050_8f32 / 65_536.0))?
            .f_mul_scalar(f64::from(scale))?
            .f_add_scalar(f64::from(shift))?;
        out.f_narrow(0, start, len)?.f_copy_(&values)?;
        start += len;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_draws_equal_the_cpu_loop_bit_for_bit() {
        // The device path run on the CPU (CI has no GPU): same bits as `fill_normal`,
        // across a chunk boundary, for streams with high bits set.
        for (stream, scale, shift) in [
            (7u64, 1.0f32, 0.0f32),
            (0x7fff_ffff_ffff_fff1, 0.1, 1.0),
            (0x1234_5678_9abc_def0, 1.0 / 1280f32.sqrt(), 0.0),
        ] {
            let count = 70_000usize;
            let mut expected = vec![0f32; count];
            fill_normal(stream, &mut expected, scale, shift);
            for chunk in [DEVICE_CHUNK, 4096] {
                let t =
                    normal_in_chunks(tch::Device::Cpu, stream, count as i64, scale, shift, chunk)
                        .unwrap();
                let got = Vec::<f32>::try_from(&t).unwrap();
                let same = expected
                    .iter()
                    .zip(&got)
                    .filter(|(a, b)| a.to_bits() == b.to_bits())
                    .count();
                assert_eq!(same, count, "stream {stream:#x}, chunks of {chunk}");
            }
        }
    }

    #[test]
    fn every_compiled_fill_writes_the_values_of_normal() {
        // An odd start and length, so the vector loops' remainders run too; high stream
        // bits, a scale and a shift, so the fp32 steps are all exercised.
        let (stream, start, len, scale, shift) =
            (0xfedc_ba98_7654_3211u64, 1_001, 4_099, 0.3, -1.5);
        let expected: Vec<u32> = (0..len)
            .map(|i| (shift + scale * normal(stream, (start + i) as u64)).to_bits())
            .collect();
        let check = |name: &str, fill: &dyn Fn(&mut [f32])| {
            let mut out = vec![f32::NAN; len];
            fill(&mut out);
            let bits: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
            assert!(bits == expected, "{name} differs from normal()");
        };
        check("fill_span", &|o| fill_span(stream, start, o, scale, shift));
        check("portable", &|o| {
            fill_span_portable(stream, start, o, scale, shift)
        });
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has AVX2.
                check("avx2", &|o| unsafe {
                    fill_span_avx2(stream, start, o, scale, shift)
                });
            }
            if has_avx512() {
                // SAFETY: the CPU has the AVX-512 features the variant needs.
                check("avx512", &|o| unsafe {
                    fill_span_avx512(stream, start, o, scale, shift)
                });
            }
        }
    }

    #[test]
    fn rounded_fills_hold_the_fp32_values_rounded_on_any_thread_count() {
        // Sizes around the share and the rounding chunk, so that pieces and chunks end
        // inside each other.
        let sizes = [70_000usize, 0, 3, ROUNDED_CHUNK + 1, 200_001];
        let value = |k: usize, i: usize| 0.25 * k as f32 + 0.5 * normal(100 + k as u64, i as u64);
        for threads in [1, 2, 7] {
            let mut bf: Vec<Vec<half::bf16>> =
                sizes.iter().map(|&n| vec![half::bf16::NAN; n]).collect();
            let mut hf: Vec<Vec<half::f16>> =
                sizes.iter().map(|&n| vec![half::f16::NAN; n]).collect();
            let fills = bf
                .iter_mut()
                .map(|o| Out::Bf16(o))
                .chain(hf.iter_mut().map(|o| Out::F16(o)))
                .enumerate()
                .map(|(j, out)| {
                    let k = j % sizes.len();
                    Fill {
                        stream: 100 + k as u64,
                        out,
                        scale: 0.5,
                        shift: 0.25 * k as f32,
                    }
                })
                .collect();
            fill_all_with(threads, fills);
            for k in 0..sizes.len() {
                for i in 0..sizes[k] {
                    let v = value(k, i);
                    assert_eq!(bf[k][i].to_bits(), half::bf16::from_f32(v).to_bits());
                    assert_eq!(hf[k][i].to_bits(), half::f16::from_f32(v).to_bits());
                }
            }
        }
    }

    #[test]
    fn half_rounds_as_libtorch_casts() {
        // The rounding a deferred bf16/fp16 parameter gets (`half`) against libtorch's
        // `to_kind`, on values where rounding can go wrong: ties to even either way, just
        // off a tie, fp16 subnormals and its overflow, bf16's smallest normals, signs, and
        // the draws' own values.
        let mut values: Vec<f32> = Vec::new();
        for base in [1.0f32, 1.5, 3.0, 1e-3, 6e-5, 65_504.0, 1e-38, 3.0e38] {
            let bits = base.to_bits();
            for delta in [
                0u32, 1, 0x0fff, 0x1000, 0x1001, 0x7fff, 0x8000, 0x8001, 0x1_8000,
            ] {
                for b in [bits.wrapping_add(delta), bits.wrapping_sub(delta)] {
                    let v = f32::from_bits(b);
                    values.extend([v, -v]);
                }
            }
        }
        values.extend([0.0, -0.0, 65_520.0, 65_519.996, 5.96e-8, 2.98e-8, 1e-45]);
        values.extend((0..10_000).map(|i| 3.0 * normal(9, i)));
        let t = tch::Tensor::from_slice(&values);
        for (kind, rounded) in [
            (
                tch::Kind::BFloat16,
                values
                    .iter()
                    .map(|&v| half::bf16::from_f32(v).to_f32())
                    .collect::<Vec<f32>>(),
            ),
            (
                tch::Kind::Half,
                values
                    .iter()
                    .map(|&v| half::f16::from_f32(v).to_f32())
                    .collect(),
            ),
        ] {
            let torch: Vec<f32> =
                Vec::try_from(t.to_kind(kind).to_kind(tch::Kind::Float)).expect("fp32 values");
            for ((v, a), b) in values.iter().zip(&rounded).zip(&torch) {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{v:e} ({:#010x}) in {kind:?}",
                    v.to_bits()
                );
            }
        }
    }

    #[test]
    fn any_thread_count_fills_the_same_values() {
        // 500,000 values: 1 chunk on one thread, 3 and 7 chunks (each over 65,536) on more,
        // so every boundary between threads is crossed somewhere.
        let fill = |threads: usize, out: &mut [f32]| {
            let (stream, scale, shift) = (5, 0.5, 1.0);
            fill_all_with(
                threads,
                vec![Fill {
                    stream,
                    out: Out::F32(out),
                    scale,
                    shift,
                }],
            )
        };
        let mut one = vec![0f32; 500_000];
        fill(1, &mut one);
        for threads in [0, 3, 7] {
            let mut many = vec![0f32; 500_000];
            fill(threads, &mut many);
            assert!(one == many, "{threads} threads");
        }
        assert_eq!(one[499_999], 1.0 + 0.5 * normal(5, 499_999));
    }

    #[test]
    fn normal_keeps_the_values_the_recorded_runs_were_drawn_with() {
        // Bits of `normal` as the H200 fixtures under verify/tests/fixtures were drawn
        // (the routing they record depends on every weight): a change to the draw, however
        // equivalent it looks, must keep these.
        for (stream, index, bits) in [
            (0x0u64, 0u64, 0x3e90_b891u32),
            (0x7, 1, 0xbfbc_84ff),
            (0xfedc_ba98_7654_3211, 1_000_003, 0x3f58_0a1d),
            (u64::MAX, u64::MAX, 0xbfa9_a72c),
        ] {
            assert_eq!(
                normal(stream, index).to_bits(),
                bits,
                "{stream:#x}, {index}"
            );
        }
    }

    #[test]
    fn many_fills_split_over_threads_draw_each_fill_s_own_values() {
        // Sizes around the 65,536-value minimum share, an empty one and single values, so
        // shares end inside fills, at their ends, and span several small ones.
        let sizes = [70_000usize, 0, 3, 131_072, 1, 200_001, 65_536, 5];
        let expected: Vec<Vec<u32>> = sizes
            .iter()
            .enumerate()
            .map(|(k, &n)| {
                let (stream, scale, shift) = (100 + k as u64, 0.25 * k as f32, k as f32);
                (0..n)
                    .map(|i| (shift + scale * normal(stream, i as u64)).to_bits())
                    .collect()
            })
            .collect();
        for threads in [1, 2, 3, 7, 64] {
            let mut outs: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![f32::NAN; n]).collect();
            let fills = outs
                .iter_mut()
                .enumerate()
                .map(|(k, out)| Fill {
                    stream: 100 + k as u64,
                    out: Out::F32(out),
                    scale: 0.25 * k as f32,
                    shift: k as f32,
                })
                .collect();
            fill_all_with(threads, fills);
            for (k, out) in outs.iter().enumerate() {
                let bits: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
                assert!(bits == expected[k], "fill {k} on {threads} threads");
            }
        }
    }

    #[test]
    fn values_depend_only_on_the_stream_and_the_index() {
        let mut a = vec![0f32; 300_000];
        fill_normal(7, &mut a, 1.0, 0.0);
        for i in [0usize, 1, 65_535, 65_536, 200_000, 299_999] {
            assert_eq!(a[i], normal(7, i as u64));
        }
        let mut b = vec![0f32; 10];
        fill_normal(8, &mut b, 1.0, 0.0);
        assert_ne!(a[..10], b[..]);
    }

    #[test]
    fn draws_are_centred_with_unit_variance() {
        let mut v = vec![0f32; 1 << 20];
        fill_normal(11, &mut v, 1.0, 0.0);
        let n = v.len() as f64;
        let mean = v.iter().map(|x| f64::from(*x)).sum::<f64>() / n;
        let var = v
            .iter()
            .map(|x| (f64::from(*x) - mean).powi(2))
            .sum::<f64>()
            / n;
        approx::assert_abs_diff_eq!(mean, 0.0, epsilon = 0.01);
        approx::assert_abs_diff_eq!(var, 1.0, epsilon = 0.01);
        assert!(v.iter().all(|x| x.abs() <= 3.4642));
        // Scale and shift apply to every value.
        let mut w = vec![0f32; 1000];
        fill_normal(11, &mut w, 0.5, 1.0);
        assert_eq!(w[3], 1.0 + 0.5 * v[3]);
    }
}
