// TensorRT IPluginV3 wrapper of QwenRMSNorm: traits for the generic plugin (common/trt_plugin_base.h).
#pragma once

#include "../common/trt_plugin_base.h"
#include "rms_norm_core.h"

namespace qwen
{
namespace trt
{

struct RMSNormOp
{
    static constexpr char const* kName = rms_norm::kPluginName;
    static constexpr auto& kFields = rms_norm::kFields;
    static constexpr auto& kInputs = rms_norm::kInputs;
    static constexpr auto& kOutputs = rms_norm::kOutputs;
    static constexpr auto& kOutputRecipes = rms_norm::kOutputRecipes;
    static constexpr auto& kAliases = rms_norm::kAliases;
    using Attrs = rms_norm::Attrs;

    static Attrs toAttrs(FieldValues<1> const& values)
    {
        return rms_norm::toAttrs(values);
    }
    static FieldValues<1> toValues(Attrs const& attrs)
    {
        return rms_norm::toValues(attrs);
    }
    static std::string validate(Attrs const& attrs)
    {
        return rms_norm::validate(attrs);
    }
    static std::string checkShapes(Attrs const& attrs, Dims const* inputs, int32_t nbInputs)
    {
        return rms_norm::checkShapes(attrs, inputs, nbInputs);
    }
    static size_t workspaceSize(Attrs const& attrs, Dims const* inputs, int32_t nbInputs)
    {
        return rms_norm::workspaceSize(attrs, inputs, nbInputs);
    }
    static int32_t enqueue(Attrs const& attrs, nvinfer1::PluginTensorDesc const* inputDesc,
        nvinfer1::PluginTensorDesc const* outputDesc, void const* const* inputs, void* const* outputs, void* workspace,
        cudaStream_t stream);
};

} // namespace trt
} // namespace qwen
