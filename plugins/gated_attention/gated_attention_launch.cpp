// qwenLaunchGatedAttention: being ported to the Triton kernels (placeholder: refuses every launch).
#include "gated_attention/gated_attention_launch.h"

#include "common/triton_launch.h"

extern "C" int64_t qwenGatedAttentionParamsSize(void) { return sizeof(QwenGatedAttentionParams); }

extern "C" int64_t qwenGatedAttentionWorkspaceSize(QwenGatedAttentionParams const*) { return 0; }

extern "C" int qwenLaunchGatedAttention(QwenGatedAttentionParams const*, cudaStream_t) {
  return qwen::launch::fail(QWEN_STATUS_UNSUPPORTED, "qwenLaunchGatedAttention: not ported to the Triton kernels yet");
}
