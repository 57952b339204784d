// The smallest shim the FLOP hook needs: a libtorch RecordFunction callback that writes
// down every ATen op the dispatcher runs inside a counted region (name, nesting depth,
// thread, scope and boxed inputs) as text lines, plus the few libtorch/CUDA settings the
// counter must read. All costing happens in Rust (src/counter.rs) with the conventions
// table of the analytic crate; the C ABI is declared in op_observer.h and wrapped by
// src/ffi.rs.
//
// Why the callback is global (at::addGlobalCallback), not thread-local: backward ops of
// the counted forward run on the autograd engine's own threads. The callback is
// registered only while a region is open and filters by thread itself: the arming thread,
// the backward nodes whose forward ran there, and the engine's evaluation around such a
// node (where the engine adds up a tensor's gradients, outside any node).
//
// Line format, one per op start:
//   <thread>\t<depth>\t<F|B>\t<name>\t<arg>;<arg>;...\n
// (B: an autograd frame, a backward node or the engine's evaluation of one: what runs
// inside is backward work. The evaluation of a node on an engine thread is written when
// its node starts, just before the node's line: only then is it known to be the region's.)
// where an arg is N (None or undefined tensor), T<dtype>@<device>[d0,d1,...],
// i<int>, f<double>, b0|b1, s<hex bytes>, I[<int>,...], B[<0|1>,...], L[<arg>;...]
// or ?<kind>. When a logged op ends, one more line gives its outputs:
//   O\t<n>\t<clock>\t<arg>;<arg>;...\n
// where <n> is the 0-based index of the op's start line in this region's log, <clock>
// the shared sequence (sequence.h) at the op's end, an output tensor that shares storage
// with one of the op's tensor inputs (in-place ops, ops that return their input
// unchanged) is written =T... instead of T..., and every output tensor with storage is
// followed by #<hex address of its storage's block>.
// A callback failure writes X\t<message>\n instead: counts are never lost
// silently, and no C++ exception ever reaches Rust.

#include "op_observer.h"
#include "sequence.h"

#include <ATen/Context.h>
#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <ATen/record_function.h>
#include <c10/util/SmallVector.h>

#include <dlfcn.h>

#include <atomic>
#include <charconv>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace {

std::mutex g_mutex;  // guards g_log and g_handle
std::string g_log;
at::CallbackHandle g_handle = 0;
std::atomic<bool> g_armed{false};
std::atomic<uint64_t> g_generation{0};
std::atomic<uint64_t> g_owner{0};
uint64_t g_started = 0;  // start lines in g_log (guarded by g_mutex)
constexpr uint64_t kNotLogged = ~uint64_t{0};
// The name prefix of the autograd engine's frame around each node it evaluates.
constexpr char kEngineFrame[] = "autograd::engine::evaluate_function";

// Per-thread stack of open ops: whether each belongs to the counted region. Reset when
// a new region starts (ops left open by an earlier one never get their end callback).
// Reached through a trivially destructible thread_local pointer and never freed, so a
// callback that runs while its thread is being torn down never touches a destroyed object.
struct FrameContext;

// One open RecordFunction frame of a thread: whether it is in the counted region, and for
// the autograd engine's evaluation of a node not (yet) in it, its context, so that a node
// of the region starting inside can bring it in.
struct OpenFrame {
  bool in;
  FrameContext* pending_engine;  // non-null: an engine evaluation not in the region
};

struct ThreadFrames {
  uint64_t generation = ~uint64_t{0};
  std::vector<OpenFrame> in_region;
};
thread_local ThreadFrames* t_frames_ptr = nullptr;

ThreadFrames& frames() {
  if (t_frames_ptr == nullptr) t_frames_ptr = new ThreadFrames();
  return *t_frames_ptr;
}

// What on_start hands to on_end for one op: the region generation whose frame stack it
// pushed onto. An op that starts in one region and ends in the next (or after a region
// was re-armed) must not pop a frame of the newer region.
struct FrameContext : at::ObserverContext {
  explicit FrameContext(uint64_t g) : generation(g) {}
  uint64_t generation;
  uint64_t line = kNotLogged;  // index of the op's start line, when it was logged
  // An engine evaluation not in the region when it started: its line, written if a node
  // of the region starts inside it.
  std::string pending_line;
  // Storages of the op's tensor inputs, as identities only (never dereferenced, never
  // owned: the caller keeps them alive for the call). The end callback cannot look at
  // the inputs themselves: by then the boxed stack holds the outputs.
  // Inline for the few tensors an op takes: no heap allocation per op.
  c10::SmallVector<const void*, 4> input_storages;
};

// The line an op's callback writes before appending it to the log under the lock: a
// c10::SmallVector, whose appends are inline (std::string's are calls into libstdc++),
// one per thread, reused from op to op with its capacity, so that logging an op
// allocates nothing once the buffer has grown: every argument of every op goes through it.
class Line {
 public:
  Line& operator+=(char c) {
    buf_.push_back(c);
    return *this;
  }
  Line& operator+=(const char* s) { return append(s, std::strlen(s)); }
  Line& operator+=(const std::string& s) { return append(s.data(), s.size()); }
  Line& append(const char* s, size_t n) {
    buf_.append(s, s + n);
    return *this;
  }
  void clear() { buf_.clear(); }
  const char* data() const { return buf_.data(); }
  size_t size() const { return buf_.size(); }

 private:
  c10::SmallVector<char, 256> buf_;  // grows on the heap past 256 bytes, and keeps it
};

// Never freed, like the frames (a callback may run while its thread is torn down).
thread_local Line* t_line_ptr = nullptr;

Line& line_buffer() {
  if (t_line_ptr == nullptr) t_line_ptr = new Line();
  t_line_ptr->clear();
  return *t_line_ptr;
}

void note_storage(c10::SmallVector<const void*, 4>& out, const at::Tensor& t) {
  if (t.defined() && t.has_storage()) out.push_back(t.storage().unsafeGetStorageImpl());
}

// Records a callback failure in the log. Never throws: it runs inside catch handlers.
// `generation`: the region the failing op was judged against; an op of an earlier region
// (still running when this one was armed) reports nothing into this one.
void append_error(uint64_t generation, const char* op, const char* message) noexcept {
  try {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (!g_armed.load() || g_generation.load() != generation) return;
    g_log += "X\t";
    for (const char* p : {op, ": ", message}) {
      for (; *p; ++p) g_log += (*p == '\n' || *p == '\t') ? ' ' : *p;
    }
    g_log += '\n';
  } catch (...) {
    // Out of memory while reporting: the op is lost, and so is its error line. The
    // region's totals then miss it; nothing better can be done without throwing.
  }
}

// Appends `value` in decimal without a temporary string: every tensor size of
// every op goes through here.
void append_int(Line& out, int64_t value) {
  char buf[24];
  // Without a base argument: libstdc++'s decimal path, two digits per step.
  const auto end = std::to_chars(buf, buf + sizeof buf, value).ptr;
  out.append(buf, static_cast<size_t>(end - buf));
}

void encode_ints(Line& out, c10::IntArrayRef values) {
  for (size_t i = 0; i < values.size(); ++i) {
    if (i) out += ',';
    append_int(out, values[i]);
  }
}

void encode_tensor(Line& out, const at::Tensor& t) {
  if (!t.defined()) {
    out += 'N';
    return;
  }
  out += 'T';
  out += c10::toString(t.scalar_type());
  out += '@';
  // `Device::str()` spelled without building a string for the usual devices.
  const c10::Device device = t.device();
  if (device.is_cpu() && !device.has_index()) {
    out += "cpu";
  } else if (device.is_cuda() && device.has_index()) {
    out += "cuda:";
    append_int(out, device.index());
  } else {
    out += device.str();
  }
  out += '[';
  encode_ints(out, t.sizes());
  out += ']';
}

void encode(Line& out, const c10::IValue& v) {
  static const char* hex = "0123456789abcdef";
  if (v.isNone()) {
    out += 'N';
  } else if (v.isTensor()) {
    encode_tensor(out, v.toTensor());
  } else if (v.isInt()) {
    out += 'i';
    append_int(out, v.toInt());
  } else if (v.isSymInt()) {
    out += 'i';
    append_int(out, v.toSymInt().guard_int(__FILE__, __LINE__));
  } else if (v.isDouble()) {
    char buf[40];
    std::snprintf(buf, sizeof(buf), "f%.17g", v.toDouble());
    out += buf;
  } else if (v.isBool()) {
    out += v.toBool() ? "b1" : "b0";
  } else if (v.isString()) {
    out += 's';
    for (unsigned char c : v.toStringRef()) {
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  } else if (v.isIntList()) {
    // Every list is read in place (`toListRef`), not copied into a vector.
    out += "I[";
    const auto list = v.toListRef();
    for (size_t i = 0; i < list.size(); ++i) {
      if (i) out += ',';
      append_int(out, list[i].toInt());
    }
    out += ']';
  } else if (v.isBoolList()) {
    out += "B[";
    const auto list = v.toListRef();
    for (size_t i = 0; i < list.size(); ++i) {
      if (i) out += ',';
      out += list[i].toBool() ? '1' : '0';
    }
    out += ']';
  } else if (v.isTensorList()) {
    out += "L[";
    const auto list = v.toListRef();
    for (size_t i = 0; i < list.size(); ++i) {
      if (i) out += ';';
      encode_tensor(out, list[i].toTensor());
    }
    out += ']';
  } else if (v.isList()) {
    out += "L[";
    auto list = v.toListRef();
    for (size_t i = 0; i < list.size(); ++i) {
      if (i) out += ';';
      encode(out, list[i]);
    }
    out += ']';
  } else {
    out += '?';
    out += v.tagKind();
  }
}

// The start line up to its arguments: `<thread>\t<depth>\t<F|B>\t<name>\t`.
void start_line(Line& line, const at::RecordFunction& fn, size_t depth, bool backward) {
  append_int(line, static_cast<int64_t>(fn.threadId()));
  line += '\t';
  append_int(line, static_cast<int64_t>(depth));
  line += backward ? "\tB\t" : "\tF\t";
  line += fn.name();
  line += '\t';
}

std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction& fn) {
  std::unique_ptr<at::ObserverContext> context;
  const uint64_t generation = g_generation.load();
  try {
    ThreadFrames& t_frames = frames();
    if (t_frames.generation != generation) {
      t_frames.generation = generation;
      t_frames.in_region.clear();
    }
    const uint64_t owner = g_owner.load();
    const bool node = fn.scope() == at::RecordScope::BACKWARD_FUNCTION;
    const bool engine = std::strncmp(fn.name(), kEngineFrame, sizeof(kEngineFrame) - 1) == 0;
    const bool backward = node || engine;
    const bool parent = !t_frames.in_region.empty() && t_frames.in_region.back().in;
    // The region is the arming thread plus the backward nodes its forward ops created,
    // which the autograd engine may run on its own threads.
    const bool in = parent || fn.threadId() == owner || (node && fn.forwardThreadId() == owner);
    const size_t depth = t_frames.in_region.size();
    auto frame = std::make_unique<FrameContext>(generation);
    FrameContext* frame_ptr = frame.get();
    context = std::move(frame);
    t_frames.in_region.push_back({in, (!in && engine) ? frame_ptr : nullptr});
    if (!g_armed.load()) return context;
    if (!in) {
      // Kept for a node of the region that may start inside (cheap: one per node).
      if (engine) {
        Line& line = line_buffer();
        start_line(line, fn, depth, true);
        line += '\n';
        frame_ptr->pending_line.assign(line.data(), line.size());
      }
      return context;
    }
    // A node of the region inside an engine evaluation that is not: the evaluation is the
    // region's too (its gradient sums run after the node returns), written now.
    if (node && !parent && depth > 0) {
      OpenFrame& outer = t_frames.in_region[depth - 1];
      if (outer.pending_engine != nullptr) {
        FrameContext* evaluation = outer.pending_engine;
        outer.in = true;
        outer.pending_engine = nullptr;
        std::lock_guard<std::mutex> lock(g_mutex);
        if (g_armed.load() && g_generation.load() == evaluation->generation) {
          g_log.append(evaluation->pending_line.data(), evaluation->pending_line.size());
          evaluation->line = g_started++;
        }
      }
    }

    Line& line = line_buffer();
    start_line(line, fn, depth, backward);
    if (fn.needsInputs()) {
      auto inputs = fn.inputs();
      for (size_t i = 0; i < inputs.size(); ++i) {
        if (i) line += ';';
        encode(line, inputs[i]);
        if (inputs[i].isTensor()) {
          note_storage(frame_ptr->input_storages, inputs[i].toTensor());
        } else if (inputs[i].isTensorList()) {
          for (const c10::IValue& t : inputs[i].toListRef()) {
            note_storage(frame_ptr->input_storages, t.toTensor());
          }
        }
      }
    }
    line += '\n';
    std::lock_guard<std::mutex> lock(g_mutex);
    // Only the region this op was judged against may receive it.
    if (g_armed.load() && g_generation.load() == generation) {
      g_log.append(line.data(), line.size());
      frame_ptr->line = g_started++;
    }
  } catch (const std::exception& e) {
    append_error(generation, fn.name(), e.what());
  } catch (...) {
    append_error(generation, fn.name(), "unknown exception");
  }
  return context;
}

// True when `t` shares storage with one of the op's tensor inputs (in-place ops, and
// ops that hand back their input, such as a `to` to the same dtype).
bool aliases_input(const FrameContext& frame, const at::Tensor& t) {
  if (!t.defined() || !t.has_storage()) return false;
  const void* storage = t.storage().unsafeGetStorageImpl();
  for (const void* in : frame.input_storages) {
    if (in == storage) return true;
  }
  return false;
}

void encode_output(Line& out, const FrameContext& frame, const c10::IValue& v) {
  if (!v.isTensor()) {
    encode(out, v);
    return;
  }
  const at::Tensor& t = v.toTensor();
  if (aliases_input(frame, t)) out += '=';
  encode(out, v);
  if (t.defined() && t.has_storage()) {
    char buf[24];
    const auto address = reinterpret_cast<uintptr_t>(t.storage().data());
    const auto end = std::to_chars(buf, buf + sizeof buf, address, 16).ptr;
    out += '#';
    out.append(buf, static_cast<size_t>(end - buf));
  }
}

// Writes the outputs of a logged op (the O line).
void log_outputs(const at::RecordFunction& fn, const FrameContext& frame) {
  Line& line = line_buffer();
  line += "O\t";
  append_int(line, static_cast<int64_t>(frame.line));
  line += '\t';
  append_int(line, static_cast<int64_t>(mmeter_sequence_next()));
  line += '\t';
  auto outputs = fn.outputs();
  for (size_t i = 0; i < outputs.size(); ++i) {
    if (i) line += ';';
    encode_output(line, frame, outputs[i]);
  }
  line += '\n';
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_armed.load() && g_generation.load() == frame.generation) {
    g_log.append(line.data(), line.size());
  }
}

void on_end(const at::RecordFunction& fn, at::ObserverContext* context) {
  // Pop only the frame this op pushed: same thread stack, same region generation. An op
  // whose start failed before pushing has no context and pops nothing.
  const auto* frame = static_cast<const FrameContext*>(context);
  if (frame == nullptr || t_frames_ptr == nullptr) return;
  ThreadFrames& t_frames = *t_frames_ptr;
  if (t_frames.generation == frame->generation && !t_frames.in_region.empty()) {
    t_frames.in_region.pop_back();
  }
  if (frame->line == kNotLogged || !g_armed.load()) return;
  try {
    log_outputs(fn, *frame);
  } catch (const std::exception& e) {
    append_error(frame->generation, fn.name(), e.what());
  } catch (...) {
    append_error(frame->generation, fn.name(), "unknown exception while logging outputs");
  }
}

void write_error(char* err, size_t len, const char* message) {
  if (err && len) {
    std::strncpy(err, message, len - 1);
    err[len - 1] = '\0';
  }
}

char* copy_out(const std::string& s, size_t* len) {
  char* buf = static_cast<char*>(std::malloc(s.size() + 1));
  if (!buf) return nullptr;
  std::memcpy(buf, s.data(), s.size());
  buf[s.size()] = '\0';
  *len = s.size();
  return buf;
}

}  // namespace

extern "C" {

uint64_t mmeter_sequence_next(void) noexcept {
  static std::atomic<uint64_t> clock{0};
  return clock.fetch_add(1) + 1;
}

// Arms the callback for ops of the calling thread (and its backward). 0 on success.
int mmeter_observer_start(char* err, size_t err_len) noexcept {
  try {
    std::lock_guard<std::mutex> lock(g_mutex);
    if (g_handle != 0) {
      write_error(err, err_len,
                  g_armed.load() ? "a counted region is already open"
                                 : "the previous region's callback could not be removed "
                                   "(libtorch refused); a new one would count every op "
                                   "twice: restart the process");
      return 1;
    }
    g_log.clear();
    g_started = 0;
    g_owner.store(at::RecordFunction::currentThreadId());
    g_generation.fetch_add(1);
    g_armed.store(true);
    g_handle = at::addGlobalCallback(
        at::RecordFunctionCallback(&on_start, &on_end)
            .needsInputs(true)
            .needsOutputs(true)
            .scopes({at::RecordScope::FUNCTION, at::RecordScope::BACKWARD_FUNCTION}));
    return 0;
  } catch (const std::exception& e) {
    g_armed.store(false);
    write_error(err, err_len, e.what());
  } catch (...) {
    g_armed.store(false);
    write_error(err, err_len, "unknown exception while arming the op observer");
  }
  return 1;
}

// Disarms the callback and hands over the log (free it with mmeter_free). 0 on success.
int mmeter_observer_stop(char** out, size_t* out_len, char* err, size_t err_len) noexcept {
  try {
    at::CallbackHandle handle = 0;
    {
      std::lock_guard<std::mutex> lock(g_mutex);
      handle = g_handle;
      g_handle = 0;
      g_armed.store(false);
    }
    // g_mutex guards only this file's state and is never held across a call into
    // libtorch: removeCallback takes libtorch's own callback-registry lock, and holding
    // g_mutex around it would order the two locks against callbacks that take g_mutex
    // (on_start's logging) — an avoidable lock-order dependency.
    if (handle != 0) {
      try {
        at::removeCallback(handle);
      } catch (...) {
        // Still registered: keep its handle, so that the next stop removes it (the
        // callback itself is disarmed and logs nothing meanwhile).
        std::lock_guard<std::mutex> lock(g_mutex);
        if (g_handle == 0) g_handle = handle;
        throw;
      }
    }
    std::lock_guard<std::mutex> lock(g_mutex);
    *out = copy_out(g_log, out_len);
    g_log.clear();
    g_log.shrink_to_fit();
    if (!*out) {
      write_error(err, err_len, "out of memory copying the op log");
      return 1;
    }
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
  } catch (...) {
    write_error(err, err_len, "unknown exception while disarming the op observer");
  }
  return 1;
}

// libtorch's build configuration (at::show_config()), with its version. Free with mmeter_free.
char* mmeter_libtorch_config(size_t* out_len) noexcept {
  try {
    return copy_out(at::show_config(), out_len);
  } catch (...) {
    return nullptr;
  }
}

// Whether fp32 matmuls may use TF32 tensor cores (torch.backends.cuda.matmul.allow_tf32).
int mmeter_tf32_matmul_allowed() noexcept {
  try {
    return at::globalContext().allowTF32CuBLAS() ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

// Whether fp32 cuDNN convolutions may use TF32 (torch.backends.cudnn.allow_tf32).
int mmeter_tf32_cudnn_allowed() noexcept {
  try {
    return at::globalContext().allowTF32CuDNN() ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

// Sets the matmul switch; 0 on success.
int mmeter_set_tf32_matmul_allowed(int allowed) noexcept {
  try {
    at::globalContext().setAllowTF32CuBLAS(allowed != 0);
    return 0;
  } catch (...) {
    return 1;
  }
}

// Waits for all work queued on CUDA device `index` and reports an asynchronous CUDA
// error (a failed kernel, an illegal address) as an error message. 0 on success.
int mmeter_cuda_synchronize(int index, char* err, size_t err_len) noexcept {
  try {
    at::detail::getCUDAHooks().deviceSynchronize(static_cast<c10::DeviceIndex>(index));
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
  } catch (...) {
    write_error(err, err_len, "unknown exception while synchronising the CUDA device");
  }
  return 1;
}

// Free and total memory of CUDA device `index`, from the CUDA runtime that libtorch
// loaded (cudaMemGetInfo, looked up at run time: the shim needs no CUDA headers).
// 0 on success.
int mmeter_cuda_mem_info(int index, size_t* free_bytes, size_t* total_bytes, char* err,
                     size_t err_len) noexcept {
  try {
    using GetDevice = int (*)(int*);
    using SetDevice = int (*)(int);
    using MemGetInfo = int (*)(size_t*, size_t*);
    auto get_device = reinterpret_cast<GetDevice>(dlsym(RTLD_DEFAULT, "cudaGetDevice"));
    auto set_device = reinterpret_cast<SetDevice>(dlsym(RTLD_DEFAULT, "cudaSetDevice"));
    auto mem_get_info = reinterpret_cast<MemGetInfo>(dlsym(RTLD_DEFAULT, "cudaMemGetInfo"));
    if (!get_device || !set_device || !mem_get_info) {
      write_error(err, err_len, "the CUDA runtime (cudaMemGetInfo) is not loaded");
      return 1;
    }
    int previous = 0;
    if (get_device(&previous) != 0 || set_device(index) != 0) {
      write_error(err, err_len, "cudaSetDevice failed");
      return 1;
    }
    int rc = mem_get_info(free_bytes, total_bytes);
    set_device(previous);
    if (rc != 0) {
      write_error(err, err_len, "cudaMemGetInfo failed");
      return 1;
    }
    return 0;
  } catch (...) {
    write_error(err, err_len, "unknown exception while reading CUDA memory");
  }
  return 1;
}

void mmeter_free(char* p) noexcept { std::free(p); }

}  // extern "C"
