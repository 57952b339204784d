//! The FFI surface of the observer shims (the crate's other unsafe code: the compiled
//! weight fill in `draws`, the fill's view of a fresh tensor in `weights`, and the CUDA
//! backend loader in `cuda_backend`): the C ABI of
//! `csrc/op_observer.cpp` (declared in `csrc/op_observer.h`) and of
//! `csrc/alloc_observer.cpp` (`csrc/alloc_observer.h`) and of `csrc/profiler_range.cpp`
//! (`csrc/profiler_range.h`), wrapped in safe functions that
//! turn every failure into an error.

use std::ffi::{c_char, c_int, c_void, CStr};

use crate::error::{Error, Result};

extern "C" {
    fn mmeter_observer_start(err: *mut c_char, err_len: usize) -> c_int;
    fn mmeter_observer_stop(
        out: *mut *mut c_char,
        out_len: *mut usize,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn mmeter_libtorch_config(out_len: *mut usize) -> *mut c_char;
    fn mmeter_tf32_matmul_allowed() -> c_int;
    fn mmeter_tf32_cudnn_allowed() -> c_int;
    fn mmeter_set_tf32_matmul_allowed(allowed: c_int) -> c_int;
    fn mmeter_cuda_synchronize(index: c_int, err: *mut c_char, err_len: usize) -> c_int;
    fn mmeter_cuda_mem_info(
        index: c_int,
        free_bytes: *mut usize,
        total_bytes: *mut usize,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn mmeter_free(p: *mut c_char);

    fn mmeter_alloc_start(recorder: *mut *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
    fn mmeter_alloc_count(
        recorder: *mut c_void,
        count: *mut usize,
        dropped: *mut u64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn mmeter_alloc_read(
        recorder: *mut c_void,
        from: usize,
        out: *mut *mut RawAllocEvent,
        out_len: *mut usize,
        dropped: *mut u64,
        err: *mut c_char,
        err_len: usize,
    ) -> c_int;
    fn mmeter_alloc_stop(recorder: *mut c_void, err: *mut c_char, err_len: usize) -> c_int;
    fn mmeter_alloc_free_events(events: *mut RawAllocEvent);

    fn mmeter_cuda_profiler_start(err: *mut c_char, err_len: usize) -> c_int;
    fn mmeter_cuda_profiler_stop(err: *mut c_char, err_len: usize) -> c_int;
}

const ERR_LEN: usize = 512;

fn message(buf: &[c_char; ERR_LEN]) -> String {
    // SAFETY: the shim writes a NUL-terminated string into the buffer (or leaves it zeroed).
    unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

/// Takes ownership of a malloc'd buffer of `len` bytes from the shim.
fn take(ptr: *mut c_char, len: usize) -> String {
    if ptr.is_null() {
        return String::new();
    }
    // SAFETY: the shim returned `len` initialised bytes at `ptr`, which we free once.
    let text = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
    // The log is ASCII but for op names: validate it in one pass (replacing any invalid
    // bytes only when there are some).
    let text = String::from_utf8(text.to_vec())
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
    // SAFETY: `ptr` came from the shim's malloc and is not used again.
    unsafe { mmeter_free(ptr) };
    text
}

/// Arms the RecordFunction callback for ops of the calling thread and its backward.
pub(crate) fn start() -> Result<()> {
    let mut err = [0 as c_char; ERR_LEN];
    // SAFETY: `err` is a writable buffer of ERR_LEN bytes.
    match unsafe { mmeter_observer_start(err.as_mut_ptr(), ERR_LEN) } {
        0 => Ok(()),
        _ => Err(Error::Observer(message(&err))),
    }
}

/// Disarms the callback and returns the op log written since [`start`].
pub(crate) fn stop() -> Result<String> {
    let mut err = [0 as c_char; ERR_LEN];
    let mut out: *mut c_char = std::ptr::null_mut();
    let mut len = 0usize;
    // SAFETY: all pointers point to live locals; the shim fills `out`/`len` on success.
    let rc = unsafe { mmeter_observer_stop(&mut out, &mut len, err.as_mut_ptr(), ERR_LEN) };
    let log = take(out, len);
    match rc {
        0 => Ok(log),
        _ => Err(Error::Observer(message(&err))),
    }
}

/// libtorch's build configuration (`at::show_config()`), if it could be read.
pub fn libtorch_config() -> Option<String> {
    let mut len = 0usize;
    // SAFETY: `len` is a live local; the result is a malloc'd buffer or null.
    let ptr = unsafe { mmeter_libtorch_config(&mut len) };
    (!ptr.is_null()).then(|| take(ptr, len))
}

/// Whether libtorch lets fp32 matmuls use TF32 tensor cores.
pub fn tf32_matmul_allowed() -> Option<bool> {
    // SAFETY: no arguments; the shim catches all exceptions.
    match unsafe { mmeter_tf32_matmul_allowed() } {
        0 => Some(false),
        1 => Some(true),
        _ => None,
    }
}

/// Whether libtorch lets fp32 cuDNN convolutions use TF32 tensor cores (PyTorch: on).
pub fn tf32_cudnn_allowed() -> Option<bool> {
    // SAFETY: no arguments; the shim catches all exceptions.
    match unsafe { mmeter_tf32_cudnn_allowed() } {
        0 => Some(false),
        1 => Some(true),
        _ => None,
    }
}

/// Both TF32 switches, or an error naming the one libtorch could not report (the
/// engine of fp32 work would be unknown).
pub fn tf32() -> Result<modelmeter::conventions::Tf32> {
    let unknown = |which: &str| {
        Error::Observer(format!(
            "libtorch could not say whether {which} may use TF32, so their engine is unknown"
        ))
    };
    Ok(modelmeter::conventions::Tf32 {
        matmul: tf32_matmul_allowed().ok_or_else(|| unknown("fp32 matmuls"))?,
        cudnn: tf32_cudnn_allowed().ok_or_else(|| unknown("fp32 cuDNN convolutions"))?,
    })
}

/// Allows or forbids TF32 for fp32 matmuls (process-wide, like PyTorch's flag).
pub fn set_tf32_matmul_allowed(allowed: bool) -> Result<()> {
    // SAFETY: plain integer argument; the shim catches all exceptions.
    match unsafe { mmeter_set_tf32_matmul_allowed(c_int::from(allowed)) } {
        0 => Ok(()),
        _ => Err(Error::Observer("could not set libtorch's TF32 flag".into())),
    }
}

/// `index` as the shim takes it: libtorch's device index is an int8
/// (`c10::DeviceIndex`), so a larger one would be truncated to another device.
fn device_index(index: usize) -> Result<c_int> {
    match u8::try_from(index) {
        Ok(i) if i <= modelmeter::Platform::MAX_CUDA_INDEX => Ok(c_int::from(i)),
        _ => Err(Error::Observer(format!(
            "CUDA device index {index} is out of range: libtorch addresses 0 to {}",
            modelmeter::Platform::MAX_CUDA_INDEX
        ))),
    }
}

/// Waits until CUDA device `index` has finished all queued work. An asynchronous CUDA
/// error of that work (a failed kernel) comes back here as an error, so it is charged to
/// the layer that caused it, not to a later one.
pub fn cuda_synchronize(index: usize) -> Result<()> {
    let index = device_index(index)?;
    let mut err = [0 as c_char; ERR_LEN];
    // SAFETY: `err` is a writable buffer of ERR_LEN bytes; the shim catches all exceptions.
    match unsafe { mmeter_cuda_synchronize(index, err.as_mut_ptr(), ERR_LEN) } {
        0 => Ok(()),
        _ => Err(Error::Observer(format!(
            "CUDA error surfaced at synchronisation: {}",
            message(&err)
        ))),
    }
}

/// [`cuda_synchronize`] for a libtorch device; nothing to wait for on the CPU.
pub fn synchronize(device: tch::Device) -> Result<()> {
    match device {
        tch::Device::Cuda(index) => cuda_synchronize(index),
        _ => Ok(()),
    }
}

/// Free and total bytes of CUDA device `index`, as the CUDA runtime reports them (what a
/// run can still allocate, unlike `nvidia-smi`'s total).
pub fn cuda_memory(index: usize) -> Result<(u64, u64)> {
    let index = device_index(index)?;
    let (mut free, mut total) = (0usize, 0usize);
    let mut err = [0 as c_char; ERR_LEN];
    // SAFETY: all pointers point to live locals; the shim catches all exceptions.
    let rc =
        unsafe { mmeter_cuda_mem_info(index, &mut free, &mut total, err.as_mut_ptr(), ERR_LEN) };
    match rc {
        0 => Ok((free as u64, total as u64)),
        _ => Err(Error::Observer(format!(
            "could not read the memory of cuda:{index}: {}",
            message(&err)
        ))),
    }
}

/// `cuProfilerStart()`: opens a profiler range, which `ncu --replay-mode app-range` (the
/// default of `--hardware-counters`) or `range` profiles as one result (csrc/profiler_range.cpp;
/// the driver is looked up at run time). Needs a current CUDA context on the calling
/// thread, which libtorch makes current once it has run work there. Outside Nsight
/// Compute the call does nothing and succeeds.
pub fn cuda_profiler_start() -> Result<()> {
    let mut err = [0 as c_char; ERR_LEN];
    // SAFETY: `err` is a writable buffer of ERR_LEN bytes; the shim catches all exceptions.
    match unsafe { mmeter_cuda_profiler_start(err.as_mut_ptr(), ERR_LEN) } {
        0 => Ok(()),
        _ => Err(Error::Observer(format!(
            "cannot open a profiler range: {}",
            message(&err)
        ))),
    }
}

/// `cuProfilerStop()`: closes the range [`cuda_profiler_start`] opened.
pub fn cuda_profiler_stop() -> Result<()> {
    let mut err = [0 as c_char; ERR_LEN];
    // SAFETY: as in `cuda_profiler_start`.
    match unsafe { mmeter_cuda_profiler_stop(err.as_mut_ptr(), ERR_LEN) } {
        0 => Ok(()),
        _ => Err(Error::Observer(format!(
            "cannot close the profiler range: {}",
            message(&err)
        ))),
    }
}

/// One allocator report as the shim stores it (`mmeter_alloc_event` in
/// `csrc/alloc_observer.h`; the layouts must agree field for field).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RawAllocEvent {
    /// The block's address (0 for an out-of-memory report).
    pub address: u64,
    /// > 0 an allocation, < 0 a free; for an out-of-memory report the bytes requested.
    pub bytes: i64,
    /// The allocator's own running totals after the event.
    pub total_allocated: u64,
    pub total_reserved: u64,
    /// `at::RecordFunction::currentThreadId()` of the reporting thread.
    pub thread: u64,
    /// The clock shared with the op observer (sequence.h).
    pub sequence: u64,
    /// `c10::DeviceType` (0 CPU, 1 CUDA) and device index (-1: none).
    pub device_type: i16,
    pub device_index: i16,
    /// 0 usage report, 1 out-of-memory report.
    pub kind: i32,
}

/// An allocation recorder installed in the calling thread's libtorch `PROFILER_STATE`
/// slot. Holding a raw pointer, it is neither `Send` nor `Sync`: it is stopped on the
/// thread that started it, as libtorch's thread-local slot requires. Dropping it stops it.
pub(crate) struct AllocRecorder {
    handle: *mut c_void,
}

impl AllocRecorder {
    /// Installs a new recorder on the calling thread; an error when the slot is taken.
    pub(crate) fn start() -> Result<AllocRecorder> {
        let mut handle: *mut c_void = std::ptr::null_mut();
        let mut err = [0 as c_char; ERR_LEN];
        // SAFETY: both pointers point to live locals; the shim catches all exceptions.
        match unsafe { mmeter_alloc_start(&mut handle, err.as_mut_ptr(), ERR_LEN) } {
            0 if !handle.is_null() => Ok(AllocRecorder { handle }),
            0 => Err(Error::Allocations("the shim returned no recorder".into())),
            _ => Err(Error::Allocations(message(&err))),
        }
    }

    /// Events recorded so far, and reports lost for want of memory.
    pub(crate) fn count(&self) -> Result<(usize, u64)> {
        let (mut count, mut dropped) = (0usize, 0u64);
        let mut err = [0 as c_char; ERR_LEN];
        // SAFETY: `handle` is a live recorder (stopped only by consuming `self`); all
        // other pointers point to live locals.
        let rc = unsafe {
            mmeter_alloc_count(
                self.handle,
                &mut count,
                &mut dropped,
                err.as_mut_ptr(),
                ERR_LEN,
            )
        };
        match rc {
            0 => Ok((count, dropped)),
            _ => Err(Error::Allocations(message(&err))),
        }
    }

    /// The events from index `from` on, and reports lost so far.
    pub(crate) fn read(&self, from: usize) -> Result<(Vec<RawAllocEvent>, u64)> {
        let mut out: *mut RawAllocEvent = std::ptr::null_mut();
        let (mut len, mut dropped) = (0usize, 0u64);
        let mut err = [0 as c_char; ERR_LEN];
        // SAFETY: `handle` is a live recorder; all other pointers point to live locals.
        let rc = unsafe {
            mmeter_alloc_read(
                self.handle,
                from,
                &mut out,
                &mut len,
                &mut dropped,
                err.as_mut_ptr(),
                ERR_LEN,
            )
        };
        let events = if out.is_null() {
            Vec::new()
        } else {
            // SAFETY: the shim returned `len` initialised events at `out` (malloc'd), which
            // are copied here and freed once.
            let events = unsafe { std::slice::from_raw_parts(out, len) }.to_vec();
            // SAFETY: `out` came from the shim's malloc and is not used again.
            unsafe { mmeter_alloc_free_events(out) };
            events
        };
        match rc {
            0 => Ok((events, dropped)),
            _ => Err(Error::Allocations(message(&err))),
        }
    }

    /// Stops recording and uninstalls the recorder.
    pub(crate) fn stop(mut self) -> Result<()> {
        self.release()
    }

    fn release(&mut self) -> Result<()> {
        let handle = std::mem::replace(&mut self.handle, std::ptr::null_mut());
        if handle.is_null() {
            return Ok(());
        }
        let mut err = [0 as c_char; ERR_LEN];
        // SAFETY: `handle` is a live recorder, released exactly once here (the shim frees
        // it whatever the outcome); `err` is a writable buffer of ERR_LEN bytes.
        match unsafe { mmeter_alloc_stop(handle, err.as_mut_ptr(), ERR_LEN) } {
            0 => Ok(()),
            _ => Err(Error::Allocations(message(&err))),
        }
    }
}

impl Drop for AllocRecorder {
    fn drop(&mut self) {
        let _ = self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_indices_past_libtorchs_int8_are_refused_not_truncated() {
        assert_eq!(device_index(127).unwrap(), 127);
        for index in [128, 255, 256, usize::MAX] {
            let e = device_index(index).unwrap_err().to_string();
            assert!(e.contains(&format!("{index} is out of range")), "{e}");
        }
    }

    #[test]
    fn raw_event_layout_matches_the_c_struct() {
        // mmeter_alloc_event: 6 × 8 bytes, 2 × 2 bytes, 4 bytes, no padding.
        assert_eq!(std::mem::size_of::<RawAllocEvent>(), 56);
        assert_eq!(std::mem::align_of::<RawAllocEvent>(), 8);
        assert_eq!(std::mem::offset_of!(RawAllocEvent, thread), 32);
        assert_eq!(std::mem::offset_of!(RawAllocEvent, sequence), 40);
        assert_eq!(std::mem::offset_of!(RawAllocEvent, device_type), 48);
        assert_eq!(std::mem::offset_of!(RawAllocEvent, kind), 52);
    }
}
