// Plain-C launch conventions shared by every kernel launcher (usable without TensorRT, e.g. via ctypes).
//
// A launcher takes a pointer to a POD parameter struct and a CUDA stream and returns 0 on success or one of
// the QWEN_STATUS_* codes below; qwenLastError() then says why, in one line. Parameter structs hold
// pointers first, then 64-bit sizes, then 32-bit fields, so ctypes mirrors need no padding rules; each
// launcher also exports `<name>ParamsSize()` so a caller can check its mirror's size.
#pragma once

#include <stdint.h>

// Identical to the CUDA runtime's own typedef, so this header mixes with cuda_runtime.h.
typedef struct CUstream_st* cudaStream_t;

#define QWEN_STATUS_OK 0
#define QWEN_STATUS_BAD_PARAM 10001
#define QWEN_STATUS_UNSUPPORTED 10002
#define QWEN_STATUS_LAUNCH 10003  // the driver or the kernel loader failed: qwenLastError() says how

// Activation dtype codes (ActType in qwen_core.h).
#define QWEN_DTYPE_F16 0
#define QWEN_DTYPE_BF16 1

#if defined(_WIN32)
#define QWEN_EXPORT __declspec(dllexport)
#else
#define QWEN_EXPORT __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

// The calling thread's last launcher failure, in one line ("" if none yet).
QWEN_EXPORT const char* qwenLastError(void);

// Load the CUDA driver API from `path` instead of libcuda.so.1 (before the first launch; the CPU replay
// tests pass plugins/tests/recording_driver.c's library). 0, or QWEN_STATUS_BAD_PARAM once it is loaded.
QWEN_EXPORT int qwenSetCudaDriverLibrary(const char* path);

// The Triton kernel images embedded in the library: how many, and image `index`'s kernel, variant, SM and
// cubin (0, or QWEN_STATUS_BAD_PARAM for an index out of range).
QWEN_EXPORT int64_t qwenKernelCount(void);
QWEN_EXPORT int qwenKernelAt(int64_t index, const char** kernel, const char** variant, const char** sm,
                             const void** cubin);

#ifdef __cplusplus
}
#endif
