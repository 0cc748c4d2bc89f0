// Our loader for the plugins' Triton kernels, compiled ahead of time (python -m qwen_export.plugins.aot) to
// one cubin per kernel x variant x SM and embedded in the library (the generated qwen_triton_cubins.cpp
// defines embeddedKernels()).
//
// - Picks the cubin for the current context's device: an "a" cubin (sm_90a, sm_100a, sm_120a) runs on
//   exactly its capability; sm_80/86/89 on the same major with an equal or higher minor (the highest such
//   one is chosen).
// - Loads each cubin once per CUDA context (cuModuleLoadData; the cache is keyed by the context's id and
//   guarded by a mutex), opts the function in to its dynamic shared memory above 48 KB, and launches it
//   on the caller's stream (TensorRT's, in enqueue).
// - Triton's launch ABI (triton 3.9, backends/nvidia/driver.c): the kernel's parameters are its
//   non-constexpr arguments in order, then two pointers, global scratch and profile scratch; block =
//   32 * num_warps threads; grid x is multiplied by num_ctas (a cluster of num_ctas when > 1); dynamic
//   shared memory = the metadata's `shared`. Global scratch is `global_scratch_size` bytes per program
//   (grid x * y * z * num_ctas of them), aligned to global_scratch_align: the caller passes it out of its
//   workspace (scratchBytes() sizes it); profile scratch (instrumentation only) is always null.
// - Every failure comes back as a Status (code + message); nothing here exits, aborts or throws.
//
// Needs neither TensorRT nor the CUDA headers: the driver types are declared as cuda.h declares them, so a
// header-free core can size workspaces with it. The implementation (triton_loader.cpp) calls the driver
// API through common/cuda_driver.h, resolved at run time: nothing links libcuda.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

// As in cuda.h (identical typedefs may repeat).
typedef struct CUstream_st* CUstream;
typedef struct CUfunc_st* CUfunction;

namespace qwen {
namespace triton {

// The type of one kernel parameter (kernels.json "args"[i].type; pointers are "*<element>").
enum class ArgType : uint8_t {
  kPtr, kI1, kI8, kI16, kI32, kI64, kU1, kU8, kU16, kU32, kU64, kFp16, kBf16, kFp32, kFp64
};

const char* argTypeName(ArgType type);

// One parameter of a compiled kernel.
struct ArgSpec {
  const char* name;
  const char* type;  // Triton's spelling: "*fp16", "i32", "fp32", ...
  ArgType kind;
  bool div16;  // compiled as a multiple of 16 (bytes, for a pointer): launches check it
};

// One embedded cubin and how to launch it (a kernels.json record; the generated source initializes the
// fields in this order, so aot.py's write_embedded_cpp changes with them).
struct KernelImage {
  const char* kernel;   // KernelSpec.name
  const char* variant;  // "fp16", "bf16", ...
  const char* sm;       // "sm_80" .. "sm_120a"
  int capability;       // 80, 86, 89, 90, 100, 120
  bool archSpecific;    // an "a" target: runs on exactly `capability`
  const char* entry;    // the cubin's kernel symbol
  const unsigned char* cubin;
  size_t cubinSize;
  const char* sha256;
  int numWarps;
  int numCtas;
  int numStages;
  int sharedBytes;        // dynamic shared memory to launch with
  int staticSharedBytes;  // declared by the cubin itself
  int globalScratchSize;  // bytes per program; 0: none
  int globalScratchAlign;
  bool launchPdl;
  bool launchCooperativeGrid;
  int registers;
  int spills;
  const ArgSpec* args;
  int numArgs;
  const char* constexprs;  // the integer constexprs it was compiled with: "BLOCK_M=4;BLOCK_N=256"
};

struct KernelTable {
  const KernelImage* images;
  size_t count;
};

// The cubins built into this library (defined by the generated qwen_triton_cubins.cpp).
KernelTable embeddedKernels();

enum class Code : int {
  kOk = 0,
  kUnknownKernel,     // no such kernel / variant in the table
  kNoImageForDevice,  // the kernel was not built for this GPU's SM
  kBadArguments,      // count, types or divisibility of the arguments do not match the kernel
  kScratch,           // the kernel needs global scratch and none (or too little, or misaligned) was passed
  kSharedMemory,      // the kernel needs more shared memory than this device allows a block
  kNoContext,         // no CUDA context is current on the calling thread
  kNoDriver,          // the CUDA driver library could not be loaded (common/cuda_driver.h)
  kCuda,              // a CUDA driver call failed (the message names it and its error)
};

struct Status {
  Code code = Code::kOk;
  std::string message;

  bool ok() const { return code == Code::kOk; }
  static Status success() { return Status{}; }
};

struct Grid {
  unsigned x = 1, y = 1, z = 1;
};

// One launch argument, tagged with its type (checked against the kernel's ArgSpec at launch).
class Arg {
 public:
  static Arg ptr(const void* p) { return Arg(ArgType::kPtr, reinterpret_cast<uint64_t>(p)); }
  static Arg i1(bool v) { return Arg(ArgType::kI1, v ? 1u : 0u); }
  static Arg i8(int8_t v) { return Arg(ArgType::kI8, static_cast<uint8_t>(v)); }
  static Arg i16(int16_t v) { return Arg(ArgType::kI16, static_cast<uint16_t>(v)); }
  static Arg i32(int32_t v) { return Arg(ArgType::kI32, static_cast<uint32_t>(v)); }
  static Arg i64(int64_t v) { return Arg(ArgType::kI64, static_cast<uint64_t>(v)); }
  static Arg u1(bool v) { return Arg(ArgType::kU1, v ? 1u : 0u); }
  static Arg u8(uint8_t v) { return Arg(ArgType::kU8, v); }
  static Arg u16(uint16_t v) { return Arg(ArgType::kU16, v); }
  static Arg u32(uint32_t v) { return Arg(ArgType::kU32, v); }
  static Arg u64(uint64_t v) { return Arg(ArgType::kU64, v); }
  static Arg fp16Bits(uint16_t bits) { return Arg(ArgType::kFp16, bits); }
  static Arg bf16Bits(uint16_t bits) { return Arg(ArgType::kBf16, bits); }
  static Arg fp32(float v);
  static Arg fp64(double v);

  ArgType type() const { return type_; }
  uint64_t bits() const { return value_.u64; }
  // The parameter's bytes, little-endian from offset 0 (what cuLaunchKernel copies).
  void* storage() const { return const_cast<uint64_t*>(&value_.u64); }

 private:
  Arg(ArgType type, uint64_t bits) : type_(type) { value_.u64 = bits; }
  ArgType type_;
  union {
    uint64_t u64;
    double f64;
    float f32;
  } value_;
};

// ---- table lookups (no CUDA calls) ----

// Whether `image` runs on a device of compute capability major.minor.
bool imageRunsOn(const KernelImage& image, int major, int minor);

// The image of kernel/variant for a device major.minor (null if none); `found` (optional) says whether
// the kernel/variant is in the table at all.
const KernelImage* selectImage(const KernelTable& table, const char* kernel, const char* variant, int major,
                               int minor, bool* found = nullptr);

// The constexpr `name` `image` was compiled with (launchers size grids from it, so a grid always matches
// the cubin's tiles); false if it has none of that name.
bool constexprValue(const KernelImage& image, const char* name, int64_t* value);

// Global scratch bytes one launch of `image` on `grid` needs (0 for most kernels).
size_t scratchBytes(const KernelImage& image, Grid grid);

// The most global scratch kernel/variant needs on `grid` on any SM it was built for: what a plugin's
// workspace reserves, independent of the GPU the engine will run on.
size_t maxScratchBytes(const KernelTable& table, const char* kernel, const char* variant, Grid grid);

// Whether `args` fit `image`'s parameters (count, types, the divisibility of hinted ones).
Status checkArgs(const KernelImage& image, const Arg* args, size_t numArgs);

// ---- loading and launching ----

class Loader {
 public:
  explicit Loader(KernelTable table);
  ~Loader();
  Loader(const Loader&) = delete;
  Loader& operator=(const Loader&) = delete;

  // The loader over embeddedKernels(), shared by every plugin in the process.
  static Loader& instance();

  const KernelTable& table() const { return table_; }

  // The image and function of kernel/variant for the current context, loading its module on first use.
  Status resolve(const char* kernel, const char* variant, const KernelImage** image, CUfunction* function);

  // Launch kernel/variant on `stream` with `args` (the kernel's non-constexpr arguments, in order).
  // `scratch`/`scratchSize`: global scratch out of the caller's workspace, if the kernel needs any.
  Status launch(const char* kernel, const char* variant, Grid grid, const Arg* args, size_t numArgs,
                CUstream stream, void* scratch = nullptr, size_t scratchSize = 0);

  // The same, for an image and function resolve() returned.
  static Status launch(const KernelImage& image, CUfunction function, Grid grid, const Arg* args,
                       size_t numArgs, CUstream stream, void* scratch = nullptr, size_t scratchSize = 0);

 private:
  struct State;  // the per-context module cache and its mutex
  KernelTable table_;
  std::unique_ptr<State> state_;
};

}  // namespace triton
}  // namespace qwen
