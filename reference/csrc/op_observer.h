// The C ABI of the op observer shim (op_observer.cpp), wrapped in safe Rust by
// src/ffi.rs. Every function catches all C++ exceptions; failures are reported through
// return codes and NUL-terminated messages written into caller-owned buffers.
#ifndef MODELMETER_OP_OBSERVER_H
#define MODELMETER_OP_OBSERVER_H

#include "ffi_export.h"

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

// Arms the RecordFunction callback for the calling thread's ops (and their backward).
// 0 on success; else a message in err[err_len].
int mmeter_observer_start(char* err, size_t err_len) MMETER_NOEXCEPT;

// Disarms it and hands over the op log (*out, *out_len; free with mmeter_free).
// 0 on success; else a message in err[err_len].
int mmeter_observer_stop(char** out, size_t* out_len, char* err, size_t err_len) MMETER_NOEXCEPT;

// at::show_config() (free with mmeter_free), or NULL.
char* mmeter_libtorch_config(size_t* out_len) MMETER_NOEXCEPT;

// torch.backends.cuda.matmul.allow_tf32: 1, 0, or -1 when it cannot be read.
int mmeter_tf32_matmul_allowed(void) MMETER_NOEXCEPT;

// torch.backends.cudnn.allow_tf32: 1, 0, or -1 when it cannot be read.
int mmeter_tf32_cudnn_allowed(void) MMETER_NOEXCEPT;

// Sets torch.backends.cuda.matmul.allow_tf32; 0 on success.
int mmeter_set_tf32_matmul_allowed(int allowed) MMETER_NOEXCEPT;

// Waits for CUDA device `index`; an asynchronous CUDA error comes back as a message.
int mmeter_cuda_synchronize(int index, char* err, size_t err_len) MMETER_NOEXCEPT;

// Free and total bytes of CUDA device `index` (cudaMemGetInfo); 0 on success.
int mmeter_cuda_mem_info(int index, size_t* free_bytes, size_t* total_bytes, char* err,
                         size_t err_len) MMETER_NOEXCEPT;

// Frees a buffer the shim returned.
void mmeter_free(char* p) MMETER_NOEXCEPT;

#ifdef __cplusplus
}
#endif

#endif  // MODELMETER_OP_OBSERVER_H
