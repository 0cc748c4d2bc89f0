// qwenLaunchGatedDeltaNet: being ported to the Triton kernels (placeholder: refuses every launch).
#include "gated_deltanet/gated_deltanet_launch.h"

#include "common/triton_launch.h"

extern "C" int64_t qwenGatedDeltaNetParamsSize(void) { return sizeof(QwenGatedDeltaNetParams); }

extern "C" int64_t qwenGatedDeltaNetWorkspaceSize(QwenGatedDeltaNetParams const*) { return 0; }

extern "C" int qwenLaunchGatedDeltaNet(QwenGatedDeltaNetParams const*, cudaStream_t) {
  return qwen::launch::fail(QWEN_STATUS_UNSUPPORTED, "qwenLaunchGatedDeltaNet: not ported to the Triton kernels yet");
}
