// Block-int4 weights times int8-quantized activations on the CPU: the header-free core of the
// qwen.cpu Int4Linear and Int4MoE ONNX Runtime kernels (no ONNX Runtime types here).
//
// Packed weight layout, for W [N, K] (y = x W^T) with blocks of B along K (B a multiple of 32):
//   rows are taken 16 at a time ("group", the last one zero-padded);
//   packed [G = ceil(N/16)][K/B][B/8][64] uint8: for byte j of pair p in block b of group g,
//     lane = j / 4, kk = j % 4, n = 16 g + lane,
//     low nibble  = q[n, b*B + 8p + kk]       high nibble = q[n, b*B + 8p + 4 + kk]
//   scales [G][K/B][16] float16 (lane order, zero for padded rows).
// q is the unsigned code (0..15) of MatMulNBits' symmetric grid: w' = (q - 8) * scale.
// Four consecutive k of one row share a 32-bit lane, which is what one VNNI dot product sums.
#pragma once

#include <cstdint>

#include "common/parallel.h"

namespace qwen_cpu {

using Half = uint16_t;  // IEEE float16 bits (the scales); every tile converts them exactly to float

constexpr int kGroupRows = 16;  // output rows per packed group (one 512-bit lane each)
constexpr int kTileRows = 8;    // activation rows computed together against one weight group

// Activations quantized to int8 per block of B along K: x ~= q * scale.
struct QuantizedRows {
  const int8_t* q = nullptr;         // [M, K]
  const float* scale = nullptr;      // [M, K/B]
  const int32_t* zero_fix = nullptr; // [M, K/B]: -8 * sum of q over the block (folds the weights' zero point)
};

// Symmetric per-block quantization: scale = max|x| / 127, q = round-to-nearest-even(x * (127 / max|x|)).
// Vectorised like the tiles (AVX-512, AVX2, portable, picked with them); all give the same bits.
void quantize_rows(const float* x, int64_t rows, int64_t k, int64_t block, int8_t* q, float* scale,
                   int32_t* zero_fix);

// The same, in tasks of 16 rows on `parallel_for` (prefill quantizes thousands of rows).
void quantize_rows_parallel(const float* x, int64_t rows, int64_t k, int64_t block, int8_t* q, float* scale,
                            int32_t* zero_fix, const ParallelFor& parallel_for);

// y[m, n] = sum_b scale_w[n, b] * scale_x[m, b] * sum_{k in b} (q_w[n, k] - 8) * q_x[m, k]
// for rows m < rows and n in groups [group_begin, group_end) (n < N); y has row stride ldy.
void int4_gemm(const QuantizedRows& x, int64_t rows, int64_t k, int64_t block, const uint8_t* packed,
               const Half* scales, int64_t n, int64_t group_begin, int64_t group_end, float* y,
               int64_t ldy);

// int4_gemm over all rows and groups in tasks on `parallel_for`: blocks of up to 256 rows (their int8 rows,
// K bytes each, stay in L2 while the task's weight groups stream past them) times ranges of groups, about
// 32 tasks in all. Each output is the same tile's over the whole K, so the split does not change a bit.
void int4_gemm_parallel(const QuantizedRows& x, int64_t rows, int64_t k, int64_t block, const uint8_t* packed,
                        const Half* scales, int64_t n, float* y, int64_t ldy, const ParallelFor& parallel_for);

// float16 -> float, exactly (the portable tile's conversion; the vector tiles use vcvtph2ps).
float half_to_float(Half h);

// Bytes of one packed group (K/B blocks of B/8 pairs of 64 bytes) and of its scales.
inline int64_t packed_group_bytes(int64_t k) { return k * 8; }
inline int64_t group_scales(int64_t k, int64_t block) { return (k / block) * kGroupRows; }

// Which tile int4_gemm runs: "avx512-vnni", else "avx2", else "portable" (by CPUID; QWEN_CPU_KERNELS=avx2
// or =portable forces a slower one, for tests). All three give the same results bit for bit.
const char* int4_gemm_backend();

namespace detail {
using TileFn = void (*)(const QuantizedRows& x, int rows, int64_t k, int64_t block, const uint8_t* packed,
                        const Half* scales, float* y, int64_t ldy, int lanes);
void tile_portable(const QuantizedRows& x, int rows, int64_t k, int64_t block, const uint8_t* packed,
                   const Half* scales, float* y, int64_t ldy, int lanes);
void tile_avx512_vnni(const QuantizedRows& x, int rows, int64_t k, int64_t block, const uint8_t* packed,
                      const Half* scales, float* y, int64_t ldy, int lanes);
void tile_avx2(const QuantizedRows& x, int rows, int64_t k, int64_t block, const uint8_t* packed,
               const Half* scales, float* y, int64_t ldy, int lanes);
using QuantizeFn = void (*)(const float* x, int64_t rows, int64_t k, int64_t block, int8_t* q, float* scale,
                           int32_t* zero_fix);
void quantize_portable(const float* x, int64_t rows, int64_t k, int64_t block, int8_t* q, float* scale,
                       int32_t* zero_fix);
void quantize_avx512(const float* x, int64_t rows, int64_t k, int64_t block, int8_t* q, float* scale,
                     int32_t* zero_fix);
void quantize_avx2(const float* x, int64_t rows, int64_t k, int64_t block, int8_t* q, float* scale,
                   int32_t* zero_fix);
bool cpu_has_avx512_vnni();
bool cpu_has_avx2();
}  // namespace detail

}  // namespace qwen_cpu
