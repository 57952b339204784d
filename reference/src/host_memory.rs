//! How this process takes memory from the operating system for libtorch's CPU tensors.
//!
//! Two costs of a CPU run are the kernel's, not libtorch's: first touching fresh pages
//! (DeepSeek-OCR's 64 experts are 880 MB of fp32 weights, about 215 thousand page faults
//! while they are drawn) and glibc handing every large tensor to `mmap` and back to
//! `munmap` when it is freed, so that each forward's large temporaries fault their pages
//! in again. Neither changes a count: libtorch's allocator (which the allocation observer
//! sees) asks for and frees the same blocks; only where glibc finds them changes.
//! Both are Linux and glibc specifics; elsewhere these functions do nothing.

/// Blocks up to this size come from glibc's heap instead of their own `mmap` (glibc's
/// largest allowed threshold on 64-bit Linux): a freed block of that size is reused by
/// the next op instead of being unmapped and faulted in again.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 32 << 20;

/// Free memory at the top of glibc's heap up to this size is kept for the next op instead
/// of being returned to the system at once (what glibc would keep by default once the
/// threshold above has moved, with its dynamic thresholds, to 32 MiB).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: i32 = 2 * MMAP_THRESHOLD;

/// Lets freed tensors of up to 32 MiB be reused from glibc's heap rather than unmapped
/// and faulted in again by the next op (`mallopt`). Call once, before the run allocates.
/// On the build machine it takes about 55 thousand page faults and 3–5 % of the wall time
/// off the default `verify-decoder` run, for about 8 MB more peak RSS
/// (docs/performance.md, twentieth session).
pub fn reuse_freed_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets two of glibc's tuning parameters; any value is valid and
    // a refusal (return 0) leaves glibc's defaults, which are also correct.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

/// Faults in the whole pages inside `buf` in one system call (`MADV_POPULATE_WRITE`,
/// Linux 5.14 or later) before they are written: about a quarter less time than taking
/// each page's fault on first write (measured on the build machine, 880 MB over two
/// threads: 0.30 s against 0.39 s). Older kernels refuse it, and then the writes fault
/// the pages in as before. The values in `buf` are unchanged: pages already present stay
/// as they are, and a fresh anonymous page reads as zeros either way.
pub fn prefault(buf: &mut [f32]) {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = buf.as_mut_ptr() as usize;
        let end = start + std::mem::size_of_val(buf);
        let first = start.next_multiple_of(PAGE);
        let last = end - end % PAGE;
        if last > first {
            // SAFETY: [first, last) lies inside `buf`, which this function borrows
            // mutably; MADV_POPULATE_WRITE maps pages in (as a write would) and changes
            // no byte of memory that is already mapped. Its result is ignored on purpose:
            // a kernel that refuses it leaves the pages to be faulted in by the writes.
            unsafe {
                libc::madvise(
                    first as *mut libc::c_void,
                    last - first,
                    libc::MADV_POPULATE_WRITE,
                );
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefaulting_keeps_every_value() {
        // Unaligned at both ends, several pages, values already written.
        let mut values: Vec<f32> = (0..10_000).map(|i| i as f32 * 0.5).collect();
        let expected = values.clone();
        prefault(&mut values[3..9_997]);
        assert_eq!(values, expected);
        // Shorter than a page, and empty.
        prefault(&mut values[10..20]);
        prefault(&mut values[0..0]);
        assert_eq!(values, expected);
    }
}
