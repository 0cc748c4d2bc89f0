// Plain-C launcher of the fused MoE (usable without TensorRT).
#pragma once

#include "../common/qwen_launch.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct QwenMoEParams
{
    void const* x;                // act [tokens, H]
    void const* routerWeight;     // act [H, E]
    void const* gateUp;           // act [E, H, 2I] (gate columns first, then up)
    void const* down;             // act [E, I, H]
    void const* sharedGate;       // act [H, Is]
    void const* sharedUp;         // act [H, Is]
    void const* sharedDown;       // act [Is, H]
    void const* sharedExpertGate; // act [H, 1]
    void* y;                      // act [tokens, H]
    void* workspace;              // qwenMoEWorkspaceSize() bytes, 256-byte aligned
    int64_t tokens;
    int64_t hidden;
    int64_t experts;
    int64_t inter;
    int64_t sharedInter;
    int32_t topK;
    int32_t normalize;
    int32_t dtype;      // QWEN_DTYPE_*
    int32_t forceTiled; // 1: tensor-core GEMMs even for few tokens (tests both paths)
} QwenMoEParams;

QWEN_EXPORT int qwenLaunchMoE(QwenMoEParams const* params, cudaStream_t stream);
QWEN_EXPORT int64_t qwenMoEWorkspaceSize(QwenMoEParams const* params);
QWEN_EXPORT int64_t qwenMoEParamsSize(void);

#ifdef __cplusplus
}
#endif
