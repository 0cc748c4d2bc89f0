// QwenMoE core (docs/ops.md "MoE"): fp32 router softmax + top-k, token permutation by expert, grouped SwiGLU
// expert GEMMs over the selected experts only, weighted combine, sigmoid-gated shared expert.
#pragma once

#include "../common/qwen_core.h"

namespace qwen
{
namespace moe
{

constexpr char kPluginName[] = "QwenMoE";

constexpr FieldSpec kFields[] = {
    {"top_k", FieldType::kInt32, 0},
    {"normalize", FieldType::kInt32, 1},
};

constexpr IoSpec kInputs[] = {
    {"X", IoType::kAct},
    {"router_weight", IoType::kAct},
    {"gate_up", IoType::kAct},
    {"down", IoType::kAct},
    {"shared_gate", IoType::kAct},
    {"shared_up", IoType::kAct},
    {"shared_down", IoType::kAct},
    {"shared_expert_gate", IoType::kAct},
};

constexpr IoSpec kOutputs[] = {
    {"Y", IoType::kAct},
};

constexpr OutputRecipe kOutputRecipes[] = {
    {0, 0, {}},
};

constexpr int32_t kAliases[] = {-1};

// Limits of the routing kernel (one warp per token holds the token's E probabilities in shared memory).
constexpr int64_t kMaxExperts = 4096;
constexpr int64_t kMaxTopK = 32;
// Tokens are routed and computed in segments of at most this many, which bounds the workspace.
constexpr int64_t kSegmentTokens = 4096;

struct Attrs
{
    int32_t topK;
    int32_t normalize;
};

Attrs toAttrs(FieldValues<2> const& values);
FieldValues<2> toValues(Attrs const& attrs);
std::string validate(Attrs const& attrs);
std::string checkShapes(Attrs const& attrs, Dims const* inputs, int32_t nbInputs);
size_t workspaceSize(Attrs const& attrs, Dims const* inputs, int32_t nbInputs);

struct Sizes
{
    int64_t tokens;        // N (all leading dims of X)
    int64_t hidden;        // H
    int64_t experts;       // E
    int64_t inter;         // I (expert intermediate)
    int64_t sharedInter;   // Is
};
Sizes sizesFromInputs(Dims const* inputs);

struct Layout
{
    size_t logits;    // f32 [seg, E]
    size_t topIdx;    // i32 [seg * k]
    size_t topW;      // f32 [seg * k]
    size_t counts;    // i32 [E]      assignments per expert
    size_t rowOff;    // i32 [E + 1]  first permuted row of each expert
    size_t tileOff;   // i32 [E + 1]  first GEMM tile of each expert
    size_t cursor;    // i32 [E]
    size_t permToken; // i32 [seg * k] token of each permuted row
    size_t permW;     // f32 [seg * k] routing weight of each permuted row
    size_t gateUp;    // f32 [min(seg * k, kSkinnyMaxGroupedRows), 2I] (weight-streaming path only)
    size_t act;       // act [seg * k, I]  silu(gate) * up
    size_t sharedGU;  // f32 [min(seg, kSkinnyMaxRows), 2 * Is] (weight-streaming path only)
    size_t sharedAct; // act [seg, Is]
    size_t sharedGate;// f32 [seg]  shared-expert gate logit, then sigmoid
    size_t acc;       // f32 [seg, H] routed + shared accumulator
    int64_t segTokens;
    size_t total;
};
Layout layout(Attrs const& attrs, Sizes const& sizes);

} // namespace moe
} // namespace qwen
