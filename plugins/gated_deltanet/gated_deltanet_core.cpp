#include "gated_deltanet_core.h"

#include "gated_deltanet_workspace.h"

#include <algorithm>
#include <sstream>

namespace qwen
{
namespace gated_deltanet
{

Attrs toAttrs(FieldValues<6> const& v)
{
    return Attrs{static_cast<int32_t>(v.v[0]), static_cast<int32_t>(v.v[1]), static_cast<int32_t>(v.v[2]),
        static_cast<int32_t>(v.v[3]), static_cast<int32_t>(v.v[4]), static_cast<float>(v.v[5])};
}

FieldValues<6> toValues(Attrs const& a)
{
    return FieldValues<6>{{static_cast<double>(a.numKHeads), static_cast<double>(a.numVHeads),
        static_cast<double>(a.headKDim), static_cast<double>(a.headVDim), static_cast<double>(a.convKernel),
        a.epsilon}};
}

std::string validate(Attrs const& a)
{
    std::ostringstream s;
    if (a.numKHeads <= 0 || a.numVHeads <= 0 || a.numVHeads % a.numKHeads != 0)
    {
        s << "num_v_heads (" << a.numVHeads << ") must be a positive multiple of num_k_heads (" << a.numKHeads
          << "); ";
    }
    if (a.headKDim != kHeadDim || a.headVDim != kHeadDim)
    {
        s << "head_k_dim (" << a.headKDim << ") and head_v_dim (" << a.headVDim << ") must be " << kHeadDim
          << ", the head dims the delta-rule kernels are compiled for; ";
    }
    if (a.convKernel != kConvKernel)
    {
        s << "conv_kernel " << a.convKernel << " is not supported: the conv kernel is compiled for "
          << kConvKernel << "; ";
    }
    if (!(a.epsilon > 0.0F))
    {
        s << "epsilon must be positive, got " << a.epsilon << "; ";
    }
    std::string const error = s.str();
    return error.empty() ? error : std::string(kPluginName) + ": " + error;
}

std::string checkShapes(Attrs const& a, Dims const* in, int32_t nbInputs)
{
    if (nbInputs != 13)
    {
        return std::string(kPluginName) + ": expects 13 inputs";
    }
    std::string error;
    expectShape("X", in[0], 3, {-1, -1, -1}, error);
    if (!error.empty())
    {
        return std::string(kPluginName) + ": " + error;
    }
    int64_t const b = in[0].d[0], h = in[0].d[2];
    int64_t const nv = a.numVHeads, dk = a.headKDim, dv = a.headVDim, c = convDim(a);
    expectShape("attention_mask", in[1], 2, {b, -1}, error);
    if (in[1].nbDims == 2 && in[1].d[1] >= 0 && in[0].d[1] >= 0 && in[1].d[1] < in[0].d[1])
    {
        error += "attention_mask must cover at least the new tokens; ";
    }
    expectShape("past_conv", in[2], 3, {b, c, a.convKernel - 1}, error);
    expectShape("past_recurrent", in[3], 4, {b, nv, dk, dv}, error);
    expectShape("qkv_weight", in[4], 2, {h, c}, error);
    expectShape("z_weight", in[5], 2, {h, nv * dv}, error);
    expectShape("b_weight", in[6], 2, {h, nv}, error);
    expectShape("a_weight", in[7], 2, {h, nv}, error);
    expectShape("conv_weight", in[8], 3, {c, 1, a.convKernel}, error);
    expectShape("neg_exp_A", in[9], 1, {nv}, error);
    expectShape("dt_bias", in[10], 1, {nv}, error);
    expectShape("norm_weight", in[11], 1, {dv}, error);
    expectShape("out_weight", in[12], 2, {nv * dv, h}, error);
    return error.empty() ? error : std::string(kPluginName) + ": " + error;
}

Sizes sizesFromInputs(Dims const* in)
{
    return Sizes{in[0].d[0], in[0].d[1], in[0].d[2]};
}

bool usesChunked(RuleMode mode, int64_t tokens)
{
    return mode == RuleMode::kChunked || (mode == RuleMode::kAuto && tokens > kRecurrentMaxTokens);
}

namespace
{

// gated_deltanet_workspace.h's carving, as byte offsets.
struct OffsetCarver
{
    WorkspaceLayout w;
    size_t take(size_t bytes)
    {
        return w.add(bytes);
    }
};

} // namespace

Layout layout(Attrs const& a, Sizes const& z)
{
    OffsetCarver carver;
    WorkspaceShape const shape{z.batch, z.tokens, convDim(a), a.numVHeads, a.headVDim};
    Buffers<size_t> const b = carve(carver, shape);
    return Layout{b.qkv, b.z, b.b, b.a, b.conv, b.o, b.normed, carver.w.total()};
}

size_t workspaceSize(Attrs const& a, Dims const* in, int32_t nbInputs)
{
    if (nbInputs != 13 || in[0].nbDims != 3)
    {
        return 0;
    }
    return layout(a, sizesFromInputs(in)).total;
}

} // namespace gated_deltanet
} // namespace qwen
