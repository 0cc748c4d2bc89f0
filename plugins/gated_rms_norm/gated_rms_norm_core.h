// QwenGatedRMSNorm core (docs/ops.md "GatedRMSNorm"): Y = RMSNorm(X; scale, epsilon) * silu(Z).
#pragma once

#include "../common/qwen_core.h"

namespace qwen
{
namespace gated_rms_norm
{

constexpr char kPluginName[] = "QwenGatedRMSNorm";

constexpr FieldSpec kFields[] = {
    {"epsilon", FieldType::kFloat32, 1e-6},
};

constexpr IoSpec kInputs[] = {
    {"X", IoType::kAct},
    {"Z", IoType::kAct},
    {"scale", IoType::kF32},
};

constexpr IoSpec kOutputs[] = {
    {"Y", IoType::kAct},
};

constexpr OutputRecipe kOutputRecipes[] = {
    {0, 0, {}},
};

constexpr int32_t kAliases[] = {-1};

struct Attrs
{
    float epsilon;
};

Attrs toAttrs(FieldValues<1> const& values);
FieldValues<1> toValues(Attrs const& attrs);
std::string validate(Attrs const& attrs);
std::string checkShapes(Attrs const& attrs, Dims const* inputs, int32_t nbInputs);
size_t workspaceSize(Attrs const& attrs, Dims const* inputs, int32_t nbInputs);

} // namespace gated_rms_norm
} // namespace qwen
