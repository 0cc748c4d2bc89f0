// TensorRT IPluginV3 wrapper of QwenMoE: traits for the generic plugin (common/trt_plugin_base.h).
#pragma once

#include "../common/trt_plugin_base.h"
#include "moe_core.h"

namespace qwen
{
namespace trt
{

struct MoEOp
{
    static constexpr char const* kName = moe::kPluginName;
    static constexpr auto& kFields = moe::kFields;
    static constexpr auto& kInputs = moe::kInputs;
    static constexpr auto& kOutputs = moe::kOutputs;
    static constexpr auto& kOutputRecipes = moe::kOutputRecipes;
    static constexpr auto& kAliases = moe::kAliases;
    using Attrs = moe::Attrs;

    static Attrs toAttrs(FieldValues<2> const& values)
    {
        return moe::toAttrs(values);
    }
    static FieldValues<2> toValues(Attrs const& attrs)
    {
        return moe::toValues(attrs);
    }
    static std::string validate(Attrs const& attrs)
    {
        return moe::validate(attrs);
    }
    static std::string checkShapes(Attrs const& attrs, Dims const* inputs, int32_t nbInputs)
    {
        return moe::checkShapes(attrs, inputs, nbInputs);
    }
    static size_t workspaceSize(Attrs const& attrs, Dims const* inputs, int32_t nbInputs)
    {
        return moe::workspaceSize(attrs, inputs, nbInputs);
    }
    static int32_t enqueue(Attrs const& attrs, nvinfer1::PluginTensorDesc const* inputDesc,
        nvinfer1::PluginTensorDesc const* outputDesc, void const* const* inputs, void* const* outputs, void* workspace,
        cudaStream_t stream);
};

} // namespace trt
} // namespace qwen
