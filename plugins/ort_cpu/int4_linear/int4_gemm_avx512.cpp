// The AVX-512 VNNI tile of int4_gemm. This file alone is compiled with -mavx512f -mavx512bw -mavx512vnni;
// it runs only where cpu_has_avx512_vnni() says so.
#include <immintrin.h>

#include <cstring>

#include "int4_linear/int4_gemm.h"

namespace qwen_cpu::detail {

bool cpu_has_avx512_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vnni");
}

namespace {

constexpr int64_t kPrefetchBytes = 4096;

inline __m512i broadcast4(const int8_t* a) {
  int32_t v;
  std::memcpy(&v, a, 4);
  return _mm512_set1_epi32(v);
}

// One group of 16 weight rows against ROWS activation rows. Per block: int32 dot products in 16 lanes
// (one per weight row; vpdpbusd sums 4 k per lane), started at the zero-point fix, then scaled into
// float accumulators: acc = fma(dot, scale_w * scale_x, acc) (the portable tile does the same fma).
// With few rows the dot products are a chain of dependent vpdpbusd; CHAINS > 1 keeps the low- and
// high-nibble products in separate registers so two chains run at once (exact: integer sums).
template <int ROWS, int CHAINS>
void tile(const QuantizedRows& x, int64_t k, int64_t block, const uint8_t* packed, const Half* scales,
          float* y, int64_t ldy, int lanes) {
  const int64_t blocks = k / block;
  const int64_t pairs = block / 8;
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F);
  __m512 acc[ROWS];
  for (int m = 0; m < ROWS; ++m) acc[m] = _mm512_setzero_ps();
  const uint8_t* w = packed;
  for (int64_t b = 0; b < blocks; ++b) {
    __m512i dot[CHAINS][ROWS];
    for (int m = 0; m < ROWS; ++m) {
      dot[0][m] = _mm512_set1_epi32(x.zero_fix[m * blocks + b]);
      if (CHAINS > 1) dot[CHAINS - 1][m] = _mm512_setzero_si512();
    }
    const int8_t* xb = x.q + b * block;
    for (int64_t p = 0; p < pairs; ++p, w += 64) {
      // two groups ahead: the stream crosses into the next group (groups are contiguous)
      _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetchBytes, _MM_HINT_T0);
      const __m512i both = _mm512_loadu_si512(w);
      const __m512i lo = _mm512_and_si512(both, low_nibbles);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(both, 4), low_nibbles);
      for (int m = 0; m < ROWS; ++m) {
        const int8_t* a = xb + m * k + 8 * p;
        dot[0][m] = _mm512_dpbusd_epi32(dot[0][m], lo, broadcast4(a));
        dot[CHAINS - 1][m] = _mm512_dpbusd_epi32(dot[CHAINS - 1][m], hi, broadcast4(a + 4));
      }
    }
    const __m512 sw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + b * kGroupRows)));
    for (int m = 0; m < ROWS; ++m) {
      const __m512i sum = CHAINS > 1 ? _mm512_add_epi32(dot[0][m], dot[CHAINS - 1][m]) : dot[0][m];
      const __m512 s = _mm512_mul_ps(sw, _mm512_set1_ps(x.scale[m * blocks + b]));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), s, acc[m]);
    }
  }
  const __mmask16 mask = static_cast<__mmask16>((1u << lanes) - 1u);
  for (int m = 0; m < ROWS; ++m) _mm512_mask_storeu_ps(y + m * ldy, mask, acc[m]);
}

}  // namespace

// quantize_rows with 16 floats per step: the same max, the same products x * (127 / amax), vcvtps2dq rounds
// to nearest even as nearbyint does, the same clamp and sums, so the same bits as the portable loop.
void quantize_avx512(const float* x, int64_t rows, int64_t k, int64_t block, int8_t* q, float* scale,
                     int32_t* zero_fix) {
  const int64_t blocks = k / block;
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* src = x + r * k + b * block;
      int8_t* dst = q + r * k + b * block;
      __m512 amax16 = _mm512_setzero_ps();
      for (int64_t i = 0; i < block; i += 16) amax16 = _mm512_max_ps(amax16, _mm512_abs_ps(_mm512_loadu_ps(src + i)));
      const float amax = _mm512_reduce_max_ps(amax16);
      const float inverse = amax > 0.f ? 127.f / amax : 0.f;
      const __m512 inv = _mm512_set1_ps(inverse);
      __m512i sum = _mm512_setzero_si512();
      for (int64_t i = 0; i < block; i += 16) {
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(src + i), inv));
        v = _mm512_min_epi32(_mm512_max_epi32(v, lo), hi);
        sum = _mm512_add_epi32(sum, v);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm512_cvtepi32_epi8(v));
      }
      scale[r * blocks + b] = amax / 127.f;
      zero_fix[r * blocks + b] = -8 * _mm512_reduce_add_epi32(sum);
    }
  }
}

void tile_avx512_vnni(const QuantizedRows& x, int rows, int64_t k, int64_t block, const uint8_t* packed,
                      const Half* scales, float* y, int64_t ldy, int lanes) {
  switch (rows) {
    case 1: return tile<1, 2>(x, k, block, packed, scales, y, ldy, lanes);
    case 2: return tile<2, 2>(x, k, block, packed, scales, y, ldy, lanes);
    case 3: return tile<3, 2>(x, k, block, packed, scales, y, ldy, lanes);
    case 4: return tile<4, 2>(x, k, block, packed, scales, y, ldy, lanes);
    case 5: return tile<5, 1>(x, k, block, packed, scales, y, ldy, lanes);
    case 6: return tile<6, 1>(x, k, block, packed, scales, y, ldy, lanes);
    case 7: return tile<7, 1>(x, k, block, packed, scales, y, ldy, lanes);
    default: return tile<8, 1>(x, k, block, packed, scales, y, ldy, lanes);
  }
}

}  // namespace qwen_cpu::detail
