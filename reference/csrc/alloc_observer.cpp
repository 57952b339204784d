// The smallest shim the allocation observer needs: an object in libtorch's thread-local
// PROFILER_STATE debug-info slot that writes down every report the allocators deliver
// there (c10::reportMemoryUsageToProfiler), as fixed-size records. All bookkeeping
// (totals, peaks, which block was allocated inside a region) happens in Rust
// (src/allocations.rs); the C ABI is declared in alloc_observer.h.
//
// Why it derives from torch::profiler::impl::ProfilerStateBase, not only from
// c10::MemoryReportingInfoBase (which is all the allocators need): the slot belongs to
// torch's profiler, and torch reads it back with ProfilerStateBase::get(), which
// static_casts whatever it finds (torch/csrc/profiler/orchestration/observer.cpp):
// profilerEnabled(), profilerType() and getProfilerConfig() would read a config field and
// call a virtual function our object would not have. As a ProfilerStateBase with a
// Disabled config it answers those truthfully: profilerEnabled() is false, profilerType()
// is NONE, and torch leaves the profiler machinery alone; memoryProfilingEnabled() is true
// while recording, which is what makes the CPU allocator report at all (the CUDA caching
// allocator reports whenever the slot holds a reporter).
//
// Who reports where: an allocator calls the reporter of the thread that allocates or
// frees. The slot is thread-local but travels with at::ThreadLocalState, so the autograd
// engine's threads (backward) and at::launch tasks report here too, concurrently: events
// are appended under a mutex. at::parallel_for worker threads do not carry it (see
// docs/memory.md).
//
// No C++ exception ever leaves this file: the allocator callbacks count a report they
// could not store (`dropped`), and the extern "C" functions return messages.

#include "alloc_observer.h"
#include "sequence.h"

#include <ATen/record_function.h>
#include <c10/core/Allocator.h>
#include <c10/util/Logging.h>
#include <c10/util/ThreadLocalDebugInfo.h>
#include <torch/csrc/profiler/orchestration/observer.h>

#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

// src/ffi.rs mirrors the record as RawAllocEvent and checks the same layout.
static_assert(sizeof(mmeter_alloc_event) == 56, "mmeter_alloc_event must stay 56 bytes");
static_assert(offsetof(mmeter_alloc_event, device_type) == 48, "layout shared with Rust");
static_assert(offsetof(mmeter_alloc_event, kind) == 52, "layout shared with Rust");

namespace {

using torch::profiler::impl::ActiveProfilerType;
using torch::profiler::impl::ProfilerConfig;
using torch::profiler::impl::ProfilerState;
using torch::profiler::impl::ProfilerStateBase;

class AllocationRecorder final : public ProfilerStateBase {
 public:
  AllocationRecorder()
      : ProfilerStateBase(ProfilerConfig(ProfilerState::Disabled,
                                         /*report_input_shapes=*/false,
                                         /*profile_memory=*/true)) {}

  void reportMemoryUsage(void* ptr, int64_t alloc_size, size_t total_allocated,
                         size_t total_reserved, c10::Device device) override {
    record(0, ptr, alloc_size, total_allocated, total_reserved, device);
  }

  void reportOutOfMemory(int64_t alloc_size, size_t total_allocated, size_t total_reserved,
                         c10::Device device) override {
    record(1, nullptr, alloc_size, total_allocated, total_reserved, device);
  }

  // False once stopped: a copy of the slot that outlives the region (captured by an
  // autograd task) then no longer asks the CPU allocator to report.
  bool memoryProfilingEnabled() const override { return open_.load(); }

  ActiveProfilerType profilerType() override { return ActiveProfilerType::NONE; }

  void close() { open_.store(false); }

  void count(size_t* n, uint64_t* dropped) {
    std::lock_guard<std::mutex> lock(mutex_);
    *n = events_.size();
    *dropped = dropped_;
  }

  // Copies events [from, end) into a malloc'd array (NULL when empty).
  bool read(size_t from, mmeter_alloc_event** out, size_t* out_len, uint64_t* dropped) {
    std::lock_guard<std::mutex> lock(mutex_);
    *dropped = dropped_;
    *out = nullptr;
    *out_len = 0;
    if (from >= events_.size()) return true;
    const size_t n = events_.size() - from;
    auto* buf = static_cast<mmeter_alloc_event*>(std::malloc(n * sizeof(mmeter_alloc_event)));
    if (buf == nullptr) return false;
    std::memcpy(buf, events_.data() + from, n * sizeof(mmeter_alloc_event));
    *out = buf;
    *out_len = n;
    return true;
  }

 private:
  // Runs inside libtorch's allocators (the CUDA caching allocator holds its own lock):
  // never throws, never calls back into libtorch beyond reading the thread id.
  void record(int32_t kind, void* ptr, int64_t bytes, size_t total_allocated,
              size_t total_reserved, c10::Device device) noexcept {
    if (!open_.load()) return;
    mmeter_alloc_event e{};
    e.address = reinterpret_cast<uintptr_t>(ptr);
    e.bytes = bytes;
    e.total_allocated = total_allocated;
    e.total_reserved = total_reserved;
    e.thread = at::RecordFunction::currentThreadId();
    e.sequence = mmeter_sequence_next();
    e.device_type = static_cast<int16_t>(device.type());
    e.device_index = static_cast<int16_t>(device.index());
    e.kind = kind;
    try {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!open_.load()) return;
      try {
        events_.push_back(e);
      } catch (...) {
        ++dropped_;
      }
    } catch (...) {
      // The mutex could not be taken; the report is lost, and cannot even be counted
      // without the lock. std::mutex::lock fails only on system errors.
    }
  }

  std::atomic<bool> open_{true};
  std::mutex mutex_;  // guards events_ and dropped_
  std::vector<mmeter_alloc_event> events_;
  uint64_t dropped_ = 0;
};

// What a handle points to: the recorder's owner on the Rust side. The debug-info stack
// (and any thread state captured from it) holds further references.
struct Handle {
  std::shared_ptr<AllocationRecorder> recorder;
};

// c10's log level is one process-wide flag, and recorders open on several threads at
// once: the first to open saves it and raises it, the last to close restores it (each
// saving and restoring its own left it raised for good when two regions interleaved).
std::mutex g_log_level_mutex;
int g_open_recorders = 0;  // guarded by g_log_level_mutex
int g_saved_log_level = 0;  // guarded by g_log_level_mutex

void raise_log_level() {
  std::lock_guard<std::mutex> lock(g_log_level_mutex);
  if (g_open_recorders++ == 0) {
    g_saved_log_level = FLAGS_caffe2_log_level;
    if (FLAGS_caffe2_log_level < 2) FLAGS_caffe2_log_level = 2;
  }
}

void restore_log_level() {
  std::lock_guard<std::mutex> lock(g_log_level_mutex);
  if (g_open_recorders > 0 && --g_open_recorders == 0) {
    FLAGS_caffe2_log_level = g_saved_log_level;
  }
}

void write_error(char* err, size_t len, const char* message) {
  if (err && len) {
    std::strncpy(err, message, len - 1);
    err[len - 1] = '\0';
  }
}

}  // namespace

extern "C" {

int mmeter_alloc_start(void** recorder, char* err, size_t err_len) noexcept {
  try {
    *recorder = nullptr;
    if (c10::ThreadLocalDebugInfo::get(c10::DebugInfoKind::PROFILER_STATE) != nullptr) {
      write_error(err, err_len,
                  "this thread's profiler state slot is taken (torch's profiler is running, "
                  "or an allocation recorder was not stopped)");
      return 1;
    }
    auto handle = std::make_unique<Handle>();
    handle->recorder = std::make_shared<AllocationRecorder>();
    c10::ThreadLocalDebugInfo::_push(c10::DebugInfoKind::PROFILER_STATE, handle->recorder);
    // The CPU allocator logs a warning ("Memory block of unknown size was allocated before
    // the profiling started …", c10 LOG(WARNING), once per process) when a block from
    // before the region is freed inside it. The region counts those frees itself
    // (pre-region frees), so c10's log level is raised to errors while it is open.
    raise_log_level();
    *recorder = handle.release();
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
  } catch (...) {
    write_error(err, err_len, "unknown exception while starting the allocation recorder");
  }
  return 1;
}

int mmeter_alloc_count(void* recorder, size_t* count, uint64_t* dropped, char* err,
                       size_t err_len) noexcept {
  try {
    if (recorder == nullptr) {
      write_error(err, err_len, "no allocation recorder");
      return 1;
    }
    static_cast<Handle*>(recorder)->recorder->count(count, dropped);
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
  } catch (...) {
    write_error(err, err_len, "unknown exception while counting allocation events");
  }
  return 1;
}

int mmeter_alloc_read(void* recorder, size_t from, mmeter_alloc_event** out, size_t* out_len,
                      uint64_t* dropped, char* err, size_t err_len) noexcept {
  try {
    if (recorder == nullptr) {
      write_error(err, err_len, "no allocation recorder");
      return 1;
    }
    if (!static_cast<Handle*>(recorder)->recorder->read(from, out, out_len, dropped)) {
      write_error(err, err_len, "out of memory copying the allocation events");
      return 1;
    }
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
  } catch (...) {
    write_error(err, err_len, "unknown exception while reading allocation events");
  }
  return 1;
}

int mmeter_alloc_stop(void* recorder, char* err, size_t err_len) noexcept {
  std::unique_ptr<Handle> handle(static_cast<Handle*>(recorder));
  try {
    if (!handle) {
      write_error(err, err_len, "no allocation recorder");
      return 1;
    }
    handle->recorder->close();
    restore_log_level();
    auto* installed = c10::ThreadLocalDebugInfo::get(c10::DebugInfoKind::PROFILER_STATE);
    if (installed != handle->recorder.get()) {
      write_error(err, err_len,
                  "the allocation recorder is not this thread's profiler state (stopped on "
                  "another thread, or torch's profiler was started inside the region); it "
                  "records nothing more but stays installed");
      return 1;
    }
    // Throws when another kind of debug info was pushed on top and not popped.
    c10::ThreadLocalDebugInfo::_pop(c10::DebugInfoKind::PROFILER_STATE);
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
  } catch (...) {
    write_error(err, err_len, "unknown exception while stopping the allocation recorder");
  }
  return 1;
}

void mmeter_alloc_free_events(mmeter_alloc_event* events) noexcept { std::free(events); }

}  // extern "C"
