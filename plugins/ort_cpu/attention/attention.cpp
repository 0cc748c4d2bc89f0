#include "attention/attention.h"
#include "common/exp_nonpositive.h"
#include "common/forced_kernels.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

namespace qwen_cpu {

namespace detail {
namespace portable {
#include "attention/attention_loops.h"
}  // namespace portable

const AttentionLoops kLoopsPortable = portable::kLoops;
}  // namespace detail

namespace {

constexpr int64_t kKeyBlock = 64;      // prefill: keys per block (the blocked score loops take 64)
// decode: keys per block. Long blocks keep the reads of K and V sequential for longer; one 64K-key layer
// of the small preset (AVX-512, in place): 64 keys 5.4 ms, 256 4.9, 512 4.5, 1024 4.5, 2048 4.9.
constexpr int64_t kDecodeBlock = 512;
constexpr int64_t kQueryRows = 256;     // prefill: query rows (tokens x heads of one group) per tile
constexpr int64_t kMinSplit = 512;     // decode: fewest keys per task (below that the combine costs more)
constexpr int64_t kMaxSplits = 64;     // decode: most tasks per (sequence, kv head)
constexpr int64_t kCopyRows = 1024;    // prefill: cache rows per copy task
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

const detail::AttentionLoops& choose_loops() {
#ifdef QWEN_CPU_PORTABLE_ONLY  // built without the x86 files (another architecture)
  return detail::kLoopsPortable;
#else
  const ForcedKernels forced = forced_kernels();
  const bool portable = forced == ForcedKernels::kPortable;
  const bool avx2 = forced == ForcedKernels::kAvx2;
  if (portable) return detail::kLoopsPortable;
  if (!avx2 && detail::attention_cpu_has_avx512()) return detail::kLoopsAvx512;
  return detail::attention_cpu_has_avx2() ? detail::kLoopsAvx2 : detail::kLoopsPortable;
#endif
}

const detail::AttentionLoops& loops() {
  static const detail::AttentionLoops& chosen = choose_loops();
  return chosen;
}

// One call's tensors and shape; the cache element is 4 (float) or 2 (float16) bytes.
struct Problem {
  const float *q, *k, *v, *bias;
  const char *past_k, *past_v;
  char *present_k, *present_v;
  AttentionShape s;
  bool half;
  float* out;

  int64_t esize() const { return half ? 2 : 4; }
  // byte offset of row j of (b, h) in a cache of `length` rows per (b, h)
  int64_t row(int64_t b, int64_t h, int64_t j, int64_t length) const {
    return (((b * s.kv_heads + h) * length) + j) * s.head_dim * esize();
  }
  int64_t past_row(int64_t b, int64_t h, int64_t j) const { return row(b, h, j, s.past_rows); }
  int64_t present_row(int64_t b, int64_t h, int64_t j) const { return row(b, h, j, s.present_rows); }
};

// The running softmax of `rows` query rows: max, sum and unnormalised output.
struct Running {
  std::vector<float> m, l, acc;
  explicit Running(int64_t rows, int64_t hd) : m(rows, kNegInf), l(rows, 0.f), acc(rows * hd, 0.f) {}
};

// Rows r = (t - t0) * G + g (query token t, head h*G + g) over keys [j0, j1) of (b, h), `block` keys at a
// time. With `copy`, each block of past rows is copied into the present cache as it is read (decode,
// separate buffers); else the keys are read from the present cache, already complete (prefill, or one
// shared buffer).
void attend(const Problem& p, int64_t b, int64_t h, int64_t t0, int64_t t1, int64_t j0, int64_t j1, int64_t block,
            bool copy, Running& run) {
  const detail::AttentionLoops& f = loops();
  const AttentionShape& s = p.s;
  const int64_t hd = s.head_dim, G = s.group(), P = s.past, S = s.total(), rows = (t1 - t0) * G;
  std::vector<float> q(rows * hd), scores(rows * block), keys, values;  // keys, values: converted blocks
  for (int64_t t = t0; t < t1; ++t)  // gather and pre-scale this group's query rows
    for (int64_t g = 0; g < G; ++g) {
      const float* src = p.q + ((b * s.tokens + t) * s.num_heads + h * G + g) * hd;
      float* dst = q.data() + ((t - t0) * G + g) * hd;
      for (int64_t d = 0; d < hd; ++d) dst[d] = src[d] * s.scale;
    }
  const int64_t last_key = std::min(j1, P + t1);  // causal: no query of the tile sees beyond P + t1 - 1
  for (int64_t jb = j0; jb < last_key;) {
    // a block never straddles P: past rows come from the past cache, new rows from the present one
    const int64_t je = std::min({jb + block, last_key, jb < P ? P : last_key});
    const int64_t n = je - jb;
    const bool from_past = copy && jb < P;
    const char* k_src = from_past ? p.past_k + p.past_row(b, h, jb) : p.present_k + p.present_row(b, h, jb);
    const char* v_src = from_past ? p.past_v + p.past_row(b, h, jb) : p.present_v + p.present_row(b, h, jb);
    if (from_past) {
      f.stream_copy(p.present_k + p.present_row(b, h, jb), k_src, n * hd * p.esize());
      f.stream_copy(p.present_v + p.present_row(b, h, jb), v_src, n * hd * p.esize());
    }
    const Half* kh = reinterpret_cast<const Half*>(k_src);
    if (!p.half) {
      f.scores(q.data(), rows, reinterpret_cast<const float*>(k_src), n, hd, scores.data(), block);
    } else if (!f.scores_half(q.data(), rows, kh, n, hd, scores.data(), block)) {
      keys.resize(block * hd);
      f.half_to_float(kh, keys.data(), n * hd);
      f.scores(q.data(), rows, keys.data(), n, hd, scores.data(), block);
    }
    bool any = false;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = t0 + r / G;
      float* sr = scores.data() + r * block;
      const int64_t visible = std::clamp<int64_t>(P + t + 1 - jb, 0, n);  // causal limit in this block
      if (visible == 0) {
        std::fill(sr, sr + n, 0.f);
        continue;
      }
      const float* br = p.bias == nullptr ? nullptr
                        : p.bias + (b * (s.bias_per_token ? s.tokens : 1) + (s.bias_per_token ? t : 0)) * S + jb;
      const float block_max = f.add_bias_max(sr, br, visible);
      const float m_new = std::max(run.m[r], block_max);
      if (run.m[r] != kNegInf && run.m[r] != m_new) {  // rescale what was summed under the old max
        const float alpha = std::exp(run.m[r] - m_new);
        run.l[r] *= alpha;
        f.scale(run.acc.data() + r * hd, hd, alpha);
      }
      run.m[r] = m_new;
      run.l[r] += f.exp_sum(sr, visible, m_new);
      std::fill(sr + visible, sr + n, 0.f);
      any = true;
    }
    if (any) {
      const Half* vh = reinterpret_cast<const Half*>(v_src);
      if (!p.half) {
        f.accumulate(scores.data(), rows, block, reinterpret_cast<const float*>(v_src), n, hd, run.acc.data());
      } else if (!f.accumulate_half(scores.data(), rows, block, vh, n, hd, run.acc.data())) {
        values.resize(block * hd);
        f.half_to_float(vh, values.data(), n * hd);
        f.accumulate(scores.data(), rows, block, values.data(), n, hd, run.acc.data());
      }
    }
    jb = je;
  }
  if (copy)  // a task whose range ends before P still owns the copy of the rest of it
    for (int64_t jb = std::max(last_key, j0); jb < std::min(j1, P); jb += block) {
      const int64_t n = std::min(jb + block, std::min(j1, P)) - jb;
      f.stream_copy(p.present_k + p.present_row(b, h, jb), p.past_k + p.past_row(b, h, jb), n * hd * p.esize());
      f.stream_copy(p.present_v + p.present_row(b, h, jb), p.past_v + p.past_row(b, h, jb), n * hd * p.esize());
    }
  if (copy) f.store_fence();
}

// present[b, h, P + t] = k[b, t, h] (converted to float16 for a half cache), for tokens [t0, t1).
void write_new_rows(const Problem& p, int64_t b, int64_t h, int64_t t0, int64_t t1) {
  const detail::AttentionLoops& f = loops();
  const AttentionShape& s = p.s;
  const int64_t hd = s.head_dim;
  for (int64_t t = t0; t < t1; ++t) {
    const float* ks = p.k + ((b * s.tokens + t) * s.kv_heads + h) * hd;
    const float* vs = p.v + ((b * s.tokens + t) * s.kv_heads + h) * hd;
    char* kd = p.present_k + p.present_row(b, h, s.past + t);
    char* vd = p.present_v + p.present_row(b, h, s.past + t);
    if (p.half) {
      f.float_to_half(ks, reinterpret_cast<Half*>(kd), hd);
      f.float_to_half(vs, reinterpret_cast<Half*>(vd), hd);
    } else {
      std::memcpy(kd, ks, hd * sizeof(float));
      std::memcpy(vd, vs, hd * sizeof(float));
    }
  }
}

void store(const Problem& p, int64_t b, int64_t h, int64_t t0, int64_t row, const float* acc, float l) {
  const AttentionShape& s = p.s;
  const int64_t hd = s.head_dim, G = s.group(), t = t0 + row / G, g = row % G;
  float* dst = p.out + ((b * s.tokens + t) * s.num_heads + h * G + g) * hd;
  const float inv = 1.f / l;
  for (int64_t d = 0; d < hd; ++d) dst[d] = acc[d] * inv;
}

void decode(const Problem& p, const ParallelFor& parallel_for) {
  const AttentionShape& s = p.s;
  const int64_t hd = s.head_dim, G = s.group(), S = s.total(), heads = s.batch * s.kv_heads;
  for (int64_t bh = 0; bh < heads; ++bh) write_new_rows(p, bh / s.kv_heads, bh % s.kv_heads, 0, 1);
  const int64_t split = std::max(kMinSplit, (S + kMaxSplits - 1) / kMaxSplits);
  const int64_t splits = (S + split - 1) / split;
  // per task: G maxima, G sums, G x hd outputs
  std::vector<float> partial(heads * splits * G * (hd + 2));
  parallel_for(heads * splits, [&](int64_t task) {
    const int64_t bh = task / splits, j0 = (task % splits) * split, j1 = std::min(S, j0 + split);
    Running run(G, hd);
    attend(p, bh / s.kv_heads, bh % s.kv_heads, 0, 1, j0, j1, kDecodeBlock, !s.shared, run);
    float* dst = partial.data() + task * G * (hd + 2);
    std::copy(run.m.begin(), run.m.end(), dst);
    std::copy(run.l.begin(), run.l.end(), dst + G);
    std::copy(run.acc.begin(), run.acc.end(), dst + 2 * G);
  });
  std::vector<float> acc(hd);
  for (int64_t bh = 0; bh < heads; ++bh)
    for (int64_t g = 0; g < G; ++g) {  // combine the ranges: rescale each to the overall max
      float m = kNegInf, l = 0.f;
      for (int64_t i = 0; i < splits; ++i) m = std::max(m, partial[(bh * splits + i) * G * (hd + 2) + g]);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t i = 0; i < splits; ++i) {
        const float* part = partial.data() + (bh * splits + i) * G * (hd + 2);
        if (part[g] == kNegInf) continue;
        const float w = std::exp(part[g] - m);
        l += w * part[G + g];
        const float* a = part + 2 * G + g * hd;
        for (int64_t d = 0; d < hd; ++d) acc[d] += w * a[d];
      }
      store(p, bh / s.kv_heads, bh % s.kv_heads, 0, g, acc.data(), l);
    }
}

void prefill(const Problem& p, const ParallelFor& parallel_for) {
  const AttentionShape& s = p.s;
  const int64_t hd = s.head_dim, G = s.group(), P = s.past, S = s.total(), heads = s.batch * s.kv_heads;
  const detail::AttentionLoops& f = loops();
  // 1. the present caches: past rows copied in chunks (separate buffers), then this call's rows written
  const int64_t copies = s.shared ? 0 : (P + kCopyRows - 1) / kCopyRows;
  const int64_t chunks = copies + 1;  // the last chunk of each head: the new rows
  parallel_for(heads * chunks, [&](int64_t task) {
    const int64_t bh = task / chunks, c = task % chunks, b = bh / s.kv_heads, h = bh % s.kv_heads;
    if (c == chunks - 1) return write_new_rows(p, b, h, 0, s.tokens);
    const int64_t j0 = c * kCopyRows, n = std::min(P, j0 + kCopyRows) - j0;
    f.stream_copy(p.present_k + p.present_row(b, h, j0), p.past_k + p.past_row(b, h, j0), n * hd * p.esize());
    f.stream_copy(p.present_v + p.present_row(b, h, j0), p.past_v + p.past_row(b, h, j0), n * hd * p.esize());
    f.store_fence();
  });
  // 2. tiles of query tokens (all G heads of a kv head together) over the keys they may see
  const int64_t tile = std::max<int64_t>(1, kQueryRows / G), tiles = (s.tokens + tile - 1) / tile;
  parallel_for(heads * tiles, [&](int64_t task) {
    const int64_t bh = task / tiles, b = bh / s.kv_heads, h = bh % s.kv_heads;
    const int64_t t0 = (task % tiles) * tile, t1 = std::min(s.tokens, t0 + tile);
    Running run((t1 - t0) * G, hd);
    attend(p, b, h, t0, t1, 0, S, kKeyBlock, false, run);
    for (int64_t r = 0; r < (t1 - t0) * G; ++r) store(p, b, h, t0, r, run.acc.data() + r * hd, run.l[r]);
  });
}

}  // namespace

const char* attention_shape_error(const AttentionShape& s) {
  if (s.num_heads <= 0 || s.kv_heads <= 0 || s.head_dim <= 0)
    return "num_heads, kv_num_heads and head size must be positive";
  if (s.num_heads % s.kv_heads) return "num_heads must be a multiple of kv_num_heads";
  return "";
}

const char* attention_backend() {
#ifdef QWEN_CPU_PORTABLE_ONLY
  return "portable";
#else
  const detail::AttentionLoops& chosen = loops();
  return &chosen == &detail::kLoopsPortable ? "portable" : &chosen == &detail::kLoopsAvx2 ? "avx2" : "avx512";
#endif
}

void attention(const float* q, const float* k, const float* v, const void* past_k, const void* past_v,
               const float* bias, const AttentionShape& shape, bool half_cache, float* out, void* present_k,
               void* present_v, const ParallelFor& parallel_for) {
  const Problem p{q, k, v, bias, static_cast<const char*>(past_k), static_cast<const char*>(past_v),
                  static_cast<char*>(present_k), static_cast<char*>(present_v), shape, half_cache, out};
  if (!shape.shared && shape.present_rows > shape.total()) {  // rows past S of a grown buffer: zeros, not junk
    const int64_t rows = shape.present_rows - shape.total(), bytes = rows * shape.head_dim * p.esize();
    for (int64_t bh = 0; bh < shape.batch * shape.kv_heads; ++bh) {
      std::memset(p.present_k + p.present_row(bh / shape.kv_heads, bh % shape.kv_heads, shape.total()), 0, bytes);
      std::memset(p.present_v + p.present_row(bh / shape.kv_heads, bh % shape.kv_heads, shape.total()), 0, bytes);
    }
  }
  if (shape.batch == 0 || shape.tokens == 0) {  // nothing to attend; the valid rows still carry over
    if (shape.shared) return;
    for (int64_t bh = 0; bh < shape.batch * shape.kv_heads; ++bh) {
      const int64_t b = bh / shape.kv_heads, h = bh % shape.kv_heads, bytes = shape.past * shape.head_dim * p.esize();
      std::memcpy(p.present_k + p.present_row(b, h, 0), p.past_k + p.past_row(b, h, 0), bytes);
      std::memcpy(p.present_v + p.present_row(b, h, 0), p.past_v + p.past_row(b, h, 0), bytes);
    }
    return;
  }
  if (shape.tokens == 1)
    decode(p, parallel_for);
  else
    prefill(p, parallel_for);
}

}  // namespace qwen_cpu
