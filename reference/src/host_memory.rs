//! How this process takes memory from the operating system for libtorch's CPU tensors.
//!
//! Two costs of a CPU run are the kernel's, not libtorch's: first touching fresh pages
//! (DeepSeek-OCR's 64 experts are 880 MB of fp32 weights, about 215 thousand page faults
//! while they are drawn) and glibc handing every large tensor to `mmap` and back to
//! `munmap` when it is freed, so that each forward's large temporaries fault their pages
//! in again. Neither changes a count: libtorch's allocator (which the allocation observer
//! sees) asks for and frees the same blocks; only where glibc finds them changes.
//! Both are Linux and glibc specifics; elsewhere these functions do nothing.

/// Blocks below this size come from glibc's heap instead of their own `mmap` (glibc's
/// largest allowed threshold on 64-bit Linux): a freed block is reused by the next op
/// instead of being unmapped and faulted in again.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 32 << 20;

/// Free memory at the top of glibc's heap up to this size is kept for the next op instead
/// of being returned to the system at once (what glibc would keep by default once the
/// threshold above has moved, with its dynamic thresholds, to 32 MiB).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: i32 = 2 * MMAP_THRESHOLD;

/// Lets freed tensors below 32 MiB be reused from glibc's heap rather than unmapped and
/// faulted in again by the next op (`mallopt`). Call once, before the run allocates. What
/// it saves and costs on the build machine: docs/performance.md (twentieth session).
pub fn reuse_freed_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets two of glibc's tuning parameters; any value is valid and
    // a refusal (return 0) leaves glibc's defaults, which are also correct.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

/// The kernel's page size (4 KiB on x86-64; 16 or 64 KiB on some arm64 kernels).
#[cfg(target_os = "linux")]
fn page_size() -> usize {
    static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf reads a system constant.
        let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(size)
            .ok()
            .filter(|s| s.is_power_of_two())
            .unwrap_or(4096)
    })
}

/// Faults in the whole pages inside `buf` in one system call (`MADV_POPULATE_WRITE`,
/// Linux 5.14 or later) before they are written: less time than taking each page's fault
/// on first write (docs/performance.md, twentieth session). Returns whether the kernel
/// did it: older kernels refuse it (and then the writes fault the pages in as before), and
/// there is nothing to do for a slice without a whole page. The values in `buf` are
/// unchanged: pages already present stay as they are, and a fresh anonymous page reads as
/// zeros either way.
pub fn prefault<T>(buf: &mut [T]) -> bool {
    #[cfg(target_os = "linux")]
    {
        let page = page_size();
        let start = buf.as_mut_ptr() as usize;
        let end = start + std::mem::size_of_val(buf);
        let first = start.next_multiple_of(page);
        let last = end - end % page;
        if last <= first {
            return false;
        }
        // SAFETY: [first, last) is whole pages inside `buf` (both ends page-aligned),
        // which this function borrows mutably for the call; MADV_POPULATE_WRITE maps
        // pages in as a write would and changes no byte of memory already mapped.
        unsafe {
            libc::madvise(
                first as *mut libc::c_void,
                last - first,
                libc::MADV_POPULATE_WRITE,
            ) == 0
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = buf;
        false
    }
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
        // Shorter than a page, and empty: nothing to do.
        assert!(!prefault(&mut values[10..20]));
        assert!(!prefault(&mut values[0..0]));
        assert_eq!(values, expected);
    }

    /// The kernel's release as (major, minor), from /proc.
    #[cfg(target_os = "linux")]
    fn kernel() -> Option<(u32, u32)> {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
        let mut parts = release.trim().split(['.', '-']);
        Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_kernel_that_has_populate_write_populates_a_fresh_buffer() {
        let mut fresh = vec![0f32; 4 << 20];
        let done = prefault(&mut fresh);
        match kernel() {
            Some(release) if release >= (5, 14) => assert!(done, "kernel {release:?}"),
            _ => {}
        }
        assert!(fresh.iter().all(|v| *v == 0.0));
    }
}
