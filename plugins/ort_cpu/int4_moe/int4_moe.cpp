#include "int4_moe/int4_moe.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "common/vector_math.h"

namespace qwen_cpu {

namespace {

constexpr int64_t kGroupsPerTask = 8;  // 128 output rows: tasks small enough to balance two threads
constexpr int64_t kRowsPerTask = 16;   // rows per task of the elementwise steps (prefill has thousands)

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
  return "";
}

void route_top_k(const float* logits, const MoeShape& shape, int32_t* experts, float* weights) {
  std::vector<float> p(shape.experts);
  std::vector<int32_t> order(shape.experts);
  for (int64_t t = 0; t < shape.tokens; ++t) {
    const float* row = logits + t * shape.experts;
    const float top = *std::max_element(row, row + shape.experts);
    float total = 0.f;
    for (int64_t e = 0; e < shape.experts; ++e) total += p[e] = std::exp(row[e] - top);
    for (int64_t e = 0; e < shape.experts; ++e) p[e] /= total;
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + shape.top_k, order.end(),
                      [&](int32_t a, int32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
    float chosen = 0.f;
    for (int64_t j = 0; j < shape.top_k; ++j) chosen += p[order[j]];
    for (int64_t j = 0; j < shape.top_k; ++j) {
      experts[t * shape.top_k + j] = order[j];
      weights[t * shape.top_k + j] = shape.normalize ? p[order[j]] / chosen : p[order[j]];
    }
  }
}

void int4_moe(const float* x, const float* logits, const uint8_t* fc1, const Half* fc1_scales,
              const uint8_t* fc2, const Half* fc2_scales, const MoeShape& s, float* y,
              const ParallelFor& parallel_for) {
  const int64_t H = s.hidden, I = s.inter, T = s.tokens, K = s.top_k, rows = T * K;
  std::vector<int32_t> chosen(rows);
  std::vector<float> weight(rows);
  route_top_k(logits, s, chosen.data(), weight.data());

  // rows of the expert products, grouped by expert (tokens in order within an expert)
  std::vector<int64_t> start(s.experts + 1, 0);
  for (int64_t r = 0; r < rows; ++r) ++start[chosen[r] + 1];
  std::partial_sum(start.begin(), start.end(), start.begin());
  std::vector<Slot> slots(rows);
  std::vector<int64_t> row_of(rows);  // (token, slot) -> row
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < K; ++j) {
        const int64_t r = next[chosen[t * K + j]]++;
        slots[r] = {t, j};
        row_of[t * K + j] = r;
      }
  }
  std::vector<int32_t> active;
  for (int64_t e = 0; e < s.experts; ++e)
    if (start[e + 1] > start[e]) active.push_back(static_cast<int32_t>(e));

  // x quantized once per token, then copied to each row that reads it
  const int64_t b1 = H / s.fc1_block, b2 = I / s.fc2_block;
  std::vector<int8_t> xq(T * H), rq(rows * H);
  std::vector<float> xs(T * b1), rs(rows * b1);
  std::vector<int32_t> xz(T * b1), rz(rows * b1);
  // each elementwise step runs over independent rows in tasks of kRowsPerTask
  auto over_rows = [&](int64_t count, const std::function<void(int64_t, int64_t)>& body) {
    parallel_for((count + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task) {
      body(task * kRowsPerTask, std::min(count, (task + 1) * kRowsPerTask));
    });
  };
  quantize_rows_parallel(x, T, H, s.fc1_block, xq.data(), xs.data(), xz.data(), parallel_for);
  over_rows(rows, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t t = slots[r].token;
      std::copy_n(xq.data() + t * H, H, rq.data() + r * H);
      std::copy_n(xs.data() + t * b1, b1, rs.data() + r * b1);
      std::copy_n(xz.data() + t * b1, b1, rz.data() + r * b1);
    }
  });

  // one task = one active expert x up to kGroupsPerTask groups of output rows
  auto run_products = [&](const QuantizedRows& in, int64_t k, int64_t block, const uint8_t* packed,
                          const Half* scales, int64_t n, float* out) {
    const int64_t groups = n / kGroupRows;
    const int64_t tasks_per_expert = (groups + kGroupsPerTask - 1) / kGroupsPerTask;
    const int64_t expert_bytes = groups * packed_group_bytes(k);
    const int64_t expert_scales = groups * group_scales(k, block);
    const int64_t blocks = k / block;
    parallel_for(static_cast<int64_t>(active.size()) * tasks_per_expert, [&](int64_t task) {
      const int64_t e = active[task / tasks_per_expert];
      const int64_t g0 = (task % tasks_per_expert) * kGroupsPerTask;
      const int64_t g1 = std::min(groups, g0 + kGroupsPerTask);
      const int64_t r0 = start[e];
      QuantizedRows expert_rows{in.q + r0 * k, in.scale + r0 * blocks, in.zero_fix + r0 * blocks};
      int4_gemm(expert_rows, start[e + 1] - r0, k, block, packed + e * expert_bytes, scales + e * expert_scales,
                n, g0, g1, out + r0 * n, n);
    });
  };

  std::vector<float> h(rows * 2 * I);
  run_products({rq.data(), rs.data(), rz.data()}, H, s.fc1_block, fc1, fc1_scales, 2 * I, h.data());

  std::vector<float> act(rows * I);
  std::vector<int8_t> aq(rows * I);
  std::vector<float> as(rows * b2);
  std::vector<int32_t> az(rows * b2);
  over_rows(rows, [&](int64_t r0, int64_t r1) {  // silu(gate) * up from the interleaved rows, quantized
    std::vector<float> gate(I);
    for (int64_t r = r0; r < r1; ++r) {
      const float* hr = h.data() + r * 2 * I;
      float* ar = act.data() + r * I;
      for (int64_t i = 0; i < I; ++i) {
        gate[i] = hr[2 * i];
        ar[i] = hr[2 * i + 1];
      }
      mul_silu(ar, gate.data(), ar, I);
    }
    quantize_rows(act.data() + r0 * I, r1 - r0, I, s.fc2_block, aq.data() + r0 * I, as.data() + r0 * b2,
                  az.data() + r0 * b2);
  });

  std::vector<float> out(rows * H);
  run_products({aq.data(), as.data(), az.data()}, I, s.fc2_block, fc2, fc2_scales, H, out.data());

  // weighted sum in slot order, so the result does not depend on the thread schedule
  over_rows(T, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      float* yt = y + t * H;
      std::fill(yt, yt + H, 0.f);
      for (int64_t j = 0; j < K; ++j) {
        const float w = weight[t * K + j];
        const float* o = out.data() + row_of[t * K + j] * H;
        for (int64_t c = 0; c < H; ++c) yt[c] += w * o[c];
      }
    }
  });
}

}  // namespace qwen_cpu
