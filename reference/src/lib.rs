//! # modelmeter-reference
//!
//! The measured half of modelmeter: DeepSeek-V2 decoder modules written with `tch`
//! (libtorch), mirroring the vendor code, run on `cuda:N` or the CPU under a
//! dispatcher-level FLOP counter ([`FlopCounter`]). The counter costs every op
//! libtorch executes with the conventions table of the analytic crate, so measured and
//! analytic metrics can be compared exactly.

pub mod counter;
pub mod error;
pub mod observer;
pub mod op_log;

pub use counter::{Counts, FlopCounter, OpRecord, OpSummary, Region};
pub use error::{Error, Result};
