// A CUDA driver for machines without a GPU: it implements the entry points the plugin library resolves
// (common/cuda_driver.h) and records what the launchers ask of them, in order: each kernel launch (the
// cubin it was loaded from, its entry, grid, block, shared memory and every parameter's bytes), each 2-D
// copy and each memset. Nothing runs. plugins/launch_replay.py then replays the record under Triton's
// interpreter on the host buffers whose addresses the launchers were given, so the C++ launch code (which
// kernel, which cubin variant, grid, argument order and values) is checked on the CPU against the reference.
//
//   qwenSetCudaDriverLibrary("<this library>") before the plugin library's first launch.
//   QWEN_RECORD_CAPABILITY (default 90): the compute capability the fake device reports.
//   qwenRecordFailCall("cuModuleLoadData"): that entry point fails from now on (error-path tests).
#include <cuda.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

extern "C" {

enum { kRecordLaunch = 1, kRecordCopy2D = 2, kRecordMemset = 3 };
enum { kMaxRecordedParams = 64 };

// One recorded call (ctypes mirror in plugins/launch_replay.py).
typedef struct QwenRecord {
  int32_t kind;
  int32_t numParams;
  uint64_t cubin;  // launch: the image its module was loaded from
  char entry[128];
  uint32_t grid[3];
  uint32_t block[3];
  uint32_t sharedBytes;
  uint32_t reserved;
  uint64_t params[kMaxRecordedParams];  // launch: each parameter's first 8 bytes
  uint64_t dst, src, dstPitch, srcPitch, widthBytes, height;  // copy; memset: dst, widthBytes, src = value
} QwenRecord;

}  // extern "C"

namespace {

struct Module {
  const void* image;
};
struct Function {
  const void* image;
  std::string entry;
};

std::mutex mutex;
std::vector<QwenRecord> records;
std::string failCall;

bool failing(const char* call) { return !failCall.empty() && failCall == call; }

int capability() {
  const char* value = std::getenv("QWEN_RECORD_CAPABILITY");
  return value ? std::atoi(value) : 90;
}

CUresult recordLaunch(CUfunction f, const unsigned grid[3], const unsigned block[3], unsigned shared,
                      void** params) {
  if (failing("cuLaunchKernel")) return CUDA_ERROR_LAUNCH_FAILED;
  const auto* fn = reinterpret_cast<const Function*>(f);
  QwenRecord r{};
  r.kind = kRecordLaunch;
  r.cubin = reinterpret_cast<uint64_t>(fn->image);
  std::strncpy(r.entry, fn->entry.c_str(), sizeof r.entry - 1);
  for (int i = 0; i < 3; ++i) {
    r.grid[i] = grid[i];
    r.block[i] = block[i];
  }
  r.sharedBytes = shared;
  // The loader ends its parameter array with a null (the real driver reads only the kernel's own count).
  while (params && params[r.numParams] && r.numParams < kMaxRecordedParams) {
    std::memcpy(&r.params[r.numParams], params[r.numParams], sizeof(uint64_t));
    ++r.numParams;
  }
  std::lock_guard<std::mutex> lock(mutex);
  records.push_back(r);
  return CUDA_SUCCESS;
}

}  // namespace

extern "C" {

int64_t qwenRecordCount(void) {
  std::lock_guard<std::mutex> lock(mutex);
  return static_cast<int64_t>(records.size());
}

const QwenRecord* qwenRecordAt(int64_t i) {
  std::lock_guard<std::mutex> lock(mutex);
  return i >= 0 && i < static_cast<int64_t>(records.size()) ? &records[static_cast<size_t>(i)] : nullptr;
}

int64_t qwenRecordSize(void) { return sizeof(QwenRecord); }

void qwenRecordReset(void) {
  std::lock_guard<std::mutex> lock(mutex);
  records.clear();
}

void qwenRecordFailCall(const char* call) {
  std::lock_guard<std::mutex> lock(mutex);
  failCall = call ? call : "";
}

CUresult CUDAAPI cuInit(unsigned int) { return failing("cuInit") ? CUDA_ERROR_NO_DEVICE : CUDA_SUCCESS; }

CUresult CUDAAPI cuGetErrorName(CUresult error, const char** name) {
  switch (error) {
    case CUDA_SUCCESS: *name = "CUDA_SUCCESS"; break;
    case CUDA_ERROR_NO_DEVICE: *name = "CUDA_ERROR_NO_DEVICE"; break;
    case CUDA_ERROR_INVALID_IMAGE: *name = "CUDA_ERROR_INVALID_IMAGE"; break;
    case CUDA_ERROR_LAUNCH_FAILED: *name = "CUDA_ERROR_LAUNCH_FAILED"; break;
    default: *name = "CUDA_ERROR_UNKNOWN"; break;
  }
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuGetErrorString(CUresult, const char** text) {
  *text = "recorded failure (plugins/tests/recording_driver.cpp)";
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxGetCurrent(CUcontext* ctx) {
  *ctx = reinterpret_cast<CUcontext>(static_cast<uintptr_t>(0x1));
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxGetId(CUcontext, unsigned long long* id) {
  *id = 1;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuCtxGetDevice(CUdevice* device) {
  *device = 0;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGetAttribute(int* value, CUdevice_attribute attribute, CUdevice) {
  switch (attribute) {
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *value = capability() / 10; break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *value = capability() % 10; break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *value = 227 * 1024; break;
    default: *value = 0; break;
  }
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuModuleLoadData(CUmodule* module, const void* image) {
  if (failing("cuModuleLoadData")) return CUDA_ERROR_INVALID_IMAGE;
  *module = reinterpret_cast<CUmodule>(new Module{image});
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuModuleUnload(CUmodule module) {
  delete reinterpret_cast<Module*>(module);
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuModuleGetFunction(CUfunction* function, CUmodule module, const char* name) {
  *function = reinterpret_cast<CUfunction>(new Function{reinterpret_cast<Module*>(module)->image, name});
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuFuncGetAttribute(int* value, CUfunction_attribute, CUfunction) {
  *value = 0;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuFuncSetAttribute(CUfunction, CUfunction_attribute, int) { return CUDA_SUCCESS; }

CUresult CUDAAPI cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                unsigned bz, unsigned shared, CUstream, void** params, void**) {
  const unsigned grid[3] = {gx, gy, gz}, block[3] = {bx, by, bz};
  return recordLaunch(f, grid, block, shared, params);
}

CUresult CUDAAPI cuLaunchKernelEx(const CUlaunchConfig* c, CUfunction f, void** params, void**) {
  const unsigned grid[3] = {c->gridDimX, c->gridDimY, c->gridDimZ};
  const unsigned block[3] = {c->blockDimX, c->blockDimY, c->blockDimZ};
  return recordLaunch(f, grid, block, c->sharedMemBytes, params);
}

CUresult CUDAAPI cuMemcpy2DAsync(const CUDA_MEMCPY2D* copy, CUstream) {
  if (failing("cuMemcpy2DAsync")) return CUDA_ERROR_LAUNCH_FAILED;
  QwenRecord r{};
  r.kind = kRecordCopy2D;
  r.dst = copy->dstDevice;
  r.src = copy->srcDevice;
  r.dstPitch = copy->dstPitch;
  r.srcPitch = copy->srcPitch;
  r.widthBytes = copy->WidthInBytes;
  r.height = copy->Height;
  std::lock_guard<std::mutex> lock(mutex);
  records.push_back(r);
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuMemsetD8Async(CUdeviceptr dst, unsigned char value, size_t bytes, CUstream) {
  QwenRecord r{};
  r.kind = kRecordMemset;
  r.dst = dst;
  r.src = value;
  r.widthBytes = bytes;
  std::lock_guard<std::mutex> lock(mutex);
  records.push_back(r);
  return CUDA_SUCCESS;
}

}  // extern "C"
