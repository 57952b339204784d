//! # modelmeter-verify
//!
//! Compares modelmeter's analytic layers with reference modules run under the FLOP
//! counter, layer by layer and metric by metric, and reports pass/fail in forms CI can
//! gate on. The binary `verify-decoder` only parses options and calls [`app::run`];
//! comparison ([`compare`]), running ([`runner`]), sweeps ([`sweep`]) and reports
//! ([`report`]) are library code. [`hardware`] reads Nsight Compute's hardware counters.

pub mod app;
pub mod check;
pub mod compare;
pub mod device;
pub mod environment;
pub mod hardware;
pub mod pairing;
pub mod report;
pub mod runner;
pub mod sweep;
