//! The CUDA caching allocator's configuration for a verification run.
//!
//! The `activation_bytes` row compares the blocks the allocator reports with the analytic
//! tensors, each rounded by [`modelmeter::allocator::cuda_round_size`]. By default the
//! caching allocator hands a request of more than 1 MiB a cached or fresh block up to
//! 1 MiB larger without splitting it, so what it reports depends on what ran before
//! (measured on an H200, 2026-11-28: +784,384 bytes on a decode step's 1.3 MB KV `cat`).
//! With `expandable_segments:True` it always splits, so every block is exactly the
//! rounded request and the row can be exact. `verify-decoder` asks for it before libtorch
//! starts, unless the user's `PYTORCH_CUDA_ALLOC_CONF` already says either way; the JSON
//! report's environment records the configuration that ran.

/// The environment variable libtorch's CUDA caching allocator reads its settings from.
pub const ALLOC_CONF: &str = "PYTORCH_CUDA_ALLOC_CONF";

/// The setting that makes every reported block exactly the rounded request.
pub const EXPANDABLE: &str = "expandable_segments:True";

/// The allocator configuration to run with, given the user's `current` one: theirs when
/// it already decides `expandable_segments`, else theirs plus [`EXPANDABLE`].
pub fn with_expandable_segments(current: Option<&str>) -> String {
    match current.map(str::trim).filter(|c| !c.is_empty()) {
        None => EXPANDABLE.to_string(),
        Some(c) if c.contains("expandable_segments") => c.to_string(),
        Some(c) => format!("{c},{EXPANDABLE}"),
    }
}

/// Sets [`ALLOC_CONF`] for this process (and the ones it starts: the profiled run under
/// ncu, the oracle's Python) before libtorch reads it. Call first thing in `main`, while
/// the process has one thread.
pub fn prepare() {
    let current = std::env::var(ALLOC_CONF).ok();
    std::env::set_var(ALLOC_CONF, with_expandable_segments(current.as_deref()));
}

/// The configuration this process runs with, for reports.
pub fn current() -> Option<String> {
    std::env::var(ALLOC_CONF).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expandable_segments_are_added_unless_the_user_decided() {
        assert_eq!(with_expandable_segments(None), "expandable_segments:True");
        assert_eq!(
            with_expandable_segments(Some(" ")),
            "expandable_segments:True"
        );
        assert_eq!(
            with_expandable_segments(Some("max_split_size_mb:128")),
            "max_split_size_mb:128,expandable_segments:True"
        );
        assert_eq!(
            with_expandable_segments(Some("expandable_segments:False")),
            "expandable_segments:False"
        );
    }
}
