//! # modelmeter-verify
//!
//! Compares modelmeter's analytic layers with reference modules run under the FLOP
//! counter, layer by layer and metric by metric, and reports pass/fail in forms CI can
//! gate on. The binary `verify-decoder` only parses options and calls [`app::run`]
//! ([`app::prepare`] checks everything before anything runs, [`app::report_of`] runs).
//! The rest is library code, one responsibility a module: the join ([`pairing`]), the
//! rows ([`check`]) and their statuses ([`compare`]), the plan ([`plan`], with test-only
//! [`hooks`]), the run loop ([`runner`]), results ([`results`]), the memory pre-check
//! ([`memory`]) and the CUDA allocator's setting ([`cuda_allocator`]), the device option
//! and what the device is ([`device`], [`environment`]), sweeps ([`sweep`]), the
//! whole-model verification ([`model`], with `modelmeter::cli::progress_bar`), the
//! independent witness ([`oracle`]), reports ([`report`]) and where the time went
//! ([`timings`]). [`hardware`] reads Nsight Compute's hardware counters.

/// This crate's `eprint!`: like the standard one, but a failed write to standard error
/// (`2>/dev/full`, a closed pipe) is ignored instead of panicking, since there is nowhere
/// left to report it. Defined before the modules, so it replaces the standard macro in
/// all of them.
macro_rules! eprint {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($arg)*);
    }};
}

/// This crate's `eprintln!`: see [`eprint!`]; never panics.
macro_rules! eprintln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod app;
pub mod check;
pub mod compare;
pub mod cuda_allocator;
pub mod device;
pub mod environment;
pub mod hardware;
pub mod hooks;
pub mod host_limits;
pub mod memory;
pub mod model;
pub mod oracle;
pub mod pairing;
pub mod plan;
pub mod process_exit;
pub mod report;
pub mod results;
pub mod runner;
pub mod sweep;
pub mod timings;
