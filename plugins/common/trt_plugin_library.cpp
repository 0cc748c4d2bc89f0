// Plugin-library entry points (TensorRT 10+ convention), logging, and field decoding.
//
// IPluginRegistry::loadLibrary(path), `trtexec --dynamicPlugins=path` and `--setPluginsToSerialize` look up
// `setLoggerFinder` and `getCreators` in this library. The library uses only the plugin interfaces (it
// does not link libnvinfer), so it can also be serialized into version-compatible engines.
#include "trt_plugin_base.h"

#include "../gated_attention/gated_attention_plugin.h"
#include "../gated_deltanet/gated_deltanet_plugin.h"
#include "../gated_rms_norm/gated_rms_norm_plugin.h"
#include "../moe/moe_plugin.h"
#include "../rms_norm/rms_norm_plugin.h"

#include <atomic>
#include <cstring>

namespace qwen
{
namespace trt
{
namespace
{
std::atomic<nvinfer1::ILoggerFinder*> gLoggerFinder{nullptr};
} // namespace

void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    gLoggerFinder.store(finder);
}

void logError(std::string const& message)
{
    nvinfer1::ILoggerFinder* finder = gLoggerFinder.load();
    nvinfer1::ILogger* logger = finder != nullptr ? finder->findLogger() : nullptr;
    if (logger != nullptr)
    {
        logger->log(nvinfer1::ILogger::Severity::kERROR, message.c_str());
    }
    else
    {
        std::fprintf(stderr, "[qwen plugins] %s\n", message.c_str());
    }
}

bool readFieldValue(nvinfer1::PluginField const& field, double& value)
{
    if (field.data == nullptr || field.length < 1)
    {
        return false;
    }
    switch (field.type)
    {
    case nvinfer1::PluginFieldType::kINT32: value = *static_cast<int32_t const*>(field.data); return true;
    case nvinfer1::PluginFieldType::kINT64: value = static_cast<double>(*static_cast<int64_t const*>(field.data)); return true;
    case nvinfer1::PluginFieldType::kINT16: value = *static_cast<int16_t const*>(field.data); return true;
    case nvinfer1::PluginFieldType::kINT8: value = *static_cast<int8_t const*>(field.data); return true;
    case nvinfer1::PluginFieldType::kFLOAT32: value = *static_cast<float const*>(field.data); return true;
    case nvinfer1::PluginFieldType::kFLOAT64: value = *static_cast<double const*>(field.data); return true;
    default: return false;
    }
}

} // namespace trt
} // namespace qwen

extern "C" QWEN_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    qwen::trt::setLoggerFinder(finder);
}

extern "C" QWEN_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    using namespace qwen::trt;
    static QwenPluginCreator<RMSNormOp> sRMSNorm;
    static QwenPluginCreator<GatedRMSNormOp> sGatedRMSNorm;
    static QwenPluginCreator<GatedAttentionOp> sGatedAttention;
    static QwenPluginCreator<GatedDeltaNetOp> sGatedDeltaNet;
    static QwenPluginCreator<MoEOp> sMoE;
    static nvinfer1::IPluginCreatorInterface* const kCreators[]
        = {&sRMSNorm, &sGatedRMSNorm, &sGatedAttention, &sGatedDeltaNet, &sMoE};
    nbCreators = static_cast<int32_t>(sizeof(kCreators) / sizeof(kCreators[0]));
    return kCreators;
}
