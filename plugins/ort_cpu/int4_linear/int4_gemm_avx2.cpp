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

// ROWS activation rows against all 16 lanes of a group in one pass: each row's broadcasts feed both 32-byte
// halves of a 64-byte pair (a tile that took one half at a time broadcast every activation twice and ran
// at 3/4 the speed: README.md). One row (decode) streams its weights from DRAM: prefetching kPrefetchBytes
// ahead keeps that stream going (the hardware prefetcher alone fed it at 3/4 the rate); more rows read each
// group from cache, once per tile.
constexpr int64_t kPrefetchBytes = 2048;
// Pairs whose int16 sums may add up before widening: a pair adds at most 2 * 2 * 15 * 127 = 7620 to a lane,
// and 4 stay below 32767. The default block of 32 is 4 pairs.
constexpr int64_t kPairsInInt16 = 4;

// The products of the pair at w with ROWS rows (a: row 0's 8 activations of this pair; rows k apart), each
// lane's low and high nibble products summed in int16, handed to add(m, half, products) as they come.
template <int ROWS, typename Add>
inline __attribute__((always_inline)) void pair_products(const uint8_t* w, const int8_t* a, int64_t k, Add add) {
  if constexpr (ROWS == 1) prefetch_ahead(w, 64, kPrefetchBytes);
  const __m256i low_nibbles = _mm256_set1_epi8(0x0F);
  const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32));
  const __m256i lo0 = _mm256_and_si256(w0, low_nibbles);
  const __m256i hi0 = _mm256_and_si256(_mm256_srli_epi16(w0, 4), low_nibbles);
  const __m256i lo1 = _mm256_and_si256(w1, low_nibbles);
  const __m256i hi1 = _mm256_and_si256(_mm256_srli_epi16(w1, 4), low_nibbles);
  for (int m = 0; m < ROWS; ++m) {
    const __m256i a_lo = broadcast4(a + m * k), a_hi = broadcast4(a + m * k + 4);
    add(m, 0, _mm256_add_epi16(_mm256_maddubs_epi16(lo0, a_lo), _mm256_maddubs_epi16(hi0, a_hi)));
    add(m, 1, _mm256_add_epi16(_mm256_maddubs_epi16(lo1, a_lo), _mm256_maddubs_epi16(hi1, a_hi)));
  }
}

// SHORT_BLOCKS (blocks of at most kPairsInInt16 pairs, the default): a block's products sum in int16 and
// widen once. Longer blocks widen every pair: a chunked widening inside the same loop made the compiler
// spill the int16 sums (0.7x), so each kind is its own instantiation. Either way, the same integer sums as
// the VNNI tile, then the same fma per block.
template <int ROWS, bool SHORT_BLOCKS>
void tile(const QuantizedRows& x, int64_t k, int64_t block, const uint8_t* packed, const Half* scales, float* y,
          int64_t ldy, int lanes) {
  const int64_t blocks = k / block;
  const int64_t pairs = block / 8;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[ROWS][2];
  for (int m = 0; m < ROWS; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  const uint8_t* w = packed;
  for (int64_t b = 0; b < blocks; ++b) {
    const int8_t* xb = x.q + b * block;
    __m256i dot[ROWS][2];
    if constexpr (SHORT_BLOCKS) {
      __m256i sum[ROWS][2];
      for (int m = 0; m < ROWS; ++m) sum[m][0] = sum[m][1] = _mm256_setzero_si256();
#pragma GCC unroll 4
      for (int64_t p = 0; p < pairs; ++p, w += 64)
        pair_products<ROWS>(w, xb + 8 * p, k, [&](int m, int half, __m256i products) {
          sum[m][half] = _mm256_add_epi16(sum[m][half], products);
        });
      for (int m = 0; m < ROWS; ++m) {
        const __m256i zero_fix = _mm256_set1_epi32(x.zero_fix[m * blocks + b]);
        for (int half = 0; half < 2; ++half)
          dot[m][half] = _mm256_add_epi32(zero_fix, _mm256_madd_epi16(sum[m][half], ones));
      }
    } else {
      for (int m = 0; m < ROWS; ++m) dot[m][0] = dot[m][1] = _mm256_set1_epi32(x.zero_fix[m * blocks + b]);
      for (int64_t p = 0; p < pairs; ++p, w += 64)
        pair_products<ROWS>(w, xb + 8 * p, k, [&](int m, int half, __m256i products) {
          dot[m][half] = _mm256_add_epi32(dot[m][half], _mm256_madd_epi16(products, ones));
        });
    }
    const __m128i* s = reinterpret_cast<const __m128i*>(scales + b * kGroupRows);
    const __m256 sw[2] = {_mm256_cvtph_ps(_mm_loadu_si128(s)), _mm256_cvtph_ps(_mm_loadu_si128(s + 1))};
    for (int m = 0; m < ROWS; ++m) {
      const __m256 sx = _mm256_set1_ps(x.scale[m * blocks + b]);
      for (int half = 0; half < 2; ++half)
        acc[m][half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[m][half]), _mm256_mul_ps(sw[half], sx), acc[m][half]);
    }
  }
  for (int m = 0; m < ROWS; ++m) {
    if (lanes == kGroupRows) {  // every group but a last, padded one: no call to memcpy (1% of a verify step)
      _mm256_storeu_ps(y + m * ldy, acc[m][0]);
      _mm256_storeu_ps(y + m * ldy + 8, acc[m][1]);
      continue;
    }
    float out[kGroupRows];
    _mm256_storeu_ps(out, acc[m][0]);
    _mm256_storeu_ps(out + 8, acc[m][1]);
    std::memcpy(y + m * ldy, out, sizeof(float) * lanes);
  }
}

using RowsTile = void (*)(const QuantizedRows& x, int64_t k, int64_t block, const uint8_t* packed,
                          const Half* scales, float* y, int64_t ldy, int lanes);
template <bool SHORT_BLOCKS>
constexpr RowsTile kTiles[4] = {tile<1, SHORT_BLOCKS>, tile<2, SHORT_BLOCKS>, tile<3, SHORT_BLOCKS>,
                                tile<4, SHORT_BLOCKS>};

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
  // 4 rows at a time: their sums outgrow AVX2's 16 registers, but 3, 5 or 6 rows measured slower (README.md)
  const RowsTile* tiles = block / 8 <= kPairsInInt16 ? kTiles<true> : kTiles<false>;
  QuantizedRows part = x;
  while (rows > 0) {
    const int now = rows < 4 ? rows : 4;
    tiles[now - 1](part, k, block, packed, scales, y, ldy, lanes);
    const int64_t blocks = k / block;
    part = QuantizedRows{part.q + now * k, part.scale + now * blocks, part.zero_fix + now * blocks};
    y += now * ldy;
    rows -= now;
  }
}

}  // namespace qwen_cpu::detail
