// MMETER_NOEXCEPT marks every function the Rust side calls (`noexcept` in C++, nothing in C).
// Each catches what it can report and returns it as a message; should an exception still
// escape one, `noexcept` ends the process with std::terminate, where it would otherwise
// unwind into Rust frames (undefined behaviour).

#ifndef MODELMETER_FFI_EXPORT_H
#define MODELMETER_FFI_EXPORT_H

#ifdef __cplusplus
#define MMETER_NOEXCEPT noexcept
#else
#define MMETER_NOEXCEPT
#endif

#endif  // MODELMETER_FFI_EXPORT_H
