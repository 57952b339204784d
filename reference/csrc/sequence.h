// One process-wide clock shared by the two observers (op_observer.cpp, alloc_observer.cpp):
// each op end and each allocator report takes the next value, so Rust can tell which
// allocation made which op's output (the latest allocation of the output's block before
// the op ended).
#ifndef MODELMETER_SEQUENCE_H
#define MODELMETER_SEQUENCE_H

#include "ffi_export.h"

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// The next value of the clock (starts at 1; never 0). Thread-safe, never throws.
uint64_t mmeter_sequence_next(void) MMETER_NOEXCEPT;

#ifdef __cplusplus
}
#endif

#endif  // MODELMETER_SEQUENCE_H
