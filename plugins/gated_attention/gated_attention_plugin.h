// TensorRT IPluginV3 wrapper of QwenGatedAttention: traits for the generic plugin (common/trt_plugin_base.h).
#pragma once

#include "../common/trt_plugin_base.h"
#include "gated_attention_core.h"

namespace qwen
{
namespace trt
{

struct GatedAttentionOp
{
    static constexpr char const* kName = gated_attention::kPluginName;
    static constexpr auto& kFields = gated_attention::kFields;
    static constexpr auto& kInputs = gated_attention::kInputs;
    static constexpr auto& kOutputs = gated_attention::kOutputs;
    static constexpr auto& kOutputRecipes = gated_attention::kOutputRecipes;
    static constexpr auto& kAliases = gated_attention::kAliases;
    using Attrs = gated_attention::Attrs;

    static Attrs toAttrs(FieldValues<6> const& values)
    {
        return gated_attention::toAttrs(values);
    }
    static FieldValues<6> toValues(Attrs const& attrs)
    {
        return gated_attention::toValues(attrs);
    }
    static std::string validate(Attrs const& attrs)
    {
        return gated_attention::validate(attrs);
    }
    static std::string checkShapes(Attrs const& attrs, Dims const* inputs, int32_t nbInputs)
    {
        return gated_attention::checkShapes(attrs, inputs, nbInputs);
    }
    static size_t workspaceSize(Attrs const& attrs, Dims const* inputs, int32_t nbInputs)
    {
        return gated_attention::workspaceSize(attrs, inputs, nbInputs);
    }
    static int32_t enqueue(Attrs const& attrs, nvinfer1::PluginTensorDesc const* inputDesc,
        nvinfer1::PluginTensorDesc const* outputDesc, void const* const* inputs, void* const* outputs, void* workspace,
        cudaStream_t stream);
};

} // namespace trt
} // namespace qwen
