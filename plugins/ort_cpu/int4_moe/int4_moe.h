// Routed experts with block-int4 weights on the CPU: the header-free core of the qwen.cpu Int4MoE kernel.
//
//   p = softmax(logits[t, :])                       fp32, over all E experts
//   S = the top_k experts by p (ties to the lower index); w_e = p_e, or p_e / sum_S p if normalize
//   h = x[t] fc1_e^T                                fc1_e [2I, H], rows gate_0, up_0, gate_1, up_1, ...
//   a_i = silu(h_{2i}) * h_{2i+1}
//   y[t] = sum_{e in S} w_e * (a fc2_e^T)           fc2_e [H, I]
// With the gated shared expert folded in (shared_inter = I_s > 0), each logits row is
// [router E | gate I_s | up I_s | shared gate 1] (the one GEMM before the op) and
//   y[t] += sigmoid(shared gate) * ((silu(gate) * up) down^T)      down [H, I_s]
// Expert weights use int4_gemm's packed layout per expert; activations are quantized to int8 per block
// before each product. Only experts some token chose are read.
#pragma once

#include <cstdint>

#include "common/parallel.h"
#include "int4_linear/int4_gemm.h"

namespace qwen_cpu {

struct MoeShape {
  int64_t tokens = 0;
  int64_t hidden = 0;      // H
  int64_t inter = 0;       // I (fc1 has 2I rows)
  int64_t experts = 0;     // E
  int64_t top_k = 0;
  int64_t fc1_block = 32;  // block along H
  int64_t fc2_block = 32;  // block along I
  bool normalize = true;
  int64_t shared_inter = 0;   // I_s: the gated shared expert folded in (0: none)
  int64_t shared_block = 32;  // block of its down projection along I_s
  // floats per logits row: E, or E + 2 I_s + 1 with the shared expert's columns after the router's
  int64_t logits_stride() const { return shared_inter > 0 ? experts + 2 * shared_inter + 1 : experts; }
};

// The shared expert's down projection [H, I_s] in int4_gemm's packed layout (H/16 groups of I_s*8 bytes).
struct SharedDown {
  const uint8_t* packed = nullptr;
  const Half* scales = nullptr;
};

// The experts each token chose and their weights, [tokens, top_k] each.
void route_top_k(const float* logits, const MoeShape& shape, int32_t* experts, float* weights);

// y [tokens, H] from x [tokens, H] and logits [tokens, logits_stride()]. fc1: packed [E][G1 = 2I/16][H*8]
// bytes and scales [E][G1][H/B1*16]; fc2 likewise with G2 = H/16 groups of I*8 bytes; `shared` read only
// where shape.shared_inter > 0.
void int4_moe(const float* x, const float* logits, const uint8_t* fc1, const Half* fc1_scales,
              const uint8_t* fc2, const Half* fc2_scales, const MoeShape& shape, float* y,
              const ParallelFor& parallel_for, const SharedDown& shared = {});

// Checks what int4_moe needs of a shape; returns an empty string or why not.
const char* moe_shape_error(const MoeShape& shape);

}  // namespace qwen_cpu
