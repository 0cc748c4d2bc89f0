#include "common/vector_math.h"

#include <cmath>

namespace qwen_cpu {

void silu_inplace(float* x, int64_t n) {
  int64_t done = 0;  // the elements a vector loop did, from the start
#ifndef QWEN_CPU_PORTABLE_ONLY
  done = detail::silu_avx512(x, n);
  if (done == 0) done = detail::silu_avx2(x, n);
#endif
  for (int64_t i = done; i < n; ++i) x[i] = x[i] / (1.f + std::exp(-x[i]));
}

void mul_silu(const float* a, const float* g, float* y, int64_t n) {
  int64_t done = 0;
#ifndef QWEN_CPU_PORTABLE_ONLY
  done = detail::mul_silu_avx512(a, g, y, n);
  if (done == 0) done = detail::mul_silu_avx2(a, g, y, n);
#endif
  for (int64_t i = done; i < n; ++i) y[i] = a[i] * (g[i] / (1.f + std::exp(-g[i])));
}

}  // namespace qwen_cpu
