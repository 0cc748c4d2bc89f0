// TensorRT IPluginV3 wrapper of QwenGatedDeltaNet: traits for the generic plugin (common/trt_plugin_base.h).
#pragma once

#include "../common/trt_plugin_base.h"
#include "gated_deltanet_core.h"

namespace qwen
{
namespace trt
{

struct GatedDeltaNetOp
{
    static constexpr char const* kName = gated_deltanet::kPluginName;
    static constexpr auto& kFields = gated_deltanet::kFields;
    static constexpr auto& kInputs = gated_deltanet::kInputs;
    static constexpr auto& kOutputs = gated_deltanet::kOutputs;
    static constexpr auto& kOutputRecipes = gated_deltanet::kOutputRecipes;
    static constexpr auto& kAliases = gated_deltanet::kAliases;
    using Attrs = gated_deltanet::Attrs;

    static Attrs toAttrs(FieldValues<6> const& values)
    {
        return gated_deltanet::toAttrs(values);
    }
    static FieldValues<6> toValues(Attrs const& attrs)
    {
        return gated_deltanet::toValues(attrs);
    }
    static std::string validate(Attrs const& attrs)
    {
        return gated_deltanet::validate(attrs);
    }
    static std::string checkShapes(Attrs const& attrs, Dims const* inputs, int32_t nbInputs)
    {
        return gated_deltanet::checkShapes(attrs, inputs, nbInputs);
    }
    static size_t workspaceSize(Attrs const& attrs, Dims const* inputs, int32_t nbInputs)
    {
        return gated_deltanet::workspaceSize(attrs, inputs, nbInputs);
    }
    static int32_t enqueue(Attrs const& attrs, nvinfer1::PluginTensorDesc const* inputDesc,
        nvinfer1::PluginTensorDesc const* outputDesc, void const* const* inputs, void* const* outputs, void* workspace,
        cudaStream_t stream);
};

} // namespace trt
} // namespace qwen
