// Our loader for the ahead-of-time compiled Triton kernels (see triton_loader.h): CUDA driver API only,
// every failure returned as a Status.
#include "common/triton_loader.h"

#include "common/cuda_driver.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <vector>

namespace qwen {
namespace triton {

namespace {

constexpr int kDefaultSharedLimit = 48 * 1024;  // what a block gets without opting in
constexpr size_t kMaxParams = 128;

Status fail(Code code, std::string message) {
  return Status{code, "qwen triton loader: " + message};
}

std::string describe(const char* kernel, const char* variant) {
  return std::string(kernel ? kernel : "(null)") + " (" + (variant ? variant : "(null)") + ")";
}

std::string describe(const KernelImage& image) {
  return describe(image.kernel, image.variant) + " " + image.sm;
}

Status cudaFailure(const cuda::Driver* d, const std::string& what, const std::string& call, CUresult result) {
  const char* name = nullptr;
  const char* text = nullptr;
  if (d->cuGetErrorName(result, &name) != CUDA_SUCCESS) name = nullptr;
  if (d->cuGetErrorString(result, &text) != CUDA_SUCCESS) text = nullptr;
  std::string message = what + ": " + call + " failed: " + (name ? name : "CUresult");
  message += " (" + std::to_string(static_cast<int>(result)) + (text ? std::string(", ") + text : "") + ")";
  return fail(Code::kCuda, message);
}

bool isSigned(ArgType t) {
  return t == ArgType::kI8 || t == ArgType::kI16 || t == ArgType::kI32 || t == ArgType::kI64;
}

std::string hex(uint64_t v) {
  char text[24];
  std::snprintf(text, sizeof text, "0x%llx", static_cast<unsigned long long>(v));
  return text;
}

int64_t signedValue(const Arg& a) {
  const uint64_t b = a.bits();
  switch (a.type()) {
    case ArgType::kI8: return static_cast<int8_t>(b);
    case ArgType::kI16: return static_cast<int16_t>(b);
    case ArgType::kI32: return static_cast<int32_t>(b);
    default: return static_cast<int64_t>(b);
  }
}

}  // namespace

const char* argTypeName(ArgType type) {
  switch (type) {
    case ArgType::kPtr: return "pointer";
    case ArgType::kI1: return "i1";
    case ArgType::kI8: return "i8";
    case ArgType::kI16: return "i16";
    case ArgType::kI32: return "i32";
    case ArgType::kI64: return "i64";
    case ArgType::kU1: return "u1";
    case ArgType::kU8: return "u8";
    case ArgType::kU16: return "u16";
    case ArgType::kU32: return "u32";
    case ArgType::kU64: return "u64";
    case ArgType::kFp16: return "fp16";
    case ArgType::kBf16: return "bf16";
    case ArgType::kFp32: return "fp32";
    case ArgType::kFp64: return "fp64";
  }
  return "?";
}

Arg Arg::fp32(float v) {
  Arg a(ArgType::kFp32, 0);
  std::memcpy(&a.value_, &v, sizeof v);
  return a;
}

Arg Arg::fp64(double v) {
  Arg a(ArgType::kFp64, 0);
  std::memcpy(&a.value_, &v, sizeof v);
  return a;
}

// ---- table lookups ----

bool imageRunsOn(const KernelImage& image, int major, int minor) {
  const int capability = major * 10 + minor;
  if (image.archSpecific) return capability == image.capability;
  return major == image.capability / 10 && minor >= image.capability % 10;
}

const KernelImage* selectImage(const KernelTable& table, const char* kernel, const char* variant, int major,
                               int minor, bool* found) {
  const KernelImage* best = nullptr;
  if (found) *found = false;
  if (!kernel || !variant) return nullptr;
  for (size_t i = 0; i < table.count; ++i) {
    const KernelImage& image = table.images[i];
    if (std::strcmp(image.kernel, kernel) != 0 || std::strcmp(image.variant, variant) != 0) continue;
    if (found) *found = true;
    if (!imageRunsOn(image, major, minor)) continue;
    // An exact ("a") match beats a same-major one; among those, the highest capability.
    if (!best || (image.archSpecific && !best->archSpecific) ||
        (image.archSpecific == best->archSpecific && image.capability > best->capability)) {
      best = &image;
    }
  }
  return best;
}

bool constexprValue(const KernelImage& image, const char* name, int64_t* value) {
  if (!image.constexprs || !name || !value) return false;
  const size_t length = std::strlen(name);
  for (const char* p = image.constexprs; *p;) {
    const char* end = std::strchr(p, ';');
    if (!end) end = p + std::strlen(p);
    if (static_cast<size_t>(end - p) > length && std::strncmp(p, name, length) == 0 && p[length] == '=') {
      *value = std::strtoll(p + length + 1, nullptr, 10);
      return true;
    }
    p = *end ? end + 1 : end;
  }
  return false;
}

size_t scratchBytes(const KernelImage& image, Grid grid) {
  if (image.globalScratchSize <= 0) return 0;
  return static_cast<size_t>(grid.x) * grid.y * grid.z * static_cast<size_t>(image.numCtas) *
         static_cast<size_t>(image.globalScratchSize);
}

size_t maxScratchBytes(const KernelTable& table, const char* kernel, const char* variant, Grid grid) {
  size_t most = 0;
  for (size_t i = 0; i < table.count; ++i) {
    const KernelImage& image = table.images[i];
    if (std::strcmp(image.kernel, kernel) == 0 && std::strcmp(image.variant, variant) == 0) {
      const size_t bytes = scratchBytes(image, grid);
      if (bytes > most) most = bytes;
    }
  }
  return most;
}

Status checkArgs(const KernelImage& image, const Arg* args, size_t numArgs) {
  if (numArgs != static_cast<size_t>(image.numArgs)) {
    return fail(Code::kBadArguments, describe(image) + " takes " + std::to_string(image.numArgs) +
                                         " arguments, got " + std::to_string(numArgs));
  }
  if (numArgs && !args) return fail(Code::kBadArguments, describe(image) + ": arguments are null");
  for (size_t i = 0; i < numArgs; ++i) {
    const ArgSpec& spec = image.args[i];
    const Arg& arg = args[i];
    const std::string which = describe(image) + ": argument " + std::to_string(i) + " (" + spec.name + ")";
    if (arg.type() != spec.kind) {
      return fail(Code::kBadArguments, which + " is " + spec.type + ", got " + argTypeName(arg.type()));
    }
    if (spec.div16) {
      const bool pointer = spec.kind == ArgType::kPtr;
      const bool ok = isSigned(spec.kind) ? signedValue(arg) % 16 == 0 : arg.bits() % 16 == 0;
      if (!ok) {
        const std::string got = pointer ? hex(arg.bits()) : std::to_string(signedValue(arg));
        return fail(Code::kBadArguments, which + " was compiled as a multiple of 16" +
                                             (pointer ? " bytes (aligned)" : "") + ", got " + got);
      }
    }
  }
  return Status::success();
}

// ---- loading ----

struct Loader::State {
  struct Loaded {
    CUmodule module = nullptr;
    CUfunction function = nullptr;
  };
  struct Context {
    int major = 0, minor = 0, sharedOptin = 0;
    std::vector<Loaded> loaded;  // one per table image
  };
  std::mutex mutex;
  std::map<unsigned long long, Context> contexts;  // by cuCtxGetId
  CUresult init = CUDA_ERROR_NOT_INITIALIZED;
  bool initialized = false;
};

Loader::Loader(KernelTable table) : table_(table), state_(new State) {}
Loader::~Loader() = default;  // modules belong to their contexts and go with them

Loader& Loader::instance() {
  static Loader loader(embeddedKernels());
  return loader;
}

Status Loader::resolve(const char* kernel, const char* variant, const KernelImage** image,
                       CUfunction* function) {
  if (!image || !function) return fail(Code::kBadArguments, "resolve() needs somewhere to put its results");
  *image = nullptr;
  *function = nullptr;
  const std::string what = describe(kernel, variant);
  std::string why;
  const cuda::Driver* d = cuda::driver(&why);
  if (!d) return fail(Code::kNoDriver, what + ": " + why);
  std::lock_guard<std::mutex> lock(state_->mutex);
  if (!state_->initialized) {
    state_->init = d->cuInit(0);
    state_->initialized = true;
  }
  if (state_->init != CUDA_SUCCESS) return cudaFailure(d, what, "cuInit", state_->init);

  CUcontext ctx = nullptr;
  CUresult r = d->cuCtxGetCurrent(&ctx);
  if (r != CUDA_SUCCESS) return cudaFailure(d, what, "cuCtxGetCurrent", r);
  if (!ctx) return fail(Code::kNoContext, what + ": no CUDA context is current on this thread");
  unsigned long long id = 0;
#if CUDA_VERSION >= 12000
  r = d->cuCtxGetId(ctx, &id);
  if (r != CUDA_SUCCESS) return cudaFailure(d, what, "cuCtxGetId", r);
#else
  id = reinterpret_cast<unsigned long long>(ctx);
#endif
  auto it = state_->contexts.find(id);
  if (it == state_->contexts.end()) {
    State::Context c;
    CUdevice device = 0;
    r = d->cuCtxGetDevice(&device);
    if (r != CUDA_SUCCESS) return cudaFailure(d, what, "cuCtxGetDevice", r);
    const struct {
      CUdevice_attribute attribute;
      int* value;
      const char* name;
    } queries[] = {
        {CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, &c.major, "compute capability major"},
        {CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, &c.minor, "compute capability minor"},
        {CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, &c.sharedOptin, "shared memory opt-in"},
    };
    for (const auto& q : queries) {
      r = d->cuDeviceGetAttribute(q.value, q.attribute, device);
      if (r != CUDA_SUCCESS) return cudaFailure(d, what, std::string("cuDeviceGetAttribute(") + q.name + ")", r);
    }
    c.loaded.resize(table_.count);
    it = state_->contexts.emplace(id, std::move(c)).first;
  }
  State::Context& c = it->second;

  bool known = false;
  const KernelImage* chosen = selectImage(table_, kernel, variant, c.major, c.minor, &known);
  if (!known) return fail(Code::kUnknownKernel, what + " is not among the embedded kernels");
  if (!chosen) {
    std::string built;
    for (size_t i = 0; i < table_.count; ++i) {
      const KernelImage& im = table_.images[i];
      if (std::strcmp(im.kernel, kernel) == 0 && std::strcmp(im.variant, variant) == 0) {
        built += std::string(built.empty() ? "" : ", ") + im.sm;
      }
    }
    return fail(Code::kNoImageForDevice, what + " has no cubin for this GPU (compute capability " +
                                             std::to_string(c.major) + "." + std::to_string(c.minor) +
                                             "); it was built for " + built);
  }
  const size_t index = static_cast<size_t>(chosen - table_.images);
  State::Loaded& loaded = c.loaded[index];
  if (!loaded.function) {
    const std::string where = describe(*chosen);
    CUmodule module = nullptr;
    r = d->cuModuleLoadData(&module, chosen->cubin);
    if (r != CUDA_SUCCESS) return cudaFailure(d, where, "cuModuleLoadData", r);
    CUfunction fn = nullptr;
    const char* call = "cuModuleGetFunction";
    r = d->cuModuleGetFunction(&fn, module, chosen->entry);
    // The driver's own count of the cubin's static shared memory; with the dynamic part it must fit the
    // block's opt-in limit (what the build checked against its table, here against this device).
    int staticShared = 0;
    if (r == CUDA_SUCCESS) {
      call = "cuFuncGetAttribute(SHARED_SIZE_BYTES)";
      r = d->cuFuncGetAttribute(&staticShared, CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, fn);
    }
    if (r == CUDA_SUCCESS && chosen->sharedBytes + staticShared > c.sharedOptin) {
      d->cuModuleUnload(module);
      const std::string needed = std::to_string(chosen->sharedBytes) + " + " + std::to_string(staticShared);
      const std::string limit = std::to_string(c.sharedOptin);
      return fail(Code::kSharedMemory, where + " needs " + needed + " (static) bytes of shared memory; " +
                                           "this device allows " + limit + " per block");
    }
    if (r == CUDA_SUCCESS && chosen->sharedBytes > kDefaultSharedLimit) {
      call = "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)";
      r = d->cuFuncSetAttribute(fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, chosen->sharedBytes);
    }
    if (r == CUDA_SUCCESS && chosen->numCtas == 16) {
      call = "cuFuncSetAttribute(NON_PORTABLE_CLUSTER_SIZE_ALLOWED)";
      r = d->cuFuncSetAttribute(fn, CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1);
    }
    if (r != CUDA_SUCCESS) {
      d->cuModuleUnload(module);
      return cudaFailure(d, where, std::string(call) + (fn ? "" : std::string(" of ") + chosen->entry), r);
    }
    loaded.module = module;
    loaded.function = fn;
  }
  *image = chosen;
  *function = loaded.function;
  return Status::success();
}

// ---- launching ----

Status Loader::launch(const KernelImage& image, CUfunction function, Grid grid, const Arg* args,
                      size_t numArgs, CUstream stream, void* scratch, size_t scratchSize) {
  const std::string where = describe(image);
  if (!function) return fail(Code::kBadArguments, where + ": no function (resolve() it first)");
  std::string why;
  const cuda::Driver* d = cuda::driver(&why);
  if (!d) return fail(Code::kNoDriver, where + ": " + why);
  Status s = checkArgs(image, args, numArgs);
  if (!s.ok()) return s;
  if (numArgs + 3 > kMaxParams) {
    return fail(Code::kBadArguments, where + ": more than " + std::to_string(kMaxParams - 3) + " arguments");
  }
  const unsigned long long gridX = static_cast<unsigned long long>(grid.x) * image.numCtas;
  if (gridX > 0x7fffffffull || grid.y > 65535u || grid.z > 65535u) {
    const std::string dims =
        std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " + std::to_string(grid.z);
    return fail(Code::kBadArguments, where + ": grid (" + dims + ") x " + std::to_string(image.numCtas) +
                                         " CTAs exceeds CUDA's limits");
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return Status::success();  // as Triton: nothing to run

  CUdeviceptr globalScratch = 0;
  CUdeviceptr profileScratch = 0;
  if (image.globalScratchSize > 0) {
    const size_t needed = scratchBytes(image, grid);
    if (!scratch || scratchSize < needed) {
      const std::string got = std::to_string(scratch ? scratchSize : 0);
      return fail(Code::kScratch,
                  where + " needs " + std::to_string(needed) + " bytes of global scratch, got " + got);
    }
    const auto address = reinterpret_cast<uintptr_t>(scratch);
    if (image.globalScratchAlign > 1 && address % static_cast<uintptr_t>(image.globalScratchAlign) != 0) {
      return fail(Code::kScratch, where + ": global scratch must be aligned to " +
                                      std::to_string(image.globalScratchAlign) + " bytes");
    }
    globalScratch = static_cast<CUdeviceptr>(address);
  }

  void* params[kMaxParams];
  for (size_t i = 0; i < numArgs; ++i) params[i] = args[i].storage();
  params[numArgs] = &globalScratch;
  params[numArgs + 1] = &profileScratch;
  params[numArgs + 2] = nullptr;  // the driver reads only the kernel's own count; a replay stops here

  const unsigned block = 32u * static_cast<unsigned>(image.numWarps);
  const unsigned shared = static_cast<unsigned>(image.sharedBytes);
  CUresult r;
  if (image.numCtas == 1 && !image.launchPdl && !image.launchCooperativeGrid) {
    r = d->cuLaunchKernel(function, static_cast<unsigned>(gridX), grid.y, grid.z, block, 1, 1, shared, stream,
                       params, nullptr);
    if (r != CUDA_SUCCESS) return cudaFailure(d, where, "cuLaunchKernel", r);
    return Status::success();
  }
  CUlaunchAttribute attrs[4];
  unsigned numAttrs = 0;
  if (image.launchPdl) {
    attrs[numAttrs].id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    std::memset(&attrs[numAttrs].value, 0, sizeof attrs[numAttrs].value);
    attrs[numAttrs++].value.programmaticStreamSerializationAllowed = 1;
  }
  if (image.launchCooperativeGrid) {
    attrs[numAttrs].id = CU_LAUNCH_ATTRIBUTE_COOPERATIVE;
    std::memset(&attrs[numAttrs].value, 0, sizeof attrs[numAttrs].value);
    attrs[numAttrs++].value.cooperative = 1;
  }
  if (image.numCtas != 1) {
    attrs[numAttrs].id = CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    std::memset(&attrs[numAttrs].value, 0, sizeof attrs[numAttrs].value);
    attrs[numAttrs].value.clusterDim.x = static_cast<unsigned>(image.numCtas);
    attrs[numAttrs].value.clusterDim.y = 1;
    attrs[numAttrs++].value.clusterDim.z = 1;
    attrs[numAttrs].id = CU_LAUNCH_ATTRIBUTE_CLUSTER_SCHEDULING_POLICY_PREFERENCE;
    std::memset(&attrs[numAttrs].value, 0, sizeof attrs[numAttrs].value);
    attrs[numAttrs++].value.clusterSchedulingPolicyPreference = CU_CLUSTER_SCHEDULING_POLICY_SPREAD;
  }
  CUlaunchConfig config;
  std::memset(&config, 0, sizeof config);
  config.gridDimX = static_cast<unsigned>(gridX);
  config.gridDimY = grid.y;
  config.gridDimZ = grid.z;
  config.blockDimX = block;
  config.blockDimY = 1;
  config.blockDimZ = 1;
  config.sharedMemBytes = shared;
  config.hStream = stream;
  config.attrs = attrs;
  config.numAttrs = numAttrs;
  r = d->cuLaunchKernelEx(&config, function, params, nullptr);
  if (r != CUDA_SUCCESS) return cudaFailure(d, where, "cuLaunchKernelEx", r);
  return Status::success();
}

Status Loader::launch(const char* kernel, const char* variant, Grid grid, const Arg* args, size_t numArgs,
                      CUstream stream, void* scratch, size_t scratchSize) {
  const KernelImage* image = nullptr;
  CUfunction function = nullptr;
  Status s = resolve(kernel, variant, &image, &function);
  if (!s.ok()) return s;
  return launch(*image, function, grid, args, numArgs, stream, scratch, scratchSize);
}

}  // namespace triton
}  // namespace qwen
