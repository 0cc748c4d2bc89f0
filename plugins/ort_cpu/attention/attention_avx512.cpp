// The attention inner loops for AVX-512 (built with -mavx512f -fopenmp-simd; run only where CPUID says so).
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "attention/attention.h"
#include "common/exp_nonpositive.h"
#include "common/prefetch.h"

namespace qwen_cpu::detail {
namespace avx512 {
#include "attention/attention_loops.h"
}  // namespace avx512

const AttentionLoops kLoopsAvx512 = avx512::kLoops;

bool attention_cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") != 0;
}

}  // namespace qwen_cpu::detail
