// QwenGatedAttention core (docs/ops.md "GatedAttention"): projections, q/k RMSNorm, partial RoPE, KV append,
// causal + padding-masked GQA softmax attention, sigmoid output gate, o_proj.
#pragma once

#include "../common/qwen_core.h"

namespace qwen
{
namespace gated_attention
{

constexpr char kPluginName[] = "QwenGatedAttention";

constexpr FieldSpec kFields[] = {
    {"num_heads", FieldType::kInt32, 0},
    {"num_kv_heads", FieldType::kInt32, 0},
    {"head_dim", FieldType::kInt32, 0},
    {"rotary_dim", FieldType::kInt32, 0},
    {"epsilon", FieldType::kFloat32, 1e-6},
    {"scale", FieldType::kFloat32, 0.0},
};

constexpr IoSpec kInputs[] = {
    {"X", IoType::kAct},
    {"attention_mask", IoType::kI32},
    {"cos", IoType::kF32},
    {"sin", IoType::kF32},
    {"past_key", IoType::kAct},
    {"past_value", IoType::kAct},
    {"q_weight", IoType::kAct},
    {"k_weight", IoType::kAct},
    {"v_weight", IoType::kAct},
    {"o_weight", IoType::kAct},
    {"q_norm", IoType::kF32},
    {"k_norm", IoType::kF32},
};

constexpr IoSpec kOutputs[] = {
    {"Y", IoType::kAct},
    {"present_key", IoType::kAct},
    {"present_value", IoType::kAct},
};

// present_* = [B, kv, P + T, hd]: the past's shape with the new tokens (X dim 1) added on axis 2.
constexpr OutputRecipe kOutputRecipes[] = {
    {0, 0, {}},
    {-1, 4, {{4, 0, -1, 0}, {4, 1, -1, 0}, {4, 2, 0, 1}, {4, 3, -1, 0}}},
    {-1, 4, {{5, 0, -1, 0}, {5, 1, -1, 0}, {5, 2, 0, 1}, {5, 3, -1, 0}}},
};

// The KV cache grows (present is longer than past), so it cannot alias its input.
constexpr int32_t kAliases[] = {-1, -1, -1};

// Head dims the Triton kernels are compiled for (qk_norm_rope / flash_prefill / split_kv_decode: HEAD_DIMS):
// powers of two (tl.arange), at most 256.
constexpr int32_t kSupportedHeadDims[] = {32, 64, 128, 256};
constexpr int32_t kMaxHeadDim = 256;

struct Attrs
{
    int32_t numHeads;
    int32_t numKvHeads;
    int32_t headDim;
    int32_t rotaryDim;
    float epsilon;
    float scale; // 0: 1/sqrt(head_dim)
};

Attrs toAttrs(FieldValues<6> const& values);
FieldValues<6> toValues(Attrs const& attrs);
std::string validate(Attrs const& attrs);
std::string checkShapes(Attrs const& attrs, Dims const* inputs, int32_t nbInputs);
size_t workspaceSize(Attrs const& attrs, Dims const* inputs, int32_t nbInputs);

// Problem sizes, taken from the input shapes.
struct Sizes
{
    int64_t batch;  // B
    int64_t tokens; // T (new tokens)
    int64_t past;   // P
    int64_t hidden; // H
};
Sizes sizesFromInputs(Dims const* inputs);

// The CUDA implementation's key-split heuristic, kept for the core tests (plugins/tests/test_cores.cpp); the
// Triton launch splits as split_kv_decode_triton.decode_plan does (gated_attention_launch.cpp), from the
// decode cubin's BLOCK_N and MAX_SPLITS, with partials sized by gated_attention_workspace.h.
int32_t numKvSplits(int64_t batch, int64_t kvHeads, int64_t rows, int64_t keys);
constexpr int64_t kTargetBlocks = 264;  // split-KV aims at this many blocks
constexpr int64_t kSplitMinBlocks = 132; // at or above this many blocks there is no split
// splits > 1 only when blocks < kSplitMinBlocks, and splits <= ceil(kTargetBlocks / blocks), so
// splits * blocks < kTargetBlocks + kSplitMinBlocks; each block holds at most 64 (padded) rows.
constexpr int64_t kMaxSplitRows = (kTargetBlocks + kSplitMinBlocks) * 64;

// Byte offsets of the workspace slices (gated_attention_workspace.h carves them; the field names predate it
// and are kept for the core tests).
struct Layout
{
    size_t qg;      // act [B*T, nh * 2 * hd]   q_proj output (query | gate per head)
    size_t k;       // act [B*T, kv * hd]       k_proj output
    size_t v;       // act [B*T, kv * hd]       v_proj output
    size_t qPacked; // act [B*T, nh * hd]       normed, rotated queries
    size_t attn;    // act [B*T, nh * hd]       gated attention output (o_proj input)
    size_t yAcc;    // no slice of its own: o_proj writes Y directly (equals `attn`)
    size_t partO;   // f32 [B, nh, kMaxDecodeSplits, hd]  split-KV partial outputs
    size_t partML;  // f32 [B, nh, kMaxDecodeSplits]      split-KV partial maxima
    size_t partL;   // f32 [B, nh, kMaxDecodeSplits]      split-KV partial sums
    size_t total;
};
Layout layout(Attrs const& attrs, Sizes const& sizes);

} // namespace gated_attention
} // namespace qwen
