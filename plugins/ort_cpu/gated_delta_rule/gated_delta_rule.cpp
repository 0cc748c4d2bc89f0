#include "gated_delta_rule/gated_delta_rule.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <utility>
#include <vector>

#include "common/exp_nonpositive.h"
#include "common/forced_kernels.h"
#include "common/scratch.h"
#include "common/step_tokens.h"
#include "common/vector_math.h"

namespace qwen_cpu {

namespace {

// x86: one copy of the loops per instruction set (AVX-512F, x86-64-v3, the baseline), picked on first use by
// CPUID or narrowed by QWEN_CPU_KERNELS=avx2|portable (common/forced_kernels.h), as the other kernels pick
// theirs; elsewhere the plain build. The AVX2 copy is x86-64-v3's (AVX2 with FMA; a bare "avx2" target has no
// FMA). Not x86-64-v4 for AVX-512: GCC prefers 256-bit vectors for it, which changed the last bits of the
// auto-vectorised loops, and a 5% slower prefill layer. (These were target_clones, resolved when the library
// loaded: QWEN_CPU_KERNELS=avx2 then ran the 8-float loops inside the AVX-512 clone, without FMA.)
#if defined(__x86_64__) && !defined(QWEN_CPU_PORTABLE_ONLY)
#define QWEN_CPU_X86_COPIES 1
#endif

// GCC vector types of W floats (spelled out: GCC ignores a vector_size that depends on a template argument)
template <int W>
struct VectorOf;
template <>
struct VectorOf<16> {
  using type = float __attribute__((vector_size(64)));
};
template <>
struct VectorOf<8> {
  using type = float __attribute__((vector_size(32)));
};
template <int W>
using VecF = typename VectorOf<W>::type;

// The loops below run on vectors of W floats: 16 (one zmm) in the AVX-512 copy, 8 (one ymm with AVX2, two xmm
// in the baseline) in the others. GCC 12 compiles arrays of 16-float vectors for AVX2 through general registers
// and the stack: the AVX2 copy of these loops ran a 2048-token prefill 8x and a decode step 5x slower than the
// AVX-512 one. Each output is computed by the same operations in the same order at either width; the copies
// differ in whether a product and its add are fused (x86-64's baseline has no FMA).

constexpr int64_t kChunk = 64;          // tokens per chunk of the chunked delta rule (as on the GPU)
constexpr int64_t kTriangleRows = 16;   // a chunk's causal products skip the blocks above the diagonal
constexpr int64_t kKeptScratchFloats = 1 << 18;  // scratch up to 1 MB stays allocated per thread

// Whether a call of T tokens runs the chunked form: from kStepTokens on (common/step_tokens.h), unless
// QWEN_CPU_DELTA_RULE says "recurrent" or "chunked" (tests and benchmarks compare the two).
bool use_chunks(int64_t tokens) {
  const char* forced = std::getenv("QWEN_CPU_DELTA_RULE");
  if (forced != nullptr && std::strcmp(forced, "recurrent") == 0) return false;
  if (forced != nullptr && std::strcmp(forced, "chunked") == 0) return true;
  return tokens >= kStepTokens;
}

inline float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }
inline float softplus(float x) { return x > 20.f ? x : std::log1p(std::exp(x)); }  // torch's threshold

// sum x^2, in 16 partial sums (16 / W vectors) when n is a multiple of 16, so it vectorises
template <int W>
__attribute__((always_inline)) inline float sum_squares(const float* x, int64_t n) {
  if (n % 16) {
    float sum = 0.f;
    for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
    return sum;
  }
  VecF<W> acc[16 / W] = {};
  for (int64_t i = 0; i < n; i += 16)
    for (int h = 0; h < 16 / W; ++h) {
      VecF<W> v;
      std::memcpy(&v, x + i + W * h, sizeof v);
      acc[h] += v * v;
    }
  float sum = 0.f;
  for (int h = 0; h < 16 / W; ++h)
    for (int j = 0; j < W; ++j) sum += acc[h][j];
  return sum;
}

// x / sqrt(sum x^2 + 1e-6) * scale, in place
template <int W>
__attribute__((always_inline)) inline void l2norm_body(float* x, int64_t n, float scale) {
  const float factor = scale / std::sqrt(sum_squares<W>(x, n) + 1e-6f);
  for (int64_t i = 0; i < n; ++i) x[i] *= factor;
}

// y = x / sqrt(mean x^2 + eps) * w
template <int W>
__attribute__((always_inline)) inline void rms_norm_body(const float* x, int64_t n, float eps, const float* w,
                                                         float* y) {
  const float power = sum_squares<W>(x, n);
  const float inv_rms = 1.f / std::sqrt(power / static_cast<float>(n) + eps);
  for (int64_t j = 0; j < n; ++j) y[j] = x[j] * inv_rms * w[j];
}

// Columns [j0, j0 + W * NB) of one delta_step (the columns of S are independent): the sums over S's rows stay in
// registers, in the same order (row 0 first) as the scalar loop's, so both give the same bits.
template <int W, int NB>
__attribute__((always_inline)) inline void delta_columns(const float* from, float* state, const float* q,
                                                         const float* k, const float* v, float decay, float beta,
                                                         int64_t dk, int64_t dv, int64_t j0, float* o) {
  VecF<W> acc[NB] = {};
  for (int64_t i = 0; i < dk; ++i) {  // S = decay * S; kv = S^T k
    const float ki = k[i];
    for (int b = 0; b < NB; ++b) {
      VecF<W> row;
      std::memcpy(&row, from + i * dv + j0 + W * b, sizeof row);
      row *= decay;
      std::memcpy(state + i * dv + j0 + W * b, &row, sizeof row);
      acc[b] += row * ki;
    }
  }
  for (int b = 0; b < NB; ++b) {  // delta
    VecF<W> vb;
    std::memcpy(&vb, v + j0 + W * b, sizeof vb);
    acc[b] = (vb - acc[b]) * beta;
  }
  VecF<W> out[NB] = {};
  for (int64_t i = 0; i < dk; ++i) {  // S += k delta^T; o = S^T q
    const float ki = k[i], qi = q[i];
    for (int b = 0; b < NB; ++b) {
      VecF<W> row;
      std::memcpy(&row, state + i * dv + j0 + W * b, sizeof row);
      row += ki * acc[b];
      std::memcpy(state + i * dv + j0 + W * b, &row, sizeof row);
      out[b] += row * qi;
    }
  }
  for (int b = 0; b < NB; ++b) std::memcpy(o + j0 + W * b, &out[b], sizeof out[b]);
}

// delta_step where dv is a multiple of W: 4, 2 or 1 vectors of columns at a time
template <int W>
__attribute__((always_inline)) inline void delta_step_columns(const float* from, float* state, const float* q,
                                                              const float* k, const float* v, float decay,
                                                              float beta, int64_t dk, int64_t dv, float* o) {
  int64_t j0 = 0;
  for (; j0 + 4 * W <= dv; j0 += 4 * W) delta_columns<W, 4>(from, state, q, k, v, decay, beta, dk, dv, j0, o);
  for (; j0 + 2 * W <= dv; j0 += 2 * W) delta_columns<W, 2>(from, state, q, k, v, decay, beta, dk, dv, j0, o);
  for (; j0 < dv; j0 += W) delta_columns<W, 1>(from, state, q, k, v, decay, beta, dk, dv, j0, o);
}

// One value head for one token: the state update and read-out in two passes over S [dk, dv], the first
// reading `from` (the past state, or S itself after the first token) and writing S. One copy per instruction
// set so the dv-wide rows vectorise where the CPU has it; where dv is a multiple of the vector the sums stay in
// registers (kept in memory they made a step 2-3x slower: `kv` and `o` may alias S, so every row reloaded them).
template <int W>
__attribute__((always_inline)) inline void delta_step_body(const float* from, float* state, const float* q,
                                                           const float* k, const float* v, float decay, float beta,
                                                           int64_t dk, int64_t dv, float* kv, float* o) {
  if (dv % W == 0) return delta_step_columns<W>(from, state, q, k, v, decay, beta, dk, dv, o);
  std::fill(kv, kv + dv, 0.f);
  for (int64_t i = 0; i < dk; ++i) {  // S = decay * S; kv = S^T k
    const float* in = from + i * dv;
    float* row = state + i * dv;
    const float ki = k[i];
    for (int64_t j = 0; j < dv; ++j) {
      row[j] = in[j] * decay;
      kv[j] += row[j] * ki;
    }
  }
  for (int64_t j = 0; j < dv; ++j) kv[j] = (v[j] - kv[j]) * beta;  // delta
  std::fill(o, o + dv, 0.f);
  for (int64_t i = 0; i < dk; ++i) {  // S += k delta^T; o = S^T q
    float* row = state + i * dv;
    const float ki = k[i], qi = q[i];
    for (int64_t j = 0; j < dv; ++j) {
      row[j] += ki * kv[j];
      o[j] += row[j] * qi;
    }
  }
}

// out[t * out_stride + c] = sum_j w[c, j] * window(c, t + j) for tokens [0, T) and channels [0, n) of a block,
// where window position i is state[c, i] for i < keep and token i - keep of x (row stride `stride`) after. The
// weight w[c, j] is wt[j * tap_stride + c * channel_stride]: transposed to [K, C] (channel_stride 1, a vector of
// channels one load) or as the op takes them, [C, K] (gathered a lane at a time, as the state's window is); the
// same values either way, so the same bits. W channels at a time sum in a register, the rest one by one;
// every token takes the same operations, wherever its window lies, so a token's outputs do not depend on how
// many tokens the call has (common/step_tokens.h). (A separate auto-vectorised loop for the tokens whose window
// reaches into the state rounded each product in the AVX-512 copy, where the register loop fused them.)
template <int W>
__attribute__((always_inline)) inline void conv_tokens(const float* wt, int64_t tap_stride,
                                                       int64_t channel_stride, int64_t kernel, const float* state,
                                                       int64_t keep, const float* x, int64_t stride, int64_t T,
                                                       int64_t n, float* out, int64_t out_stride) {
  for (int64_t t = 0; t < T; ++t) {
    float* row = out + t * out_stride;
    int64_t c = 0;
    for (; c + W <= n; c += W) {
      VecF<W> acc{};
      for (int64_t j = 0; j < kernel; ++j) {
        const int64_t i = t + j;
        VecF<W> w, in;
        if (channel_stride == 1) {
          std::memcpy(&w, wt + j * tap_stride + c, sizeof w);
        } else {
          for (int l = 0; l < W; ++l) w[l] = wt[j * tap_stride + (c + l) * channel_stride];
        }
        if (i < keep) {
          for (int l = 0; l < W; ++l) in[l] = state[(c + l) * keep + i];
        } else {
          std::memcpy(&in, x + (i - keep) * stride + c, sizeof in);
        }
        acc += w * in;
      }
      std::memcpy(row + c, &acc, sizeof acc);
    }
    for (; c < n; ++c) {
      float acc = 0.f;
      for (int64_t j = 0; j < kernel; ++j) {
        const int64_t i = t + j;
        acc += wt[j * tap_stride + c * channel_stride] * (i < keep ? state[c * keep + i] : x[(i - keep) * stride + c]);
      }
      row[c] = acc;
    }
  }
}

// A register tile of small_gemm: ROWS rows x W NB columns of C in W-float vectors. Always inlined, so it is
// compiled for the caller's instruction set.
template <int W, int ROWS, int NB>
__attribute__((always_inline)) inline void gemm_tile(const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                                                     int64_t ldc, int64_t p_count, bool accumulate) {
  using V = VecF<W>;
  V acc[ROWS][NB];
  for (int r = 0; r < ROWS; ++r)
    for (int n = 0; n < NB; ++n) {
      if (accumulate) {
        std::memcpy(&acc[r][n], c + r * ldc + W * n, sizeof(V));
      } else {
        acc[r][n] = V{};
      }
    }
  for (int64_t p = 0; p < p_count; ++p) {
    V bp[NB];
    for (int n = 0; n < NB; ++n) std::memcpy(&bp[n], b + p * ldb + W * n, sizeof(V));
    for (int r = 0; r < ROWS; ++r) {
      const float ar = a[r * lda + p];
      for (int n = 0; n < NB; ++n) acc[r][n] += ar * bp[n];
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int n = 0; n < NB; ++n) std::memcpy(c + r * ldc + W * n, &acc[r][n], sizeof(V));
}

// Columns [j0, j0 + W NB) of small_gemm, ROWS rows at a time.
template <int W, int ROWS, int NB>
__attribute__((always_inline)) inline void gemm_columns(const float* a, int64_t lda, const float* b, int64_t ldb,
                                                        float* c, int64_t ldc, int64_t m, int64_t p, bool accumulate,
                                                        int64_t j0) {
  int64_t i = 0;
  for (; i + ROWS <= m; i += ROWS)
    gemm_tile<W, ROWS, NB>(a + i * lda, lda, b + j0, ldb, c + i * ldc + j0, ldc, p, accumulate);
  for (; i < m; ++i) gemm_tile<W, 1, NB>(a + i * lda, lda, b + j0, ldb, c + i * ldc + j0, ldc, p, accumulate);
}

// small_gemm in tiles of ROWS rows x up to W NB columns (ROWS x NB accumulators), then the last n % W columns
// in a scalar loop.
template <int W, int ROWS, int NB>
__attribute__((always_inline)) inline void gemm_tiles(const float* a, int64_t lda, const float* b, int64_t ldb,
                                                      float* c, int64_t ldc, int64_t m, int64_t n, int64_t p,
                                                      bool accumulate) {
  int64_t j0 = 0;
  for (; j0 + W * NB <= n; j0 += W * NB) gemm_columns<W, ROWS, NB>(a, lda, b, ldb, c, ldc, m, p, accumulate, j0);
  if (NB == 4 && n - j0 >= 3 * W) {
    gemm_columns<W, ROWS, 3>(a, lda, b, ldb, c, ldc, m, p, accumulate, j0);
    j0 += 3 * W;
  } else if (NB >= 3 && n - j0 >= 2 * W) {
    gemm_columns<W, ROWS, 2>(a, lda, b, ldb, c, ldc, m, p, accumulate, j0);
    j0 += 2 * W;
  }
  for (; j0 + W <= n; j0 += W) gemm_columns<W, ROWS, 1>(a, lda, b, ldb, c, ldc, m, p, accumulate, j0);
  for (int64_t i = 0; i < m && j0 < n; ++i)  // the last n % W columns
    for (int64_t j = j0; j < n; ++j) {
      float sum = accumulate ? c[i * ldc + j] : 0.f;
      for (int64_t k = 0; k < p; ++k) sum += a[i * lda + k] * b[k * ldb + j];
      c[i * ldc + j] = sum;
    }
}

// C [M, N] = (accumulate ? C : 0) + A [M, P] B [P, N], all row-major with the given row strides. Tiles of 4 rows
// x 64 columns with AVX-512 (16 accumulators in its 32 registers, enough to keep the FMA pipes busy), 4 x 16
// elsewhere (8 ymm of AVX2's 16). Every element sums over p in order whatever its tile: the same bits.
template <int W>
__attribute__((always_inline)) inline void small_gemm_body(const float* a, int64_t lda, const float* b, int64_t ldb,
                                                           float* c, int64_t ldc, int64_t m, int64_t n, int64_t p,
                                                           bool accumulate) {
  if constexpr (W == 16) {
    gemm_tiles<16, 4, 4>(a, lda, b, ldb, c, ldc, m, n, p, accumulate);
  } else {
    gemm_tiles<8, 4, 2>(a, lda, b, ldb, c, ldc, m, n, p, accumulate);
  }
}

// The small products of delta_chunk go through the chosen copy (below): one call each, not inlined five times.
void small_gemm(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t m,
                int64_t n, int64_t p, bool accumulate);

// Columns [j0, j0 + W * NB) of the chunk's forward substitution (the columns of U are independent): row t of U
// sums in registers, in the scalar loop's order (s = 0 first), so both give the same bits.
template <int W, int NB>
__attribute__((always_inline)) inline void substitute_columns(float* u, const float* v, const float* ks,
                                                              const float* beta, const float* decay,
                                                              const float* kk, float to_0, int64_t L, int64_t dv,
                                                              int64_t j0) {
  for (int64_t t = 0; t < L; ++t) {
    const float to_t = decay[t * L] * to_0;  // exp(G_t)
    VecF<W> acc[NB];
    for (int b = 0; b < NB; ++b) {
      VecF<W> vt, kst;
      std::memcpy(&vt, v + t * dv + j0 + W * b, sizeof vt);
      std::memcpy(&kst, ks + t * dv + j0 + W * b, sizeof kst);
      acc[b] = beta[t] * (vt - to_t * kst);
    }
    for (int64_t s = 0; s < t; ++s) {
      const float a = -beta[t] * decay[t * L + s] * kk[t * L + s];
      for (int b = 0; b < NB; ++b) {
        VecF<W> us;
        std::memcpy(&us, u + s * dv + j0 + W * b, sizeof us);
        acc[b] += a * us;
      }
    }
    for (int b = 0; b < NB; ++b) std::memcpy(u + t * dv + j0 + W * b, &acc[b], sizeof acc[b]);
  }
}

// The forward substitution where dv is a multiple of W: 4, 2 or 1 vectors of columns at a time.
template <int W>
__attribute__((always_inline)) inline void substitute(float* u, const float* v, const float* ks, const float* beta,
                                                      const float* decay, const float* kk, float to_0, int64_t L,
                                                      int64_t dv) {
  int64_t j0 = 0;
  for (; j0 + 4 * W <= dv; j0 += 4 * W) substitute_columns<W, 4>(u, v, ks, beta, decay, kk, to_0, L, dv, j0);
  for (; j0 + 2 * W <= dv; j0 += 2 * W) substitute_columns<W, 2>(u, v, ks, beta, decay, kk, to_0, L, dv, j0);
  for (; j0 < dv; j0 += W) substitute_columns<W, 1>(u, v, ks, beta, decay, kk, to_0, L, dv, j0);
}

// One chunk of L tokens of one value head in the WY form of the GPU kernels (plugins/gated_deltanet,
// flash-linear-attention's chunk_gated_delta_rule). With G_t the running sum of the log decays from the chunk's
// start and S0 the state before it:
//   (I + A) U = diag(beta) (V - diag(exp G) K S0),   A[t, s] = beta_t exp(G_t - G_s) k_t.k_s   (s < t)
//   O = diag(exp G) Q S0 + (exp(G_t - G_s) q_t.k_s)_{s <= t} U
//   S = exp(G_L) S0 + sum_s exp(G_L - G_s) k_s u_s^T
// U (the delta rule's corrections, one per token) comes by forward substitution; the rest are matrix products.
// Equal to L steps of delta_step up to float rounding. Row t of O goes to o + t * ldo. `work` holds
// 4 L dv + dk L + 3 L L floats.
template <int W>
__attribute__((always_inline)) inline void delta_chunk_body(float* state, const float* q, const float* k,
                                                            const float* v, const float* beta, const float* g,
                                                            int64_t L, int64_t dk, int64_t dv, float* o, int64_t ldo,
                                                            float* work) {
  float* ks = work;            // [L, dv]  K S0
  float* qs = ks + L * dv;     // [L, dv]  Q S0
  float* u = qs + L * dv;      // [L, dv]
  float* gsum = u + L * dv;    // [L]      (L dv reserved)
  float* kt = gsum + L * dv;   // [dk, L]  K^T, then scaled by exp(G_L - G_s)
  float* kk = kt + dk * L;     // [L, L]   K K^T, then A
  float* qk = kk + L * L;      // [L, L]   Q K^T, then the masked decayed scores
  float* decay = qk + L * L;   // [L, L]   exp(G_t - G_s), s <= t
  float g_run = 0.f;
  for (int64_t t = 0; t < L; ++t) gsum[t] = g_run += g[t];
  for (int64_t i = 0; i < dk; ++i)
    for (int64_t t = 0; t < L; ++t) kt[i * L + t] = k[t * dk + i];
  small_gemm(k, dk, state, dv, ks, dv, L, dv, dk, false);
  small_gemm(q, dk, state, dv, qs, dv, L, dv, dk, false);
  // K K^T and Q K^T below the diagonal only (s <= t), in blocks of kTriangleRows rows
  for (int64_t r0 = 0; r0 < L; r0 += kTriangleRows) {
    const int64_t rows = std::min(kTriangleRows, L - r0), columns = std::min(L, r0 + kTriangleRows);
    small_gemm(k + r0 * dk, dk, kt, L, kk + r0 * L, L, rows, columns, dk, false);
    small_gemm(q + r0 * dk, dk, kt, L, qk + r0 * L, L, rows, columns, dk, false);
  }
  for (int64_t t = 0; t < L; ++t)
    for (int64_t s = 0; s <= t; ++s) decay[t * L + s] = exp_nonpositive(gsum[t] - gsum[s]);
  const float to_0 = std::exp(gsum[0]);
  // forward substitution, in column blocks that stay in registers
  if (dv % W == 0) {
    substitute<W>(u, v, ks, beta, decay, kk, to_0, L, dv);
  } else {
    for (int64_t t = 0; t < L; ++t) {  // forward substitution, one row of U at a time
      float* ut = u + t * dv;
      const float to_t = decay[t * L] * to_0;  // exp(G_t)
      for (int64_t j = 0; j < dv; ++j) ut[j] = beta[t] * (v[t * dv + j] - to_t * ks[t * dv + j]);
      for (int64_t s = 0; s < t; ++s) {
        const float a = -beta[t] * decay[t * L + s] * kk[t * L + s];
        const float* us = u + s * dv;
        for (int64_t j = 0; j < dv; ++j) ut[j] += a * us[j];
      }
    }
  }
  for (int64_t t = 0; t < L; ++t)
    for (int64_t s = 0; s < L; ++s) qk[t * L + s] = s <= t ? qk[t * L + s] * decay[t * L + s] : 0.f;
  for (int64_t r0 = 0; r0 < L; r0 += kTriangleRows) {  // row t of the scores is 0 past s = t
    const int64_t rows = std::min(kTriangleRows, L - r0), columns = std::min(L, r0 + kTriangleRows);
    small_gemm(qk + r0 * L, L, u, dv, o + r0 * ldo, ldo, rows, dv, columns, false);
  }
  for (int64_t t = 0; t < L; ++t) {
    const float to_t = std::exp(gsum[t]);
    for (int64_t j = 0; j < dv; ++j) o[t * ldo + j] += to_t * qs[t * dv + j];
  }
  const float last = gsum[L - 1];
  float* to_last = qs;  // exp(G_L - G_s); Q S0 is used up
  for (int64_t s = 0; s < L; ++s) to_last[s] = std::exp(last - gsum[s]);
  for (int64_t i = 0; i < dk; ++i)
    for (int64_t s = 0; s < L; ++s) kt[i * L + s] *= to_last[s];
  const float total = std::exp(last);
  for (int64_t i = 0; i < dk * dv; ++i) state[i] *= total;
  small_gemm(kt, L, u, dv, state, dv, dk, dv, L, true);
}

// The six entry points of one copy, compiled for its instruction set (the bodies above are always inlined).
struct DeltaRuleLoops {
  void (*l2norm)(float* x, int64_t n, float scale);
  void (*rms_norm)(const float* x, int64_t n, float eps, const float* w, float* y);
  void (*delta_step)(const float* from, float* state, const float* q, const float* k, const float* v, float decay,
                     float beta, int64_t dk, int64_t dv, float* kv, float* o);
  void (*conv_tokens)(const float* wt, int64_t tap_stride, int64_t channel_stride, int64_t kernel,
                      const float* state, int64_t keep, const float* x, int64_t stride, int64_t T, int64_t n,
                      float* out, int64_t out_stride);
  void (*small_gemm)(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t m,
                     int64_t n, int64_t p, bool accumulate);
  void (*delta_chunk)(float* state, const float* q, const float* k, const float* v, const float* beta,
                      const float* g, int64_t L, int64_t dk, int64_t dv, float* o, int64_t ldo, float* work);
  const char* name;
};

#define QWEN_DELTA_RULE_COPY(copy, W, attributes, label)                                                          \
  namespace copy {                                                                                               \
  attributes void l2norm(float* x, int64_t n, float scale) { l2norm_body<W>(x, n, scale); }                      \
  attributes void rms_norm(const float* x, int64_t n, float eps, const float* w, float* y) {                     \
    rms_norm_body<W>(x, n, eps, w, y);                                                                           \
  }                                                                                                              \
  attributes void delta_step(const float* from, float* state, const float* q, const float* k, const float* v,    \
                             float decay, float beta, int64_t dk, int64_t dv, float* kv, float* o) {             \
    delta_step_body<W>(from, state, q, k, v, decay, beta, dk, dv, kv, o);                                        \
  }                                                                                                              \
  attributes void conv_tokens(const float* wt, int64_t tap_stride, int64_t channel_stride, int64_t kernel,      \
                              const float* state, int64_t keep, const float* x, int64_t stride, int64_t T,        \
                              int64_t n, float* out, int64_t out_stride) {                                       \
    qwen_cpu::conv_tokens<W>(wt, tap_stride, channel_stride, kernel, state, keep, x, stride, T, n, out,          \
                             out_stride);                                                                        \
  }                                                                                                              \
  attributes void small_gemm(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,    \
                             int64_t m, int64_t n, int64_t p, bool accumulate) {                                 \
    small_gemm_body<W>(a, lda, b, ldb, c, ldc, m, n, p, accumulate);                                             \
  }                                                                                                              \
  attributes void delta_chunk(float* state, const float* q, const float* k, const float* v, const float* beta,   \
                              const float* g, int64_t L, int64_t dk, int64_t dv, float* o, int64_t ldo,          \
                              float* work) {                                                                     \
    delta_chunk_body<W>(state, q, k, v, beta, g, L, dk, dv, o, ldo, work);                                       \
  }                                                                                                              \
  const DeltaRuleLoops loops = {l2norm, rms_norm, delta_step, conv_tokens, small_gemm, delta_chunk, label};     \
  }
#ifdef QWEN_CPU_X86_COPIES
QWEN_DELTA_RULE_COPY(avx512, 16, __attribute__((target("avx512f"))), "avx512f")
QWEN_DELTA_RULE_COPY(v3, 8, __attribute__((target("arch=x86-64-v3"))), "avx2")
#endif
QWEN_DELTA_RULE_COPY(baseline, 8, , "baseline")
#undef QWEN_DELTA_RULE_COPY

const DeltaRuleLoops& choose_loops() {
#ifdef QWEN_CPU_X86_COPIES
  __builtin_cpu_init();
  switch (kernel_level(__builtin_cpu_supports("avx512f"), __builtin_cpu_supports("x86-64-v3"))) {
    case KernelLevel::kWide: return avx512::loops;
    case KernelLevel::kAvx2: return v3::loops;
    default: break;
  }
#endif
  return baseline::loops;
}

const DeltaRuleLoops& loops() {
  static const DeltaRuleLoops& chosen = choose_loops();
  return chosen;
}

void small_gemm(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t m,
                int64_t n, int64_t p, bool accumulate) {
  loops().small_gemm(a, lda, b, ldb, c, ldc, m, n, p, accumulate);
}

}  // namespace

const char* delta_rule_loops() { return loops().name; }

const char* delta_rule_shape_error(const DeltaRuleShape& s) {
  if (s.nk <= 0 || s.nv <= 0 || s.nv % s.nk) return "value heads must be a multiple of key heads";
  if (s.dk <= 0 || s.dv <= 0 || s.kernel < 1) return "head sizes and the conv kernel must be positive";
  return "";
}

void gated_delta_rule(const float* proj, const float* conv_w, const float* past_conv, const float* past_state,
                      const float* dt_bias, const float* neg_exp_a, const float* norm_w, const DeltaRuleShape& s,
                      float* out, float* present_conv, float* present_state, const ParallelFor& parallel_for,
                      float* position_conv, float* position_state) {
  const int64_t B = s.batch, T = s.tokens, C = s.channels(), K = s.kernel, W = s.proj_width();
  const DeltaRuleLoops& f = loops();
  const int64_t keep = K - 1;
  if (T == 0) {  // no tokens: the states pass through
    std::copy_n(past_conv, B * C * keep, present_conv);
    std::copy_n(past_state, B * s.nv * s.dk * s.dv, present_state);
    return;
  }

  // 1. causal conv + SiLU, per sequence and block of channels. Position i of the window is the state's
  // input i for i < K-1, else this call's token i - (K-1). The results are stored head-major, each head's
  // T rows together ([q heads][k heads][v heads], each [T, width]), so step 2 reads every head's q, k and v
  // as contiguous rows where it used to copy them out of T rows of all C channels.
  // Decode-sized scratch is kept per thread (a decode step of a small model spent a tenth of its time in malloc
  // and free); a prefill's conv rows (T x C floats, 512 MB for 64K tokens of the small preset) are allocated
  // for the call only, uninitialised: every element is written below.
  thread_local std::vector<float> conv_buffer, conv_wt_buffer;
  std::unique_ptr<float[]> conv_rows;
  float* conv = B * T * C <= kKeptScratchFloats ? grow(conv_buffer, B * T * C)
                                                : (conv_rows.reset(new float[B * T * C]), conv_rows.get());
  // A call of several tokens transposes the conv weights to [K, C] once (a vector of channels one load for
  // every token); a one-token call (decode) reads them as given, [C, K], in order: in a model they come from
  // memory every step, and the transpose's strided pass took 11 of a small-preset decode layer's 58-70 us.
  const bool transposed = T > 1;
  float* conv_wt = nullptr;
  if (transposed) {
    conv_wt = grow(conv_wt_buffer, K * C);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = 0; j < K; ++j) conv_wt[j * C + c] = conv_w[c * K + j];
  }
  const int64_t qk_channels = 2 * s.nk * s.dk;
  // the first channel and the width of the head that holds channel c (q and k heads are dk wide, v heads dv)
  const auto head_of = [&](int64_t c) -> std::pair<int64_t, int64_t> {
    if (c < qk_channels) return {c / s.dk * s.dk, s.dk};
    return {qk_channels + (c - qk_channels) / s.dv * s.dv, s.dv};
  };
  const auto head_rows = [&](int64_t b, int64_t first) { return conv + b * T * C + first * T; };
  const float q_scale = 1.f / std::sqrt(static_cast<float>(s.dk));
  // blocks of whole key heads (q and k lead the channels), so each head's l2 norm is in one task
  const int64_t per_task = std::max(s.dk, 512 / s.dk * s.dk);
  const int64_t chunks = (C + per_task - 1) / per_task;
  for_work(parallel_for, B * T * C * K)(B * chunks, [&](int64_t task) {
    const int64_t b = task / chunks, c0 = (task % chunks) * per_task;
    const int64_t c1 = std::min(C, c0 + per_task);
    const float* state = past_conv + (b * C + c0) * keep;
    const float* x = proj + b * T * W + c0;
    for (int64_t c = c0; c < c1;) {  // the block's part of each head
      const auto [first, width] = head_of(c);
      const int64_t n = std::min(c1, first + width) - c;
      float* rows = head_rows(b, first) + (c - first);
      const float *wt = transposed ? conv_wt + c : conv_w + c * K, *window = state + (c - c0) * keep;
      f.conv_tokens(wt, transposed ? C : 1, transposed ? 1 : K, K, window, keep, x + (c - c0), W, T, n, rows, width);
      if (n == width) {
        silu_inplace(rows, T * width);
      } else {
        for (int64_t t = 0; t < T; ++t) silu_inplace(rows + t * width, n);
      }
      c += n;
    }
    // q and k l2-normed per key head (q also scaled by 1/sqrt(dk)), once for all value heads that read them
    for (int64_t head = c0 / s.dk; head < std::min(c1, qk_channels) / s.dk; ++head) {
      float* rows = head_rows(b, head * s.dk);
      for (int64_t t = 0; t < T; ++t) f.l2norm(rows + t * s.dk, s.dk, head < s.nk ? q_scale : 1.f);
    }
    // the conv state after token t - 1 holds window positions t .. t + keep - 1: the present one (t = T),
    // and where asked, the one after every token (t = 1 .. T)
    const auto window_after = [&](int64_t t, float* next) {
      for (int64_t c = 0; c < c1 - c0; ++c)
        for (int64_t i = 0; i < keep; ++i) {
          const int64_t at = t + i;  // window position
          next[c * keep + i] = at < keep ? state[c * keep + at] : x[(at - keep) * W + c];
        }
    };
    window_after(T, present_conv + (b * C + c0) * keep);
    if (position_conv != nullptr)
      for (int64_t t = 0; t < T; ++t) window_after(t + 1, position_conv + ((b * T + t) * C + c0) * keep);
  });

  // 2. the delta rule and the gated norm, per sequence and value head: tokens in order one at a time for
  // short calls (decode), in chunks of kChunk tokens (matrix products) for long ones (prefill)
  const int64_t group = s.nv / s.nk;
  const bool chunked = position_state == nullptr && use_chunks(T);  // the chunks keep no per-token states
  const int64_t L = chunked ? std::min(T, kChunk) : 1;
  // Work: 4 multiply-adds a state element a token (the decay, S^T k, the update, S^T q). Counted as one, the
  // small preset's decode step (16 heads of 64 x 64) ran on the caller's thread alone, its states cold from
  // memory after the weights streamed past; the trained model's (4 heads of 32 x 32) stays there.
  for_work(parallel_for, 4 * B * s.nv * s.dk * s.dv * T)(B * s.nv, [&](int64_t task) {
    const int64_t b = task / s.nv, h = task % s.nv, hk = h / group;
    float* state = present_state + (b * s.nv + h) * s.dk * s.dv;
    const float* from = past_state + (b * s.nv + h) * s.dk * s.dv;
    const float* q = head_rows(b, hk * s.dk);
    const float* k = head_rows(b, (s.nk + hk) * s.dk);
    const float* v = head_rows(b, qk_channels + h * s.dv);
    thread_local std::vector<float> head_buffer;
    const int64_t work_size = chunked ? 4 * L * s.dv + s.dk * L + 3 * L * L : 0;
    float* beta = grow(head_buffer, 2 * L + s.dv + work_size);
    float *g = beta + L, *kv = g + L, *work = kv + s.dv;
    if (chunked && from != state) std::copy_n(from, s.dk * s.dv, state);  // the chunks update S in place
    for (int64_t t0 = 0; t0 < T; t0 += L) {
      const int64_t n = std::min(L, T - t0);
      for (int64_t i = 0; i < n; ++i) {  // the chunk's beta and log decay
        const float* p = proj + (b * T + t0 + i) * W;
        beta[i] = sigmoid(p[C + s.nv * s.dv + h]);
        g[i] = neg_exp_a[h] * softplus(p[C + s.nv * s.dv + s.nv + h] + dt_bias[h]);
      }
      const float *qt = q + t0 * s.dk, *kt = k + t0 * s.dk, *vt = v + t0 * s.dv;
      float* o = out + (b * T + t0) * s.nv * s.dv + h * s.dv;  // the heads' outputs, normed in step 3
      if (chunked) {
        f.delta_chunk(state, qt, kt, vt, beta, g, n, s.dk, s.dv, o, s.nv * s.dv, work);
      } else {
        f.delta_step(t0 == 0 ? from : state, state, qt, kt, vt, std::exp(g[0]), beta[0], s.dk, s.dv, kv, o);
        if (position_state != nullptr)
          std::copy_n(state, s.dk * s.dv, position_state + ((b * T + t0) * s.nv + h) * s.dk * s.dv);
      }
    }
  });

  // 3. the gated RMSNorm of each head's output, a token at a time: its heads and its z are contiguous rows
  const int64_t row = s.nv * s.dv;
  for_work(parallel_for, B * T * row)(B * T, [&](int64_t bt) {
    float* y = out + bt * row;
    for (int64_t h = 0; h < s.nv; ++h) f.rms_norm(y + h * s.dv, s.dv, s.epsilon, norm_w, y + h * s.dv);
    mul_silu(y, proj + bt * W + C, y, row);  // * silu(z)
  });
}

}  // namespace qwen_cpu
