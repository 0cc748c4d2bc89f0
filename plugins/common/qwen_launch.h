// Plain-C launch conventions shared by every kernel launcher (usable without TensorRT, e.g. via ctypes).
//
// A launcher takes a pointer to a POD parameter struct and a CUDA stream and returns 0 on success or a
// non-zero code: a cudaError_t value, or one of the QWEN_STATUS_* codes below. Parameter structs hold
// pointers first, then 64-bit sizes, then 32-bit fields, so ctypes mirrors need no padding rules; each
// launcher also exports `<name>ParamsSize()` so a caller can check its mirror's size.
#pragma once

#include <stdint.h>

// Identical to the CUDA runtime's own typedef, so this header mixes with cuda_runtime.h.
typedef struct CUstream_st* cudaStream_t;

#define QWEN_STATUS_OK 0
#define QWEN_STATUS_BAD_PARAM 10001
#define QWEN_STATUS_UNSUPPORTED 10002

// Activation dtype codes (ActType in qwen_core.h).
#define QWEN_DTYPE_F16 0
#define QWEN_DTYPE_BF16 1

#if defined(_WIN32)
#define QWEN_EXPORT __declspec(dllexport)
#else
#define QWEN_EXPORT __attribute__((visibility("default")))
#endif
