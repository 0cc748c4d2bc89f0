#include "int4_linear/int4_gemm.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "common/forced_kernels.h"

namespace qwen_cpu {

namespace detail {

void quantize_portable(const float* x, int64_t rows, int64_t k, int64_t block, int8_t* q, float* scale,
                       int32_t* zero_fix) {
  const int64_t blocks = k / block;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* src = x + r * k + b * block;
      int8_t* dst = q + r * k + b * block;
      float amax = 0.f;
      for (int64_t i = 0; i < block; ++i) amax = std::max(amax, std::fabs(src[i]));
      const float s = amax / 127.f;
      const float inverse = amax > 0.f ? 127.f / amax : 0.f;
      int32_t sum = 0;
      for (int64_t i = 0; i < block; ++i) {
        // nearbyint rounds to nearest even under the default rounding mode, as the vector path does
        const int32_t v = static_cast<int32_t>(std::nearbyint(src[i] * inverse));
        dst[i] = static_cast<int8_t>(std::clamp(v, -127, 127));
        sum += dst[i];
      }
      scale[r * blocks + b] = s;
      zero_fix[r * blocks + b] = -8 * sum;
    }
  }
}

}  // namespace detail

float half_to_float(Half h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu, bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);  // inf, nan
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;  // zero
  } else {  // subnormal: normalise
    exponent = 113;
    while (!(mantissa & 0x400u)) {
      mantissa <<= 1;
      --exponent;
    }
    bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

void quantize_rows_parallel(const float* x, int64_t rows, int64_t k, int64_t block, int8_t* q, float* scale,
                            int32_t* zero_fix, const ParallelFor& parallel_for) {
  constexpr int64_t kRowsPerTask = 16;
  const int64_t blocks = k / block;
  for_work(parallel_for, rows * k)((rows + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task) {
    const int64_t r0 = task * kRowsPerTask, count = std::min(kRowsPerTask, rows - r0);
    quantize_rows(x + r0 * k, count, k, block, q + r0 * k, scale + r0 * blocks, zero_fix + r0 * blocks);
  });
}

namespace detail {

void tile_portable(const QuantizedRows& x, int rows, int64_t k, int64_t block, const uint8_t* packed,
                   const Half* scales, float* y, int64_t ldy, int lanes) {
  const int64_t blocks = k / block;
  const int64_t pairs = block / 8;
  for (int m = 0; m < rows; ++m) {
    float acc[kGroupRows] = {};
    const int8_t* xq = x.q + m * k;
    for (int64_t b = 0; b < blocks; ++b) {
      int32_t dot[kGroupRows];
      std::fill(dot, dot + kGroupRows, x.zero_fix[m * blocks + b]);
      const uint8_t* w = packed + b * pairs * 64;
      for (int64_t p = 0; p < pairs; ++p, w += 64) {
        const int8_t* a = xq + b * block + 8 * p;
        for (int j = 0; j < 64; ++j) {
          dot[j / 4] += (w[j] & 0x0F) * a[j % 4] + (w[j] >> 4) * a[4 + j % 4];
        }
      }
      const float sx = x.scale[m * blocks + b];
      for (int lane = 0; lane < kGroupRows; ++lane) {
        const float sw = half_to_float(scales[b * kGroupRows + lane]);
        acc[lane] = std::fma(static_cast<float>(dot[lane]), sw * sx, acc[lane]);
      }
    }
    std::memcpy(y + m * ldy, acc, sizeof(float) * lanes);
  }
}

}  // namespace detail

namespace {

detail::TileFn choose_tile() {
#ifdef QWEN_CPU_PORTABLE_ONLY  // built without the x86 tiles (another architecture)
  return detail::tile_portable;
#else
  switch (kernel_level(detail::cpu_has_avx512_vnni(), detail::cpu_has_avx2())) {
    case KernelLevel::kWide: return detail::tile_avx512_vnni;
    case KernelLevel::kAvx2: return detail::tile_avx2;
    default: return detail::tile_portable;
  }
#endif
}

detail::TileFn tile_fn() {
  static const detail::TileFn fn = choose_tile();
  return fn;
}

detail::QuantizeFn quantize_fn() {
#ifdef QWEN_CPU_PORTABLE_ONLY
  return detail::quantize_portable;
#else
  static const detail::QuantizeFn fn = tile_fn() == detail::tile_avx512_vnni ? detail::quantize_avx512
                                       : tile_fn() == detail::tile_avx2      ? detail::quantize_avx2
                                                                             : detail::quantize_portable;
  return fn;
#endif
}

}  // namespace

void quantize_rows(const float* x, int64_t rows, int64_t k, int64_t block, int8_t* q, float* scale,
                   int32_t* zero_fix) {
  quantize_fn()(x, rows, k, block, q, scale, zero_fix);
}

const char* int4_gemm_backend() {
#ifdef QWEN_CPU_PORTABLE_ONLY
  return "portable";
#else
  const detail::TileFn fn = tile_fn();
  return fn == detail::tile_avx512_vnni ? "avx512-vnni" : fn == detail::tile_avx2 ? "avx2" : "portable";
#endif
}

void int4_gemm(const QuantizedRows& x, int64_t rows, int64_t k, int64_t block, const uint8_t* packed,
               const Half* scales, int64_t n, int64_t group_begin, int64_t group_end, float* y,
               int64_t ldy) {
  const detail::TileFn tile = tile_fn();
  const int64_t blocks = k / block;
  const int64_t group_bytes = packed_group_bytes(k);
  const int64_t group_scale_count = group_scales(k, block);
  for (int64_t g = group_begin; g < group_end; ++g) {
    const int lanes = static_cast<int>(std::min<int64_t>(kGroupRows, n - g * kGroupRows));
    const uint8_t* w = packed + g * group_bytes;
    const Half* s = scales + g * group_scale_count;
    // the group's weights (K*8 bytes) stay in L1/L2 while every tile of rows reads them
    for (int64_t m = 0; m < rows; m += kTileRows) {
      QuantizedRows tile_rows{x.q + m * k, x.scale + m * blocks, x.zero_fix + m * blocks};
      const int count = static_cast<int>(std::min<int64_t>(kTileRows, rows - m));
      tile(tile_rows, count, k, block, w, s, y + m * ldy + g * kGroupRows, ldy, lanes);
    }
  }
}

void int4_gemm_parallel(const QuantizedRows& x, int64_t rows, int64_t k, int64_t block, const uint8_t* packed,
                        const Half* scales, int64_t n, float* y, int64_t ldy, const ParallelFor& parallel_for) {
  constexpr int64_t kRowBlock = 256, kTasks = 32;
  const int64_t groups = (n + kGroupRows - 1) / kGroupRows, blocks = k / block;
  const int64_t row_blocks = (rows + kRowBlock - 1) / kRowBlock;
  const int64_t row_step = (rows + row_blocks - 1) / row_blocks;  // even blocks
  const int64_t splits = std::min(groups, std::max<int64_t>(1, kTasks / row_blocks));
  const int64_t per_split = (groups + splits - 1) / splits;
  const int64_t group_splits = (groups + per_split - 1) / per_split;
  for_work(parallel_for, rows * n * k)(row_blocks * group_splits, [&](int64_t task) {
    const int64_t m0 = (task / group_splits) * row_step, m1 = std::min(rows, m0 + row_step);
    const int64_t g0 = (task % group_splits) * per_split, g1 = std::min(groups, g0 + per_split);
    const QuantizedRows part{x.q + m0 * k, x.scale + m0 * blocks, x.zero_fix + m0 * blocks};
    int4_gemm(part, m1 - m0, k, block, packed, scales, n, g0, g1, y + m0 * ldy, ldy);
  });
}

}  // namespace qwen_cpu
