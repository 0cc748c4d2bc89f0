// Elementwise activations over contiguous floats, vectorised where the CPU has AVX-512 or AVX2 + FMA (the
// header-free cores call these instead of per-element std::exp, which dominated the small kernels' time).
#pragma once

#include <cstdint>

namespace qwen_cpu {

// x = x * sigmoid(x) = x / (1 + exp(-x)), in place.
void silu_inplace(float* x, int64_t n);

// y = a * silu(g) elementwise (a and y may be the same array).
void mul_silu(const float* a, const float* g, float* y, int64_t n);

namespace detail {
bool silu_avx512(float* x, int64_t n);                                 // false: not run (no AVX-512)
bool mul_silu_avx512(const float* a, const float* g, float* y, int64_t n);
int64_t silu_avx2(float* x, int64_t n);  // the elements done (a multiple of 8; 0: not run, no AVX2 + FMA)
int64_t mul_silu_avx2(const float* a, const float* g, float* y, int64_t n);
}  // namespace detail

}  // namespace qwen_cpu
