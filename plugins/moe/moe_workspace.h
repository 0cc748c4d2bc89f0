// The MoE launch's workspace, carved by one function for all three of its users: qwenMoEWorkspaceSize and
// qwenLaunchMoE (moe_launch.cpp, with qwen::launch::Workspace) and the core's build-time workspaceSize
// (moe_core.cpp, with OffsetCarver), so the size TensorRT reserves and the size the launch uses agree by
// construction. Header-free (no CUDA, TensorRT or loader types).
//
// Bounded: tokens run in segments of at most kSegmentTokens, and every buffer is sized for one segment.
// The align buffers depend on tile sizes only the cubins know (the grouped GEMMs' BLOCK_M, align_count's
// CHUNK): they are sized for the bounds below, which the launcher checks against the resolved cubins
// before it launches anything.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace qwen {
namespace moe {

// Tokens are routed and computed in segments of at most this many, which bounds the workspace (at the
// Qwen3.5-397B-A17B widths, top-10 of 512 experts, H 4096, I = Is = 1024: about 470 MB, 335 MB of it the
// per-pair expert outputs the combine sums).
constexpr int64_t kSegmentTokens = 4096;
// Largest BLOCK_M of the grouped GEMMs the sorted rows are sized for.
constexpr int64_t kAlignMaxBlockM = 256;
// Smallest CHUNK of moe.align_count the per-chunk expert histograms are sized for.
constexpr int64_t kAlignMinChunk = 256;
constexpr size_t kActElementBytes = 2;  // fp16 / bf16

struct WorkspaceShape {
  int64_t tokens;
  int64_t hidden;       // H
  int64_t experts;      // E
  int64_t inter;        // I
  int64_t sharedInter;  // Is
  int64_t topK;
};

// The slices of one segment's buffers: pointers (the launch) or offsets (the core).
template <class Slice>
struct Buffers {
  Slice logits;     // f32 [seg, E]      router logits
  Slice weights;    // f32 [seg, k]      routing weights, best first
  Slice ids;        // i32 [seg, k]      expert of each (token, slot) pair; pair p = token * k + slot
  Slice counts;     // i32 [chunks, E]   align_count's per-chunk expert histograms
  Slice offsets;    // i32 [E + 1]       first sorted row of each expert's padded group
  Slice cursor;     // i32 [E]           next free sorted row of each expert
  Slice sortedIds;  // i32 [sorted rows] the pair at each sorted row (sentinel: the pair count)
  Slice expertIds;  // i32 [blocks]      expert of each BLOCK_M block (-1: unused)
  Slice h;          // act [seg * k, I]  silu(gate) * up per pair
  Slice y;          // act [seg * k, H]  expert output per pair, unweighted
  Slice sharedH;    // act [seg, Is]     the shared expert's silu(gate) * up
  Slice sharedY;    // act [seg, H]      the shared expert's output, before its gate
};

inline int64_t segmentTokens(int64_t tokens) {
  return std::max<int64_t>(0, std::min(tokens, kSegmentTokens));
}

// Sorted rows align needs for `pairs` pairs over `experts` experts padded to `blockM` (as
// align_triton.sorted_length: pairs + min(pairs, E) * (BLOCK_M - 1), rounded up to BLOCK_M).
inline int64_t sortedRows(int64_t pairs, int64_t experts, int64_t blockM) {
  const int64_t bound = pairs + std::min(pairs, experts) * (blockM - 1);
  return (bound + blockM - 1) / blockM * blockM;
}

// Room for sortedRows(pairs, experts, m) for every m <= kAlignMaxBlockM, and for its m-row blocks.
inline int64_t sortedRowsCapacity(int64_t pairs, int64_t experts) {
  return pairs + std::min(pairs, experts) * (kAlignMaxBlockM - 1) + kAlignMaxBlockM;
}
inline int64_t blocksCapacity(int64_t pairs, int64_t experts) {
  return pairs + std::min(pairs, experts) + 1;  // >= sortedRows(pairs, experts, m) / m for every m >= 1
}

// The one carving: `w.take(bytes)` returns the next slice (256-byte aligned) as a pointer or an offset.
template <class W>
auto carve(W& w, const WorkspaceShape& s) -> Buffers<decltype(w.take(size_t{}))> {
  const auto n = [](int64_t v) { return static_cast<size_t>(std::max<int64_t>(v, 0)); };
  const int64_t seg = segmentTokens(s.tokens);
  const int64_t pairs = seg * s.topK;
  const int64_t chunks = (pairs + kAlignMinChunk - 1) / kAlignMinChunk;
  Buffers<decltype(w.take(size_t{}))> b;
  b.logits = w.take(n(seg * s.experts) * 4);
  b.weights = w.take(n(pairs) * 4);
  b.ids = w.take(n(pairs) * 4);
  b.counts = w.take(n(chunks * s.experts) * 4);
  b.offsets = w.take(n(s.experts + 1) * 4);
  b.cursor = w.take(n(s.experts) * 4);
  b.sortedIds = w.take(n(sortedRowsCapacity(pairs, s.experts)) * 4);
  b.expertIds = w.take(n(blocksCapacity(pairs, s.experts)) * 4);
  b.h = w.take(n(pairs * s.inter) * kActElementBytes);
  b.y = w.take(n(pairs * s.hidden) * kActElementBytes);
  b.sharedH = w.take(n(seg * s.sharedInter) * kActElementBytes);
  b.sharedY = w.take(n(seg * s.hidden) * kActElementBytes);
  return b;
}

// Offsets from the workspace's start, aligned as qwen::launch::Workspace aligns its slices (256 bytes).
class OffsetCarver {
 public:
  size_t take(size_t bytes) {
    const size_t at = used_;
    used_ += (bytes + 255) / 256 * 256;
    return at;
  }
  size_t used() const { return used_; }

 private:
  size_t used_ = 0;
};

}  // namespace moe
}  // namespace qwen
