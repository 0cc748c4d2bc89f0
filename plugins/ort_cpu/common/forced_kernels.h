// QWEN_CPU_KERNELS=avx2|portable: the narrower loops on any CPU (tests compare the instruction sets on one
// machine). Each kernel picks its loops once, through kernel_level below.
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

enum class KernelLevel { kPortable, kAvx2, kWide };

// The loops a kernel runs: its widest (`wide`: the CPU has the AVX-512 features that kernel's widest loops
// need), else AVX2 (`avx2`: the CPU has what its AVX2 loops need), else the portable ones; narrowed by
// QWEN_CPU_KERNELS. Every kernel that picks its loops by CPUID decides here.
inline KernelLevel kernel_level(bool wide, bool avx2) {
  const ForcedKernels forced = forced_kernels();
  if (forced == ForcedKernels::kPortable) return KernelLevel::kPortable;
  if (forced == ForcedKernels::kNone && wide) return KernelLevel::kWide;
  return avx2 ? KernelLevel::kAvx2 : KernelLevel::kPortable;
}

}  // namespace qwen_cpu
