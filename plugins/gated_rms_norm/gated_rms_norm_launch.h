// Plain-C launcher of the gated RMSNorm kernel (usable without TensorRT).
#pragma once

#include "../common/qwen_launch.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct QwenGatedRMSNormParams
{
    void const* x;      // act [rows, dim]
    void const* z;      // act [rows, dim] gate
    float const* scale; // f32 [dim]
    void* y;            // act [rows, dim]
    int64_t rows;
    int64_t dim;
    float epsilon;
    int32_t dtype; // QWEN_DTYPE_*
} QwenGatedRMSNormParams;

QWEN_EXPORT int qwenLaunchGatedRMSNorm(QwenGatedRMSNormParams const* params, cudaStream_t stream);
QWEN_EXPORT int64_t qwenGatedRMSNormParamsSize(void);

#ifdef __cplusplus
}
#endif
