// The launchers' shared plumbing (triton_launch.h) and the library's error and driver entry points.
#include "common/triton_launch.h"

#include "common/cuda_driver.h"

#include <cstring>

namespace qwen {
namespace launch {

namespace {

thread_local std::string lastError;

int cudaCall(const char* call, CUresult result, const cuda::Driver* d) {
  if (result == CUDA_SUCCESS) return QWEN_STATUS_OK;
  const char* name = nullptr;
  if (d->cuGetErrorName(result, &name) != CUDA_SUCCESS) name = "CUresult";
  return fail(QWEN_STATUS_LAUNCH, std::string(call) + " failed: " + name + " (" + std::to_string(result) + ")");
}

const cuda::Driver* driverOrFail(int* status) {
  std::string why;
  const cuda::Driver* d = cuda::driver(&why);
  *status = d ? QWEN_STATUS_OK : fail(QWEN_STATUS_LAUNCH, why);
  return d;
}

}  // namespace

const char* actVariant(int32_t dtype) {
  switch (dtype) {
    case QWEN_DTYPE_F16: return "fp16";
    case QWEN_DTYPE_BF16: return "bf16";
    default: return nullptr;
  }
}

int fail(int code, const std::string& message) {
  lastError = message;
  return code;
}

int check(const triton::Status& status) {
  return status.ok() ? QWEN_STATUS_OK : fail(QWEN_STATUS_LAUNCH, status.message);
}

int resolve(const char* kernel, const char* variant, Kernel* out) {
  return check(triton::Loader::instance().resolve(kernel, variant, &out->image, &out->function));
}

int constant(const Kernel& kernel, const char* name, int64_t* value) {
  if (kernel.image && triton::constexprValue(*kernel.image, name, value)) return QWEN_STATUS_OK;
  const std::string which = kernel.image ? std::string(kernel.image->kernel) : "an unresolved kernel";
  return fail(QWEN_STATUS_LAUNCH, which + " has no constexpr " + name);
}

int widthClass(const char* prefix, const char* suffix, int64_t dim, std::string* name) {
  const triton::KernelTable table = triton::Loader::instance().table();
  const size_t prefixLength = std::strlen(prefix), suffixLength = std::strlen(suffix);
  long best = -1, widest = -1;
  for (size_t i = 0; i < table.count; ++i) {
    const char* kernel = table.images[i].kernel;
    const size_t length = std::strlen(kernel);
    if (length <= prefixLength + suffixLength || std::strncmp(kernel, prefix, prefixLength) != 0) continue;
    const std::string middle(kernel + prefixLength, length - prefixLength - suffixLength);
    if (std::strcmp(kernel + length - suffixLength, suffix) != 0 || middle.empty() ||
        middle.find_first_not_of("0123456789") != std::string::npos) {
      continue;
    }
    const long n = std::stol(middle);
    if (n > widest) widest = n;
    if (n >= dim && (best < 0 || n < best)) best = n;
  }
  if (widest < 0) return fail(QWEN_STATUS_LAUNCH, std::string("no kernel named ") + prefix + "<N>" + suffix);
  *name = prefix + std::to_string(best >= 0 ? best : widest) + suffix;
  return QWEN_STATUS_OK;
}

bool aligned16(std::initializer_list<const void*> pointers, std::initializer_list<int64_t> values) {
  for (const void* p : pointers) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  for (int64_t v : values) {
    if (v % 16 != 0) return false;
  }
  return true;
}

int run(const Kernel& kernel, triton::Grid grid, std::initializer_list<triton::Arg> args, cudaStream_t stream) {
  if (!kernel.image) return fail(QWEN_STATUS_LAUNCH, "launch of an unresolved kernel");
  return check(
      triton::Loader::launch(*kernel.image, kernel.function, grid, args.begin(), args.size(), stream));
}

int run(const char* kernel, const char* variant, triton::Grid grid, std::initializer_list<triton::Arg> args,
        cudaStream_t stream) {
  Kernel k;
  const int status = resolve(kernel, variant, &k);
  return status ? status : run(k, grid, args, stream);
}

int copyRows(void* dst, size_t dstPitch, const void* src, size_t srcPitch, size_t rowBytes, size_t rows,
             cudaStream_t stream) {
  if (rows == 0 || rowBytes == 0) return QWEN_STATUS_OK;
  int status = QWEN_STATUS_OK;
  const cuda::Driver* d = driverOrFail(&status);
  if (!d) return status;
  CUDA_MEMCPY2D copy{};
  copy.srcMemoryType = CU_MEMORYTYPE_DEVICE;
  copy.srcDevice = reinterpret_cast<CUdeviceptr>(src);
  copy.srcPitch = srcPitch;
  copy.dstMemoryType = CU_MEMORYTYPE_DEVICE;
  copy.dstDevice = reinterpret_cast<CUdeviceptr>(dst);
  copy.dstPitch = dstPitch;
  copy.WidthInBytes = rowBytes;
  copy.Height = rows;
  return cudaCall("cuMemcpy2DAsync", d->cuMemcpy2DAsync(&copy, stream), d);
}

int zero(void* dst, size_t bytes, cudaStream_t stream) {
  if (bytes == 0) return QWEN_STATUS_OK;
  int status = QWEN_STATUS_OK;
  const cuda::Driver* d = driverOrFail(&status);
  if (!d) return status;
  return cudaCall("cuMemsetD8Async", d->cuMemsetD8Async(reinterpret_cast<CUdeviceptr>(dst), 0, bytes, stream), d);
}

}  // namespace launch
}  // namespace qwen

extern "C" const char* qwenLastError(void) { return qwen::launch::lastError.c_str(); }

extern "C" int qwenSetCudaDriverLibrary(const char* path) {
  std::string why;
  return qwen::cuda::setDriverLibrary(path, &why) ? QWEN_STATUS_OK : qwen::launch::fail(QWEN_STATUS_BAD_PARAM, why);
}

extern "C" int64_t qwenKernelCount(void) {
  return static_cast<int64_t>(qwen::triton::Loader::instance().table().count);
}

extern "C" int qwenKernelAt(int64_t index, const char** kernel, const char** variant, const char** sm,
                            const void** cubin) {
  const qwen::triton::KernelTable table = qwen::triton::Loader::instance().table();
  if (index < 0 || static_cast<size_t>(index) >= table.count || !kernel || !variant || !sm || !cubin) {
    return qwen::launch::fail(QWEN_STATUS_BAD_PARAM, "qwenKernelAt: no such kernel image");
  }
  const qwen::triton::KernelImage& image = table.images[index];
  *kernel = image.kernel;
  *variant = image.variant;
  *sm = image.sm;
  *cubin = image.cubin;
  return QWEN_STATUS_OK;
}
