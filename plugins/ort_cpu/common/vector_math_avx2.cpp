// AVX2 silu: exp512's steps (vector_math_avx512.cpp) eight lanes at a time: range reduction
// (x = n ln2 + r, |r| <= ln2/2), the degree-7 Taylor polynomial, then 2^n through the exponent bits, which
// needs n in [-126, 127]: x is clamped to [-87.3, 88.3]. For silu that changes nothing that shows: below
// -87.3, exp(-g) is far under what 1 + exp(-g) can hold; above 88.3 (g < -88.3) silu is ~1e-36 either way.
// Compiled with -mavx2 -mfma; run only where the CPU has them.
#include <immintrin.h>

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

inline __m256 exp256(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3f)), _mm256_set1_ps(-87.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 split in two for exactness
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

inline __m256 silu256(__m256 g) {
  const __m256 one = _mm256_set1_ps(1.f);
  return _mm256_div_ps(g, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), g))));
}

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
