// QwenMoE plugin: maps the TensorRT tensors onto the kernel launcher.
#include "moe_launch.h"
#include "moe_plugin.h"

namespace qwen
{
namespace trt
{

int32_t MoEOp::enqueue(Attrs const& attrs, nvinfer1::PluginTensorDesc const* inputDesc,
    nvinfer1::PluginTensorDesc const*, void const* const* inputs, void* const* outputs, void* workspace,
    cudaStream_t stream)
{
    Dims dims[8];
    for (int32_t i = 0; i < 8; ++i)
    {
        dims[i] = toCoreDims(inputDesc[i].dims);
    }
    moe::Sizes const z = moe::sizesFromInputs(dims);
    QwenMoEParams p{};
    p.x = inputs[0];
    p.routerWeight = inputs[1];
    p.gateUp = inputs[2];
    p.down = inputs[3];
    p.sharedGate = inputs[4];
    p.sharedUp = inputs[5];
    p.sharedDown = inputs[6];
    p.sharedExpertGate = inputs[7];
    p.y = outputs[0];
    p.workspace = workspace;
    p.tokens = z.tokens;
    p.hidden = z.hidden;
    p.experts = z.experts;
    p.inter = z.inter;
    p.sharedInter = z.sharedInter;
    p.topK = attrs.topK;
    p.normalize = attrs.normalize;
    p.dtype = toQwenDtype(inputDesc[0].type);
    p.forceTiled = 0;
    return qwenLaunchMoE(&p, stream);
}

} // namespace trt
} // namespace qwen
