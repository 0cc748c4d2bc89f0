// QwenGatedAttention plugin: maps the TensorRT tensors onto the kernel launcher.
#include "gated_attention_launch.h"
#include "gated_attention_plugin.h"

namespace qwen
{
namespace trt
{

int32_t GatedAttentionOp::enqueue(Attrs const& attrs, nvinfer1::PluginTensorDesc const* inputDesc,
    nvinfer1::PluginTensorDesc const*, void const* const* inputs, void* const* outputs, void* workspace,
    cudaStream_t stream)
{
    Dims const x = toCoreDims(inputDesc[0].dims);
    Dims const pastKey = toCoreDims(inputDesc[4].dims);
    QwenGatedAttentionParams p{};
    p.x = inputs[0];
    p.mask = static_cast<int32_t const*>(inputs[1]);
    p.cos = static_cast<float const*>(inputs[2]);
    p.sin = static_cast<float const*>(inputs[3]);
    p.pastKey = inputs[4];
    p.pastValue = inputs[5];
    p.qWeight = inputs[6];
    p.kWeight = inputs[7];
    p.vWeight = inputs[8];
    p.oWeight = inputs[9];
    p.qNorm = static_cast<float const*>(inputs[10]);
    p.kNorm = static_cast<float const*>(inputs[11]);
    p.y = outputs[0];
    p.presentKey = outputs[1];
    p.presentValue = outputs[2];
    p.workspace = workspace;
    p.batch = x.d[0];
    p.tokens = x.d[1];
    p.hidden = x.d[2];
    p.past = pastKey.d[2];
    p.numHeads = attrs.numHeads;
    p.numKvHeads = attrs.numKvHeads;
    p.headDim = attrs.headDim;
    p.rotaryDim = attrs.rotaryDim;
    p.epsilon = attrs.epsilon;
    p.scale = attrs.scale;
    p.dtype = toQwenDtype(inputDesc[0].type);
    return qwenLaunchGatedAttention(&p, stream);
}

} // namespace trt
} // namespace qwen
