#include "gated_attention_core.h"

#include "gated_attention_workspace.h"

#include <algorithm>
#include <sstream>

namespace qwen
{
namespace gated_attention
{

Attrs toAttrs(FieldValues<6> const& v)
{
    return Attrs{static_cast<int32_t>(v.v[0]), static_cast<int32_t>(v.v[1]), static_cast<int32_t>(v.v[2]),
        static_cast<int32_t>(v.v[3]), static_cast<float>(v.v[4]), static_cast<float>(v.v[5])};
}

FieldValues<6> toValues(Attrs const& a)
{
    return FieldValues<6>{{static_cast<double>(a.numHeads), static_cast<double>(a.numKvHeads),
        static_cast<double>(a.headDim), static_cast<double>(a.rotaryDim), a.epsilon, a.scale}};
}

std::string validate(Attrs const& a)
{
    std::ostringstream s;
    if (a.numHeads <= 0 || a.numKvHeads <= 0 || a.numHeads % a.numKvHeads != 0)
    {
        s << "num_heads (" << a.numHeads << ") must be a positive multiple of num_kv_heads (" << a.numKvHeads
          << "); ";
    }
    bool supported = false;
    for (int32_t hd : kSupportedHeadDims)
    {
        supported = supported || hd == a.headDim;
    }
    if (a.headDim > kMaxHeadDim)
    {
        s << "head_dim " << a.headDim << " is over " << kMaxHeadDim
          << " (the attention kernels hold a head in one tile); ";
    }
    else if (!supported)
    {
        s << "head_dim " << a.headDim << " is not supported (one of 32, 64, 128, 256: the attention kernels' "
          << "power-of-two head dims); ";
    }
    if (a.rotaryDim <= 0 || a.rotaryDim % 2 != 0 || a.rotaryDim > a.headDim)
    {
        s << "rotary_dim " << a.rotaryDim << " must be even and within (0, head_dim " << a.headDim << "]; ";
    }
    if (!(a.epsilon > 0.0F))
    {
        s << "epsilon must be positive, got " << a.epsilon << "; ";
    }
    if (!(a.scale >= 0.0F))
    {
        s << "scale must be >= 0 (0 means 1/sqrt(head_dim)), got " << a.scale << "; ";
    }
    std::string const error = s.str();
    return error.empty() ? error : std::string(kPluginName) + ": " + error;
}

std::string checkShapes(Attrs const& a, Dims const* in, int32_t nbInputs)
{
    if (nbInputs != 12)
    {
        return std::string(kPluginName) + ": expects 12 inputs";
    }
    std::string error;
    int64_t const nh = a.numHeads, kv = a.numKvHeads, hd = a.headDim, rot = a.rotaryDim;
    expectShape("X", in[0], 3, {-1, -1, -1}, error);
    if (!error.empty())
    {
        return std::string(kPluginName) + ": " + error;
    }
    int64_t const b = in[0].d[0], t = in[0].d[1], h = in[0].d[2];
    int64_t const p = in[4].nbDims == 4 ? in[4].d[2] : -1;
    int64_t const s = (p >= 0 && t >= 0) ? p + t : -1;
    expectShape("attention_mask", in[1], 2, {b, s}, error);
    expectShape("cos", in[2], 3, {b, t, rot}, error);
    expectShape("sin", in[3], 3, {b, t, rot}, error);
    expectShape("past_key", in[4], 4, {b, kv, -1, hd}, error);
    expectShape("past_value", in[5], 4, {b, kv, p, hd}, error);
    expectShape("q_weight", in[6], 2, {h, nh * 2 * hd}, error);
    expectShape("k_weight", in[7], 2, {h, kv * hd}, error);
    expectShape("v_weight", in[8], 2, {h, kv * hd}, error);
    expectShape("o_weight", in[9], 2, {nh * hd, h}, error);
    expectShape("q_norm", in[10], 1, {hd}, error);
    expectShape("k_norm", in[11], 1, {hd}, error);
    return error.empty() ? error : std::string(kPluginName) + ": " + error;
}

Sizes sizesFromInputs(Dims const* in)
{
    return Sizes{in[0].d[0], in[0].d[1], in[4].d[2], in[0].d[2]};
}

int32_t numKvSplits(int64_t batch, int64_t kvHeads, int64_t rows, int64_t keys)
{
    // Sized for ~2 waves of 132 SMs; row tiles counted with the 64-row tile (the kernel may use 32-row
    // tiles on GPUs with less shared memory, which only adds blocks).
    constexpr int64_t kMinKeysPerSplit = 256;
    constexpr int64_t kMaxSplits = 64;
    int64_t const blocks = batch * kvHeads * ceilDiv(rows, 64);
    if (blocks <= 0 || blocks >= kSplitMinBlocks)
    {
        return 1;
    }
    int64_t splits = std::min(ceilDiv(kTargetBlocks, blocks), ceilDiv(keys, kMinKeysPerSplit));
    splits = std::max<int64_t>(1, std::min(splits, kMaxSplits));
    return static_cast<int32_t>(splits);
}

namespace
{

// gated_attention_workspace.h's carving, as byte offsets.
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
    WorkspaceShape const shape{z.batch, z.tokens, a.numHeads, a.numKvHeads, a.headDim};
    Buffers<size_t> const b = carve(carver, shape);
    Layout l{};
    l.qg = b.qProj;
    l.k = b.k;
    l.v = b.v;
    l.qPacked = b.q;
    l.attn = b.attn;
    l.yAcc = b.attn;
    l.partO = b.acc;
    l.partML = b.m;
    l.partL = b.l;
    l.total = carver.w.total();
    return l;
}

size_t workspaceSize(Attrs const& a, Dims const* in, int32_t nbInputs)
{
    if (nbInputs != 12 || in[0].nbDims != 3 || in[4].nbDims != 4)
    {
        return 0;
    }
    return layout(a, sizesFromInputs(in)).total;
}

} // namespace gated_attention
} // namespace qwen
