// Plain-C launcher of the fused Gated DeltaNet block (usable without TensorRT).
#pragma once

#include "../common/qwen_launch.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct QwenGatedDeltaNetParams
{
    void const* x;              // act [B, T, H]
    int32_t const* mask;        // i32 [B, maskLen]; its last T columns cover the new tokens
    void const* pastConv;       // act [B, C, K-1]
    float const* pastRecurrent; // f32 [B, nv, dk, dv]
    void const* qkvWeight;      // act [H, C]   C = 2 * nk * dk + nv * dv (q | k | v)
    void const* zWeight;        // act [H, nv * dv]
    void const* bWeight;        // act [H, nv]
    void const* aWeight;        // act [H, nv]
    void const* convWeight;     // act [C, 1, K]
    float const* negExpA;       // f32 [nv]  -exp(A_log)
    float const* dtBias;        // f32 [nv]
    float const* normWeight;    // f32 [dv]
    void const* outWeight;      // act [nv * dv, H]
    void* y;                    // act [B, T, H]
    void* presentConv;          // act [B, C, K-1]       may be the same buffer as pastConv
    float* presentRecurrent;    // f32 [B, nv, dk, dv]   may be the same buffer as pastRecurrent
    void* workspace;            // qwenGatedDeltaNetWorkspaceSize() bytes, 256-byte aligned
    int64_t batch;
    int64_t tokens;
    int64_t maskLen;
    int64_t hidden;
    int32_t numKHeads;
    int32_t numVHeads;
    int32_t headKDim;
    int32_t headVDim;
    int32_t convKernel;
    float epsilon;
    int32_t dtype;    // QWEN_DTYPE_*
    int32_t ruleMode; // 0: auto, 1: recurrent, 2: chunked (tests compare the two)
} QwenGatedDeltaNetParams;

QWEN_EXPORT int qwenLaunchGatedDeltaNet(QwenGatedDeltaNetParams const* params, cudaStream_t stream);
QWEN_EXPORT int64_t qwenGatedDeltaNetWorkspaceSize(QwenGatedDeltaNetParams const* params);
QWEN_EXPORT int64_t qwenGatedDeltaNetParamsSize(void);

#ifdef __cplusplus
}
#endif
