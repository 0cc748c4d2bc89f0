#include "int4_moe/int4_moe.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "common/scratch.h"
#include "common/vector_math.h"

namespace qwen_cpu {

namespace {

constexpr int64_t kGroupsPerTask = 8;  // 128 output rows: tasks small enough to balance two threads
constexpr int64_t kRowsPerTask = 16;   // rows per task of the elementwise steps (prefill has thousands)
constexpr int64_t kFusedRows = 32;       // from this many expert rows on, the fused per-expert blocks
constexpr int64_t kFusedRowBlock = 64;   // rows of one fused task (at most)
constexpr int64_t kTokensPerPass = 1024; // tokens per pass (bounds the scratch)

struct Slot {
  int64_t token;
  int64_t slot;
};

}  // namespace

const char* moe_shape_error(const MoeShape& s) {
  if (s.top_k < 1 || s.top_k > s.experts) return "top_k must be in [1, experts]";
  if (s.fc1_block % 32 || s.fc2_block % 32) return "blocks must be multiples of 32";
  if (s.hidden % s.fc1_block) return "hidden size must be a multiple of the fc1 block";
  if (s.inter % s.fc2_block) return "expert size must be a multiple of the fc2 block";
  if (s.hidden % kGroupRows || (2 * s.inter) % kGroupRows) return "hidden and 2*expert sizes must be multiples of 16";
  if (s.shared_inter < 0 || (s.shared_inter > 0 && (s.shared_block % 32 || s.shared_inter % s.shared_block)))
    return "the shared expert's size must be a multiple of its block, a multiple of 32";
  return "";
}

void route_top_k(const float* logits, const MoeShape& shape, int32_t* experts, float* weights) {
  thread_local std::vector<float> p_buffer;
  thread_local std::vector<int32_t> order_buffer;
  float* p = grow(p_buffer, shape.experts);
  int32_t* order = grow(order_buffer, shape.experts);
  for (int64_t t = 0; t < shape.tokens; ++t) {
    const float* row = logits + t * shape.logits_stride();
    const float top = *std::max_element(row, row + shape.experts);
    float total = 0.f;
    for (int64_t e = 0; e < shape.experts; ++e) total += p[e] = std::exp(row[e] - top);
    for (int64_t e = 0; e < shape.experts; ++e) p[e] /= total;
    std::iota(order, order + shape.experts, 0);
    std::partial_sort(order, order + shape.top_k, order + shape.experts,
                      [&](int32_t a, int32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
    float chosen = 0.f;
    for (int64_t j = 0; j < shape.top_k; ++j) chosen += p[order[j]];
    for (int64_t j = 0; j < shape.top_k; ++j) {
      experts[t * shape.top_k + j] = order[j];
      weights[t * shape.top_k + j] = shape.normalize ? p[order[j]] / chosen : p[order[j]];
    }
  }
}

namespace {

// One pass of int4_moe over `tokens` tokens (x, logits and y start at the pass's first token).
void moe_pass(const float* x, const float* logits, const uint8_t* fc1, const Half* fc1_scales, const uint8_t* fc2,
              const Half* fc2_scales, const MoeShape& s, float* y, const ParallelFor& parallel_for,
              const SharedDown& shared) {
  const int64_t H = s.hidden, I = s.inter, T = s.tokens, K = s.top_k, rows = T * K;
  const int64_t S = s.shared_inter, stride = s.logits_stride(), bs = S > 0 ? S / s.shared_block : 0;
  const int64_t b1 = H / s.fc1_block, b2 = I / s.fc2_block;
  // each elementwise step runs over independent rows in tasks of kRowsPerTask
  auto over_rows = [&](int64_t count, const std::function<void(int64_t, int64_t)>& body) {
    for_work(parallel_for, count * H)((count + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task) {
      body(task * kRowsPerTask, std::min(count, (task + 1) * kRowsPerTask));
    });
  };
  // scratch of the calling thread, reused by every call (a pass holds at most kTokensPerPass tokens)
  thread_local std::vector<int32_t> chosen_buffer, xz_buffer, rz_buffer;
  thread_local std::vector<float> weight_buffer, xs_buffer, rs_buffer, out_buffer;
  thread_local std::vector<int8_t> xq_buffer, rq_buffer;
  thread_local std::vector<int64_t> row_of_buffer, start_buffer, next_buffer;
  thread_local std::vector<Slot> slots_buffer;
  thread_local std::vector<int32_t> active_buffer;
  int32_t* chosen = grow(chosen_buffer, rows);
  float* weight = grow(weight_buffer, rows);
  over_rows(T, [&](int64_t t0, int64_t t1) {
    MoeShape part = s;
    part.tokens = t1 - t0;
    route_top_k(logits + t0 * stride, part, chosen + t0 * K, weight + t0 * K);
  });

  // rows of the expert products, grouped by expert (tokens in order within an expert)
  int64_t* start = grow(start_buffer, s.experts + 1);
  std::fill(start, start + s.experts + 1, 0);
  for (int64_t r = 0; r < rows; ++r) ++start[chosen[r] + 1];
  std::partial_sum(start, start + s.experts + 1, start);
  Slot* slots = grow(slots_buffer, rows);
  int64_t* row_of = grow(row_of_buffer, rows);  // (token, slot) -> row
  {
    int64_t* next = grow(next_buffer, s.experts);
    std::copy_n(start, s.experts, next);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < K; ++j) {
        const int64_t r = next[chosen[t * K + j]]++;
        slots[r] = {t, j};
        row_of[t * K + j] = r;
      }
  }
  std::vector<int32_t>& active = active_buffer;
  active.clear();
  for (int64_t e = 0; e < s.experts; ++e)
    if (start[e + 1] > start[e]) active.push_back(static_cast<int32_t>(e));

  // x quantized once per token, then copied to each row that reads it
  int8_t* xq = grow(xq_buffer, T * H);
  int8_t* rq = grow(rq_buffer, rows * H);
  float* xs = grow(xs_buffer, T * b1);
  float* rs = grow(rs_buffer, rows * b1);
  int32_t* xz = grow(xz_buffer, T * b1);
  int32_t* rz = grow(rz_buffer, rows * b1);
  quantize_rows_parallel(x, T, H, s.fc1_block, xq, xs, xz, parallel_for);
  over_rows(rows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = slots[r].token;
      std::copy_n(xq + t * H, H, rq + r * H);
      std::copy_n(xs + t * b1, b1, rs + r * b1);
      std::copy_n(xz + t * b1, b1, rz + r * b1);
    }
  });

  // the shared expert's fc2 activations, silu(gate) * up from its logits columns, quantized per token
  thread_local std::vector<int8_t> sq_buffer;
  thread_local std::vector<float> ss_buffer, shared_out_buffer;
  thread_local std::vector<int32_t> sz_buffer;
  int8_t* sq = S > 0 ? grow(sq_buffer, T * S) : nullptr;
  float* ss = S > 0 ? grow(ss_buffer, T * bs) : nullptr;
  int32_t* sz = S > 0 ? grow(sz_buffer, T * bs) : nullptr;
  float* shared_out = S > 0 ? grow(shared_out_buffer, T * H) : nullptr;
  if (S > 0)
    over_rows(T, [&](int64_t t0, int64_t t1) {
      thread_local std::vector<float> act_buffer;
      float* act = grow(act_buffer, S);
      for (int64_t t = t0; t < t1; ++t) {
        const float* gate = logits + t * stride + s.experts;
        mul_silu(gate + S, gate, act, S);
        quantize_rows(act, 1, S, s.shared_block, sq + t * S, ss + t * bs, sz + t * bs);
      }
    });
  const QuantizedRows shared_rows{sq, ss, sz};

  const int64_t g1 = 2 * I / kGroupRows, g2 = H / kGroupRows;
  const int64_t expert1_bytes = g1 * packed_group_bytes(H), expert1_scales = g1 * group_scales(H, s.fc1_block);
  const int64_t expert2_bytes = g2 * packed_group_bytes(I), expert2_scales = g2 * group_scales(I, s.fc2_block);
  float* out = grow(out_buffer, rows * H);
  // silu(gate) * up from the interleaved rows h [count, 2I], quantized: the fc2 activations of `count` rows
  auto activate = [&](const float* h, int64_t count, int8_t* aq, float* as, int32_t* az) {
    thread_local std::vector<float> gate_buffer, act_buffer;
    float* gate = grow(gate_buffer, I);
    float* act = grow(act_buffer, I);
    for (int64_t r = 0; r < count; ++r) {
      const float* hr = h + r * 2 * I;
      for (int64_t i = 0; i < I; ++i) {
        gate[i] = hr[2 * i];
        act[i] = hr[2 * i + 1];
      }
      mul_silu(act, gate, act, I);
      quantize_rows(act, 1, I, s.fc2_block, aq + r * I, as + r * b2, az + r * b2);
    }
  };

  if (rows >= kFusedRows) {
    // prefill: one task = one expert x a block of its rows, fc1 -> silu * up -> fc2 with the block's
    // intermediates in the task's own scratch (they stay in cache; the expert's weights are read once a block)
    struct Block {
      int64_t expert, r0, r1;
    };
    std::vector<Block> blocks;
    for (const int32_t e : active) {
      const int64_t n = start[e + 1] - start[e], count = (n + kFusedRowBlock - 1) / kFusedRowBlock;
      const int64_t step = (n + count - 1) / count;
      for (int64_t r = start[e]; r < start[e + 1]; r += step) blocks.push_back({e, r, std::min(start[e + 1], r + step)});
    }
    parallel_for(static_cast<int64_t>(blocks.size()), [&](int64_t task) {
      const Block& blk = blocks[task];
      const int64_t count = blk.r1 - blk.r0;
      thread_local std::vector<float> h_buffer, as_buffer;
      thread_local std::vector<int8_t> aq_buffer;
      thread_local std::vector<int32_t> az_buffer;
      float* h = grow(h_buffer, count * 2 * I);
      int8_t* aq = grow(aq_buffer, count * I);
      float* as = grow(as_buffer, count * b2);
      int32_t* az = grow(az_buffer, count * b2);
      const QuantizedRows in{rq + blk.r0 * H, rs + blk.r0 * b1, rz + blk.r0 * b1};
      int4_gemm(in, count, H, s.fc1_block, fc1 + blk.expert * expert1_bytes, fc1_scales + blk.expert * expert1_scales,
                2 * I, 0, g1, h, 2 * I);
      activate(h, count, aq, as, az);
      int4_gemm({aq, as, az}, count, I, s.fc2_block, fc2 + blk.expert * expert2_bytes,
                fc2_scales + blk.expert * expert2_scales, H, 0, g2, out + blk.r0 * H, H);
    });
    if (S > 0) int4_gemm_parallel(shared_rows, T, S, s.shared_block, shared.packed, shared.scales, H, shared_out, H,
                                  parallel_for);
  } else {
    // decode: few rows; one task = one active expert x up to kGroupsPerTask groups of output rows. The fc2
    // call also runs the shared expert's down projection, as more tasks of the same size: one hand-off.
    auto run_products = [&](const QuantizedRows& in, int64_t k, int64_t block, const uint8_t* packed,
                            const Half* scales, int64_t n, int64_t expert_bytes, int64_t expert_scales, float* y_out,
                            bool with_shared) {
      const int64_t groups = n / kGroupRows;
      const int64_t tasks_per_expert = (groups + kGroupsPerTask - 1) / kGroupsPerTask;
      const int64_t blocks = k / block;
      const int64_t tasks = static_cast<int64_t>(active.size()) * tasks_per_expert;
      const int64_t shared_tasks = with_shared ? (g2 + kGroupsPerTask - 1) / kGroupsPerTask : 0;
      const int64_t work = rows * n * k + (with_shared ? T * H * S : 0);
      for_work(parallel_for, work)(tasks + shared_tasks, [&](int64_t task) {
        if (task >= tasks) {
          const int64_t g0 = (task - tasks) * kGroupsPerTask;
          int4_gemm(shared_rows, T, S, s.shared_block, shared.packed, shared.scales, H, g0,
                    std::min(g2, g0 + kGroupsPerTask), shared_out, H);
          return;
        }
        const int64_t e = active[task / tasks_per_expert];
        const int64_t g0 = (task % tasks_per_expert) * kGroupsPerTask;
        const int64_t g_end = std::min(groups, g0 + kGroupsPerTask);
        const int64_t r0 = start[e];
        QuantizedRows expert_rows{in.q + r0 * k, in.scale + r0 * blocks, in.zero_fix + r0 * blocks};
        int4_gemm(expert_rows, start[e + 1] - r0, k, block, packed + e * expert_bytes, scales + e * expert_scales,
                  n, g0, g_end, y_out + r0 * n, n);
      });
    };
    thread_local std::vector<float> h_buffer, as_buffer;
    thread_local std::vector<int8_t> aq_buffer;
    thread_local std::vector<int32_t> az_buffer;
    float* h = grow(h_buffer, rows * 2 * I);
    run_products({rq, rs, rz}, H, s.fc1_block, fc1, fc1_scales, 2 * I, expert1_bytes, expert1_scales, h, false);
    int8_t* aq = grow(aq_buffer, rows * I);
    float* as = grow(as_buffer, rows * b2);
    int32_t* az = grow(az_buffer, rows * b2);
    over_rows(rows, [&](int64_t r0, int64_t r1) {
      activate(h + r0 * 2 * I, r1 - r0, aq + r0 * I, as + r0 * b2, az + r0 * b2);
    });
    run_products({aq, as, az}, I, s.fc2_block, fc2, fc2_scales, H, expert2_bytes, expert2_scales, out, S > 0);
  }

  // weighted sum in slot order, so the result does not depend on the thread schedule
  over_rows(T, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* yt = y + t * H;
      std::fill(yt, yt + H, 0.f);
      for (int64_t j = 0; j < K; ++j) {
        const float w = weight[t * K + j];
        const float* o = out + row_of[t * K + j] * H;
        for (int64_t c = 0; c < H; ++c) yt[c] += w * o[c];
      }
      if (S > 0) {  // + shared * sigmoid(shared gate), as GatedAdd(routed, shared, Sigmoid(s)) did
        const float gate = 1.f / (1.f + std::exp(-logits[t * stride + s.experts + 2 * S]));
        const float* st = shared_out + t * H;
        for (int64_t c = 0; c < H; ++c) yt[c] += st[c] * gate;
      }
    }
  });
}

}  // namespace

void int4_moe(const float* x, const float* logits, const uint8_t* fc1, const Half* fc1_scales,
              const uint8_t* fc2, const Half* fc2_scales, const MoeShape& s, float* y,
              const ParallelFor& parallel_for, const SharedDown& shared) {
  // passes of at most kTokensPerPass tokens bound the scratch (each token is independent of the others)
  for (int64_t t0 = 0; t0 < s.tokens; t0 += kTokensPerPass) {
    MoeShape part = s;
    part.tokens = std::min(kTokensPerPass, s.tokens - t0);
    moe_pass(x + t0 * s.hidden, logits + t0 * s.logits_stride(), fc1, fc1_scales, fc2, fc2_scales, part,
             y + t0 * s.hidden, parallel_for, shared);
  }
}

}  // namespace qwen_cpu
