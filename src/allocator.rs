//! The CUDA caching allocator's block sizes: what `c10::cuda::CUDACachingAllocator`
//! reserves (and reports to observers) for a tensor of a given size. The analytic side
//! applies it to each tensor it predicts on CUDA; the measured side sees the rounded
//! blocks (modelmeter-reference's allocation observer).

/// The CUDA caching allocator's smallest block and its rounding granularity
/// (`kMinBlockSize` in `c10/core/AllocatorConfig.h`, torch 2.11).
pub const CUDA_MIN_BLOCK_SIZE: u64 = 512;

/// Largest request the CUDA caching allocator serves from its small pool
/// (`kSmallSize`, 1 MiB): up to this size a block is always exactly [`cuda_round_size`].
pub const CUDA_SMALL_SIZE: u64 = 1 << 20;

/// The bytes the CUDA caching allocator of torch 2.11 reserves, and reports, for a
/// request of `nbytes`: `round_size` in `c10/cuda/CUDACachingAllocator.cpp`. This is the
/// one place the rule is written down; the analytic side applies it to each tensor.
///
/// - 0 bytes: no block at all (the allocator returns a null pointer and reports nothing);
/// - below 512 bytes: 512;
/// - otherwise the next multiple of 512, unless power-of-two rounding is configured: with
///   `roundup_power2_divisions` = d > 1 for this size's interval
///   (`PYTORCH_CUDA_ALLOC_CONF=roundup_power2_divisions:…`; off by default, pass 0 or 1)
///   and `nbytes > 512·d`, the interval `[2^k, 2^(k+1))` holding `nbytes` is cut into d
///   equal steps and `nbytes` rounds up to the next step (a power of two stays as it is).
///
/// The reported block is exactly this size for requests up to 1 MiB
/// ([`CUDA_SMALL_SIZE`]; the small pool always splits off the rest). A larger request may
/// get a bigger block: the allocator does not split a cached or fresh block whose
/// remainder would be 1 MiB or less (without `expandable_segments`), so the block
/// reported is at most 1 MiB above this size and depends on the cache's state.
///
/// `None` when the rounded size does not fit in 64 bits.
pub fn cuda_round_size(nbytes: u64, roundup_power2_divisions: u64) -> Option<u64> {
    let d = roundup_power2_divisions;
    if nbytes == 0 {
        return Some(0);
    }
    if nbytes < CUDA_MIN_BLOCK_SIZE {
        return Some(CUDA_MIN_BLOCK_SIZE);
    }
    if d > 1 && nbytes > CUDA_MIN_BLOCK_SIZE.checked_mul(d)? {
        // roundup_power2_next_division
        if nbytes.is_power_of_two() {
            return Some(nbytes);
        }
        let floor = 1u64 << (63 - nbytes.leading_zeros());
        let step = floor >> (63 - d.leading_zeros());
        if step == 0 {
            return floor.checked_mul(2);
        }
        let rounded_down = nbytes & !(step - 1);
        return if rounded_down == nbytes {
            Some(nbytes)
        } else {
            rounded_down.checked_add(step)
        };
    }
    nbytes
        .div_ceil(CUDA_MIN_BLOCK_SIZE)
        .checked_mul(CUDA_MIN_BLOCK_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_rounding_by_hand() {
        assert_eq!(cuda_round_size(0, 0), Some(0));
        assert_eq!(cuda_round_size(1, 0), Some(512));
        assert_eq!(cuda_round_size(511, 0), Some(512));
        assert_eq!(cuda_round_size(512, 0), Some(512));
        assert_eq!(cuda_round_size(513, 0), Some(1024));
        // [64, 16] fp32 = 4096 bytes is a multiple of 512; [10, 4] fp32 = 160 → 512.
        assert_eq!(cuda_round_size(4096, 0), Some(4096));
        assert_eq!(cuda_round_size(160, 0), Some(512));
        // 1 MiB + 1 → 1 MiB + 512 (still 512 granularity in the large pool).
        assert_eq!(cuda_round_size(1_048_577, 1), Some(1_049_088));
        assert_eq!(cuda_round_size(u64::MAX, 0), None);
    }

    #[test]
    fn cuda_power2_divisions_by_hand() {
        // Only above 512·d: with d = 4 up to 2048 bytes the 512 rule holds.
        assert_eq!(cuda_round_size(1200, 4), Some(1536));
        assert_eq!(cuda_round_size(2000, 4), Some(2048));
        // 4500 with d = 4: [4096, 8192) in steps of 1024 → 5120 (the 512 rule: 4608).
        assert_eq!(cuda_round_size(4500, 4), Some(5120));
        assert_eq!(cuda_round_size(1200, 2), Some(1536));
        // 5 MiB + 1 with 8 divisions: interval [4 MiB, 8 MiB) in 512 KiB steps → 5.5 MiB.
        assert_eq!(
            cuda_round_size(5 * 1048576 + 1, 8),
            Some(5 * 1048576 + 524288)
        );
        // Powers of two and step boundaries stay as they are.
        assert_eq!(cuda_round_size(4 * 1048576, 8), Some(4 * 1048576));
        assert_eq!(cuda_round_size(5 * 1048576, 8), Some(5 * 1048576));
        // Divisions that are not powers of two act as the power of two below them.
        assert_eq!(cuda_round_size(5 * 1048576 + 1, 6), Some(6 * 1048576));
        // 0 and 1 division: the 512 rule.
        assert_eq!(cuda_round_size(5 * 1048576 + 1, 1), Some(5 * 1048576 + 512));
    }
}
