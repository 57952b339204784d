// The C ABI of the CUDA-backend loader (cuda_backend.cpp), wrapped by src/cuda_backend.rs.
#ifndef MODELMETER_CUDA_BACKEND_H
#define MODELMETER_CUDA_BACKEND_H

#include "ffi_export.h"

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

// What start-up did: 1 the backend is loaded; 0 not loaded because this machine has no
// NVIDIA driver (libcuda.so.1); -1 loading failed, or this libtorch has no CUDA backend,
// with the reason in err[err_len].
int mmeter_cuda_backend_state(char* err, size_t err_len) MMETER_NOEXCEPT;

// Loads the backend now, driver or not (what start-up does when a driver is present);
// returns as mmeter_cuda_backend_state.
int mmeter_cuda_backend_load(char* err, size_t err_len) MMETER_NOEXCEPT;

#ifdef __cplusplus
}
#endif

#endif
