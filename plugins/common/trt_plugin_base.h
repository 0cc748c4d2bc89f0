// Generic TensorRT IPluginV3 wrapper and creator, driven by an op's core tables (<op>_core.h).
//
// An op plugs in through a traits struct (see e.g. moe/moe_plugin.h) providing:
//   kName, kFields, kInputs, kOutputs, kOutputRecipes, kAliases   (from the core header)
//   Attrs, toAttrs(values), toValues(attrs), validate, checkShapes, workspaceSize   (core functions)
//   enqueue(attrs, inputDesc, outputDesc, inputs, outputs, workspace, stream)      (calls the launcher)
//
// Capabilities: IPluginV3OneCore, IPluginV3OneBuildV2 (build + in-place aliasing of state outputs, which
// TensorRT honours when PreviewFeature::kALIASED_PLUGIN_IO_10_03 is on), IPluginV3OneRuntime.
#pragma once

#include <NvInferRuntime.h>

#include "qwen_core.h"
#include "qwen_launch.h"

#include <cstdio>
#include <exception>
#include <new>
#include <string>
#include <vector>

namespace qwen
{
namespace trt
{

void setLoggerFinder(nvinfer1::ILoggerFinder* finder);
void logError(std::string const& message);

inline Dims toCoreDims(nvinfer1::Dims const& dims)
{
    Dims out;
    out.nbDims = dims.nbDims < kMaxDims ? dims.nbDims : kMaxDims;
    for (int32_t i = 0; i < out.nbDims; ++i)
    {
        out.d[i] = dims.d[i];
    }
    return out;
}

inline int32_t toQwenDtype(nvinfer1::DataType type)
{
    return type == nvinfer1::DataType::kBF16 ? QWEN_DTYPE_BF16 : QWEN_DTYPE_F16;
}

template <size_t N>
constexpr size_t countOf(IoSpec const (&)[N])
{
    return N;
}

template <size_t N>
constexpr size_t countOf(FieldSpec const (&)[N])
{
    return N;
}

template <class Op>
class QwenPlugin : public nvinfer1::IPluginV3,
                   public nvinfer1::IPluginV3OneCore,
                   public nvinfer1::IPluginV3OneBuildV2,
                   public nvinfer1::IPluginV3OneRuntime
{
public:
    using Attrs = typename Op::Attrs;
    static constexpr int32_t kNbInputs = static_cast<int32_t>(countOf(Op::kInputs));
    static constexpr int32_t kNbOutputs = static_cast<int32_t>(countOf(Op::kOutputs));
    static constexpr size_t kNbFields = countOf(Op::kFields);

    explicit QwenPlugin(Attrs const& attrs)
        : mAttrs(attrs)
    {
        buildSerialization();
    }

    QwenPlugin(QwenPlugin const&) = delete;
    QwenPlugin& operator=(QwenPlugin const&) = delete;
    ~QwenPlugin() override = default;

    // ---- IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override
    {
        switch (type)
        {
        case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuildV2*>(this);
        case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
        case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
        }
        return nullptr;
    }

    nvinfer1::IPluginV3* clone() noexcept override
    {
        try
        {
            return new QwenPlugin(mAttrs);
        }
        catch (std::exception const& e)
        {
            logError(std::string(Op::kName) + ": clone failed: " + e.what());
        }
        return nullptr;
    }

    // ---- IPluginV3OneCore
    char const* getPluginName() const noexcept override
    {
        return Op::kName;
    }
    char const* getPluginVersion() const noexcept override
    {
        return kPluginVersion;
    }
    char const* getPluginNamespace() const noexcept override
    {
        return kPluginNamespace;
    }

    // ---- IPluginV3OneBuild(V2)
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept override
    {
        if (nbInputs != kNbInputs || nbOutputs != kNbOutputs)
        {
            logError(std::string(Op::kName) + ": wrong number of inputs or outputs");
            return 1;
        }
        Dims dims[kNbInputs];
        for (int32_t i = 0; i < kNbInputs; ++i)
        {
            dims[i] = toCoreDims(in[i].desc.dims); // -1 marks dimensions not known yet
        }
        return report(Op::checkShapes(mAttrs, dims, kNbInputs));
    }

    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override
    {
        if (nbInputs != kNbInputs || nbOutputs != kNbOutputs)
        {
            return 1;
        }
        for (int32_t i = 0; i < kNbOutputs; ++i)
        {
            outputTypes[i] = typeOf(Op::kOutputs[i].type, inputTypes[0]);
        }
        return 0;
    }

    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const*,
        int32_t, nvinfer1::DimsExprs* outputs, int32_t nbOutputs, nvinfer1::IExprBuilder& exprBuilder) noexcept override
    {
        if (nbInputs != kNbInputs || nbOutputs != kNbOutputs)
        {
            return 1;
        }
        for (int32_t i = 0; i < kNbOutputs; ++i)
        {
            OutputRecipe const& recipe = Op::kOutputRecipes[i];
            if (recipe.sameAsInput >= 0)
            {
                outputs[i] = inputs[recipe.sameAsInput];
                continue;
            }
            outputs[i].nbDims = recipe.nbDims;
            for (int32_t d = 0; d < recipe.nbDims; ++d)
            {
                DimRecipe const& r = recipe.dims[d];
                nvinfer1::IDimensionExpr const* e = inputs[r.input].d[r.dim];
                if (r.input2 >= 0)
                {
                    e = exprBuilder.operation(nvinfer1::DimensionOperation::kSUM, *e, *inputs[r.input2].d[r.dim2]);
                }
                if (e == nullptr)
                {
                    return 1;
                }
                outputs[i].d[d] = e;
            }
        }
        return 0;
    }

    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override
    {
        if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || pos < 0 || pos >= nbInputs + nbOutputs)
        {
            return false;
        }
        nvinfer1::PluginTensorDesc const& desc = inOut[pos].desc;
        if (desc.format != nvinfer1::TensorFormat::kLINEAR)
        {
            return false;
        }
        IoType const type = pos < nbInputs ? Op::kInputs[pos].type : Op::kOutputs[pos - nbInputs].type;
        switch (type)
        {
        case IoType::kAct:
            if (pos == 0)
            {
                return desc.type == nvinfer1::DataType::kHALF || desc.type == nvinfer1::DataType::kBF16;
            }
            return desc.type == inOut[0].desc.type;
        case IoType::kF32: return desc.type == nvinfer1::DataType::kFLOAT;
        case IoType::kI32: return desc.type == nvinfer1::DataType::kINT32;
        }
        return false;
    }

    int32_t getNbOutputs() const noexcept override
    {
        return kNbOutputs;
    }

    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const*, int32_t) const noexcept override
    {
        if (nbInputs != kNbInputs)
        {
            return 0;
        }
        // Sized for the profile's largest shapes; the layouts are built so that every smaller shape fits.
        Dims dims[kNbInputs];
        for (int32_t i = 0; i < kNbInputs; ++i)
        {
            dims[i] = toCoreDims(inputs[i].max);
        }
        return Op::workspaceSize(mAttrs, dims, kNbInputs);
    }

    int32_t getAliasedInput(int32_t outputIndex) noexcept override
    {
        return outputIndex >= 0 && outputIndex < kNbOutputs ? Op::kAliases[outputIndex] : -1;
    }

    char const* getTimingCacheID() noexcept override
    {
        return mTimingCacheId.c_str();
    }

    // ---- IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const*,
        int32_t nbOutputs) noexcept override
    {
        if (nbInputs != kNbInputs || nbOutputs != kNbOutputs)
        {
            return 1;
        }
        Dims dims[kNbInputs];
        for (int32_t i = 0; i < kNbInputs; ++i)
        {
            dims[i] = toCoreDims(in[i].dims);
        }
        return report(Op::checkShapes(mAttrs, dims, kNbInputs));
    }

    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override
    {
        int32_t const status = Op::enqueue(mAttrs, inputDesc, outputDesc, inputs, outputs, workspace, stream);
        if (status != 0)
        {
            logError(std::string(Op::kName) + ": launch failed (status " + std::to_string(status)
                + "): " + qwenLastError());
        }
        return status;
    }

    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext*) noexcept override
    {
        return clone();
    }

    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override
    {
        return &mFieldCollection;
    }

private:
    static nvinfer1::DataType typeOf(IoType type, nvinfer1::DataType act)
    {
        switch (type)
        {
        case IoType::kAct: return act;
        case IoType::kF32: return nvinfer1::DataType::kFLOAT;
        case IoType::kI32: return nvinfer1::DataType::kINT32;
        }
        return act;
    }

    static int32_t report(std::string const& error)
    {
        if (error.empty())
        {
            return 0;
        }
        logError(error);
        return 1;
    }

    // The serialized fields are the creator's fields, so a deserialized engine recreates the plugin
    // through the same createPlugin path.
    void buildSerialization()
    {
        FieldValues<kNbFields> const values = Op::toValues(mAttrs);
        mFields.clear();
        mTimingCacheId = Op::kName;
        for (size_t i = 0; i < kNbFields; ++i)
        {
            FieldSpec const& spec = Op::kFields[i];
            if (spec.type == FieldType::kInt32)
            {
                mInts[i] = static_cast<int32_t>(values.v[i]);
                mFields.emplace_back(spec.name, &mInts[i], nvinfer1::PluginFieldType::kINT32, 1);
            }
            else
            {
                mFloats[i] = static_cast<float>(values.v[i]);
                mFields.emplace_back(spec.name, &mFloats[i], nvinfer1::PluginFieldType::kFLOAT32, 1);
            }
            mTimingCacheId += ":" + std::to_string(values.v[i]);
        }
        mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
        mFieldCollection.fields = mFields.data();
    }

    Attrs mAttrs;
    int32_t mInts[kNbFields]{};
    float mFloats[kNbFields]{};
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
    std::string mTimingCacheId;
};

// Reads one numeric plugin field (any integer or float width) as a double. False for other types.
bool readFieldValue(nvinfer1::PluginField const& field, double& value);

template <class Op>
class QwenPluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    static constexpr size_t kNbFields = countOf(Op::kFields);

    QwenPluginCreator()
    {
        for (size_t i = 0; i < kNbFields; ++i)
        {
            FieldSpec const& spec = Op::kFields[i];
            mFields.emplace_back(spec.name, nullptr,
                spec.type == FieldType::kInt32 ? nvinfer1::PluginFieldType::kINT32
                                               : nvinfer1::PluginFieldType::kFLOAT32,
                1);
        }
        mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
        mFieldCollection.fields = mFields.data();
    }

    char const* getPluginName() const noexcept override
    {
        return Op::kName;
    }
    char const* getPluginVersion() const noexcept override
    {
        return kPluginVersion;
    }
    char const* getPluginNamespace() const noexcept override
    {
        return kPluginNamespace;
    }
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override
    {
        return &mFieldCollection;
    }

    nvinfer1::IPluginV3* createPlugin(
        char const*, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase) noexcept override
    {
        try
        {
            FieldValues<kNbFields> values = defaultFieldValues(Op::kFields);
            for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i)
            {
                nvinfer1::PluginField const& field = fc->fields[i];
                double value = 0.0;
                if (field.name == nullptr || !readFieldValue(field, value))
                {
                    continue; // unknown types: fields this plugin does not list are ignored anyway
                }
                setFieldValue(Op::kFields, values, field.name, value);
            }
            typename Op::Attrs const attrs = Op::toAttrs(values);
            std::string const error = Op::validate(attrs);
            if (!error.empty())
            {
                logError(error);
                return nullptr;
            }
            return new QwenPlugin<Op>(attrs);
        }
        catch (std::exception const& e)
        {
            logError(std::string(Op::kName) + ": createPlugin failed: " + e.what());
        }
        return nullptr;
    }

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

} // namespace trt
} // namespace qwen
