// The C ABI of the profiler-range shim (profiler_range.cpp), wrapped in safe Rust by
// src/ffi.rs: the CUDA driver's cuProfilerStart/cuProfilerStop, which Nsight Compute
// intercepts to delimit the ranges of `ncu --replay-mode range`.
#ifndef MODELMETER_PROFILER_RANGE_H
#define MODELMETER_PROFILER_RANGE_H

#include "ffi_export.h"

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

// cuProfilerStart() on the calling thread's current CUDA context. 0 on success; else a
// message in err[err_len] (the driver is not loaded, or the call returned an error code).
int mmeter_cuda_profiler_start(char* err, size_t err_len) MMETER_NOEXCEPT;

// cuProfilerStop(); as mmeter_cuda_profiler_start.
int mmeter_cuda_profiler_stop(char* err, size_t err_len) MMETER_NOEXCEPT;

#ifdef __cplusplus
}
#endif

#endif
