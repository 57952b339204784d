//! libtorch's CUDA backend (`libtorch_cuda.so`): loaded at start-up on machines with an
//! NVIDIA driver, never on the others.
//!
//! The binaries link `libtorch_cpu` alone. Loading `libtorch_cuda` and the CUDA libraries
//! it pulls in (cuBLAS, cuBLASLt, cuDNN, NCCL, cuFFT, nvJitLink …) costs every process
//! about 235 MB of resident memory and 0.2 s (the 2-core CPU machine, 2026-11-28:
//! libtorch_cpu alone 125 MB, with the CUDA backend 360 MB), which a run on a machine
//! without a GPU never uses. Where `libcuda.so.1` loads, a static initializer of the C++
//! shim (`csrc/cuda_backend.cpp`) opens the backend from the folder `libtorch_cpu` came
//! from, before `main`: libtorch decides its CUDA hooks once per process, at the first
//! question about CUDA, so loading it later could be too late.

use std::ffi::{c_char, c_int, CStr};

extern "C" {
    fn mmeter_cuda_backend_state(err: *mut c_char, err_len: usize) -> c_int;
    fn mmeter_cuda_backend_load(err: *mut c_char, err_len: usize) -> c_int;
}

const ERR_LEN: usize = 1024;

/// What start-up did about the CUDA backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Loaded: libtorch can use CUDA devices if the driver sees any.
    Loaded,
    /// Not loaded: this machine has no NVIDIA driver (`libcuda.so.1`).
    NoDriver,
    /// Loading failed, or this libtorch is a CPU-only build; the loader's message.
    Failed(String),
}

fn decode(state: c_int, err: &[c_char]) -> Backend {
    match state {
        1 => Backend::Loaded,
        0 => Backend::NoDriver,
        _ => {
            // SAFETY: the shim writes a NUL-terminated message into the buffer.
            let text = unsafe { CStr::from_ptr(err.as_ptr()) };
            Backend::Failed(text.to_string_lossy().into_owned())
        }
    }
}

/// What start-up did.
pub fn state() -> Backend {
    let mut err = [0 as c_char; ERR_LEN];
    // SAFETY: a writable buffer of ERR_LEN bytes; the shim writes at most that.
    decode(
        unsafe { mmeter_cuda_backend_state(err.as_mut_ptr(), ERR_LEN) },
        &err,
    )
}

/// Loads the backend now, driver or not. Only for tests: libtorch may already have
/// decided it has no CUDA in this process.
pub fn load_now() -> Backend {
    let mut err = [0 as c_char; ERR_LEN];
    // SAFETY: as in `state`.
    decode(
        unsafe { mmeter_cuda_backend_load(err.as_mut_ptr(), ERR_LEN) },
        &err,
    )
}

/// The CUDA devices libtorch sees, or why it cannot see any.
pub fn devices() -> Result<i64, String> {
    match state() {
        Backend::Loaded => Ok(tch::Cuda::device_count()),
        Backend::NoDriver => Err("no NVIDIA driver (libcuda.so.1) on this machine".into()),
        Backend::Failed(why) => Err(why),
    }
}

/// True when libtorch sees a CUDA device.
pub fn is_available() -> bool {
    devices().is_ok_and(|n| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backend_loads_beside_libtorch_cpu() {
        // PyPI's torch 2.11.0 (the .venv) ships libtorch_cuda beside libtorch_cpu; it must
        // load on a machine without a GPU too (start-up skips it only to save memory).
        let folder_has_cuda = std::env::var("LIBTORCH")
            .map(|l| {
                std::path::Path::new(&l)
                    .join("lib/libtorch_cuda.so")
                    .exists()
            })
            .unwrap_or(true);
        match load_now() {
            Backend::Loaded => {}
            other if folder_has_cuda => panic!("the CUDA backend did not load: {other:?}"),
            Backend::Failed(why) => assert!(why.contains("libtorch_cuda.so"), "{why}"),
            Backend::NoDriver => panic!("load_now never answers NoDriver"),
        }
        assert_eq!(state(), load_now(), "loading twice changes nothing");
    }
}
