#include "moe_core.h"

#include <climits>
#include <sstream>

namespace qwen
{
namespace moe
{

Attrs toAttrs(FieldValues<2> const& v)
{
    return Attrs{static_cast<int32_t>(v.v[0]), static_cast<int32_t>(v.v[1])};
}

FieldValues<2> toValues(Attrs const& a)
{
    return FieldValues<2>{{static_cast<double>(a.topK), static_cast<double>(a.normalize)}};
}

std::string validate(Attrs const& a)
{
    std::ostringstream s;
    if (a.topK < 1 || a.topK > kMaxTopK)
    {
        s << "top_k " << a.topK << " must be within 1.." << kMaxTopK << "; ";
    }
    if (a.normalize != 0 && a.normalize != 1)
    {
        s << "normalize must be 0 or 1, got " << a.normalize << "; ";
    }
    std::string const error = s.str();
    return error.empty() ? error : std::string(kPluginName) + ": " + error;
}

std::string checkShapes(Attrs const& a, Dims const* in, int32_t nbInputs)
{
    if (nbInputs != 8)
    {
        return std::string(kPluginName) + ": expects 8 inputs";
    }
    std::string error;
    if (in[0].nbDims < 1)
    {
        return std::string(kPluginName) + ": X must have rank >= 1";
    }
    int64_t const h = in[0].d[in[0].nbDims - 1];
    expectShape("router_weight", in[1], 2, {h, -1}, error);
    int64_t const e = in[1].nbDims == 2 ? in[1].d[1] : -1;
    int64_t const i = in[3].nbDims == 3 ? in[3].d[1] : -1;
    int64_t const is = in[4].nbDims == 2 ? in[4].d[1] : -1;
    expectShape("gate_up", in[2], 3, {e, h, i >= 0 ? 2 * i : -1}, error);
    expectShape("down", in[3], 3, {e, -1, h}, error);
    expectShape("shared_gate", in[4], 2, {h, -1}, error);
    expectShape("shared_up", in[5], 2, {h, is}, error);
    expectShape("shared_down", in[6], 2, {is, h}, error);
    expectShape("shared_expert_gate", in[7], 2, {h, 1}, error);
    if (e >= 0 && (e > kMaxExperts || a.topK > e))
    {
        std::ostringstream s;
        s << "experts " << e << " must be within top_k (" << a.topK << ").." << kMaxExperts << "; ";
        error += s.str();
    }
    // What the Triton kernels take: widths with their ':16' hints, and one expert's matrix indexed in int32.
    struct Width
    {
        char const* name;
        int64_t value;
    };
    for (Width const w : {Width{"hidden (X dim -1)", h}, Width{"inter (down dim 1)", i},
             Width{"shared inter (shared_gate dim 1)", is}})
    {
        if (w.value >= 0 && w.value % kWidthMultiple != 0)
        {
            std::ostringstream s;
            s << w.name << " " << w.value << " must be a multiple of " << kWidthMultiple << "; ";
            error += s.str();
        }
    }
    if (h > 0 && ((i > 0 && h * 2 * i > INT32_MAX) || (is > 0 && h * is > INT32_MAX)))
    {
        std::ostringstream s;
        s << "gate_up (" << h << " x " << 2 * i << ") and shared_gate (" << h << " x " << is
          << ") must each hold fewer than 2^31 elements per expert; ";
        error += s.str();
    }
    return error.empty() ? error : std::string(kPluginName) + ": " + error;
}

Sizes sizesFromInputs(Dims const* in)
{
    int64_t tokens = 1;
    for (int32_t i = 0; i + 1 < in[0].nbDims; ++i)
    {
        tokens *= in[0].d[i];
    }
    return Sizes{tokens, in[0].d[in[0].nbDims - 1], in[1].d[1], in[3].d[1], in[4].d[1]};
}

Layout layout(Attrs const& a, Sizes const& z)
{
    OffsetCarver w;
    Layout l{};
    l.at = carve(w, WorkspaceShape{z.tokens, z.hidden, z.experts, z.inter, z.sharedInter, a.topK});
    l.logits = l.at.logits;
    l.topIdx = l.at.ids;
    l.counts = l.at.counts;
    l.rowOff = l.at.offsets;
    l.permToken = l.at.sortedIds;
    l.act = l.at.h;
    l.acc = l.at.y;
    l.segTokens = segmentTokens(z.tokens);
    l.total = w.used();
    return l;
}

size_t workspaceSize(Attrs const& a, Dims const* in, int32_t nbInputs)
{
    if (nbInputs != 8 || in[0].nbDims < 1 || in[1].nbDims != 2 || in[3].nbDims != 3 || in[4].nbDims != 2)
    {
        return 0;
    }
    return layout(a, sizesFromInputs(in)).total;
}

} // namespace moe
} // namespace qwen
