#include "gated_rms_norm_core.h"

#include <sstream>

namespace qwen
{
namespace gated_rms_norm
{

Attrs toAttrs(FieldValues<1> const& values)
{
    return Attrs{static_cast<float>(values.v[0])};
}

FieldValues<1> toValues(Attrs const& attrs)
{
    return FieldValues<1>{{attrs.epsilon}};
}

std::string validate(Attrs const& attrs)
{
    if (!(attrs.epsilon > 0.0F))
    {
        std::ostringstream s;
        s << kPluginName << ": epsilon must be positive, got " << attrs.epsilon;
        return s.str();
    }
    return "";
}

std::string checkShapes(Attrs const&, Dims const* in, int32_t nbInputs)
{
    if (nbInputs != 3)
    {
        return std::string(kPluginName) + ": expects 3 inputs (X, Z, scale)";
    }
    std::string error;
    if (in[0].nbDims < 1)
    {
        error += "X must have rank >= 1; ";
    }
    else
    {
        if (in[1].nbDims != in[0].nbDims)
        {
            error += "Z must have the shape of X, got " + toString(in[1]) + " vs " + toString(in[0]) + "; ";
        }
        else
        {
            for (int32_t i = 0; i < in[0].nbDims; ++i)
            {
                if (in[0].d[i] >= 0 && in[1].d[i] >= 0 && in[0].d[i] != in[1].d[i])
                {
                    error += "Z must have the shape of X, got " + toString(in[1]) + " vs " + toString(in[0]) + "; ";
                    break;
                }
            }
        }
        expectShape("scale", in[2], 1, {in[0].d[in[0].nbDims - 1]}, error);
    }
    return error.empty() ? error : std::string(kPluginName) + ": " + error;
}

size_t workspaceSize(Attrs const&, Dims const*, int32_t)
{
    return 0;
}

} // namespace gated_rms_norm
} // namespace qwen
