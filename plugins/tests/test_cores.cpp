// Unit tests of the header-free plugin cores (no TensorRT, no CUDA): field tables, attribute validation,
// shape checks, output-shape recipes and workspace layouts. Plain asserts; exit code 0 when all pass.
#include "../gated_attention/gated_attention_core.h"
#include "../gated_deltanet/gated_deltanet_core.h"
#include "../gated_rms_norm/gated_rms_norm_core.h"
#include "../moe/moe_core.h"
#include "../rms_norm/rms_norm_core.h"

#include <cstdio>
#include <cstring>
#include <set>
#include <string>

using namespace qwen;

namespace
{

int gFailures = 0;
int gChecks = 0;

void check(bool ok, char const* what, int line, std::string const& detail = "")
{
    ++gChecks;
    if (!ok)
    {
        ++gFailures;
        std::printf("FAIL line %d: %s %s\n", line, what, detail.c_str());
    }
}

#define CHECK(cond) check((cond), #cond, __LINE__)
#define CHECK_MSG(cond, detail) check((cond), #cond, __LINE__, (detail))

bool contains(std::string const& haystack, char const* needle)
{
    return haystack.find(needle) != std::string::npos;
}

template <size_t N>
void checkFieldTable(FieldSpec const (&fields)[N])
{
    std::set<std::string> names;
    for (size_t i = 0; i < N; ++i)
    {
        CHECK(fields[i].name != nullptr && std::strlen(fields[i].name) > 0);
        CHECK(names.insert(fields[i].name).second);
    }
    FieldValues<N> values = defaultFieldValues(fields);
    for (size_t i = 0; i < N; ++i)
    {
        CHECK(values.v[i] == fields[i].defaultValue);
    }
    CHECK(!setFieldValue(fields, values, "no_such_field", 1.0));
}

template <size_t N>
void checkAliases(int32_t const (&aliases)[N], IoSpec const* inputs, IoSpec const* outputs, size_t nbInputs)
{
    for (size_t i = 0; i < N; ++i)
    {
        if (aliases[i] >= 0)
        {
            CHECK(static_cast<size_t>(aliases[i]) < nbInputs);
            CHECK(inputs[aliases[i]].type == outputs[i].type); // aliased tensors share their type
        }
    }
}

void checkLayoutAligned(std::initializer_list<size_t> offsets)
{
    for (size_t o : offsets)
    {
        CHECK(o % WorkspaceLayout::kAlign == 0);
    }
}

// ---- RMSNorm / GatedRMSNorm ---------------------------------------------------------------------------

void testNorms()
{
    checkFieldTable(rms_norm::kFields);
    checkFieldTable(gated_rms_norm::kFields);
    CHECK(std::string(rms_norm::kPluginName) == "QwenRMSNorm");
    CHECK(std::string(gated_rms_norm::kPluginName) == "QwenGatedRMSNorm");

    auto values = defaultFieldValues(rms_norm::kFields);
    CHECK(setFieldValue(rms_norm::kFields, values, "epsilon", 1e-5));
    rms_norm::Attrs a = rms_norm::toAttrs(values);
    CHECK(a.epsilon == 1e-5F);
    CHECK(rms_norm::toValues(a).v[0] == static_cast<double>(1e-5F));
    CHECK(rms_norm::validate(a).empty());
    CHECK(contains(rms_norm::validate(rms_norm::Attrs{0.0F}), "epsilon must be positive"));

    Dims in[2] = {makeDims({2, 7, 64}), makeDims({64})};
    CHECK(rms_norm::checkShapes(a, in, 2).empty());
    in[1] = makeDims({32});
    CHECK(contains(rms_norm::checkShapes(a, in, 2), "scale dim 0 is 32, expected 64"));
    in[0] = makeDims({-1, -1, 64});
    in[1] = makeDims({64});
    CHECK(rms_norm::checkShapes(a, in, 2).empty()); // dynamic dims are not held against the op
    Dims out;
    std::string error;
    CHECK(applyRecipe(rms_norm::kOutputRecipes[0], in, 2, out, error));
    CHECK(toString(out) == "[-1, -1, 64]");

    gated_rms_norm::Attrs g{1e-6F};
    Dims gin[3] = {makeDims({3, 5, 4, 16}), makeDims({3, 5, 4, 16}), makeDims({16})};
    CHECK(gated_rms_norm::checkShapes(g, gin, 3).empty());
    gin[1] = makeDims({3, 5, 4, 8});
    CHECK(contains(gated_rms_norm::checkShapes(g, gin, 3), "Z must have the shape of X"));
    CHECK(rms_norm::workspaceSize(a, in, 2) == 0);
}

// ---- GatedAttention ------------------------------------------------------------------------------------

gated_attention::Attrs bigAttention()
{
    // Qwen3.5-397B-A17B: 32 q / 2 kv heads of dim 256, rotary 64.
    return gated_attention::Attrs{32, 2, 256, 64, 1e-6F, 0.0625F};
}

void attentionInputs(Dims* in, int64_t b, int64_t t, int64_t p, int64_t h, gated_attention::Attrs const& a)
{
    int64_t const nh = a.numHeads, kv = a.numKvHeads, hd = a.headDim, rot = a.rotaryDim;
    in[0] = makeDims({b, t, h});
    in[1] = makeDims({b, p + t});
    in[2] = makeDims({b, t, rot});
    in[3] = makeDims({b, t, rot});
    in[4] = makeDims({b, kv, p, hd});
    in[5] = makeDims({b, kv, p, hd});
    in[6] = makeDims({h, nh * 2 * hd});
    in[7] = makeDims({h, kv * hd});
    in[8] = makeDims({h, kv * hd});
    in[9] = makeDims({nh * hd, h});
    in[10] = makeDims({hd});
    in[11] = makeDims({hd});
}

void testAttention()
{
    using namespace gated_attention;
    checkFieldTable(kFields);
    checkAliases(kAliases, kInputs, kOutputs, 12);
    CHECK(std::string(kPluginName) == "QwenGatedAttention");
    CHECK(sizeof(kInputs) / sizeof(kInputs[0]) == 12);
    CHECK(kInputs[1].type == IoType::kI32); // attention_mask is narrowed to int32 by the lowering

    Attrs a = bigAttention();
    CHECK(validate(a).empty());
    CHECK(contains(validate(Attrs{32, 3, 256, 64, 1e-6F, 0.0F}), "multiple of num_kv_heads"));
    CHECK(contains(validate(Attrs{32, 2, 96, 64, 1e-6F, 0.0F}), "head_dim 96 is not supported"));
    CHECK(contains(validate(Attrs{32, 2, 256, 63, 1e-6F, 0.0F}), "rotary_dim 63"));
    CHECK(contains(validate(Attrs{32, 2, 256, 512, 1e-6F, 0.0F}), "rotary_dim 512"));
    CHECK(contains(validate(Attrs{32, 2, 256, 64, 0.0F, 0.0F}), "epsilon"));
    CHECK(contains(validate(Attrs{0, 2, 256, 64, 1e-6F, 0.0F}), "num_heads"));

    auto values = defaultFieldValues(kFields);
    CHECK(setFieldValue(kFields, values, "num_heads", 32));
    CHECK(setFieldValue(kFields, values, "num_kv_heads", 2));
    CHECK(setFieldValue(kFields, values, "head_dim", 256));
    CHECK(setFieldValue(kFields, values, "rotary_dim", 64));
    Attrs parsed = toAttrs(values);
    CHECK(parsed.numHeads == 32 && parsed.numKvHeads == 2 && parsed.headDim == 256 && parsed.rotaryDim == 64);
    CHECK(parsed.scale == 0.0F && parsed.epsilon == 1e-6F);
    Attrs round = toAttrs(toValues(a));
    CHECK(round.numHeads == a.numHeads && round.scale == a.scale && round.epsilon == a.epsilon);

    Dims in[12];
    attentionInputs(in, 2, 7, 100, 4096, a);
    CHECK_MSG(checkShapes(a, in, 12).empty(), checkShapes(a, in, 12));
    Dims out;
    std::string error;
    CHECK(applyRecipe(kOutputRecipes[0], in, 12, out, error) && toString(out) == "[2, 7, 4096]");
    CHECK(applyRecipe(kOutputRecipes[1], in, 12, out, error) && toString(out) == "[2, 2, 107, 256]");
    CHECK(applyRecipe(kOutputRecipes[2], in, 12, out, error) && toString(out) == "[2, 2, 107, 256]");

    in[1] = makeDims({2, 100}); // mask must cover past + new tokens
    CHECK(contains(checkShapes(a, in, 12), "attention_mask dim 1 is 100, expected 107"));
    attentionInputs(in, 2, 7, 100, 4096, a);
    in[6] = makeDims({4096, 8192}); // q_proj without the gate half
    CHECK(contains(checkShapes(a, in, 12), "q_weight dim 1 is 8192, expected 16384"));
    attentionInputs(in, 2, 7, 100, 4096, a);
    in[2] = makeDims({2, 7, 32});
    CHECK(contains(checkShapes(a, in, 12), "cos dim 2 is 32, expected 64"));

    // Split-KV: only small grids split, and the partial buffers' shape-independent bound holds.
    CHECK(numKvSplits(1, 2, 16, 32768) > 1);     // decode at long context
    CHECK(numKvSplits(1, 2, 16000, 1000) == 1);  // prefill
    CHECK(numKvSplits(1, 2, 16, 1) == 1);        // one key: nothing to split
    for (int64_t b = 1; b <= 8; ++b)
    {
        for (int64_t kv = 1; kv <= 4; ++kv)
        {
            for (int64_t rows = 1; rows <= 4096; rows = rows * 3 + 1)
            {
                for (int64_t keys = 1; keys <= (1 << 20); keys *= 7)
                {
                    int64_t const s = numKvSplits(b, kv, rows, keys);
                    CHECK(s == 1 || s * b * kv * ceilDiv(rows, 64) * 64 <= kMaxSplitRows); // partials used only when s > 1
                    CHECK(s >= 1);
                }
            }
        }
    }

    // Workspace: sized for the largest shapes, it must fit every smaller one (TensorRT sizes it once).
    Sizes const big{8, 2048, 4096, 4096};
    Layout const lb = layout(a, big);
    checkLayoutAligned({lb.qg, lb.k, lb.v, lb.qPacked, lb.attn, lb.yAcc, lb.partO, lb.partML, lb.total});
    for (int64_t b = 1; b <= 8; b *= 2)
    {
        for (int64_t t = 1; t <= 2048; t *= 4)
        {
            for (int64_t p = 0; p <= 4096; p += 1024)
            {
                CHECK(layout(a, Sizes{b, t, p, 4096}).total <= lb.total);
            }
        }
    }
    attentionInputs(in, 8, 2048, 4096, 4096, a);
    CHECK(workspaceSize(a, in, 12) == lb.total);
}

// ---- GatedDeltaNet -------------------------------------------------------------------------------------

gated_deltanet::Attrs bigDeltaNet()
{
    // Qwen3.5-397B-A17B linear attention: 16 qk / 64 v heads of dim 128, conv kernel 4.
    return gated_deltanet::Attrs{16, 64, 128, 128, 4, 1e-6F};
}

void deltanetInputs(Dims* in, int64_t b, int64_t t, int64_t s, int64_t h, gated_deltanet::Attrs const& a)
{
    int64_t const nv = a.numVHeads, dk = a.headKDim, dv = a.headVDim, c = gated_deltanet::convDim(a);
    in[0] = makeDims({b, t, h});
    in[1] = makeDims({b, s});
    in[2] = makeDims({b, c, a.convKernel - 1});
    in[3] = makeDims({b, nv, dk, dv});
    in[4] = makeDims({h, c});
    in[5] = makeDims({h, nv * dv});
    in[6] = makeDims({h, nv});
    in[7] = makeDims({h, nv});
    in[8] = makeDims({c, 1, a.convKernel});
    in[9] = makeDims({nv});
    in[10] = makeDims({nv});
    in[11] = makeDims({dv});
    in[12] = makeDims({nv * dv, h});
}

void testDeltaNet()
{
    using namespace gated_deltanet;
    checkFieldTable(kFields);
    checkAliases(kAliases, kInputs, kOutputs, 13);
    CHECK(std::string(kPluginName) == "QwenGatedDeltaNet");
    CHECK(kAliases[1] == 2 && kAliases[2] == 3); // states in place
    CHECK(kInputs[3].type == IoType::kF32 && kOutputs[2].type == IoType::kF32); // fp32 recurrent state

    Attrs a = bigDeltaNet();
    CHECK(validate(a).empty());
    CHECK(convDim(a) == 2 * 16 * 128 + 64 * 128);
    CHECK(contains(validate(Attrs{16, 60, 128, 128, 4, 1e-6F}), "multiple of num_k_heads"));
    CHECK(contains(validate(Attrs{16, 64, 256, 128, 4, 1e-6F}), "head_k_dim"));
    CHECK(contains(validate(Attrs{16, 64, 128, 128, 1, 1e-6F}), "conv_kernel 1"));
    CHECK(contains(validate(Attrs{16, 64, 128, 128, 5, 1e-6F}), "conv_kernel 5 is not supported"));
    CHECK(contains(validate(Attrs{16, 64, 64, 128, 4, 1e-6F}), "must be 128"));
    auto values = defaultFieldValues(kFields);
    CHECK(toAttrs(values).convKernel == 4); // default conv kernel

    Dims in[13];
    deltanetInputs(in, 2, 65, 80, 4096, a);
    CHECK_MSG(checkShapes(a, in, 13).empty(), checkShapes(a, in, 13));
    Dims out;
    std::string error;
    CHECK(applyRecipe(kOutputRecipes[1], in, 13, out, error) && toString(out) == "[2, 12288, 3]");
    CHECK(applyRecipe(kOutputRecipes[2], in, 13, out, error) && toString(out) == "[2, 64, 128, 128]");
    in[1] = makeDims({2, 10});
    CHECK(contains(checkShapes(a, in, 13), "attention_mask must cover"));
    deltanetInputs(in, 2, 65, 80, 4096, a);
    in[8] = makeDims({12288, 1, 3});
    CHECK(contains(checkShapes(a, in, 13), "conv_weight dim 2 is 3, expected 4"));

    CHECK(!usesChunked(RuleMode::kAuto, kRecurrentMaxTokens));
    CHECK(usesChunked(RuleMode::kAuto, kRecurrentMaxTokens + 1));
    CHECK(usesChunked(RuleMode::kChunked, 1));
    CHECK(!usesChunked(RuleMode::kRecurrent, 1000));

    // One carving (gated_deltanet_workspace.h) serves every shape up to the largest: aligned, monotonic.
    Sizes const big{8, 8192, 4096};
    Layout const lb = layout(a, big);
    checkLayoutAligned({lb.qkv, lb.z, lb.b, lb.a, lb.conv, lb.o, lb.normed});
    for (int64_t b = 1; b <= 8; ++b)
    {
        for (int64_t t = 1; t <= 8192; t = t * 2 + 1)
        {
            CHECK(layout(a, Sizes{b, t, 4096}).total <= lb.total);
        }
    }
    CHECK(workspaceSize(a, in, 13) == layout(a, sizesFromInputs(in)).total);
}

// ---- MoE -------------------------------------------------------------------------------------------------

void moeInputs(Dims* in, int64_t b, int64_t t, int64_t h, int64_t e, int64_t i, int64_t is)
{
    in[0] = makeDims({b, t, h});
    in[1] = makeDims({h, e});
    in[2] = makeDims({e, h, 2 * i});
    in[3] = makeDims({e, i, h});
    in[4] = makeDims({h, is});
    in[5] = makeDims({h, is});
    in[6] = makeDims({is, h});
    in[7] = makeDims({h, 1});
}

void testMoE()
{
    using namespace moe;
    checkFieldTable(kFields);
    CHECK(std::string(kPluginName) == "QwenMoE");
    Attrs a{10, 1};
    CHECK(validate(a).empty());
    CHECK(contains(validate(Attrs{0, 1}), "top_k 0"));
    CHECK(contains(validate(Attrs{10, 2}), "normalize must be 0 or 1"));
    auto values = defaultFieldValues(kFields);
    CHECK(toAttrs(values).normalize == 1);
    CHECK(setFieldValue(kFields, values, "top_k", 10.7)); // integer fields truncate
    CHECK(toAttrs(values).topK == 10);

    Dims in[8];
    moeInputs(in, 1, 200, 4096, 512, 1024, 1024);
    CHECK_MSG(checkShapes(a, in, 8).empty(), checkShapes(a, in, 8));
    Sizes const z = sizesFromInputs(in);
    CHECK(z.tokens == 200 && z.hidden == 4096 && z.experts == 512 && z.inter == 1024 && z.sharedInter == 1024);
    in[2] = makeDims({512, 4096, 1024});
    CHECK(contains(checkShapes(a, in, 8), "gate_up dim 2 is 1024, expected 2048"));
    moeInputs(in, 1, 200, 4096, 8, 1024, 1024);
    CHECK(contains(checkShapes(a, in, 8), "experts 8 must be within top_k (10)"));
    moeInputs(in, 1, 200, 4096, 512, 1024, 1024);
    in[7] = makeDims({4096, 2});
    CHECK(contains(checkShapes(a, in, 8), "shared_expert_gate dim 1 is 2, expected 1"));

    Sizes const big{16384, 4096, 512, 1024, 1024};
    Layout const lb = layout(a, big);
    CHECK(lb.segTokens == kSegmentTokens);
    checkLayoutAligned({lb.logits, lb.topIdx, lb.counts, lb.rowOff, lb.permToken, lb.act, lb.acc, lb.total});
    for (int64_t n = 1; n <= 16384; n = n * 2 + 3)
    {
        CHECK(layout(a, Sizes{n, 4096, 512, 1024, 1024}).total <= lb.total);
    }
    moeInputs(in, 4, 4096, 4096, 512, 1024, 1024);
    CHECK(workspaceSize(a, in, 8) == lb.total);
}

} // namespace

int main()
{
    testNorms();
    testAttention();
    testDeltaNet();
    testMoE();
    std::printf("%d passed, %d failed\n", gChecks - gFailures, gFailures);
    return gFailures == 0 ? 0 : 1;
}
