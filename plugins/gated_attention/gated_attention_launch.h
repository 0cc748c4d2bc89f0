// Plain-C launcher of the fused gated attention block (usable without TensorRT).
#pragma once

#include "../common/qwen_launch.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct QwenGatedAttentionParams
{
    void const* x;           // act [B, T, H]
    int32_t const* mask;     // i32 [B, P + T]  1 = real token
    float const* cos;        // f32 [B, T, rotary_dim]
    float const* sin;        // f32 [B, T, rotary_dim]
    void const* pastKey;     // act [B, kv, P, hd]
    void const* pastValue;   // act [B, kv, P, hd]
    void const* qWeight;     // act [H, nh * 2 * hd]  (query | gate per head)
    void const* kWeight;     // act [H, kv * hd]
    void const* vWeight;     // act [H, kv * hd]
    void const* oWeight;     // act [nh * hd, H]
    float const* qNorm;      // f32 [hd]
    float const* kNorm;      // f32 [hd]
    void* y;                 // act [B, T, H]
    void* presentKey;        // act [B, kv, P + T, hd]
    void* presentValue;      // act [B, kv, P + T, hd]
    void* workspace;         // qwenGatedAttentionWorkspaceSize() bytes, 256-byte aligned
    int64_t batch;
    int64_t tokens;
    int64_t past;
    int64_t hidden;
    int32_t numHeads;
    int32_t numKvHeads;
    int32_t headDim;
    int32_t rotaryDim;
    float epsilon;
    float scale;       // 0: 1/sqrt(head_dim)
    int32_t dtype;     // QWEN_DTYPE_*
    int32_t kvSplits;  // 0: automatic; > 0: force this many key splits (tests the split-KV path)
} QwenGatedAttentionParams;

QWEN_EXPORT int qwenLaunchGatedAttention(QwenGatedAttentionParams const* params, cudaStream_t stream);
QWEN_EXPORT int64_t qwenGatedAttentionWorkspaceSize(QwenGatedAttentionParams const* params);
QWEN_EXPORT int64_t qwenGatedAttentionParamsSize(void);

#ifdef __cplusplus
}
#endif
