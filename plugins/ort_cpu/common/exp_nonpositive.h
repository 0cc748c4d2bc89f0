// exp(x) for x <= 0 (a softmax score minus its running max, a sum of log decays): vectorisable, where
// std::exp is a call per element (given -fno-trapping-math, as the library builds: qwen_export/cpu_kernels.py).
#pragma once

#include <cstdint>

namespace qwen_cpu {
namespace {  // internal linkage: each file compiles its own copy with its own instruction set

// 0 below -87 (float underflow). Rounds by the 1.5*2^23 trick, ln2 in two parts, a degree-6 polynomial
// (relative error ~2e-7), 2^n through the exponent bits.
inline float exp_nonpositive(float x) {
  const float clamped = x < -87.f ? -87.f : x;
  const float t = clamped * 1.44269504088896341f + 12582912.f;
  const float n = t - 12582912.f;
  float r = clamped - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  const float scale = __builtin_bit_cast(float, bits);
  return x < -87.f ? 0.f : p * scale;
}

}  // namespace
}  // namespace qwen_cpu
