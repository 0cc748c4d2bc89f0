// The AVX2 tile of int4_gemm, for CPUs without AVX-512 VNNI. This file alone is compiled with -mavx2
// -mfma -mf16c; it runs only where cpu_has_avx2() says so. vpmaddubsw multiplies the 4-bit codes (0..15) by the
// int8 activations and adds pairs into int16 (at most 2 * 15 * 127 per pair, and the low and high nibble
// products of a pair summed stay within 4 * 15 * 127 = 7620: no saturation), vpmaddwd adds those into
// the int32 lanes: the same integer sums as the VNNI tile, then the same fma per block.
#include <immintrin.h>

#include <cstring>

#include "common/prefetch.h"
#include "int4_linear/int4_gemm.h"

namespace qwen_cpu::detail {

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

namespace {

inline __m256i broadcast4(const int8_t* a) {
  int32_t v;
  std::memcpy(&v, a, 4);
  return _mm256_set1_epi32(v);
}

// Eight of the group's 16 lanes (half 0: lanes 0-7, the first 32 bytes of each 64-byte pair; half 1: the
// rest) against ROWS activation rows.
template <int ROWS>
void half_tile(const QuantizedRows& x, int64_t k, int64_t block, const uint8_t* packed, const Half* scales,
               float* y, int64_t ldy, int lanes, int half) {
  const int64_t blocks = k / block;
  const int64_t pairs = block / 8;
  const __m256i low_nibbles = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[ROWS];
  for (int m = 0; m < ROWS; ++m) acc[m] = _mm256_setzero_ps();
  const uint8_t* w = packed + 32 * half;
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i dot[ROWS];
    for (int m = 0; m < ROWS; ++m) dot[m] = _mm256_set1_epi32(x.zero_fix[m * blocks + b]);
    const int8_t* xb = x.q + b * block;
    for (int64_t p = 0; p < pairs; ++p, w += 64) {
      const __m256i both = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
      const __m256i lo = _mm256_and_si256(both, low_nibbles);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(both, 4), low_nibbles);
      for (int m = 0; m < ROWS; ++m) {
        const int8_t* a = xb + m * k + 8 * p;
        const __m256i pairs16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, broadcast4(a)),
                                                 _mm256_maddubs_epi16(hi, broadcast4(a + 4)));
        dot[m] = _mm256_add_epi32(dot[m], _mm256_madd_epi16(pairs16, ones));
      }
    }
    const __m256 sw =
        _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + b * kGroupRows + 8 * half)));
    for (int m = 0; m < ROWS; ++m) {
      const __m256 s = _mm256_mul_ps(sw, _mm256_set1_ps(x.scale[m * blocks + b]));
      acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[m]), s, acc[m]);
    }
  }
  const int valid = lanes - 8 * half;  // lanes of this half that are real rows
  if (valid <= 0) return;
  for (int m = 0; m < ROWS; ++m) {
    float out[8];
    _mm256_storeu_ps(out, acc[m]);
    std::memcpy(y + m * ldy + 8 * half, out, sizeof(float) * (valid < 8 ? valid : 8));
  }
}

// One activation row (decode) against all 16 lanes in one pass: both 32-byte halves of a 64-byte pair share
// the row's broadcasts, and 4 pairs sum in int16 before widening (each pair adds at most 2 * 2 * 15 * 127 =
// 7620, so 4 stay below 32767: the same integer sums). Prefetching kPrefetchBytes ahead keeps the stream
// from DRAM going (the hardware prefetcher alone fed it at 3/4 the rate; measured in README.md). More
// rows keep the two-pass tile: their sums need the registers.
constexpr int64_t kPrefetchBytes = 2048;

void row_tile(const QuantizedRows& x, int64_t k, int64_t block, const uint8_t* packed, const Half* scales,
              float* y, int lanes) {
  const int64_t blocks = k / block;
  const int64_t pairs = block / 8;  // a multiple of 4: block is a multiple of 32
  const __m256i low_nibbles = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  const uint8_t* w = packed;
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i dot0 = _mm256_set1_epi32(x.zero_fix[b]), dot1 = dot0;
    const int8_t* xb = x.q + b * block;
    for (int64_t p0 = 0; p0 < pairs; p0 += 4) {
      prefetch_ahead(w, 4 * 64, kPrefetchBytes);  // the 4 pairs' lines, kPrefetchBytes on
      __m256i sum0 = _mm256_setzero_si256(), sum1 = _mm256_setzero_si256();
      for (int64_t p = p0; p < p0 + 4; ++p, w += 64) {
        const __m256i a_lo = broadcast4(xb + 8 * p), a_hi = broadcast4(xb + 8 * p + 4);
        const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
        const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32));
        sum0 = _mm256_add_epi16(
            sum0, _mm256_add_epi16(
                      _mm256_maddubs_epi16(_mm256_and_si256(w0, low_nibbles), a_lo),
                      _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w0, 4), low_nibbles), a_hi)));
        sum1 = _mm256_add_epi16(
            sum1, _mm256_add_epi16(
                      _mm256_maddubs_epi16(_mm256_and_si256(w1, low_nibbles), a_lo),
                      _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w1, 4), low_nibbles), a_hi)));
      }
      dot0 = _mm256_add_epi32(dot0, _mm256_madd_epi16(sum0, ones));
      dot1 = _mm256_add_epi32(dot1, _mm256_madd_epi16(sum1, ones));
    }
    const __m256 sx = _mm256_set1_ps(x.scale[b]);
    const __m128i* s = reinterpret_cast<const __m128i*>(scales + b * kGroupRows);
    acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot0), _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(s)), sx), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot1), _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(s + 1)), sx), acc1);
  }
  float out[kGroupRows];
  _mm256_storeu_ps(out, acc0);
  _mm256_storeu_ps(out + 8, acc1);
  std::memcpy(y, out, sizeof(float) * lanes);
}

template <int ROWS>
void tile(const QuantizedRows& x, int64_t k, int64_t block, const uint8_t* packed, const Half* scales,
          float* y, int64_t ldy, int lanes) {
  for (int half = 0; half < 2; ++half) half_tile<ROWS>(x, k, block, packed, scales, y, ldy, lanes, half);
}

}  // namespace

// quantize_rows with 8 floats per step, the same bits as the portable loop (see quantize_avx512).
void quantize_avx2(const float* x, int64_t rows, int64_t k, int64_t block, int8_t* q, float* scale,
                   int32_t* zero_fix) {
  const int64_t blocks = k / block;
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < blocks; ++b) {
      const float* src = x + r * k + b * block;
      int8_t* dst = q + r * k + b * block;
      __m256 amax8 = _mm256_setzero_ps();
      for (int64_t i = 0; i < block; i += 8) amax8 = _mm256_max_ps(amax8, _mm256_andnot_ps(sign, _mm256_loadu_ps(src + i)));
      float lanes[8];
      _mm256_storeu_ps(lanes, amax8);
      float amax = 0.f;
      for (float v : lanes) amax = amax > v ? amax : v;
      const float inverse = amax > 0.f ? 127.f / amax : 0.f;
      const __m256 inv = _mm256_set1_ps(inverse);
      __m256i sum = _mm256_setzero_si256();
      for (int64_t i = 0; i < block; i += 8) {
        __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(src + i), inv));
        v = _mm256_min_epi32(_mm256_max_epi32(v, lo), hi);
        sum = _mm256_add_epi32(sum, v);
        const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + i), _mm_packs_epi16(words, words));
      }
      int32_t parts[8];
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(parts), sum);
      int32_t total = 0;
      for (int32_t v : parts) total += v;
      scale[r * blocks + b] = amax / 127.f;
      zero_fix[r * blocks + b] = -8 * total;
    }
  }
}

void tile_avx2(const QuantizedRows& x, int rows, int64_t k, int64_t block, const uint8_t* packed,
               const Half* scales, float* y, int64_t ldy, int lanes) {
  // 16 ymm registers: at most 4 rows at a time (4 int32 sums, 4 float accumulators, temporaries)
  QuantizedRows part = x;
  while (rows > 0) {
    const int now = rows < 4 ? rows : 4;
    switch (now) {
      case 1: row_tile(part, k, block, packed, scales, y, lanes); break;
      case 2: tile<2>(part, k, block, packed, scales, y, ldy, lanes); break;
      case 3: tile<3>(part, k, block, packed, scales, y, ldy, lanes); break;
      default: tile<4>(part, k, block, packed, scales, y, ldy, lanes); break;
    }
    const int64_t blocks = k / block;
    part = QuantizedRows{part.q + now * k, part.scale + now * blocks, part.zero_fix + now * blocks};
    y += now * ldy;
    rows -= now;
  }
}

}  // namespace qwen_cpu::detail
