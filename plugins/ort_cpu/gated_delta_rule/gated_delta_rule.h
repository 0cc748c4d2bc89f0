// The Gated DeltaNet token mixer between its two projections, on the CPU: the header-free core of the
// qwen.cpu GatedDeltaRule kernel. For each sequence b and token t, in order:
//
//   mixed, z, b, a = split(proj[b, t], [C, nv*dv, nv, nv])           C = 2*nk*dk + nv*dv
//   c     = silu(causal depthwise conv of mixed with conv_w [C, K]; state: the last K-1 inputs)
//   q, k, v = split(c, [nk*dk, nk*dk, nv*dv]);  q, k = l2norm per head (eps 1e-6);  q *= 1/sqrt(dk)
//   per value head h (key head h / (nv/nk)):
//     decay = exp(neg_exp_a[h] * softplus(a[h] + dt_bias[h]));  beta = sigmoid(b[h])
//     S = decay * S;  S += k (x) (beta * (v - S^T k));  o = S^T q           S [dk, dv], fp32
//     out[b, t, h] = rmsnorm(o; eps) * norm_w * silu(z[h])
//
// States: conv [B, C, K-1] (oldest input first) and recurrent [B, nv, dk, dv]; past in, present out.
// Where position_conv and position_state are not null (a call narrower than kStepTokens), they receive the
// states after every token, [B, T, C, K-1] and [B, T, nv, dk, dv]: a speculative verify step that rejects a
// draft keeps the states after its last accepted token (runtime/speculative.py, rollback "snapshot").
#pragma once

#include <cstdint>

#include "common/parallel.h"

namespace qwen_cpu {

struct DeltaRuleShape {
  int64_t batch = 0, tokens = 0;
  int64_t nk = 0, nv = 0, dk = 0, dv = 0, kernel = 0;
  float epsilon = 1e-6f;

  int64_t channels() const { return 2 * nk * dk + nv * dv; }
  int64_t proj_width() const { return channels() + nv * dv + 2 * nv; }
};

// Returns an empty string or why the shape is not supported.
const char* delta_rule_shape_error(const DeltaRuleShape& shape);

void gated_delta_rule(const float* proj, const float* conv_w, const float* past_conv, const float* past_state,
                      const float* dt_bias, const float* neg_exp_a, const float* norm_w, const DeltaRuleShape& shape,
                      float* out, float* present_conv, float* present_state, const ParallelFor& parallel_for,
                      float* position_conv = nullptr, float* position_state = nullptr);

// Which copy of the loops runs: "avx512f", "avx2" (x86-64-v3: AVX2 with FMA) or "baseline" (CPUID, narrowed by
// QWEN_CPU_KERNELS=avx2|portable).
const char* delta_rule_loops();

}  // namespace qwen_cpu
