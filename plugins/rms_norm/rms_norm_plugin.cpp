// QwenRMSNorm plugin: maps the TensorRT tensors onto the kernel launcher.
#include "rms_norm_plugin.h"
#include "rms_norm_launch.h"

namespace qwen
{
namespace trt
{

int32_t RMSNormOp::enqueue(Attrs const& attrs, nvinfer1::PluginTensorDesc const* inputDesc,
    nvinfer1::PluginTensorDesc const*, void const* const* inputs, void* const* outputs, void*, cudaStream_t stream)
{
    Dims const x = toCoreDims(inputDesc[0].dims);
    QwenRMSNormParams p{};
    p.x = inputs[0];
    p.scale = static_cast<float const*>(inputs[1]);
    p.y = outputs[0];
    p.dim = x.d[x.nbDims - 1];
    p.rows = p.dim > 0 ? volume(x) / p.dim : 0;
    p.epsilon = attrs.epsilon;
    p.dtype = toQwenDtype(inputDesc[0].type);
    return qwenLaunchRMSNorm(&p, stream);
}

} // namespace trt
} // namespace qwen
