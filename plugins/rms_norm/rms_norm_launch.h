// Plain-C launcher of the RMSNorm kernel (usable without TensorRT).
#pragma once

#include "../common/qwen_launch.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct QwenRMSNormParams
{
    void const* x;      // act [rows, dim]
    float const* scale; // f32 [dim]
    void* y;            // act [rows, dim]
    int64_t rows;
    int64_t dim;
    float epsilon;
    int32_t dtype; // QWEN_DTYPE_*
} QwenRMSNormParams;

QWEN_EXPORT int qwenLaunchRMSNorm(QwenRMSNormParams const* params, cudaStream_t stream);
QWEN_EXPORT int64_t qwenRMSNormParamsSize(void);

#ifdef __cplusplus
}
#endif
