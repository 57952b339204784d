// The C ABI of the allocation observer shim (alloc_observer.cpp), wrapped in safe Rust by
// src/ffi.rs and src/allocations.rs. Every function catches all C++ exceptions; failures
// are reported through return codes and NUL-terminated messages written into
// caller-owned buffers.
#ifndef MODELMETER_ALLOC_OBSERVER_H
#define MODELMETER_ALLOC_OBSERVER_H

#include "ffi_export.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// One report of a libtorch allocator, as c10::reportMemoryUsageToProfiler (kind 0) or
// c10::reportOutOfMemoryToProfiler (kind 1) delivered it.
typedef struct mmeter_alloc_event {
  // The block's address (0 for an out-of-memory report).
  uint64_t address;
  // Bytes as the allocator reports them: > 0 an allocation, < 0 a free; for an
  // out-of-memory report the bytes that could not be allocated.
  int64_t bytes;
  // The allocator's own running totals after this event (the CPU allocator reports 0 as
  // reserved).
  uint64_t total_allocated;
  uint64_t total_reserved;
  // at::RecordFunction::currentThreadId() of the reporting thread.
  uint64_t thread;
  // The shared clock (sequence.h) when the report arrived.
  uint64_t sequence;
  // c10::DeviceType (0 CPU, 1 CUDA, …) and the device index (-1: none).
  int16_t device_type;
  int16_t device_index;
  // 0: usage report (allocation or free), 1: out-of-memory report.
  int32_t kind;
} mmeter_alloc_event;

// Creates an allocation recorder and installs it in the calling thread's libtorch
// PROFILER_STATE debug-info slot. *recorder receives its handle. Fails when that slot is
// already taken (torch's profiler, or a recorder that was not stopped).
// 0 on success; else a message in err[err_len].
int mmeter_alloc_start(void** recorder, char* err, size_t err_len) MMETER_NOEXCEPT;

// Events recorded so far, and reports lost because memory for them ran out.
int mmeter_alloc_count(void* recorder, size_t* count, uint64_t* dropped, char* err,
                       size_t err_len) MMETER_NOEXCEPT;

// Copies the events from index `from` on (free *out with mmeter_alloc_free_events) and
// the number of lost reports so far. 0 on success; else a message in err[err_len].
int mmeter_alloc_read(void* recorder, size_t from, mmeter_alloc_event** out, size_t* out_len,
                      uint64_t* dropped, char* err, size_t err_len) MMETER_NOEXCEPT;

// Stops recording, removes the recorder from the calling thread's slot (it must be the
// thread that started it, and the recorder must be the innermost debug info there) and
// releases the handle, which is invalid afterwards even when this fails.
// 0 on success; else a message in err[err_len].
int mmeter_alloc_stop(void* recorder, char* err, size_t err_len) MMETER_NOEXCEPT;

// Frees an event array the shim returned.
void mmeter_alloc_free_events(mmeter_alloc_event* events) MMETER_NOEXCEPT;

#ifdef __cplusplus
}
#endif

#endif  // MODELMETER_ALLOC_OBSERVER_H
