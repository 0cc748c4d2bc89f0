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
// Each returns the elements it did from the start: 0 where the CPU lacks its instructions (or
// QWEN_CPU_KERNELS narrows them away); AVX-512 all n, AVX2 a multiple of 8 (the caller does the rest).
int64_t silu_avx512(float* x, int64_t n);
int64_t mul_silu_avx512(const float* a, const float* g, float* y, int64_t n);
int64_t silu_avx2(float* x, int64_t n);
int64_t mul_silu_avx2(const float* a, const float* g, float* y, int64_t n);
}  // namespace detail

}  // namespace qwen_cpu
