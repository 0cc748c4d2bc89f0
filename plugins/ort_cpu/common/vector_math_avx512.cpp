// AVX-512 silu: the vector exp (common/exp_lanes.h: range reduction, a degree-7 Taylor polynomial, about
// 1 ulp after rounding), scaled by 2^n with vscalefps. Compiled with -mavx512f; run only where the CPU has it.
#include <immintrin.h>

#include "common/exp_lanes.h"
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

struct Avx512 {  // exp_lanes' operations; vscalefps takes n down to -150 (denormal results)
  using V = __m512;
  static constexpr float kLowest = -103.9f, kHighest = 88.7f;
  static V set(float c) { return _mm512_set1_ps(c); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V fnmadd(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  static V round(V x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V scale_pow2(V p, V n) { return _mm512_scalef_ps(p, n); }
};

inline __m512 silu512(__m512 g) { return silu_lanes<Avx512>(g); }

}  // namespace

int64_t silu_avx512(float* x, int64_t n) {
  if (!has_avx512f()) return 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, silu512(_mm512_loadu_ps(x + i)));
  if (i < n) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (n - i)) - 1u);
    _mm512_mask_storeu_ps(x + i, mask, silu512(_mm512_maskz_loadu_ps(mask, x + i)));
  }
  return n;  // the tail too, masked
}

int64_t mul_silu_avx512(const float* a, const float* g, float* y, int64_t n) {
  if (!has_avx512f()) return 0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    _mm512_storeu_ps(y + i, _mm512_mul_ps(_mm512_loadu_ps(a + i), silu512(_mm512_loadu_ps(g + i))));
  }
  if (i < n) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, a + i), silu512(_mm512_maskz_loadu_ps(mask, g + i)));
    _mm512_mask_storeu_ps(y + i, mask, v);
  }
  return n;  // the tail too, masked
}

}  // namespace qwen_cpu::detail
