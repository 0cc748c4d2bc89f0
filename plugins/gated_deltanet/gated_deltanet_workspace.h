// The Gated DeltaNet launch's workspace, carved by one function for all three of its users:
// qwenGatedDeltaNetWorkspaceSize and qwenLaunchGatedDeltaNet (gated_deltanet_launch.cpp, with
// qwen::launch::Workspace) and the core's build-time workspaceSize (gated_deltanet_core.cpp, with
// WorkspaceLayout), so the size TensorRT reserves and the size the launch uses agree by construction.
// Header-free. Every slice grows with batch x tokens only: the largest profile shapes serve every smaller
// launch, prefill or decode, chunked or recurrent.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace qwen {
namespace gated_deltanet {

constexpr size_t kActElementBytes = 2;  // fp16 / bf16

struct WorkspaceShape {
  int64_t batch;   // B
  int64_t tokens;  // T
  int64_t convDim;  // C = 2 nk dk + nv dv
  int64_t numVHeads;
  int64_t headVDim;
};

// The slices: pointers (the launch) or offsets (the core).
template <class Slice>
struct Buffers {
  Slice qkv;     // act [B*T, C]        in_proj_qkv output (the conv's input)
  Slice z;       // act [B*T, nv * dv]  in_proj_z output (the gate of the norm)
  Slice b;       // act [B*T, nv]       in_proj_b output (beta = sigmoid(b), in the rule kernels)
  Slice a;       // act [B*T, nv]       in_proj_a output (the decay's input, in the rule kernels)
  Slice conv;    // act [B*T, C]        silu(causal conv): the rule's q | k | v
  Slice o;       // act [B*T, nv, dv]   the delta rule's output
  Slice normed;  // act [B*T, nv * dv]  gated RMSNorm output: out_proj's input
};

// The one carving: `w.take(bytes)` returns the next slice (256-byte aligned) as a pointer or an offset.
template <class W>
auto carve(W& w, const WorkspaceShape& s) -> Buffers<decltype(w.take(size_t{}))> {
  const auto n = [](int64_t v) { return static_cast<size_t>(std::max<int64_t>(v, 0)); };
  const size_t rows = n(s.batch) * n(s.tokens), c = n(s.convDim), nv = n(s.numVHeads), dv = n(s.headVDim);
  Buffers<decltype(w.take(size_t{}))> out;
  out.qkv = w.take(rows * c * kActElementBytes);
  out.z = w.take(rows * nv * dv * kActElementBytes);
  out.b = w.take(rows * nv * kActElementBytes);
  out.a = w.take(rows * nv * kActElementBytes);
  out.conv = w.take(rows * c * kActElementBytes);
  out.o = w.take(rows * nv * dv * kActElementBytes);
  out.normed = w.take(rows * nv * dv * kActElementBytes);
  return out;
}

}  // namespace gated_deltanet
}  // namespace qwen
