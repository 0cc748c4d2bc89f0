// Run-time resolution of the CUDA driver API (see cuda_driver.h).
#include "common/cuda_driver.h"

#include <dlfcn.h>

#include <mutex>

namespace qwen {
namespace cuda {

namespace {

#define QWEN_SYMBOL_NAME(name) QWEN_SYMBOL_NAME_EXPANDED(name)
#define QWEN_SYMBOL_NAME_EXPANDED(name) #name

struct State {
  std::mutex mutex;
  std::string library = "libcuda.so.1";
  bool resolved = false;
  bool ok = false;
  std::string error;
  Driver table{};
};

State& state() {
  static State s;
  return s;
}

template <typename Fn>
bool resolve(void* handle, Fn*& slot, const char* symbol, std::string* error) {
  slot = reinterpret_cast<Fn*>(dlsym(handle, symbol));
  if (!slot) *error = std::string("the CUDA driver has no ") + symbol;
  return slot != nullptr;
}

bool load(State& s) {
  void* handle = dlopen(s.library.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!handle) {
    const char* why = dlerror();
    s.error = "cannot load the CUDA driver " + s.library + ": " + (why ? why : "dlopen failed") +
              " (a GPU machine needs the NVIDIA driver installed)";
    return false;
  }
  Driver& d = s.table;
  std::string* e = &s.error;
  // Each member is resolved by the symbol cuda.h maps its name to (the versioned _v2 entry points).
#define QWEN_RESOLVE(name) resolve(handle, d.name, QWEN_SYMBOL_NAME(name), e)
  return QWEN_RESOLVE(cuInit) && QWEN_RESOLVE(cuGetErrorName) && QWEN_RESOLVE(cuGetErrorString) &&
         QWEN_RESOLVE(cuCtxGetCurrent) && QWEN_RESOLVE(cuCtxGetId) && QWEN_RESOLVE(cuCtxGetDevice) &&
         QWEN_RESOLVE(cuDeviceGetAttribute) && QWEN_RESOLVE(cuModuleLoadData) && QWEN_RESOLVE(cuModuleUnload) &&
         QWEN_RESOLVE(cuModuleGetFunction) && QWEN_RESOLVE(cuFuncGetAttribute) &&
         QWEN_RESOLVE(cuFuncSetAttribute) && QWEN_RESOLVE(cuLaunchKernel) && QWEN_RESOLVE(cuLaunchKernelEx) &&
         QWEN_RESOLVE(cuMemcpy2DAsync) && QWEN_RESOLVE(cuMemsetD8Async);
#undef QWEN_RESOLVE
}

}  // namespace

const Driver* driver(std::string* error) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  if (!s.resolved) {
    s.ok = load(s);
    s.resolved = true;
  }
  if (!s.ok && error) *error = s.error;
  return s.ok ? &s.table : nullptr;
}

bool setDriverLibrary(const char* path, std::string* error) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  if (s.resolved) {
    if (error) *error = "the CUDA driver was already loaded from " + s.library;
    return false;
  }
  if (!path || !*path) {
    if (error) *error = "no driver library path given";
    return false;
  }
  s.library = path;
  return true;
}

}  // namespace cuda
}  // namespace qwen
