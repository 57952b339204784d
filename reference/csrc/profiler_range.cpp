// cuProfilerStart / cuProfilerStop for `verify-decoder --hardware-counters`: each layer's
// counted forward is one range of `ncu --replay-mode range`. The driver functions are
// looked up at run time in libcuda.so.1 (which libtorch has loaded by the time a CUDA
// layer runs), so the shim needs no CUDA headers and links without a driver. Nothing
// here throws; failures are return codes with messages.

#include "profiler_range.h"

#include <dlfcn.h>

#include <cstdio>
#include <cstring>

namespace {

void write_message(char* err, size_t len, const char* message) {
  if (err == nullptr || len == 0) {
    return;
  }
  std::snprintf(err, len, "%s", message);
}

// Calls the driver function `name` (CUresult (*)(void)); 0 on success.
int call_driver(const char* name, char* err, size_t err_len) {
  try {
    // The driver libtorch already loaded; load it only if it is not (then the call fails
    // for want of a context, which is reported).
    void* driver = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (driver == nullptr) {
      driver = dlopen("libcuda.so.1", RTLD_NOW);
    }
    if (driver == nullptr) {
      write_message(err, err_len,
                    "the CUDA driver (libcuda.so.1) cannot be loaded: no NVIDIA driver here");
      return 1;
    }
    using Call = int (*)();
    auto call = reinterpret_cast<Call>(dlsym(driver, name));
    if (call == nullptr) {
      char message[160];
      std::snprintf(message, sizeof message, "libcuda.so.1 has no %s", name);
      write_message(err, err_len, message);
      return 1;
    }
    int rc = call();
    if (rc != 0) {
      char message[200];
      std::snprintf(message, sizeof message,
                    "%s returned CUresult %d (201: no current CUDA context)", name, rc);
      write_message(err, err_len, message);
      return 1;
    }
    return 0;
  } catch (...) {
    write_message(err, err_len, "unknown exception around the CUDA profiler API");
  }
  return 1;
}

}  // namespace

extern "C" {

int mmeter_cuda_profiler_start(char* err, size_t err_len) noexcept {
  return call_driver("cuProfilerStart", err, err_len);
}

int mmeter_cuda_profiler_stop(char* err, size_t err_len) noexcept {
  return call_driver("cuProfilerStop", err, err_len);
}

}  // extern "C"
