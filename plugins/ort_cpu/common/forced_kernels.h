// QWEN_CPU_KERNELS=avx2|portable: the narrower loops on any CPU (tests compare the instruction sets on one
// machine). Each kernel reads it once, where it picks its loops by CPUID.
#pragma once

#include <cstdlib>
#include <cstring>

namespace qwen_cpu {

enum class ForcedKernels { kNone, kAvx2, kPortable };

inline ForcedKernels forced_kernels() {
  const char* forced = std::getenv("QWEN_CPU_KERNELS");
  if (forced == nullptr) return ForcedKernels::kNone;
  if (std::strcmp(forced, "portable") == 0) return ForcedKernels::kPortable;
  if (std::strcmp(forced, "avx2") == 0) return ForcedKernels::kAvx2;
  return ForcedKernels::kNone;
}

}  // namespace qwen_cpu
