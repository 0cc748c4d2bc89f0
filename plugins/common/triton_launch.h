// What every op's launcher (plugins/<op>/<op>_launch.cpp) shares: the variant of an activation dtype, a
// workspace carved into aligned slices, the failure path (a QWEN_STATUS_* code, the message kept for
// qwenLastError()), and launching one Triton kernel through the loader with the caller's stream.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "common/qwen_launch.h"
#include "common/triton_loader.h"

namespace qwen {
namespace launch {

// "fp16" / "bf16" for a QWEN_DTYPE_* code; null for anything else.
const char* actVariant(int32_t dtype);

// Record `message` as this thread's last error (qwenLastError) and return `code`.
int fail(int code, const std::string& message);

// 0 for an ok status; else QWEN_STATUS_LAUNCH with the loader's message recorded.
int check(const triton::Status& status);

inline int64_t ceilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Slices of a workspace, each aligned to 256 bytes (what TensorRT guarantees the workspace itself). With a
// null base it only counts: the same code sizes the workspace and carves it.
class Workspace {
 public:
  explicit Workspace(void* base = nullptr) : base_(static_cast<char*>(base)) {}
  void* take(size_t bytes) {
    const size_t at = used_;
    used_ += (bytes + 255) / 256 * 256;
    return base_ ? base_ + at : nullptr;
  }
  size_t used() const { return used_; }

 private:
  char* base_;
  size_t used_ = 0;
};

// A kernel resolved for the current context: its image (what it was compiled with) and function.
struct Kernel {
  const triton::KernelImage* image = nullptr;
  CUfunction function = nullptr;
};

// Resolve kernel/variant (loading its module on first use); 0 or QWEN_STATUS_LAUNCH.
int resolve(const char* kernel, const char* variant, Kernel* out);

// The constexpr `name` `kernel` was compiled with; 0 or QWEN_STATUS_LAUNCH if it has none.
int constant(const Kernel& kernel, const char* name, int64_t* value);

// Of the kernels named `<prefix><N><suffix>` (N: a width class, for example "rms_norm.rms_norm_n" N ""), the
// name of the narrowest with N >= `dim`, else the widest (whose kernel loops over wider rows). The classes
// are the ones the library was built with, so this never disagrees with the cubins.
int widthClass(const char* prefix, const char* suffix, int64_t dim, std::string* name);

// Whether every pointer is 16-byte aligned and every value a multiple of 16 (a launch may then take the
// `_a16` cubins, compiled with those divisibility hints).
bool aligned16(std::initializer_list<const void*> pointers, std::initializer_list<int64_t> values);

// Launch a resolved kernel on `stream`; 0 or QWEN_STATUS_LAUNCH (message recorded).
int run(const Kernel& kernel, triton::Grid grid, std::initializer_list<triton::Arg> args, cudaStream_t stream);

// Resolve and launch in one step.
int run(const char* kernel, const char* variant, triton::Grid grid, std::initializer_list<triton::Arg> args,
        cudaStream_t stream);

// A 2-D copy on `stream`: `rows` rows of `rowBytes`, source and destination with their own pitches.
int copyRows(void* dst, size_t dstPitch, const void* src, size_t srcPitch, size_t rowBytes, size_t rows,
             cudaStream_t stream);

// Zero `bytes` bytes at `dst` on `stream`.
int zero(void* dst, size_t bytes, cudaStream_t stream);

}  // namespace launch
}  // namespace qwen
