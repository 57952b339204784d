// Loads libtorch's CUDA backend (libtorch_cuda.so) at start-up, on machines that have an
// NVIDIA driver only.
//
// The binaries link libtorch_cpu alone: libtorch_cuda and the CUDA libraries it pulls in
// (cuBLAS, cuBLASLt, cuDNN, NCCL, cuFFT, nvJitLink ...) cost a process about 235 MB of
// resident memory and 0.2 s (the 2-core CPU machine, 2026-11-28), which a run on a
// machine without a GPU never uses. Where libcuda.so.1 loads, this static initializer
// opens libtorch_cuda.so from the folder libtorch_cpu.so came from, before main: its
// CUDA hooks and kernels register themselves as they would have at start-up. It must be
// before anything asks libtorch about CUDA, since libtorch decides its CUDA hooks once
// per process (at::detail::getCUDAHooks): hence start-up, not first use. This file is
// linked whole into every binary (build.rs), referenced or not.

#include "cuda_backend.h"

#include <ATen/Context.h>

#include <dlfcn.h>

#include <cstdio>
#include <mutex>
#include <string>

namespace {

// Written at load time and by mmeter_cuda_backend_load, read by any thread asking for the
// state: every access holds g_mutex.
std::mutex g_mutex;
int g_state = 0;
char g_error[1024] = "";

void fail(const std::string& why) {
  g_state = -1;
  std::snprintf(g_error, sizeof g_error, "%s", why.c_str());
}

void load_backend() {
  if (g_state == 1) {
    return;
  }
  Dl_info info{};
  // Any function of libtorch_cpu names the file it came from.
  if (dladdr(reinterpret_cast<void*>(&at::globalContext), &info) == 0 ||
      info.dli_fname == nullptr) {
    fail("the folder of libtorch_cpu.so could not be found (dladdr)");
    return;
  }
  std::string path = info.dli_fname;
  const auto slash = path.rfind('/');
  path = (slash == std::string::npos ? std::string(".") : path.substr(0, slash)) +
         "/libtorch_cuda.so";
  if (dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL) != nullptr) {
    g_state = 1;
    g_error[0] = '\0';
    return;
  }
  const char* why = dlerror();
  fail(path + " could not be loaded (a CPU-only libtorch has none): " +
       (why != nullptr ? why : "no message from the loader"));
}

// Loads the backend (under g_mutex); a failure to build the message is a failure too,
// never an exception out of this file.
void load_locked() {
  try {
    load_backend();
  } catch (...) {
    g_state = -1;
    std::snprintf(g_error, sizeof g_error, "%s", "loading libtorch_cuda.so failed (out of memory)");
  }
}

struct LoadWhereThereIsADriver {
  LoadWhereThereIsADriver() {
    if (dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL) != nullptr) {
      std::lock_guard<std::mutex> lock(g_mutex);
      load_locked();
    }
  }
} load_where_there_is_a_driver;

int report(char* err, size_t err_len) {
  if (g_state == -1 && err != nullptr && err_len > 0) {
    std::snprintf(err, err_len, "%s", g_error);
  }
  return g_state;
}

}  // namespace

extern "C" int mmeter_cuda_backend_state(char* err, size_t err_len) noexcept {
  std::lock_guard<std::mutex> lock(g_mutex);
  return report(err, err_len);
}

extern "C" int mmeter_cuda_backend_load(char* err, size_t err_len) noexcept {
  std::lock_guard<std::mutex> lock(g_mutex);
  load_locked();
  return report(err, err_len);
}
