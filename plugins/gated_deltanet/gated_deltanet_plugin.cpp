// QwenGatedDeltaNet plugin: maps the TensorRT tensors onto the kernel launcher. With aliasing on,
// present_conv / present_recurrent are the past buffers themselves; the kernels handle both cases.
#include "gated_deltanet_launch.h"
#include "gated_deltanet_plugin.h"

namespace qwen
{
namespace trt
{

int32_t GatedDeltaNetOp::enqueue(Attrs const& attrs, nvinfer1::PluginTensorDesc const* inputDesc,
    nvinfer1::PluginTensorDesc const*, void const* const* inputs, void* const* outputs, void* workspace,
    cudaStream_t stream)
{
    Dims const x = toCoreDims(inputDesc[0].dims);
    Dims const mask = toCoreDims(inputDesc[1].dims);
    QwenGatedDeltaNetParams p{};
    p.x = inputs[0];
    p.mask = static_cast<int32_t const*>(inputs[1]);
    p.pastConv = inputs[2];
    p.pastRecurrent = static_cast<float const*>(inputs[3]);
    p.qkvWeight = inputs[4];
    p.zWeight = inputs[5];
    p.bWeight = inputs[6];
    p.aWeight = inputs[7];
    p.convWeight = inputs[8];
    p.negExpA = static_cast<float const*>(inputs[9]);
    p.dtBias = static_cast<float const*>(inputs[10]);
    p.normWeight = static_cast<float const*>(inputs[11]);
    p.outWeight = inputs[12];
    p.y = outputs[0];
    p.presentConv = outputs[1];
    p.presentRecurrent = static_cast<float*>(outputs[2]);
    p.workspace = workspace;
    p.batch = x.d[0];
    p.tokens = x.d[1];
    p.hidden = x.d[2];
    p.maskLen = mask.d[1];
    p.numKHeads = attrs.numKHeads;
    p.numVHeads = attrs.numVHeads;
    p.headKDim = attrs.headKDim;
    p.headVDim = attrs.headVDim;
    p.convKernel = attrs.convKernel;
    p.epsilon = attrs.epsilon;
    p.dtype = toQwenDtype(inputDesc[0].type);
    p.ruleMode = 0;
    return qwenLaunchGatedDeltaNet(&p, stream);
}

} // namespace trt
} // namespace qwen
