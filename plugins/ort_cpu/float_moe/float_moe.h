// Routed experts with float weights on the CPU: the header-free core of the qwen.cpu FloatMoE kernel, the
// fp32 experts of the ort-cpu target (in place of com.microsoft MoE).
//
//   routing: route_top_k (int4_moe.h): softmax over the E experts, the top_k, renormalised if asked
//   h = x[t] fc1_e^T                  fc1 [E, 2I, H], rows gate_0, up_0, gate_1, up_1, ... (interleaved SwiGLU)
//   a_i = silu(h_{2i}) * h_{2i+1}
//   y[t] = sum_{j < top_k} w_j * (a fc2_e^T)   fc2 [E, H, I], summed in the order of the chosen experts
// The weights are com.microsoft MoE's fp32 layout, unchanged. Only experts some token chose are read, each
// once for all the tokens that chose it (one weight row at a time against up to six tokens, four against
// four beyond that).
#pragma once

#include <cstdint>

#include "common/parallel.h"
#include "int4_moe/int4_moe.h"

namespace qwen_cpu {

// y [tokens, H] from x [tokens, H] and router logits [tokens, shape.logits_stride()] (shape's block sizes are
// not used). With shape.shared_inter = I_s > 0 the gated shared expert is folded in, as in int4_moe.h:
// y[t] += sigmoid(s) * ((silu(gate) * up) down^T) with gate, up and s from the logits row after the router's
// E columns, and `shared_down` its down projection transposed, [H, I_s].
void float_moe(const float* x, const float* logits, const float* fc1, const float* fc2, const MoeShape& shape,
               float* y, const ParallelFor& parallel_for, const float* shared_down = nullptr);

// The dot loops this process runs: "x86-64-v4", "avx2" or "baseline" (CPUID, or QWEN_CPU_KERNELS=avx2|portable).
const char* float_moe_loops();

// Checks what float_moe needs of a shape; returns an empty string or why not.
const char* float_moe_shape_error(const MoeShape& shape);

}  // namespace qwen_cpu
