// qwenLaunchMoE: being ported to the Triton kernels (placeholder: refuses every launch).
#include "moe/moe_launch.h"

#include "common/triton_launch.h"

extern "C" int64_t qwenMoEParamsSize(void) { return sizeof(QwenMoEParams); }

extern "C" int64_t qwenMoEWorkspaceSize(QwenMoEParams const*) { return 0; }

extern "C" int qwenLaunchMoE(QwenMoEParams const*, cudaStream_t) {
  return qwen::launch::fail(QWEN_STATUS_UNSUPPORTED, "qwenLaunchMoE: not ported to the Triton kernels yet");
}
