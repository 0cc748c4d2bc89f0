#include "attention/attention.h"
#include "common/exp_nonpositive.h"
#include "common/prefetch.h"
#include "common/forced_kernels.h"
#include "common/step_tokens.h"

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
  switch (kernel_level(detail::attention_cpu_has_avx512(), detail::attention_cpu_has_avx2())) {
    case KernelLevel::kWide: return detail::kLoopsAvx512;
    case KernelLevel::kAvx2: return detail::kLoopsAvx2;
    default: return detail::kLoopsPortable;
  }
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

// q[b, t, head] * scale, the query row as the score loops take it.
void scale_query(const Problem& p, int64_t b, int64_t t, int64_t head, float* dst) {
  const AttentionShape& s = p.s;
  const float* src = p.q + ((b * s.tokens + t) * s.num_heads + head) * s.head_dim;
  for (int64_t d = 0; d < s.head_dim; ++d) dst[d] = src[d] * s.scale;
}

// Row r of `run` (query token t) takes the n scores `sr` of keys [jb, jb + n): bias added, the running max
// and sum updated (what was summed under an older max rescaled), sr turned into exp(score - max).
void softmax_update(const Problem& p, int64_t b, int64_t t, int64_t jb, float* sr, int64_t n, int64_t r,
                    Running& run) {
  const detail::AttentionLoops& f = loops();
  const AttentionShape& s = p.s;
  const float* br = p.bias == nullptr ? nullptr
                    : p.bias + (b * (s.bias_per_token ? s.tokens : 1) + (s.bias_per_token ? t : 0)) * s.total() + jb;
  const float block_max = f.add_bias_max(sr, br, n);
  const float m_new = std::max(run.m[r], block_max);
  if (run.m[r] != kNegInf && run.m[r] != m_new) {  // rescale what was summed under the old max
    const float alpha = std::exp(run.m[r] - m_new);
    run.l[r] *= alpha;
    f.scale(run.acc.data() + r * s.head_dim, s.head_dim, alpha);
  }
  run.m[r] = m_new;
  run.l[r] += f.exp_sum(sr, n, m_new);
}

// Prefill tiles: rows r = (t - t0) * G + g (query token t, head h*G + g) over keys [0, S) of (b, h) in the
// present cache (complete: the past rows were copied first, or it is the past buffer), blocks of kKeyBlock.
void attend_tile(const Problem& p, int64_t b, int64_t h, int64_t t0, int64_t t1, Running& run) {
  const detail::AttentionLoops& f = loops();
  const AttentionShape& s = p.s;
  const int64_t hd = s.head_dim, G = s.group(), P = s.past, S = s.total(), rows = (t1 - t0) * G;
  std::vector<float> q(rows * hd), scores(rows * kKeyBlock), keys, values;  // keys, values: converted blocks
  for (int64_t t = t0; t < t1; ++t)  // gather and pre-scale this group's query rows
    for (int64_t g = 0; g < G; ++g) scale_query(p, b, t, h * G + g, q.data() + ((t - t0) * G + g) * hd);
  const int64_t last_key = std::min(S, P + t1);  // causal: no query of the tile sees beyond P + t1 - 1
  for (int64_t jb = 0; jb < last_key; jb += kKeyBlock) {
    const int64_t n = std::min(kKeyBlock, last_key - jb);
    const char* k_src = p.present_k + p.present_row(b, h, jb);
    const char* v_src = p.present_v + p.present_row(b, h, jb);
    const Half* kh = reinterpret_cast<const Half*>(k_src);
    if (!p.half) {
      f.scores(q.data(), rows, reinterpret_cast<const float*>(k_src), n, hd, scores.data(), kKeyBlock);
    } else if (!f.scores_half(q.data(), rows, kh, n, hd, scores.data(), kKeyBlock)) {
      keys.resize(kKeyBlock * hd);
      f.half_to_float(kh, keys.data(), n * hd);
      f.scores(q.data(), rows, keys.data(), n, hd, scores.data(), kKeyBlock);
    }
    bool any = false;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t t = t0 + r / G;
      float* sr = scores.data() + r * kKeyBlock;
      const int64_t visible = std::clamp<int64_t>(P + t + 1 - jb, 0, n);  // causal limit in this block
      if (visible == 0) {
        std::fill(sr, sr + n, 0.f);
        continue;
      }
      softmax_update(p, b, t, jb, sr, visible, r, run);
      std::fill(sr + visible, sr + n, 0.f);
      any = true;
    }
    if (any) {
      const Half* vh = reinterpret_cast<const Half*>(v_src);
      if (!p.half) {
        f.accumulate(scores.data(), rows, kKeyBlock, reinterpret_cast<const float*>(v_src), n, hd,
                     run.acc.data());
      } else if (!f.accumulate_half(scores.data(), rows, kKeyBlock, vh, n, hd, run.acc.data())) {
        values.resize(kKeyBlock * hd);
        f.half_to_float(vh, values.data(), n * hd);
        f.accumulate(scores.data(), rows, kKeyBlock, values.data(), n, hd, run.acc.data());
      }
    }
  }
}

// Calls one after another with the rows [jb, je) of (b, h)'s K and V caches: where the past rows are read
// from the past buffers (`copy`: separate past and present), those below P in one call and the new ones from
// the present buffers in a second. A score is computed for each key alone and the values are summed in key
// order, so where a block is cut changes no bit.
template <typename Fn>
void for_cache_rows(const Problem& p, int64_t b, int64_t h, int64_t jb, int64_t je, bool copy, Fn&& fn) {
  const int64_t cut = copy ? std::clamp(p.s.past, jb, je) : jb;
  if (cut > jb) fn(p.past_k + p.past_row(b, h, jb), p.past_v + p.past_row(b, h, jb), jb, cut - jb);
  if (je > cut) fn(p.present_k + p.present_row(b, h, cut), p.present_v + p.present_row(b, h, cut), cut, je - cut);
}

// One token's G rows (pre-scaled, contiguous in q) over keys [jb, je) of (b, h), one block of a decode range.
void decode_block(const Problem& p, int64_t b, int64_t h, int64_t t, int64_t jb, int64_t je, bool copy,
                  const float* q, float* scores, std::vector<float>& converted, Running& run) {
  const detail::AttentionLoops& f = loops();
  const int64_t hd = p.s.head_dim, G = p.s.group();
  for_cache_rows(p, b, h, jb, je, copy, [&](const char* k_src, const char*, int64_t j, int64_t n) {
    float* s = scores + (j - jb);
    const Half* kh = reinterpret_cast<const Half*>(k_src);
    if (!p.half) {
      f.scores(q, G, reinterpret_cast<const float*>(k_src), n, hd, s, kDecodeBlock);
    } else if (!f.scores_half(q, G, kh, n, hd, s, kDecodeBlock)) {
      converted.resize(kDecodeBlock * hd);
      f.half_to_float(kh, converted.data(), n * hd);
      f.scores(q, G, converted.data(), n, hd, s, kDecodeBlock);
    }
  });
  for (int64_t g = 0; g < G; ++g) softmax_update(p, b, t, jb, scores + g * kDecodeBlock, je - jb, g, run);
  for_cache_rows(p, b, h, jb, je, copy, [&](const char*, const char* v_src, int64_t j, int64_t n) {
    const float* w = scores + (j - jb);
    const Half* vh = reinterpret_cast<const Half*>(v_src);
    if (!p.half) {
      f.accumulate(w, G, kDecodeBlock, reinterpret_cast<const float*>(v_src), n, hd, run.acc.data());
    } else if (!f.accumulate_half(w, G, kDecodeBlock, vh, n, hd, run.acc.data())) {
      converted.resize(kDecodeBlock * hd);
      f.half_to_float(vh, converted.data(), n * hd);
      f.accumulate(w, G, kDecodeBlock, converted.data(), n, hd, run.acc.data());
    }
  });
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

// Keys per decode range of a token that sees S keys: at least kMinSplit, at most kMaxSplits ranges, whole
// blocks (so the tokens of a verify step mostly share one: it changes every 32768 keys).
int64_t decode_split(int64_t S) {
  const int64_t per = (S + kMaxSplits - 1) / kMaxSplits;
  return std::max(kMinSplit, (per + kDecodeBlock - 1) / kDecodeBlock * kDecodeBlock);
}

// Calls of fewer than kStepTokens tokens (decode, speculative verify): token t, at position P + t, runs what
// a one-token call there would, bit for bit: its keys split into ranges of decode_split(P + t + 1), one task
// per (sequence, kv head, range), partial max, sum and output per range combined after (flash decoding),
// blocks of kDecodeBlock from the range's start. The tokens that share a split share the tasks: each block
// is read from memory once, then from cache for the next token. With separate past and present buffers the
// first task over a block of past rows copies it into the present cache.
void decode(const Problem& p, const ParallelFor& parallel_for) {
  const AttentionShape& s = p.s;
  const detail::AttentionLoops& f = loops();
  const int64_t hd = s.head_dim, G = s.group(), P = s.past, T = s.tokens, heads = s.batch * s.kv_heads;
  for (int64_t bh = 0; bh < heads; ++bh) write_new_rows(p, bh / s.kv_heads, bh % s.kv_heads, 0, T);
  // groups of consecutive tokens with one split: [first token, split, ranges (of the group's last token)]
  struct Group { int64_t t0, t1, split, ranges; };
  std::vector<Group> groups;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t split = decode_split(P + t + 1);
    if (groups.empty() || groups.back().split != split) groups.push_back({t, t, split, 0});
    groups.back().t1 = t + 1;
    groups.back().ranges = (P + t + 1 + split - 1) / split;
  }
  // per (token, range, sequence x kv head): G maxima, G sums, G x hd outputs
  std::vector<int64_t> first_task(groups.size() + 1, 0), first_part(groups.size() + 1, 0);
  for (size_t i = 0; i < groups.size(); ++i) {
    first_task[i + 1] = first_task[i] + heads * groups[i].ranges;
    first_part[i + 1] = first_part[i] + heads * groups[i].ranges * (groups[i].t1 - groups[i].t0);
  }
  const int64_t part_size = G * (hd + 2);
  std::vector<float> partial(first_part.back() * part_size);
  const bool copy = !s.shared;
  parallel_for(first_task.back(), [&](int64_t task) {
    size_t gi = 0;
    while (task >= first_task[gi + 1]) ++gi;
    const Group& grp = groups[gi];
    const int64_t local = task - first_task[gi], bh = local / grp.ranges, range = local % grp.ranges;
    const int64_t b = bh / s.kv_heads, h = bh % s.kv_heads, n_tokens = grp.t1 - grp.t0;
    const int64_t j0 = range * grp.split, j1 = std::min(P + grp.t1, j0 + grp.split);
    std::vector<float> q(n_tokens * G * hd), scores(G * kDecodeBlock), converted;
    std::vector<Running> runs(n_tokens, Running(G, hd));
    for (int64_t t = grp.t0; t < grp.t1; ++t)
      for (int64_t g = 0; g < G; ++g) scale_query(p, b, t, h * G + g, q.data() + ((t - grp.t0) * G + g) * hd);
    const bool copies = copy && gi == 0;  // the first group's tasks cover every past row
    for (int64_t jb = j0; jb < j1; jb += kDecodeBlock) {
      const int64_t jw = std::min(jb + kDecodeBlock, j1);
      if (copies && jb < P) {
        const int64_t n = std::min(jw, P) - jb;
        f.stream_copy(p.present_k + p.present_row(b, h, jb), p.past_k + p.past_row(b, h, jb), n * hd * p.esize());
        f.stream_copy(p.present_v + p.present_row(b, h, jb), p.past_v + p.past_row(b, h, jb), n * hd * p.esize());
      }
      for (int64_t t = grp.t0; t < grp.t1; ++t) {
        const int64_t je = std::min(jw, P + t + 1);  // causal: token t sees keys up to P + t
        if (je > jb)
          decode_block(p, b, h, t, jb, je, copy, q.data() + (t - grp.t0) * G * hd, scores.data(), converted,
                       runs[t - grp.t0]);
      }
    }
    if (copies) f.store_fence();
    for (int64_t i = 0; i < n_tokens; ++i) {
      float* dst = partial.data() + (first_part[gi] + (i * heads + bh) * grp.ranges + range) * part_size;
      std::copy(runs[i].m.begin(), runs[i].m.end(), dst);
      std::copy(runs[i].l.begin(), runs[i].l.end(), dst + G);
      std::copy(runs[i].acc.begin(), runs[i].acc.end(), dst + 2 * G);
    }
  });
  std::vector<float> acc(hd);
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const Group& grp = groups[gi];
    for (int64_t t = grp.t0; t < grp.t1; ++t)
      for (int64_t bh = 0; bh < heads; ++bh) {
        // token t's ranges, in order (a range past its keys has no maximum: skipped)
        const float* parts = partial.data() + (first_part[gi] + ((t - grp.t0) * heads + bh) * grp.ranges) * part_size;
        for (int64_t g = 0; g < G; ++g) {  // combine the ranges: rescale each to the overall max
          float m = kNegInf, l = 0.f;
          for (int64_t i = 0; i < grp.ranges; ++i) m = std::max(m, parts[i * part_size + g]);
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int64_t i = 0; i < grp.ranges; ++i) {
            const float* part = parts + i * part_size;
            if (part[g] == kNegInf) continue;
            const float w = std::exp(part[g] - m);
            l += w * part[G + g];
            const float* a = part + 2 * G + g * hd;
            for (int64_t d = 0; d < hd; ++d) acc[d] += w * a[d];
          }
          store(p, bh / s.kv_heads, bh % s.kv_heads, t, g, acc.data(), l);
        }
      }
  }
}

void prefill(const Problem& p, const ParallelFor& parallel_for) {
  const AttentionShape& s = p.s;
  const int64_t hd = s.head_dim, G = s.group(), P = s.past, heads = s.batch * s.kv_heads;
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
    attend_tile(p, b, h, t0, t1, run);
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
  if (shape.tokens < kStepTokens)
    decode(p, parallel_for);
  else
    prefill(p, parallel_for);
}

}  // namespace qwen_cpu
