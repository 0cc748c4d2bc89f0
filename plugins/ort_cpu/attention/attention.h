// Causal softmax attention over a KV cache on the CPU: the header-free core of the qwen.cpu Attention and
// AttentionKv16 kernels (no ONNX Runtime types here).
//
//   present_k[b, h, :S] = concat(past_k[b, h, :P], k[b, :, h]);  present_v likewise       (S = P + T keys)
//   out[b, t, n]    = softmax_j(scale * q[b, t, n] . present_k[b, n/G, j] + bias[b, t, j]) present_v[b, n/G, j]
//                     over keys j <= P + t                                             (G = nh / kv)
//
// q [B, T, nh*hd], k and v [B, T, kv*hd], bias [B, 1, T or 1, S] (0 for a real key, a large negative number
// for padding). The past caches [B, kv, C, hd] hold P <= C valid rows (C > P: a buffer with room to grow);
// the present ones have max(C, S) rows. When present is the past buffer itself (the runtime binds one
// buffer to both), only the T new rows are written: the step reads the cache once and writes one row.
// The caches hold float or float16 (AttentionKv16); the arithmetic is fp32 either way. The G query heads
// of one kv head share one pass over its keys.
//
// Decode (T < kStepTokens, common/step_tokens.h) splits each (sequence, kv head)'s keys into ranges, one task
// each (partial max, sum and output per range, combined after: flash decoding), every token as a one-token
// call at its position would, bit for bit; with separate buffers the tasks copy their range of the past
// cache into the present one as they read it. Prefill copies first (separate buffers), then runs tiles of
// queries over blocks of keys.
#pragma once

#include <cstdint>

#include "common/parallel.h"

namespace qwen_cpu {

struct AttentionShape {
  int64_t batch = 0, tokens = 0, past = 0;  // B, T, P
  int64_t past_rows = 0, present_rows = 0;  // C >= P rows per (b, h) of the past caches, max(C, S) of the present
  bool shared = false;                      // present is the past buffer: only the new rows are written
  int64_t num_heads = 0, kv_heads = 0, head_dim = 0;
  float scale = 1.f;
  bool bias_per_token = true;  // bias [B, 1, T, S]; else [B, 1, 1, S] for every query

  int64_t total() const { return past + tokens; }
  int64_t group() const { return num_heads / kv_heads; }
};

// Returns an empty string or why the shape is not supported.
const char* attention_shape_error(const AttentionShape& shape);

using Half = uint16_t;  // IEEE float16 bits

// Caches as float (half_cache false) or float16 bits (half_cache true); bias may be null (no padding).
void attention(const float* q, const float* k, const float* v, const void* past_k, const void* past_v,
               const float* bias, const AttentionShape& shape, bool half_cache, float* out, void* present_k,
               void* present_v, const ParallelFor& parallel_for);

// Which inner loops run: "avx512", else "avx2", else "portable" (CPUID; QWEN_CPU_KERNELS=avx2|portable
// forces a slower one). They differ only in the order of float sums.
const char* attention_backend();

namespace detail {
// The inner loops, one set per instruction set (attention_loops.h compiled three times).
struct AttentionLoops {
  // s[r * ld + j] = q[r] . keys[j] (+ bias[j] if bias) for rows r < rows, keys j < count; q rows contiguous.
  void (*scores)(const float* q, int64_t rows, const float* keys, int64_t count, int64_t hd, float* s,
                 int64_t ld);
  // acc[r] += sum_j p[r * ld + j] * values[j] for r < rows, j < count.
  void (*accumulate)(const float* p, int64_t rows, int64_t ld, const float* values, int64_t count, int64_t hd,
                     float* acc);
  // The two above over float16 keys / values, converted as they are loaded; false where they do not apply
  // (prefill tiles, odd head sizes, the portable loops): the caller converts a block and runs the above.
  bool (*scores_half)(const float* q, int64_t rows, const Half* keys, int64_t count, int64_t hd, float* s,
                      int64_t ld);
  bool (*accumulate_half)(const float* p, int64_t rows, int64_t ld, const Half* values, int64_t count,
                          int64_t hd, float* acc);
  // s += bias (where bias is not null), returns the largest of the n values.
  float (*add_bias_max)(float* s, const float* bias, int64_t n);
  // p = exp(s - max) in place, returns the sum (n values).
  float (*exp_sum)(float* s, int64_t n, float max);
  // x *= alpha (n values).
  void (*scale)(float* x, int64_t n, float alpha);
  void (*half_to_float)(const Half* x, float* y, int64_t n);
  void (*float_to_half)(const float* x, Half* y, int64_t n);
  // dst = src, bytes a multiple of 4; non-temporal stores where the ISA has them and dst is aligned (the
  // present cache is not read again this step: keep it out of the caches, skip the read-for-ownership).
  void (*stream_copy)(void* dst, const void* src, int64_t bytes);
  // Orders this thread's streamed stores before what follows (once per task: a fence per block stalls on
  // the write-combining buffers).
  void (*store_fence)();
};
extern const AttentionLoops kLoopsPortable;
extern const AttentionLoops kLoopsAvx2;
extern const AttentionLoops kLoopsAvx512;
bool attention_cpu_has_avx512();
bool attention_cpu_has_avx2();
}  // namespace detail

}  // namespace qwen_cpu
