//! Errors of the reference side: libtorch failures, observer failures, model errors.

/// Everything that can go wrong while running a reference module under the counter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// libtorch refused an op (bad shape, out of memory, no such device …).
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// The op observer could not be armed or read.
    #[error("op observer: {0}")]
    Observer(String),
    /// The allocation observer could not be started, read or stopped.
    #[error("allocation observer: {0}")]
    Allocations(String),
    /// A config, workload or costing error from the analytic crate.
    #[error(transparent)]
    Model(#[from] modelmeter::Error),
    /// Reading or writing a file (parity exports).
    /// The reason is part of the message, not a `source()`, so that chain printers do
    /// not repeat it.
    #[error("{path}: {cause}")]
    Io {
        path: std::path::PathBuf,
        cause: std::io::Error,
    },
    /// The parity check against Hugging Face transformers did not run or did not pass.
    #[error("parity check: {0}")]
    Parity(String),
}

impl Error {
    /// True when libtorch reported an out-of-memory condition.
    pub fn is_out_of_memory(&self) -> bool {
        match self {
            Error::Torch(e) => {
                let text = e.to_string();
                text.contains("out of memory")
                    || text.contains("OutOfMemory")
                    || text.contains("DefaultCPUAllocator: can't allocate")
            }
            _ => false,
        }
    }
}

/// Result alias of the reference crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
