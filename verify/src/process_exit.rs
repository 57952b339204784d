//! Ending `verify-decoder` without libtorch's teardown.
//!
//! When `main` returns, the C runtime runs every static destructor of the loaded
//! libraries before the process ends. libtorch's deregister each of its thousands of
//! operators from the dispatcher, one dispatch-table update at a time, and glibc
//! consolidates the freed heap: on the 2-core CPU machine about 0.1 s of a 1.7 s default
//! run (docs/performance.md, twenty-first session), after every result is already written.
//! None of that work is visible outside the process (the kernel returns its memory and
//! closes its files either way), so [`finish`] flushes standard output and ends the process
//! with `_exit`, as compilers that skip freeing their heaps at exit do.
//!
//! Tools that collect their results in exit handlers still get a normal exit: Nsight
//! Compute and Nsight Systems (their CUDA injection library, which the hardware-counter
//! child runs under), LLVM's coverage runtime where `LLVM_PROFILE_FILE` names its output
//! (cargo-llvm-cov sets it; a bare `-C instrument-coverage` run does not), and any other
//! when `MODELMETER_EXIT_HANDLERS` is set (gprof's `gmon.out`, heaptrack).

use std::io::Write;
use std::process::ExitCode;

/// Environment variables whose presence (non-empty) means the exit handlers must run: a
/// tool injected into the process writes its results there; the last is the user's own
/// switch for any tool not recognised by the others.
pub const EXIT_HANDLERS_NEEDED_BY: [&str; 3] = [
    "CUDA_INJECTION64_PATH",
    "LLVM_PROFILE_FILE",
    "MODELMETER_EXIT_HANDLERS",
];

/// Whether the process may skip the exit handlers, given how to read an environment
/// variable (the process's own: [`std::env::var_os`]).
pub fn may_skip_exit_handlers(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> bool {
    EXIT_HANDLERS_NEEDED_BY
        .iter()
        .all(|name| var(name).map_or(true, |value| value.is_empty()))
}

/// Ends the process with `status`: standard output flushed, then `_exit(status)` where
/// [`may_skip_exit_handlers`] allows it, else a normal return of `ExitCode` from `main`.
/// Call it from `main` only, once everything the run writes is written and every value
/// whose `Drop` does visible work (a temporary folder removed, a child waited for) is gone.
pub fn finish(status: u8) -> ExitCode {
    // A failed flush (a closed pipe) loses nothing more by ending now.
    let _ = std::io::stdout().flush();
    if may_skip_exit_handlers(|name| std::env::var_os(name)) {
        let _ = std::io::stderr().flush();
        // C's stdio buffers too: native code's printf (MKL_VERBOSE, DNNL_VERBOSE lines)
        // would otherwise lose its last buffer when standard output is a pipe or a file.
        // SAFETY: fflush(NULL) flushes every open C stream; nothing else runs alongside.
        unsafe { libc::fflush(std::ptr::null_mut()) };
        // SAFETY: `_exit` only ends the process; no Rust value is used after it, and the
        // caller guarantees nothing left needs its destructor to run.
        unsafe { libc::_exit(i32::from(status)) }
    }
    ExitCode::from(status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<OsString> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn skips_the_handlers_when_no_tool_waits_for_them() {
        assert!(may_skip_exit_handlers(env(&[])));
        assert!(may_skip_exit_handlers(env(&[("PATH", "/usr/bin")])));
        // Set but empty: no injection library, no profile file.
        assert!(may_skip_exit_handlers(env(&[(
            "CUDA_INJECTION64_PATH",
            ""
        )])));
    }

    #[test]
    fn keeps_them_under_nsight_or_coverage() {
        assert!(!may_skip_exit_handlers(env(&[(
            "CUDA_INJECTION64_PATH",
            "/opt/nvidia/nsight-compute/target/linux-desktop-glibc_2_11_3-x64/libTreeLauncherTargetInjection.so"
        )])));
        assert!(!may_skip_exit_handlers(env(&[(
            "LLVM_PROFILE_FILE",
            "/tmp/cov-%p.profraw"
        )])));
        assert!(!may_skip_exit_handlers(env(&[(
            "MODELMETER_EXIT_HANDLERS",
            "1"
        )])));
    }
}
