// QwenGatedDeltaNet core (docs/ops.md "GatedDeltaNet"): masked input, projections, causal conv with state +
// SiLU, l2norm, gated delta rule (chunked for prefill, recurrent for decode) with fp32 state, gated
// RMSNorm, out_proj.
#pragma once

#include "../common/qwen_core.h"

namespace qwen
{
namespace gated_deltanet
{

constexpr char kPluginName[] = "QwenGatedDeltaNet";

constexpr FieldSpec kFields[] = {
    {"num_k_heads", FieldType::kInt32, 0},
    {"num_v_heads", FieldType::kInt32, 0},
    {"head_k_dim", FieldType::kInt32, 0},
    {"head_v_dim", FieldType::kInt32, 0},
    {"conv_kernel", FieldType::kInt32, 4},
    {"epsilon", FieldType::kFloat32, 1e-6},
};

constexpr IoSpec kInputs[] = {
    {"X", IoType::kAct},
    {"attention_mask", IoType::kI32},
    {"past_conv", IoType::kAct},
    {"past_recurrent", IoType::kF32},
    {"qkv_weight", IoType::kAct},
    {"z_weight", IoType::kAct},
    {"b_weight", IoType::kAct},
    {"a_weight", IoType::kAct},
    {"conv_weight", IoType::kAct},
    {"neg_exp_A", IoType::kF32},
    {"dt_bias", IoType::kF32},
    {"norm_weight", IoType::kF32},
    {"out_weight", IoType::kAct},
};

constexpr IoSpec kOutputs[] = {
    {"Y", IoType::kAct},
    {"present_conv", IoType::kAct},
    {"present_recurrent", IoType::kF32},
};

constexpr OutputRecipe kOutputRecipes[] = {
    {0, 0, {}},
    {2, 0, {}},
    {3, 0, {}},
};

// The states are updated in place where TensorRT allows (IPluginV3OneBuildV2::getAliasedInput):
// present_conv over past_conv, present_recurrent over past_recurrent. The kernels are written so that
// aliased and separate buffers both work.
constexpr int32_t kAliases[] = {-1, 2, 3};

// Delta-rule chunk length for prefill, and the largest T evaluated token by token (recurrent kernel).
constexpr int64_t kChunk = 64;
constexpr int64_t kRecurrentMaxTokens = 16;
// Chunked prefill runs in segments of at most this many (batch x value head x chunk) items, which bounds
// the chunk workspace (about 80 KiB per item at head dims 128).
constexpr int64_t kChunkItemsPerSegment = 1024;
// Head dims the delta-rule kernels support (their shared-memory tiles are sized for this).
constexpr int64_t kMaxHeadDim = 128;

struct Attrs
{
    int32_t numKHeads;
    int32_t numVHeads;
    int32_t headKDim;
    int32_t headVDim;
    int32_t convKernel;
    float epsilon;
};

Attrs toAttrs(FieldValues<6> const& values);
FieldValues<6> toValues(Attrs const& attrs);
std::string validate(Attrs const& attrs);
std::string checkShapes(Attrs const& attrs, Dims const* inputs, int32_t nbInputs);
size_t workspaceSize(Attrs const& attrs, Dims const* inputs, int32_t nbInputs);

struct Sizes
{
    int64_t batch;  // B
    int64_t tokens; // T
    int64_t hidden; // H
};
Sizes sizesFromInputs(Dims const* inputs);

inline int64_t convDim(Attrs const& a)
{
    return 2LL * a.numKHeads * a.headKDim + static_cast<int64_t>(a.numVHeads) * a.headVDim;
}

// Chunks per segment of the chunked prefill.
int64_t segmentChunks(Attrs const& a, Sizes const& z);

struct Layout
{
    size_t xMasked; // act [B*T, H]      X * mask
    size_t mixed;   // f32 [B*T, C]      qkv projection, then (in place) conv + SiLU output
    size_t z;       // f32 [B*T, nv*dv]  gate projection
    size_t b;       // f32 [B*T, nv]
    size_t a;       // f32 [B*T, nv]
    size_t q;       // f32 [B, nk, T, dk] l2-normed, scaled queries
    size_t k;       // f32 [B, nk, T, dk] l2-normed keys
    size_t beta;    // f32 [B, nv, T]
    size_t g;       // f32 [B, nv, T]    log decay
    size_t o;       // f32 [B, T, nv, dv] delta-rule output
    size_t normed;  // act [B*T, nv*dv]  gated RMSNorm output (out_proj input)
    size_t yAcc;    // f32 [B*T, H]
    // chunked prefill only (T > kRecurrentMaxTokens), per segment item (b, value head, chunk):
    size_t u;       // f32 [items, kChunk, dv]  A @ (v * beta)
    size_t w;       // f32 [items, kChunk, dk]  A @ (k * beta * exp(gcum))
    size_t aqk;     // f32 [items, kChunk, kChunk] (q k^T) * decay, lower triangle
    size_t gcum;    // f32 [items, kChunk]  cumulative log decay within the chunk
    int64_t segChunks;
    size_t total;
};
// Delta-rule evaluation: auto (recurrent for T <= kRecurrentMaxTokens, else chunked), or forced (tests).
enum class RuleMode : int32_t
{
    kAuto = 0,
    kRecurrent = 1,
    kChunked = 2,
};
bool usesChunked(RuleMode mode, int64_t tokens);

Layout layout(Attrs const& attrs, Sizes const& sizes, RuleMode mode = RuleMode::kAuto);

} // namespace gated_deltanet
} // namespace qwen
