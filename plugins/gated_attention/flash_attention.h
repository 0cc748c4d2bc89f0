// Flash-style attention over the KV cache for the gated attention plugin (internal).
//
// Query rows are GQA-packed: the rows of one kv head are (token t, group member g) -> row t * group + g,
// so a block's K/V tile is shared by all query heads of the group (decode reads the cache once).
// Softmax semantics follow docs/ops.md exactly: key j is visible to token t when j <= past + t and
// mask[b, j] != 0; masked scores are float32.min (not -inf), so a row with no visible key averages V over
// all keys, as the reference does.
#pragma once

#include "../common/qwen_launch.h"

namespace qwen
{
namespace gated_attention
{

struct FlashParams
{
    void const* q;        // act [B, kv, rows, hd] packed, normed, rotated queries
    void const* k;        // act [B, kv, S, hd] present key
    void const* v;        // act [B, kv, S, hd] present value
    int32_t const* mask;  // i32 [B, S]
    float const* gate;    // f32 q_proj output [B*T, nh * 2 * hd]; head h's gate at h * 2 * hd + hd
    void* out;            // act [B*T, nh * hd]  softmax(q k^T) v * sigmoid(gate)
    float* partO;         // split-KV partial outputs [splits, B, kv, rows, hd]
    float* partML;        // split-KV partial (max, sum) [splits, B, kv, rows, 2]
    int64_t batch;
    int64_t tokens;       // T
    int64_t past;         // P
    int64_t keys;         // S = P + T
    int64_t rows;         // T * group
    int32_t kvHeads;
    int32_t group;        // num_heads / num_kv_heads
    int32_t headDim;
    int32_t splits;
    float scale;
};

int launchFlashAttention(FlashParams const& p, int32_t dtype, cudaStream_t stream);

} // namespace gated_attention
} // namespace qwen
