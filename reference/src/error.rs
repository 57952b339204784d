//! Errors of the reference side: libtorch failures, observer failures, model errors.

/// Everything that can go wrong while running a reference module under the counter.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// libtorch refused an op (bad shape, out of memory, no such device …). Shown
    /// without the C++ backtrace libtorch appends ([`torch_text`]).
    #[error("libtorch: {}", torch_text(.0))]
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
    /// The error inside was raised while the layer's profiler range was open
    /// ([`crate::harness::Prepared::run_in_profiler_range`]: in the counted forward or in
    /// closing the range), so Nsight Compute has a range, and a result row, for the layer.
    /// The `--hardware-counters` child lists such a layer as failed in its range rather
    /// than as one that opened none, so the rows after it keep their layers. On the CPU,
    /// which has no range, the same point is marked so that this bookkeeping can be
    /// tested. Shown as the error inside.
    #[error(transparent)]
    InProfilerRange(Box<Error>),
}

impl Error {
    /// True when libtorch reported an out-of-memory condition (also inside a profiler
    /// range).
    pub fn is_out_of_memory(&self) -> bool {
        match self {
            Error::InProfilerRange(inner) => inner.is_out_of_memory(),
            Error::Torch(e) => {
                let text = e.to_string();
                text.contains("out of memory")
                    || text.contains("OutOfMemory")
                    || text.contains("DefaultCPUAllocator: can't allocate")
            }
            _ => false,
        }
    }

    /// True when the error was raised while the layer's profiler range was open (see
    /// [`Error::InProfilerRange`]); false for one raised before it was opened, or outside
    /// any range.
    pub fn opened_profiler_range(&self) -> bool {
        matches!(self, Error::InProfilerRange(_))
    }

    /// `self` marked as raised inside an open profiler range (once: an error already
    /// marked is not wrapped again).
    pub fn in_profiler_range(self) -> Error {
        match self {
            marked @ Error::InProfilerRange(_) => marked,
            other => Error::InProfilerRange(Box::new(other)),
        }
    }
}

/// What libtorch said, without the C++ backtrace it appends to its messages
/// (`Exception raised from … (most recent call first):` and one line per frame): dozens of
/// lines that reports would repeat for every call and phase an error reaches.
pub fn torch_text(error: &tch::TchError) -> String {
    without_backtrace(&error.to_string()).to_string()
}

/// A libtorch message up to its backtrace (see [`torch_text`]): the backtrace starts with
/// `Exception raised from …` after a `TORCH_CHECK`, and straight with `frame #0: …` after
/// a failed `CAFFE_ENFORCE` (the CPU allocator's "can't allocate memory"), whose frames
/// carry the process's addresses, so that two runs' reports would differ.
pub fn without_backtrace(message: &str) -> &str {
    let at = ["\nException raised from", "\nframe #"]
        .iter()
        .filter_map(|marker| message.find(marker))
        .min();
    match at {
        Some(at) => message[..at].trim_end(),
        None => message,
    }
}

/// Result alias of the reference crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtorch_messages_are_shown_without_the_backtrace() {
        let e = Error::Torch(tch::TchError::Torch(
            "CUDA out of memory. Tried to allocate 2.00 GiB\nGPU 0 has 1 GiB free\n\
             Exception raised from malloc at c10/cuda/Alloc.cpp:1 (most recent call first):\n\
             frame #0: c10::Error::Error() + 0x1\nframe #1: at::empty() + 0x2"
                .into(),
        ));
        assert_eq!(
            e.to_string(),
            "libtorch: Internal torch error: CUDA out of memory. Tried to allocate 2.00 GiB\n\
             GPU 0 has 1 GiB free"
        );
        assert!(e.is_out_of_memory());
        // An enforce failure has its frames without the "Exception raised from" line.
        let cpu = Error::Torch(tch::TchError::Torch(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate 1643520000 bytes. Error code 12 (Cannot allocate memory)\n\
             frame #0: c10::ThrowEnforceNotMet(char const*, int) + 0x6a (0x7fae40d62d6a in libc10.so)\n\
             frame #1: c10::alloc_cpu(unsigned long) + 0x365 (0x7fae40d4db05 in libc10.so)"
                .into(),
        ));
        assert_eq!(
            cpu.to_string(),
            "libtorch: Internal torch error: [enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate 1643520000 bytes. Error code 12 (Cannot allocate memory)"
        );
        assert!(cpu.is_out_of_memory());
        let plain = Error::Torch(tch::TchError::Torch("shape '[2]' is invalid".into()));
        assert_eq!(
            plain.to_string(),
            "libtorch: Internal torch error: shape '[2]' is invalid"
        );
    }

    #[test]
    fn an_error_in_a_profiler_range_reads_as_the_error_inside() {
        let oom = Error::Torch(tch::TchError::Torch(
            "CUDA out of memory. Tried to allocate 2.00 GiB".into(),
        ));
        let text = oom.to_string();
        assert!(oom.is_out_of_memory() && !oom.opened_profiler_range());
        let marked = oom.in_profiler_range().in_profiler_range();
        assert!(marked.opened_profiler_range());
        assert!(marked.is_out_of_memory(), "{marked:?}");
        assert_eq!(marked.to_string(), text);
        // Marked once: the error inside is the libtorch one, not another mark.
        assert!(matches!(
            &marked,
            Error::InProfilerRange(inner) if matches!(**inner, Error::Torch(_))
        ));
        let other = Error::Observer("cannot close the profiler range: x".into());
        assert!(!other.is_out_of_memory());
        let other = other.in_profiler_range();
        assert!(other.opened_profiler_range() && !other.is_out_of_memory());
    }
}
