// Not a normal header: included inside a namespace by each ISA's file (no include guard on purpose).
// The attention core's inner loops, written once and compiled per instruction set: attention.cpp
// (portable), attention_avx2.cpp (-mavx2 -mfma -mf16c) and attention_avx512.cpp include this file inside
// their own namespace, with -fopenmp-simd so the `omp simd` loops vectorise to that ISA's width. The
// decode loops (few query rows), the float16 conversions and the streaming copy use intrinsics, under the
// ISA's own macros (AVX-512F or AVX2+FMA+F16C; the portable build runs the `omp simd` loops).
//
// Needs <cstring>, <cstdint>, "common/exp_nonpositive.h", "common/prefetch.h" and, on x86, <immintrin.h>
// included before the namespace.

constexpr int64_t kBlockKeys = 64;  // = kKeyBlock in attention.cpp, the only `ld` the blocked paths take
constexpr int64_t kMaxHeadDim = 512;

#if defined(__AVX512F__) || defined(__AVX2__)
#if defined(__AVX512F__)
using Lanes = __m512;
constexpr int64_t kLanes = 16;
constexpr int kAccRows = 4;  // rows x 4 sums in registers (32 zmm)
// Decode: rows x 8 vectors (a 128-dim row of values) of sums, so each pass over a block reads whole rows of
// values from memory. Passes of 4 rows x 64 dims read half of every 512-byte row each: one 64K-key layer of
// the small preset on 2 threads took 0.83x the time with whole rows (README). 16 zmm of sums.
constexpr int kDecodeRows = 2;
// Decode reads the caches with no software prefetch and sums the values over whole blocks here: the AVX2
// path's prefetch and chunks were measured on an AVX2 machine only (an earlier prefetch slowed this path).
constexpr int64_t kPrefetchBytes = 0, kPrefetchValues = 0;
constexpr int64_t kValueChunkKeys = 0;
inline Lanes lanes_zero() { return _mm512_setzero_ps(); }
inline Lanes lanes_load(const float* x) { return _mm512_loadu_ps(x); }
inline Lanes lanes_load(const Half* x) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
}
inline Lanes lanes_set(float x) { return _mm512_set1_ps(x); }
inline Lanes lanes_fmadd(Lanes a, Lanes b, Lanes c) { return _mm512_fmadd_ps(a, b, c); }
inline void lanes_store(float* y, Lanes x) { _mm512_storeu_ps(y, x); }
inline __m256 to_256(Lanes x) {
  const __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1));  // AVX-512F only
  return _mm256_add_ps(_mm512_castps512_ps256(x), high);
}
#else
using Lanes = __m256;
constexpr int64_t kLanes = 8;
constexpr int kAccRows = 2;  // rows x 4 sums in registers (16 ymm)
constexpr int kDecodeRows = 1;  // 8 ymm of sums (64 head dims; measured the same as 2 rows x 32 dims)
// Decode streams the caches from memory with few loads in flight: one thread read 11-12 GB/s of keys or
// values where a bare read loop gets 20-23. The scores ask for the keys 4 KiB ahead; the values are summed
// over chunks of 32 keys (16 KiB: the G rows' passes after the first read the chunk from L1, where they
// read the 512-key block from L2) and the first pass asks for the values 4 KiB ahead. One 64K-key layer of
// the small preset, 2 threads: 6.6-6.9 -> 5.0-5.3 ms (README; 2-16 KiB ahead, chunks of 16-64 keys and
// prefetching into L2 only measured within the host's noise of this). The second row's pass asks for the
// next chunk, so memory keeps streaming while the rows after the first sum from L1 (README: 0.96-0.98x).
constexpr int64_t kPrefetchBytes = 4096, kPrefetchValues = 4096;
constexpr int64_t kValueChunkKeys = 32;
inline Lanes lanes_zero() { return _mm256_setzero_ps(); }
inline Lanes lanes_load(const float* x) { return _mm256_loadu_ps(x); }
inline Lanes lanes_load(const Half* x) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x))); }
inline Lanes lanes_set(float x) { return _mm256_set1_ps(x); }
inline Lanes lanes_fmadd(Lanes a, Lanes b, Lanes c) { return _mm256_fmadd_ps(a, b, c); }
inline void lanes_store(float* y, Lanes x) { _mm256_storeu_ps(y, x); }
inline __m256 to_256(Lanes x) { return x; }
#endif
template <typename T>
inline Lanes lanes_fma(const float* a, const T* b, Lanes c) { return lanes_fmadd(lanes_load(a), lanes_load(b), c); }

// The four sums of four vectors, as one 128-bit vector (a shuffle tree, not four serial reductions).
inline __m128 sum4(Lanes a, Lanes b, Lanes c, Lanes d) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(to_256(a), to_256(b)), _mm256_hadd_ps(to_256(c), to_256(d)));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// Float16 caches on 8 lanes (AVX2), rows in groups of four and a last pair (G = 4, 6, 8 or 16: Qwen3.5's
// 0.8B-9B, 27B, 35B-A3B and 122B/397B): the decode loops convert each key and value vector once per group,
// where one pass per row converted it once per row (the conversions bound those loops). Before, G = 8 and
// 16 took the path for many rows, which converts each 512-key block into a float copy first (1.85x the time
// at G = 4), and G = 6 one pass per row.
inline bool float16_row_groups(int64_t rows) { return kLanes == 8 && rows >= 4 && rows % 2 == 0 && rows <= 16; }
template <typename T>
inline bool row_groups(int64_t rows) {  // float keys and values keep one pass per row
  return sizeof(T) == sizeof(Half) && float16_row_groups(rows);
}

// R rows by two keys: R = 4, or 2 for the last pair of rows (G = 6). Each (row, key) sums over d in the same
// order, and sum4 reduces a vector the same way wherever it sits: the same bits as one pass per row.
template <int R, typename T>
inline void row_group_two_keys(const float* qg, const T* k0, const T* k1, int64_t hd, float* sg, int64_t ld) {
  static_assert(R == 2 || R == 4);
  Lanes a[R][2];
  for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = lanes_zero();
  for (int64_t d = 0; d < hd; d += kLanes) {
    const Lanes x0 = lanes_load(k0 + d), x1 = lanes_load(k1 + d);
    for (int r = 0; r < R; ++r) {
      const Lanes y = lanes_load(qg + r * hd + d);
      a[r][0] = lanes_fmadd(y, x0, a[r][0]);
      a[r][1] = lanes_fmadd(y, x1, a[r][1]);
    }
  }
  const __m128 s01 = sum4(a[0][0], a[0][1], a[1][0], a[1][1]);
  _mm_storel_pi(reinterpret_cast<__m64*>(sg), s01);  // rows g and g + 1, keys j and j + 1
  _mm_storeh_pi(reinterpret_cast<__m64*>(sg + ld), s01);
  if constexpr (R == 4) {
    const __m128 s23 = sum4(a[2][0], a[2][1], a[3][0], a[3][1]);
    _mm_storel_pi(reinterpret_cast<__m64*>(sg + 2 * ld), s23);
    _mm_storeh_pi(reinterpret_cast<__m64*>(sg + 3 * ld), s23);
  }
}

// Four rows by two float16 keys at a time, for each group of four rows (and two by two for a last pair): one
// 64K-key layer of the small preset (G = 4), AVX2: 0.93-0.95x the time, and 0.935x at 1K keys (README).
// Returns the keys done (a multiple of two). Float keys keep the loop below (this one: 0.96x at 64K, 1.07x
// at 1K, where the extra loads of the queries cost more than the loads of keys it saves).
template <typename T>
int64_t scores_row_groups_two_keys(const float* q, int64_t rows, const T* keys, int64_t count, int64_t hd,
                                   float* s, int64_t ld) {
  int64_t j = 0;
  for (; j + 2 <= count; j += 2) {
    const T *k0 = keys + j * hd, *k1 = k0 + hd;
    if (kPrefetchBytes > 0) prefetch_ahead(k0, 2 * hd * static_cast<int64_t>(sizeof(T)), kPrefetchBytes);
    int64_t g = 0;
    for (; g + 4 <= rows; g += 4) row_group_two_keys<4>(q + g * hd, k0, k1, hd, s + g * ld + j, ld);
    if (g < rows) row_group_two_keys<2>(q + g * hd, k0, k1, hd, s + g * ld + j, ld);
  }
  return j;
}

// Few query rows (decode: the G heads of one kv head): four keys at a time, four independent chains per
// row, the four dot products reduced together. (For float keys, two or four rows at once, each key chunk
// loaded once for them, measured slower at 64K keys: 6.2 and 6.8 ms against 5.4 for one layer of the small
// preset.) Keys as float, or float16 converted as they are loaded.
template <typename T>
bool scores_few_rows(const float* q, int64_t rows, const T* keys, int64_t count, int64_t hd, float* s,
                     int64_t ld) {
  if (hd % kLanes != 0) return false;
  int64_t j = 0;
  if (row_groups<T>(rows)) j = scores_row_groups_two_keys(q, rows, keys, count, hd, s, ld);
  for (; j + 4 <= count; j += 4) {
    const T *k0 = keys + j * hd, *k1 = k0 + hd, *k2 = k1 + hd, *k3 = k2 + hd;
    if (kPrefetchBytes > 0) prefetch_ahead(k0, 4 * hd * static_cast<int64_t>(sizeof(T)), kPrefetchBytes);
    for (int64_t r = 0; r < rows; ++r) {
      const float* qr = q + r * hd;
      Lanes a0 = lanes_zero(), a1 = lanes_zero(), a2 = lanes_zero(), a3 = lanes_zero();
      for (int64_t d = 0; d < hd; d += kLanes) {
        a0 = lanes_fma(qr + d, k0 + d, a0);
        a1 = lanes_fma(qr + d, k1 + d, a1);
        a2 = lanes_fma(qr + d, k2 + d, a2);
        a3 = lanes_fma(qr + d, k3 + d, a3);
      }
      _mm_storeu_ps(s + r * ld + j, sum4(a0, a1, a2, a3));
    }
  }
  for (; j < count; ++j)
    for (int64_t r = 0; r < rows; ++r) {
      Lanes a = lanes_zero();
      for (int64_t d = 0; d < hd; d += kLanes) a = lanes_fma(q + r * hd + d, keys + j * hd + d, a);
      s[r * ld + j] = _mm_cvtss_f32(sum4(a, lanes_zero(), lanes_zero(), lanes_zero()));
    }
  return true;
}

// acc[r] += sum_j p[r * ld + j] * values[j] for R rows, C vectors of head dims at a time (R x C sums in
// registers across the block's keys); float16 values are converted as they are loaded. With `ahead` > 0,
// each key's read also asks for the bytes `ahead` past it (a pass that reads from memory).
template <int R, int C, typename T>
void accumulate_rows(const float* p, int64_t ld, const T* values, int64_t count, int64_t hd, float* acc,
                     int64_t ahead = 0) {
  for (int64_t d0 = 0; d0 < hd; d0 += C * kLanes) {
    Lanes a[R][C];
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < C; ++i) a[r][i] = lanes_load(acc + r * hd + d0 + i * kLanes);
    for (int64_t j = 0; j < count; ++j) {
      const T* v = values + j * hd + d0;
      if (ahead > 0) prefetch_ahead(v, C * kLanes * static_cast<int64_t>(sizeof(T)), ahead);
      Lanes vc[C];
      for (int i = 0; i < C; ++i) vc[i] = lanes_load(v + i * kLanes);
      for (int r = 0; r < R; ++r) {
        const Lanes w = lanes_set(p[r * ld + j]);
        for (int i = 0; i < C; ++i) a[r][i] = lanes_fmadd(w, vc[i], a[r][i]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < C; ++i) lanes_store(acc + r * hd + d0 + i * kLanes, a[r][i]);
  }
}

// Decode's rows of float16 keys and values, converted as they are loaded: fewer than 8, or row groups on AVX2
// (float16_row_groups). Prefill tiles (ld = kBlockKeys) of 8 rows or more convert a block first and keep
// their own sums.
inline bool few_float16_rows(int64_t rows, int64_t ld) {
  return rows < 8 || (float16_row_groups(rows) && ld != kBlockKeys);
}

bool scores_half(const float* q, int64_t rows, const Half* keys, int64_t count, int64_t hd, float* s, int64_t ld) {
  return few_float16_rows(rows, ld) && scores_few_rows(q, rows, keys, count, hd, s, ld);
}

// Any number of rows, kAccRows then one at a time (rows x 64 or 32 head dims in registers, each value vector
// loaded once for them); each output sums over the keys in order. Float16 values are converted as loaded,
// once per group of rows: prefill tiles over a float16 cache convert a block once instead (accumulate_half).
// (For few rows, the omp-simd loop measured 4.6-6.2 ms on one 64K-key layer, depending on how the compiler
// laid it out; these 4.1-4.5.)
template <typename T>
bool accumulate_tiles(const float* p, int64_t rows, int64_t ld, const T* values, int64_t count, int64_t hd,
                      float* acc) {
  int64_t r = 0;
  if (hd % (4 * kLanes) != 0) {
    // narrow heads (32 or 96 dims under AVX-512: the trained reference model's are 32): two vectors of sums
    // per row (the omp-simd loop below took 3x as long: 7.8 against 2.5 us a decode step there, perf)
    if (hd % (2 * kLanes) != 0) return false;
    for (; r + kDecodeRows <= rows; r += kDecodeRows)
      accumulate_rows<kDecodeRows, 2>(p + r * ld, ld, values, count, hd, acc + r * hd);
    for (; r < rows; ++r) accumulate_rows<1, 2>(p + r * ld, ld, values, count, hd, acc + r * hd);
    return true;
  }
  const bool groups = row_groups<T>(rows);
  if ((rows < 8 || groups) && hd % (8 * kLanes) == 0) {  // few rows (decode): whole rows, see kDecodeRows
    const int64_t chunk = kValueChunkKeys > 0 ? kValueChunkKeys : count;
    // each chunk read from memory by its first rows, then from L1; where the values are chunked (AVX2), the
    // first rows ask for the values 4 KiB ahead and the next rows for the next chunk
    const int64_t next = kValueChunkKeys > 0 ? chunk * hd * static_cast<int64_t>(sizeof(T)) : 0;
    for (int64_t j = 0; j < count; j += chunk) {
      const int64_t n = count - j < chunk ? count - j : chunk;
      const T* vj = values + j * hd;
      if (groups) {
        // float16 values: four rows by two vectors, each value vector converted once per group of four rows
        // (one pass per row converted it once per row): G = 4, 0.91-0.98x the time at 64K keys, 0.93x at
        // 1K. Two rows by four vectors took 1.13x this, so they take a last pair only (G = 6); float values
        // keep the passes per row (README).
        int64_t g = 0;
        for (; g + 4 <= rows; g += 4)
          accumulate_rows<4, 2>(p + g * ld + j, ld, vj, n, hd, acc + g * hd, g == 0 ? next : 0);
        if (g < rows) accumulate_rows<2, 4>(p + g * ld + j, ld, vj, n, hd, acc + g * hd);
        continue;
      }
      for (r = 0; r + kDecodeRows <= rows; r += kDecodeRows)
        accumulate_rows<kDecodeRows, 8>(p + r * ld + j, ld, vj, n, hd, acc + r * hd,
                                        r == 0 ? kPrefetchValues : r == kDecodeRows ? next : 0);
      for (; r < rows; ++r)
        accumulate_rows<1, 8>(p + r * ld + j, ld, vj, n, hd, acc + r * hd,
                              r == 0 ? kPrefetchValues : r == 1 ? next : 0);
    }
    return true;
  }
  for (; r + kAccRows <= rows; r += kAccRows)
    accumulate_rows<kAccRows, 4>(p + r * ld, ld, values, count, hd, acc + r * hd);
  for (; r < rows; ++r) accumulate_rows<1, 4>(p + r * ld, ld, values, count, hd, acc + r * hd);
  return true;
}

bool accumulate_half(const float* p, int64_t rows, int64_t ld, const Half* values, int64_t count, int64_t hd,
                     float* acc) {
  return few_float16_rows(rows, ld) && accumulate_tiles(p, rows, ld, values, count, hd, acc);
}

// Many rows (prefill tiles) against a key block transposed to [hd][kBlockKeys]: kAccRows rows x four vectors
// of keys in registers across the head dims (an array the compiler kept on the stack, reloading it for every
// multiply-add, ran at half the speed). Each score sums over d in order, as the portable loop does. Returns
// the rows done (a multiple of kAccRows).
int64_t scores_tiles(const float* q, int64_t rows, const float* kt, int64_t hd, float* s) {
  constexpr int64_t kKeyChunk = 4 * kLanes;
  int64_t r = 0;
  for (; r + kAccRows <= rows; r += kAccRows)
    for (int64_t j0 = 0; j0 < kBlockKeys; j0 += kKeyChunk) {
      Lanes a[kAccRows][4];
      for (int i = 0; i < kAccRows; ++i)
        for (int x = 0; x < 4; ++x) a[i][x] = lanes_zero();
      for (int64_t d = 0; d < hd; ++d) {
        const float* kd = kt + d * kBlockKeys + j0;
        const Lanes k0 = lanes_load(kd), k1 = lanes_load(kd + kLanes), k2 = lanes_load(kd + 2 * kLanes),
                    k3 = lanes_load(kd + 3 * kLanes);
        for (int i = 0; i < kAccRows; ++i) {
          const Lanes w = lanes_set(q[(r + i) * hd + d]);
          a[i][0] = lanes_fmadd(w, k0, a[i][0]);
          a[i][1] = lanes_fmadd(w, k1, a[i][1]);
          a[i][2] = lanes_fmadd(w, k2, a[i][2]);
          a[i][3] = lanes_fmadd(w, k3, a[i][3]);
        }
      }
      for (int i = 0; i < kAccRows; ++i)
        for (int x = 0; x < 4; ++x) lanes_store(s + (r + i) * kBlockKeys + j0 + x * kLanes, a[i][x]);
    }
  return r;
}
#else
bool scores_few_rows(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t) { return false; }
bool accumulate_tiles(const float*, int64_t, int64_t, const float*, int64_t, int64_t, float*) { return false; }
int64_t scores_tiles(const float*, int64_t, const float*, int64_t, float*) { return 0; }
bool scores_half(const float*, int64_t, const Half*, int64_t, int64_t, float*, int64_t) { return false; }
bool accumulate_half(const float*, int64_t, int64_t, const Half*, int64_t, int64_t, float*) { return false; }
#endif

// Many query rows (prefill tiles): the key block transposed once to [hd][kBlockKeys], then four query rows at
// a time accumulate whole rows of scores in vector registers (no horizontal sums per (row, key) pair):
// scores_tiles where the ISA has intrinsics, the omp-simd loop for the rest.
void scores_blocked(const float* q, int64_t rows, const float* keys, int64_t count, int64_t hd, float* s) {
  alignas(64) float kt[kMaxHeadDim * kBlockKeys];
  for (int64_t d = 0; d < hd; ++d)
    for (int64_t j = 0; j < kBlockKeys; ++j) kt[d * kBlockKeys + j] = j < count ? keys[j * hd + d] : 0.f;
  int64_t r = scores_tiles(q, rows, kt, hd, s);
  for (; r + 4 <= rows; r += 4) {  // the portable build
    alignas(64) float acc[4][kBlockKeys] = {};
    const float *q0 = q + r * hd, *q1 = q0 + hd, *q2 = q1 + hd, *q3 = q2 + hd;
    for (int64_t d = 0; d < hd; ++d) {
      const float* kd = kt + d * kBlockKeys;
      const float a0 = q0[d], a1 = q1[d], a2 = q2[d], a3 = q3[d];
#pragma omp simd
      for (int64_t j = 0; j < kBlockKeys; ++j) {
        acc[0][j] += a0 * kd[j];
        acc[1][j] += a1 * kd[j];
        acc[2][j] += a2 * kd[j];
        acc[3][j] += a3 * kd[j];
      }
    }
    for (int64_t i = 0; i < 4; ++i) std::memcpy(s + (r + i) * kBlockKeys, acc[i], count * sizeof(float));
  }
  for (; r < rows; ++r) {
    alignas(64) float acc[kBlockKeys] = {};
    for (int64_t d = 0; d < hd; ++d) {
      const float a = q[r * hd + d];
#pragma omp simd
      for (int64_t j = 0; j < kBlockKeys; ++j) acc[j] += a * kt[d * kBlockKeys + j];
    }
    std::memcpy(s + r * kBlockKeys, acc, count * sizeof(float));
  }
}

void scores(const float* q, int64_t rows, const float* keys, int64_t count, int64_t hd, float* s, int64_t ld) {
  if (rows >= 8 && ld == kBlockKeys && count <= kBlockKeys && hd <= kMaxHeadDim) {
    scores_blocked(q, rows, keys, count, hd, s);
    return;
  }
  if (scores_few_rows(q, rows, keys, count, hd, s, ld)) return;
  for (int64_t j = 0; j < count; ++j) {
    const float* key = keys + j * hd;
    for (int64_t r = 0; r < rows; ++r) {
      const float* qr = q + r * hd;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t d = 0; d < hd; ++d) sum += qr[d] * key[d];
      s[r * ld + j] = sum;
    }
  }
}

// acc += p values: accumulate_tiles where the ISA has intrinsics, else four rows at a time, one chunk of 16
// head dims at a time (the four output chunks in registers across the block's keys, each value chunk loaded
// once for the four rows), then the rest one by one.
constexpr int64_t kDimChunk = 16;
void accumulate(const float* p, int64_t rows, int64_t ld, const float* values, int64_t count, int64_t hd,
                float* acc) {
  int64_t r = 0;
  if (accumulate_tiles(p, rows, ld, values, count, hd, acc)) return;
  if (hd % kDimChunk == 0) {
    for (; r + 4 <= rows; r += 4) {
      const float *p0 = p + r * ld, *p1 = p0 + ld, *p2 = p1 + ld, *p3 = p2 + ld;
      for (int64_t d0 = 0; d0 < hd; d0 += kDimChunk) {
        alignas(64) float a[4][kDimChunk];
        for (int64_t i = 0; i < 4; ++i) std::memcpy(a[i], acc + (r + i) * hd + d0, sizeof(a[i]));
        for (int64_t j = 0; j < count; ++j) {
          const float* v = values + j * hd + d0;
          const float w0 = p0[j], w1 = p1[j], w2 = p2[j], w3 = p3[j];
#pragma omp simd
          for (int64_t x = 0; x < kDimChunk; ++x) {
            a[0][x] += w0 * v[x];
            a[1][x] += w1 * v[x];
            a[2][x] += w2 * v[x];
            a[3][x] += w3 * v[x];
          }
        }
        for (int64_t i = 0; i < 4; ++i) std::memcpy(acc + (r + i) * hd + d0, a[i], sizeof(a[i]));
      }
    }
  }
  for (; r < rows; ++r) {
    float* a = acc + r * hd;
    for (int64_t j = 0; j < count; ++j) {
      const float w = p[r * ld + j];
      if (w == 0.f) continue;  // masked keys and rows that saw nothing in this block
      const float* value = values + j * hd;
#pragma omp simd
      for (int64_t d = 0; d < hd; ++d) a[d] += w * value[d];
    }
  }
}

float add_bias_max(float* s, const float* bias, int64_t n) {
  float max = -__builtin_inff();
  if (bias != nullptr) {
#pragma omp simd reduction(max : max)
    for (int64_t i = 0; i < n; ++i) {
      s[i] += bias[i];
      max = s[i] > max ? s[i] : max;
    }
  } else {
#pragma omp simd reduction(max : max)
    for (int64_t i = 0; i < n; ++i) max = s[i] > max ? s[i] : max;
  }
  return max;
}

void scale(float* x, int64_t n, float alpha) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) x[i] *= alpha;
}

float exp_sum(float* s, int64_t n, float max) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const float e = exp_nonpositive(s[i] - max);
    s[i] = e;
    sum += e;
  }
  return sum;
}

void half_to_float(const Half* x, float* y, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(y + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i))));
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))));
#endif
  for (; i < n; ++i) y[i] = static_cast<float>(__builtin_bit_cast(_Float16, x[i]));
}

void float_to_half(const float* x, Half* y, int64_t n) {  // round to nearest even, as numpy's astype
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), _mm512_cvtps_ph(_mm512_loadu_ps(x + i),
                                                                           _MM_FROUND_TO_NEAREST_INT));
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i),
                                                                        _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < n; ++i) y[i] = __builtin_bit_cast(Half, static_cast<_Float16>(x[i]));
}

void stream_copy(void* dst, const void* src, int64_t bytes) {
#if defined(__AVX512F__) || defined(__AVX__)
#if defined(__AVX512F__)
  constexpr int64_t kLine = 64;
#else
  constexpr int64_t kLine = 32;
#endif
  if (reinterpret_cast<uintptr_t>(dst) % kLine == 0 && bytes % kLine == 0) {
    float* d = static_cast<float*>(dst);
    const float* s = static_cast<const float*>(src);
    for (int64_t i = 0; i < bytes / 4; i += kLine / 4) {
#if defined(__AVX512F__)
      _mm512_stream_ps(d + i, _mm512_loadu_ps(s + i));
#else
      _mm256_stream_ps(d + i, _mm256_loadu_ps(s + i));
#endif
    }
    return;  // weakly ordered stores: the task calls store_fence() once when done
  }
#endif
  std::memcpy(dst, src, static_cast<size_t>(bytes));
}

void store_fence() {
#if defined(__AVX512F__) || defined(__AVX__)
  _mm_sfence();
#endif
}

constexpr AttentionLoops kLoops = {scores,      accumulate,    scores_half,   accumulate_half, add_bias_max, exp_sum,
                                  scale,       half_to_float, float_to_half, stream_copy,     store_fence};
