// AVX-512 silu: exp by range reduction (x = n ln2 + r, |r| <= ln2/2) and a degree-7 Taylor polynomial
// (relative error < 2e-8 before rounding, about 1 ulp after), scaled by 2^n with vscalefps.
// Compiled with -mavx512f; run only where the CPU has it.
#include <immintrin.h>

#include "common/forced_kernels.h"
#include "common/vector_math.h"

namespace qwen_cpu::detail {

namespace {

bool has_avx512f() {  // and not narrowed by QWEN_CPU_KERNELS=avx2|portable
  static const bool has = [] {
    __builtin_cpu_init();
    return kernel_level(__builtin_cpu_supports("avx512f"), false) == KernelLevel::kWide;
  }();
  return has;
}

inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.7f)), _mm512_set1_ps(-103.9f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 split in two for exactness
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

inline __m512 silu512(__m512 g) {
  const __m512 one = _mm512_set1_ps(1.f);
  return _mm512_div_ps(g, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}

}  // namespace

bool silu_avx512(float* x, int64_t n) {
  if (!has_avx512f()) return false;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, silu512(_mm512_loadu_ps(x + i)));
  if (i < n) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (n - i)) - 1u);
    _mm512_mask_storeu_ps(x + i, mask, silu512(_mm512_maskz_loadu_ps(mask, x + i)));
  }
  return true;
}

bool mul_silu_avx512(const float* a, const float* g, float* y, int64_t n) {
  if (!has_avx512f()) return false;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_loadu_ps(a + i), silu512(_mm512_loadu_ps(g + i))));
  }
  if (i < n) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, a + i), silu512(_mm512_maskz_loadu_ps(mask, g + i)));
    _mm512_mask_storeu_ps(y + i, mask, v);
  }
  return true;
}

}  // namespace qwen_cpu::detail
