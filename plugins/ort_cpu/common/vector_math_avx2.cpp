// AVX2 silu: the vector exp (common/exp_lanes.h, as the AVX-512 file's) eight lanes at a time, with 2^n
// through the exponent bits, which needs n in [-126, 127]: x is clamped to [-87.3, 88.3]. For silu that
// changes nothing that shows: below -87.3, exp(-g) is far under what 1 + exp(-g) can hold; above 88.3
// (g < -88.3) silu is ~1e-36 either way. Compiled with -mavx2 -mfma; run only where the CPU has them.
#include <immintrin.h>

#include "common/exp_lanes.h"
#include "common/forced_kernels.h"
#include "common/vector_math.h"

namespace qwen_cpu::detail {

namespace {

bool runs_avx2() {  // and not narrowed by QWEN_CPU_KERNELS=portable
  static const bool runs = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return kernel_level(false, avx2) == KernelLevel::kAvx2;
  }();
  return runs;
}

struct Avx2 {  // exp_lanes' operations; 2^n through the exponent bits needs n in [-126, 127]
  using V = __m256;
  static constexpr float kLowest = -87.3f, kHighest = 88.3f;
  static V set(float c) { return _mm256_set1_ps(c); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  static V round(V x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V scale_pow2(V p, V n) {
    return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(
                                _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23)));
  }
};

inline __m256 silu256(__m256 g) { return silu_lanes<Avx2>(g); }

}  // namespace

int64_t silu_avx2(float* x, int64_t n) {
  if (!runs_avx2()) return 0;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, silu256(_mm256_loadu_ps(x + i)));
  return i;
}

int64_t mul_silu_avx2(const float* a, const float* g, float* y, int64_t n) {
  if (!runs_avx2()) return 0;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_loadu_ps(a + i), silu256(_mm256_loadu_ps(g + i))));
  }
  return i;
}

}  // namespace qwen_cpu::detail
