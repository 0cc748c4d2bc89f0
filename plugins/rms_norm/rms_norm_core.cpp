#include "rms_norm_core.h"

#include <sstream>

namespace qwen
{
namespace rms_norm
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
    if (nbInputs != 2)
    {
        return std::string(kPluginName) + ": expects 2 inputs (X, scale)";
    }
    std::string error;
    if (in[0].nbDims < 1)
    {
        error += "X must have rank >= 1; ";
    }
    else
    {
        expectShape("scale", in[1], 1, {in[0].d[in[0].nbDims - 1]}, error);
    }
    return error.empty() ? error : std::string(kPluginName) + ": " + error;
}

size_t workspaceSize(Attrs const&, Dims const*, int32_t)
{
    return 0;
}

} // namespace rms_norm
} // namespace qwen
