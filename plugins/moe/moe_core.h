// QwenMoE core (docs/ops.md "MoE"): fp32 router softmax + top-k, token permutation by expert, grouped SwiGLU
// expert GEMMs over the selected experts only, weighted combine, sigmoid-gated shared expert.
#pragma once

#include "../common/qwen_core.h"
#include "moe_workspace.h"

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

// Limits of the Triton kernels (router_topk_triton.py): moe.router_topk keeps at most MAX_TOP_K = 32 picks
// per token, and moe.align_scatter maps blocks to at most MAX_EXPERTS = 4096 experts. The launcher also
// checks the cubins it resolves. kSegmentTokens (moe_workspace.h) bounds the workspace.
constexpr int64_t kMaxExperts = 4096;
constexpr int64_t kMaxTopK = 32;
// The grouped GEMMs take K, N, the row strides and the weight strides with ':16' hints: H, I and Is must be
// multiples of this.
constexpr int64_t kWidthMultiple = 16;

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

// The workspace at these sizes: moe_workspace.h's carve (the launcher's own), as offsets. `at` holds every
// slice; the named copies are the ones plugins/tests/test_cores.cpp checks.
struct Layout
{
    Buffers<size_t> at;
    size_t logits;    // = at.logits     f32 [seg, E]
    size_t topIdx;    // = at.ids        i32 [seg * k]
    size_t counts;    // = at.counts     i32 [chunks, E]
    size_t rowOff;    // = at.offsets    i32 [E + 1] first sorted row of each expert
    size_t permToken; // = at.sortedIds  i32 [sorted rows] pair of each sorted row
    size_t act;       // = at.h          act [seg * k, I] silu(gate) * up
    size_t acc;       // = at.y          act [seg * k, H] expert outputs the combine sums
    int64_t segTokens;
    size_t total;
};
Layout layout(Attrs const& attrs, Sizes const& sizes);

} // namespace moe
} // namespace qwen
