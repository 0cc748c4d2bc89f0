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

// The largest T evaluated token by token (the recurrent kernel) in automatic mode; longer prefills run the
// chunked kernel (64-token chunks).
constexpr int64_t kRecurrentMaxTokens = 16;
// The head dims and conv width the plugin's kernels are compiled for (the DK / DV / KERNEL constexprs of
// plugins/gated_deltanet/*_triton.py's specs, checked against the cubins again at launch): Qwen3.5's and
// Qwen3-Next's linear attention.
constexpr int64_t kHeadDim = 128;
constexpr int64_t kConvKernel = 4;

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

// Workspace offsets (gated_deltanet_workspace.h's carving) and its total.
struct Layout
{
    size_t qkv;
    size_t z;
    size_t b;
    size_t a;
    size_t conv;
    size_t o;
    size_t normed;
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

Layout layout(Attrs const& attrs, Sizes const& sizes);

} // namespace gated_deltanet
} // namespace qwen
