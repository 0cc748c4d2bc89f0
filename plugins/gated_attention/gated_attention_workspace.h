// The gated attention launch's workspace, carved by one function for all three of its users:
// qwenGatedAttentionWorkspaceSize and qwenLaunchGatedAttention (gated_attention_launch.cpp, with
// qwen::launch::Workspace) and the core's build-time workspaceSize (gated_attention_core.cpp, with
// WorkspaceLayout), so the size TensorRT reserves and the size the launch uses agree by construction.
// Header-free (no CUDA, TensorRT or loader types).
//
// Every slice grows with the shapes (batch, tokens) and none depends on the path a launch takes: a workspace
// sized for the profile's largest shapes (prefill) also serves a decode step. The split-KV partials are
// indexed with the decode cubins' MAX_SPLITS as their stride; they are sized for kMaxDecodeSplits, which the
// launcher checks the resolved cubins against before it launches anything.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace qwen {
namespace gated_attention {

// Largest MAX_SPLITS of the split_kv_decode / split_kv_combine cubins (split_kv_decode_triton._MAX_SPLITS).
constexpr int64_t kMaxDecodeSplits = 64;
constexpr size_t kActElementBytes = 2;  // fp16 / bf16

struct WorkspaceShape {
  int64_t batch;   // B
  int64_t tokens;  // T
  int64_t numHeads;
  int64_t numKvHeads;
  int64_t headDim;
};

// The slices: pointers (the launch) or offsets (the core).
template <class Slice>
struct Buffers {
  Slice qProj;  // act [B*T, nh, 2 * hd]         q_proj output: per head the query, then the gate
  Slice k;      // act [B*T, kv * hd]            k_proj output
  Slice v;      // act [B*T, kv * hd]            v_proj output
  Slice q;      // act [B*T, nh * hd]            normed, rotated queries (qk_norm_rope)
  Slice attn;   // act [B*T, nh * hd]            softmax(q k^T) v * sigmoid(gate): o_proj's input
  Slice acc;    // f32 [B, nh, kMaxDecodeSplits, hd]  split-KV partial outputs (decode)
  Slice m;      // f32 [B, nh, kMaxDecodeSplits]      split-KV running maxima (exp2 domain)
  Slice l;      // f32 [B, nh, kMaxDecodeSplits]      split-KV running sums
};

// The one carving: `w.take(bytes)` returns the next slice (256-byte aligned) as a pointer or an offset.
template <class W>
auto carve(W& w, const WorkspaceShape& s) -> Buffers<decltype(w.take(size_t{}))> {
  const auto n = [](int64_t v) { return static_cast<size_t>(std::max<int64_t>(v, 0)); };
  const size_t rows = n(s.batch) * n(s.tokens);
  const size_t nh = n(s.numHeads), kv = n(s.numKvHeads), hd = n(s.headDim);
  const size_t partials = n(s.batch) * nh * static_cast<size_t>(kMaxDecodeSplits);
  Buffers<decltype(w.take(size_t{}))> b;
  b.qProj = w.take(rows * nh * 2 * hd * kActElementBytes);
  b.k = w.take(rows * kv * hd * kActElementBytes);
  b.v = w.take(rows * kv * hd * kActElementBytes);
  b.q = w.take(rows * nh * hd * kActElementBytes);
  b.attn = w.take(rows * nh * hd * kActElementBytes);
  b.acc = w.take(partials * hd * sizeof(float));
  b.m = w.take(partials * sizeof(float));
  b.l = w.take(partials * sizeof(float));
  return b;
}

}  // namespace gated_attention
}  // namespace qwen
