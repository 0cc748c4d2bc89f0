// The projections' dense GEMM (common/matmul_triton.py) for the fused ops' launchers.
#pragma once

#include <cstdint>

#include "common/qwen_launch.h"

namespace qwen {
namespace launch {

// y[M, N] = x[M, K] @ w[K, N]: row-major operands with their own row strides (in elements, last axes
// contiguous), fp32 accumulation; x and w in the activation type `dtype`, y in it too, or fp32 with
// `fp32Out`. The decode tile class runs M <= 16, the prefill class the rest.
struct Matmul {
  const void* x;
  const void* w;
  void* y;
  int64_t M, N, K;
  int64_t strideX, strideW, strideY;
};

int matmul(const Matmul& m, int32_t dtype, bool fp32Out, cudaStream_t stream);

}  // namespace launch
}  // namespace qwen
