// The attention inner loops for AVX2 + FMA + F16C (built with those flags and -fopenmp-simd).
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "attention/attention.h"
#include "common/exp_nonpositive.h"
#include "common/prefetch.h"

namespace qwen_cpu::detail {
namespace avx2 {
#include "attention/attention_loops.h"
}  // namespace avx2

const AttentionLoops kLoopsAvx2 = avx2::kLoops;

bool attention_cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") != 0 && __builtin_cpu_supports("fma") != 0 &&
         __builtin_cpu_supports("f16c") != 0;
}

}  // namespace qwen_cpu::detail
