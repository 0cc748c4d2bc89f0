#include "gated_deltanet_core.h"

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
    if (a.headKDim <= 0 || a.headKDim > kMaxHeadDim || a.headVDim <= 0 || a.headVDim > kMaxHeadDim)
    {
        s << "head_k_dim (" << a.headKDim << ") and head_v_dim (" << a.headVDim << ") must be within 1.."
          << kMaxHeadDim << "; ";
    }
    if (a.convKernel < 2 || a.convKernel > 8)
    {
        s << "conv_kernel " << a.convKernel << " must be within 2..8; ";
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

int64_t segmentChunks(Attrs const& a, Sizes const& z)
{
    int64_t const chunks = ceilDiv(z.tokens, kChunk);
    int64_t const perChunk = std::max<int64_t>(1, z.batch * a.numVHeads);
    return std::max<int64_t>(1, std::min(chunks, kChunkItemsPerSegment / perChunk));
}

bool usesChunked(RuleMode mode, int64_t tokens)
{
    return mode == RuleMode::kChunked || (mode == RuleMode::kAuto && tokens > kRecurrentMaxTokens);
}

Layout layout(Attrs const& a, Sizes const& z, RuleMode mode)
{
    int64_t const bt = z.batch * z.tokens;
    int64_t const nk = a.numKHeads, nv = a.numVHeads, dk = a.headKDim, dv = a.headVDim;
    WorkspaceLayout w;
    Layout l{};
    l.xMasked = w.add(bt * z.hidden * kActBytes);
    l.mixed = w.add(bt * convDim(a) * 4);
    l.z = w.add(bt * nv * dv * 4);
    l.b = w.add(bt * nv * 4);
    l.a = w.add(bt * nv * 4);
    l.q = w.add(bt * nk * dk * 4);
    l.k = w.add(bt * nk * dk * 4);
    l.beta = w.add(bt * nv * 4);
    l.g = w.add(bt * nv * 4);
    l.o = w.add(bt * nv * dv * 4);
    l.normed = w.add(bt * nv * dv * kActBytes);
    l.yAcc = w.add(bt * z.hidden * 4);
    l.segChunks = 0;
    if (usesChunked(mode, z.tokens))
    {
        l.segChunks = segmentChunks(a, z);
        // Capacity, not the segment's item count: TensorRT sizes the workspace for the largest shapes and
        // it must fit every smaller one, and items per segment is not monotonic in the batch size.
        int64_t const heads = z.batch * nv;
        int64_t const items = std::min(heads * ceilDiv(z.tokens, kChunk), std::max(heads, kChunkItemsPerSegment));
        l.u = w.add(items * kChunk * dv * 4);
        l.w = w.add(items * kChunk * dk * 4);
        l.aqk = w.add(items * kChunk * kChunk * 4);
        l.gcum = w.add(items * kChunk * 4);
    }
    l.total = w.total();
    return l;
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
