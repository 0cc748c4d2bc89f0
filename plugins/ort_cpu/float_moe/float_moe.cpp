#include "float_moe/float_moe.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/forced_kernels.h"
#include "common/vector_math.h"

namespace qwen_cpu {

namespace {

// x86: one copy of the dot loops per instruction set (x86-64-v4, AVX2 + FMA, the baseline), picked on first
// use by CPUID or narrowed by QWEN_CPU_KERNELS=avx2|portable (common/forced_kernels.h); elsewhere the plain
// build
#if defined(__x86_64__) && !defined(QWEN_CPU_PORTABLE_ONLY)
#define QWEN_CPU_X86_COPIES 1
#endif

// Eight floats: one ymm (AVX2, and AVX-512 cores that run 512-bit FMAs as two 256-bit halves anyway).
using Vec8 = float __attribute__((vector_size(32)));
using Vec4 = float __attribute__((vector_size(16)));

constexpr int64_t kRowBlock = 64;          // weight rows per task
constexpr int64_t kTokensPerPass = 512;    // tokens per pass (bounds the scratch)

__attribute__((always_inline)) inline float sum8(const Vec8& v) {  // a shuffle tree, not eight serial adds
  const Vec4 half = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  return (half[0] + half[2]) + (half[1] + half[3]);
}

// out[r][j] = a[r] . b[j] for R activation rows and J weight rows j (k contiguous floats each), each sum in
// kChains chains: chunk c of 8 floats goes to chain c % kChains, the chains are added at the end. One chain
// is one FMA a chunk, each behind the last one's latency (4 cycles), which caps a one-row pass at 8 bytes of
// weights a cycle per core; the AVX2 copy's two chains lift that cap (below). Always inlined, so each clone
// of its caller compiles it for its instruction set.
template <int R, int J, int kChains>
__attribute__((always_inline)) inline void dot_tile(const float* const* a, const float* b, int64_t k,
                                                    float out[][J]) {
  static_assert(kChains == 1 || kChains == 2);
  Vec8 acc[kChains][R][J] = {};
  const auto chunk = [&](int64_t d, Vec8(&sums)[R][J]) __attribute__((always_inline)) {
    Vec8 w[J];
    for (int j = 0; j < J; ++j) std::memcpy(&w[j], b + j * k + d, sizeof(Vec8));
    for (int r = 0; r < R; ++r) {
      Vec8 x;
      std::memcpy(&x, a[r] + d, sizeof(Vec8));
      for (int j = 0; j < J; ++j) sums[r][j] += x * w[j];
    }
  };
  const int64_t k8 = k - k % 8, whole = k8 - k8 % (8 * kChains);
  for (int64_t d = 0; d < whole; d += 8 * kChains)
    for (int c = 0; c < kChains; ++c) chunk(d + 8 * c, acc[c]);
  if (k8 > whole) chunk(whole, acc[0]);  // with two chains, one chunk at most: an odd count's last
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < J; ++j) {
      Vec8 total = acc[0][r][j];
      if constexpr (kChains == 2) total += acc[1][r][j];
      float sum = sum8(total);
      for (int64_t d = k8; d < k; ++d) sum += a[r][d] * b[j * k + d];
      out[r][j] = sum;
    }
}

// Up to this many activation rows take each weight row once, against all of them (below).
constexpr int64_t kOneStreamRows = 6;

// out[i][n - n0] = a[i] . w[n] for the `rows` activation rows a[i] and weight rows n in [n0, n1) (n1 - n0 a
// multiple of 4).
// - Up to kOneStreamRows rows (decode, and the experts of short prompts): the weight rows one after another,
//   each against every activation row. Each weight is read once, so the loop is bound by the memory stream,
//   and one sequential stream is what the hardware prefetcher follows best. One core of an AVX-512 EPYC,
//   one token on four of the small preset's experts: 25.1 GB/s, where eight weight rows a pass (eight
//   streams at once) read 18.6 and NumPy sums the same bytes at 24.0 (benchmarks/decode_ops.md).
// - More rows: four activation rows at a time against kTileCols weight rows: four (16 accumulators: the
//   FMAs, not the stream, bound it) where AVX-512 gives 32 registers; with 7 or 8 rows an expert the
//   one-stream loop was already slower there. The AVX2 copy takes one weight row at a time: 4 x 4 needs
//   21 of its 16 registers, and spilled, ran at less than half the speed. One layer of the small preset's
//   experts, 2 threads, AVX2-only EPYC: 64 tokens 10.4 -> 8.3-8.9 ms, 256 tokens 59 -> 26 ms, 2048 tokens
//   454 -> 187 ms (4 x 2 measured the same as 4 x 1; 2 x 4 slower still than 4 x 4).
// Every output sums in the same order whatever the tile, so a token gets the same bits alone or in a batch.
template <int kTileCols, int kChains>
__attribute__((always_inline)) inline void dot_rows_body(const float* const* a, int64_t rows, const float* w,
                                                        int64_t k, int64_t n0, int64_t n1, float* out,
                                                        int64_t ldo) {
  if (rows <= kOneStreamRows) {
    for (int64_t n = n0; n < n1; ++n) {
      float dot[kOneStreamRows][1];
      switch (rows) {
        case 6: dot_tile<6, 1, kChains>(a, w + n * k, k, dot); break;
        case 5: dot_tile<5, 1, kChains>(a, w + n * k, k, dot); break;
        case 4: dot_tile<4, 1, kChains>(a, w + n * k, k, dot); break;
        case 3: dot_tile<3, 1, kChains>(a, w + n * k, k, dot); break;
        case 2: dot_tile<2, 1, kChains>(a, w + n * k, k, dot); break;
        default: dot_tile<1, 1, kChains>(a, w + n * k, k, dot); break;
      }
      for (int64_t i = 0; i < rows; ++i) out[i * ldo + (n - n0)] = dot[i][0];
    }
    return;
  }
  for (int64_t i = 0; i < rows;) {
    const int64_t r = rows - i >= 4 ? 4 : rows - i >= 2 ? 2 : 1;
    for (int64_t n = n0; n < n1; n += kTileCols) {
      float tile[4][kTileCols];
      if (r == 4)
        dot_tile<4, kTileCols, kChains>(a + i, w + n * k, k, tile);
      else if (r == 2)
        dot_tile<2, kTileCols, kChains>(a + i, w + n * k, k, tile);
      else
        dot_tile<1, kTileCols, kChains>(a + i, w + n * k, k, tile);
      for (int64_t q = 0; q < r; ++q) std::memcpy(out + (i + q) * ldo + (n - n0), tile[q], sizeof(tile[q]));
    }
    i += r;
  }
}

using DotRows = void (*)(const float* const*, int64_t, const float*, int64_t, int64_t, int64_t, float*, int64_t);

// Each copy compiles the always-inlined body for its instruction set and tile width. x86-64-v4 and the
// baseline have the flags of the target_clones they replace (the same bits); the AVX2 copy adds FMA, which
// every AVX2 x86 core has (Haswell, Zen): the clone without it rounded each product before its add, two
// instructions where one does.
#define QWEN_DOT_ROWS_COPY(name, cols, chains, attributes)                                                    \
  attributes void name(const float* const* a, int64_t rows, const float* w, int64_t k, int64_t n0, int64_t n1, \
                       float* out, int64_t ldo) {                                                             \
    dot_rows_body<cols, chains>(a, rows, w, k, n0, n1, out, ldo);                                             \
  }
// The AVX2 copy sums in two chains: one token on four of the small preset's experts (64 of H 1024, I 256,
// fresh router logits every call, AVX2-only EPYC) took 396 -> 378 us on 2 threads and 726 -> 642 us on one,
// 64 tokens 8.4 -> 7.9 ms. With the x86-64-v4 copy's 4 x 4 tiles two chains need 32 accumulators of its 32
// registers; it keeps one (it is not measured here: this machine has no AVX-512).
#ifdef QWEN_CPU_X86_COPIES
QWEN_DOT_ROWS_COPY(dot_rows_v4, 4, 1, __attribute__((target("arch=x86-64-v4"))))
QWEN_DOT_ROWS_COPY(dot_rows_avx2, 1, 2, __attribute__((target("avx2,fma"))))
#endif
QWEN_DOT_ROWS_COPY(dot_rows_baseline, 4, 1, )
#undef QWEN_DOT_ROWS_COPY

struct DotRowsChoice {
  DotRows run;
  const char* name;
};

DotRowsChoice choose_dot_rows() {
#ifdef QWEN_CPU_X86_COPIES
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  switch (kernel_level(__builtin_cpu_supports("x86-64-v4"), avx2)) {
    case KernelLevel::kWide: return {dot_rows_v4, "x86-64-v4"};
    case KernelLevel::kAvx2: return {dot_rows_avx2, "avx2"};
    default: break;
  }
#endif
  return {dot_rows_baseline, "baseline"};
}

const DotRowsChoice& dot_rows_choice() {
  static const DotRowsChoice chosen = choose_dot_rows();
  return chosen;
}

void dot_rows(const float* const* a, int64_t rows, const float* w, int64_t k, int64_t n0, int64_t n1, float* out,
              int64_t ldo) {
  dot_rows_choice().run(a, rows, w, k, n0, n1, out, ldo);
}

// One pass over `tokens` tokens (x, logits and y start at the pass's first token).
void moe_pass(const float* x, const float* logits, const float* fc1, const float* fc2, const MoeShape& s,
              float* y, const ParallelFor& parallel_for, const float* shared_down) {
  const int64_t T = s.tokens, H = s.hidden, I = s.inter, E = s.experts, K = s.top_k, pairs = T * K;
  const int64_t S = s.shared_inter, stride = s.logits_stride();
  std::vector<int32_t> expert(pairs);
  std::vector<float> weight(pairs);
  route_top_k(logits, s, expert.data(), weight.data());
  // the (token, slot) pairs grouped by expert, in token order within an expert
  std::vector<int64_t> start(E + 1, 0), order(pairs);
  for (int64_t p = 0; p < pairs; ++p) ++start[expert[p] + 1];
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t p = 0; p < pairs; ++p) order[next[expert[p]]++] = p;
  }
  std::vector<int64_t> used;  // experts some token chose
  for (int64_t e = 0; e < E; ++e)
    if (start[e + 1] > start[e]) used.push_back(e);
  // 1. a = silu(gate) * up per pair (rows of `act` in grouped order), in tasks of (expert, 64 fc1 rows)
  std::vector<float> act(pairs * I);
  const int64_t blocks1 = (2 * I + kRowBlock - 1) / kRowBlock;
  parallel_for(static_cast<int64_t>(used.size()) * blocks1, [&](int64_t task) {
    const int64_t e = used[task / blocks1], n0 = (task % blocks1) * kRowBlock;
    const int64_t n1 = std::min(2 * I, n0 + kRowBlock), count = start[e + 1] - start[e];
    std::vector<const float*> rows(count);
    for (int64_t i = 0; i < count; ++i) rows[i] = x + (order[start[e] + i] / K) * H;
    std::vector<float> h(count * (n1 - n0));
    dot_rows(rows.data(), count, fc1 + e * 2 * I * H, H, n0, n1, h.data(), n1 - n0);
    std::vector<float> gate((n1 - n0) / 2);
    for (int64_t i = 0; i < count; ++i) {  // de-interleave the gates and ups, then up * silu(gate)
      const float* gate_up = h.data() + i * (n1 - n0);
      float* up = act.data() + (start[e] + i) * I + n0 / 2;
      for (int64_t c = 0; c < (n1 - n0) / 2; ++c) {
        gate[c] = gate_up[2 * c];
        up[c] = gate_up[2 * c + 1];
      }
      mul_silu(up, gate.data(), up, (n1 - n0) / 2);
    }
  });
  // the shared expert's activations, silu(gate) * up from its logits columns, in tasks of 64 tokens
  std::vector<float> shared_act(S * T), shared_out(S > 0 ? T * H : 0);
  parallel_for(S > 0 ? (T + kRowBlock - 1) / kRowBlock : 0, [&](int64_t task) {
    for (int64_t t = task * kRowBlock; t < std::min(T, (task + 1) * kRowBlock); ++t) {
      const float* gate = logits + t * stride + E;
      mul_silu(gate + S, gate, shared_act.data() + t * S, S);
    }
  });
  // 2. each pair's weighted expert output, in tasks of (expert, 64 fc2 rows); summed per token after, in
  // slot order. The shared expert's down projection is more tasks of 64 rows in the same hand-off.
  std::vector<float> out(pairs * H);
  const int64_t blocks2 = (H + kRowBlock - 1) / kRowBlock;
  const int64_t expert_tasks = static_cast<int64_t>(used.size()) * blocks2;
  parallel_for(expert_tasks + (S > 0 ? blocks2 : 0), [&](int64_t task) {
    if (task >= expert_tasks) {
      const int64_t n0 = (task - expert_tasks) * kRowBlock, n1 = std::min(H, n0 + kRowBlock);
      std::vector<const float*> rows(T);
      for (int64_t t = 0; t < T; ++t) rows[t] = shared_act.data() + t * S;
      std::vector<float> o(T * (n1 - n0));
      dot_rows(rows.data(), T, shared_down, S, n0, n1, o.data(), n1 - n0);
      for (int64_t t = 0; t < T; ++t) std::copy_n(o.data() + t * (n1 - n0), n1 - n0, shared_out.data() + t * H + n0);
      return;
    }
    const int64_t e = used[task / blocks2], n0 = (task % blocks2) * kRowBlock;
    const int64_t n1 = std::min(H, n0 + kRowBlock), count = start[e + 1] - start[e];
    std::vector<const float*> rows(count);
    for (int64_t i = 0; i < count; ++i) rows[i] = act.data() + (start[e] + i) * I;
    std::vector<float> o(count * (n1 - n0));
    dot_rows(rows.data(), count, fc2 + e * H * I, I, n0, n1, o.data(), n1 - n0);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t p = order[start[e] + i];
      for (int64_t c = n0; c < n1; ++c) out[p * H + c] = weight[p] * o[i * (n1 - n0) + c - n0];
    }
  });
  parallel_for(T, [&](int64_t t) {
    float* yt = y + t * H;
    std::copy_n(out.data() + t * K * H, H, yt);
    for (int64_t j = 1; j < K; ++j)
      for (int64_t c = 0; c < H; ++c) yt[c] += out[(t * K + j) * H + c];
    if (S > 0) {  // + shared * sigmoid(shared gate), as GatedAdd(routed, shared, Sigmoid(s)) did
      const float gate = 1.f / (1.f + std::exp(-logits[t * stride + E + 2 * S]));
      for (int64_t c = 0; c < H; ++c) yt[c] += shared_out[t * H + c] * gate;
    }
  });
}

}  // namespace

const char* float_moe_loops() { return dot_rows_choice().name; }

const char* float_moe_shape_error(const MoeShape& s) {
  if (s.top_k < 1 || s.top_k > s.experts) return "top_k must be in [1, experts]";
  if (s.hidden % 4 || s.inter % 2 || (2 * s.inter) % 4) return "hidden size must be a multiple of 4, expert size of 2";
  if (s.shared_inter < 0) return "the shared expert's size must not be negative";
  return "";
}

void float_moe(const float* x, const float* logits, const float* fc1, const float* fc2, const MoeShape& shape,
               float* y, const ParallelFor& parallel_for, const float* shared_down) {
  for (int64_t t0 = 0; t0 < shape.tokens; t0 += kTokensPerPass) {
    MoeShape part = shape;
    part.tokens = std::min(kTokensPerPass, shape.tokens - t0);
    moe_pass(x + t0 * shape.hidden, logits + t0 * shape.logits_stride(), fc1, fc2, part, y + t0 * shape.hidden,
             parallel_for, shared_down);
  }
}

}  // namespace qwen_cpu
