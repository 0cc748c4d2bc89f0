// Fused gated attention block: q/k/v projections -> per-head q/k RMSNorm + partial RoPE (queries packed
// by GQA group, keys/values appended to the present cache) -> flash attention with the output gate ->
// o_proj.
#include "../common/qwen_cuda.cuh"
#include "../common/qwen_gemm.h"
#include "flash_attention.h"
#include "gated_attention_core.h"
#include "gated_attention_launch.h"

#include <algorithm>
#include <cmath>

namespace qwen
{
namespace gated_attention
{
namespace
{

// present[:, :, :P] = past  (16-byte vectors: head_dim is a multiple of 8)
template <typename T>
__global__ void copyPastKernel(T const* past, T* present, int64_t heads, int64_t pastLen, int64_t keys, int hd)
{
    int64_t const vecPerRow = hd / 8;
    int64_t const total = heads * pastLen * vecPerRow;
    for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
         idx += static_cast<int64_t>(gridDim.x) * blockDim.x)
    {
        int64_t const v = idx % vecPerRow;
        int64_t const row = idx / vecPerRow; // (head, position)
        int64_t const head = row / pastLen, pos = row % pastLen;
        uint4 const data = *reinterpret_cast<uint4 const*>(past + row * hd + v * 8);
        *reinterpret_cast<uint4*>(present + (head * keys + pos) * hd + v * 8) = data;
    }
}

struct PrepParams
{
    float const* qg;   // [B*T, nh * 2 * hd]
    float const* k;    // [B*T, kv * hd]
    float const* v;    // [B*T, kv * hd]
    float const* cos;  // [B*T, rot]
    float const* sin;
    float const* qNorm;
    float const* kNorm;
    void* qPacked;     // [B, kv, T * group, hd]
    void* presentKey;  // [B, kv, S, hd]
    void* presentValue;
    int64_t batch;
    int64_t tokens;
    int64_t past;
    int64_t keys;
    int32_t nh;
    int32_t kv;
    int32_t hd;
    int32_t rot;
    float eps;
};

constexpr int kPrepWarps = 4;
constexpr int kMaxHeadDim = 256;

// One warp per (token, head slot); slots: nh query heads, then kv key heads, then kv value heads.
template <typename T>
__global__ void __launch_bounds__(kPrepWarps * 32) prepKernel(PrepParams p)
{
    __shared__ float xs[kPrepWarps][kMaxHeadDim];
    int const lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int const slots = p.nh + 2 * p.kv;
    int64_t const w = static_cast<int64_t>(blockIdx.x) * kPrepWarps + warp;
    if (w >= p.batch * p.tokens * slots)
    {
        return; // warp-level synchronisation only
    }
    int64_t const bt = w / slots;
    int const slot = static_cast<int>(w % slots);
    int64_t const b = bt / p.tokens, t = bt % p.tokens;
    int const hd = p.hd, group = p.nh / p.kv;
    float* x = xs[warp];

    float const* src;
    float const* norm = nullptr;
    T* dst;
    if (slot < p.nh)
    {
        int const kvh = slot / group, g = slot % group;
        src = p.qg + bt * p.nh * 2 * hd + static_cast<int64_t>(slot) * 2 * hd;
        norm = p.qNorm;
        dst = static_cast<T*>(p.qPacked) + ((b * p.kv + kvh) * p.tokens * group + t * group + g) * hd;
    }
    else if (slot < p.nh + p.kv)
    {
        int const kvh = slot - p.nh;
        src = p.k + bt * p.kv * hd + static_cast<int64_t>(kvh) * hd;
        norm = p.kNorm;
        dst = static_cast<T*>(p.presentKey) + ((b * p.kv + kvh) * p.keys + p.past + t) * hd;
    }
    else
    {
        int const kvh = slot - p.nh - p.kv;
        src = p.v + bt * p.kv * hd + static_cast<int64_t>(kvh) * hd;
        dst = static_cast<T*>(p.presentValue) + ((b * p.kv + kvh) * p.keys + p.past + t) * hd;
    }
    float ss = 0.0F;
    for (int d = lane; d < hd; d += 32)
    {
        float const val = src[d];
        x[d] = val;
        ss = fmaf(val, val, ss);
    }
    if (norm == nullptr)
    {
        for (int d = lane; d < hd; d += 32)
        {
            dst[d] = fromFloat<T>(x[d]);
        }
        return;
    }
    float const inv = rsqrtf(warpSum(ss) / static_cast<float>(hd) + p.eps);
    for (int d = lane; d < hd; d += 32)
    {
        x[d] *= inv * norm[d];
    }
    __syncwarp();
    // Partial RoPE: x * cos + rotate_half(x) * sin on the first `rot` channels.
    int const halfRot = p.rot / 2;
    float const* c = p.cos + bt * p.rot;
    float const* s = p.sin + bt * p.rot;
    float out[kMaxHeadDim / 32];
#pragma unroll
    for (int i = 0; i < kMaxHeadDim / 32; ++i)
    {
        int const d = lane + i * 32;
        if (d < hd)
        {
            float val = x[d];
            if (d < p.rot)
            {
                float const partner = d < halfRot ? -x[d + halfRot] : x[d - halfRot];
                val = val * c[d] + partner * s[d];
            }
            out[i] = val;
        }
    }
#pragma unroll
    for (int i = 0; i < kMaxHeadDim / 32; ++i)
    {
        int const d = lane + i * 32;
        if (d < hd)
        {
            dst[d] = fromFloat<T>(out[i]);
        }
    }
}

template <typename T>
__global__ void convertKernel(float const* acc, int64_t n, T* y)
{
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    {
        y[i] = fromFloat<T>(acc[i]);
    }
}

Attrs attrsOf(QwenGatedAttentionParams const& p)
{
    return Attrs{p.numHeads, p.numKvHeads, p.headDim, p.rotaryDim, p.epsilon, p.scale};
}

Sizes sizesOf(QwenGatedAttentionParams const& p)
{
    return Sizes{p.batch, p.tokens, p.past, p.hidden};
}

template <typename T>
int launch(QwenGatedAttentionParams const& p, cudaStream_t stream)
{
    Attrs const a = attrsOf(p);
    Layout const l = layout(a, sizesOf(p));
    char* ws = static_cast<char*>(p.workspace);
    auto f32 = [&](size_t off) { return reinterpret_cast<float*>(ws + off); };
    int64_t const bt = p.batch * p.tokens;
    int64_t const nh = p.numHeads, kv = p.numKvHeads, hd = p.headDim, h = p.hidden;
    int64_t const keys = p.past + p.tokens;
    int64_t const group = nh / kv;

    QWEN_CHECK_STATUS(project(p.x, p.qWeight, f32(l.qg), bt, nh * 2 * hd, h, p.dtype, stream));
    QWEN_CHECK_STATUS(project(p.x, p.kWeight, f32(l.k), bt, kv * hd, h, p.dtype, stream));
    QWEN_CHECK_STATUS(project(p.x, p.vWeight, f32(l.v), bt, kv * hd, h, p.dtype, stream));

    if (p.past > 0)
    {
        int64_t const vecs = p.batch * kv * p.past * hd / 8;
        copyPastKernel<T><<<gridFor(vecs, 256), 256, 0, stream>>>(static_cast<T const*>(p.pastKey),
            static_cast<T*>(p.presentKey), p.batch * kv, p.past, keys, p.headDim);
        QWEN_CHECK_LAUNCH();
        copyPastKernel<T><<<gridFor(vecs, 256), 256, 0, stream>>>(static_cast<T const*>(p.pastValue),
            static_cast<T*>(p.presentValue), p.batch * kv, p.past, keys, p.headDim);
        QWEN_CHECK_LAUNCH();
    }

    PrepParams pp{};
    pp.qg = f32(l.qg);
    pp.k = f32(l.k);
    pp.v = f32(l.v);
    pp.cos = p.cos;
    pp.sin = p.sin;
    pp.qNorm = p.qNorm;
    pp.kNorm = p.kNorm;
    pp.qPacked = ws + l.qPacked;
    pp.presentKey = p.presentKey;
    pp.presentValue = p.presentValue;
    pp.batch = p.batch;
    pp.tokens = p.tokens;
    pp.past = p.past;
    pp.keys = keys;
    pp.nh = p.numHeads;
    pp.kv = p.numKvHeads;
    pp.hd = p.headDim;
    pp.rot = p.rotaryDim;
    pp.eps = p.epsilon;
    int64_t const prepWarps = bt * (nh + 2 * kv);
    prepKernel<T><<<static_cast<unsigned>(ceilDiv(prepWarps, kPrepWarps)), kPrepWarps * 32, 0, stream>>>(pp);
    QWEN_CHECK_LAUNCH();

    FlashParams f{};
    f.q = ws + l.qPacked;
    f.k = p.presentKey;
    f.v = p.presentValue;
    f.mask = p.mask;
    f.gate = f32(l.qg);
    f.out = ws + l.attn;
    f.partO = f32(l.partO);
    f.partML = f32(l.partML);
    f.batch = p.batch;
    f.tokens = p.tokens;
    f.past = p.past;
    f.keys = keys;
    f.rows = p.tokens * group;
    f.kvHeads = p.numKvHeads;
    f.group = static_cast<int32_t>(group);
    f.headDim = p.headDim;
    f.scale = p.scale > 0.0F ? p.scale : 1.0F / std::sqrt(static_cast<float>(hd));
    int64_t splits = p.kvSplits > 0 ? p.kvSplits : l.splits;
    // The partial buffers hold kMaxSplitRows rows: never exceed them (a forced split count is clamped).
    int64_t const rowsPadded = p.batch * kv * ceilDiv(f.rows, 64) * 64;
    splits = std::max<int64_t>(1, std::min(splits, kMaxSplitRows / std::max<int64_t>(1, rowsPadded)));
    f.splits = static_cast<int32_t>(splits);
    QWEN_CHECK_STATUS(launchFlashAttention(f, p.dtype, stream));

    QWEN_CHECK_STATUS(project(ws + l.attn, p.oWeight, f32(l.yAcc), bt, h, nh * hd, p.dtype, stream));
    convertKernel<T><<<gridFor(bt * h, 256), 256, 0, stream>>>(f32(l.yAcc), bt * h, static_cast<T*>(p.y));
    QWEN_CHECK_LAUNCH();
    return 0;
}

} // namespace
} // namespace gated_attention
} // namespace qwen

extern "C" int64_t qwenGatedAttentionParamsSize(void)
{
    return sizeof(QwenGatedAttentionParams);
}

extern "C" int64_t qwenGatedAttentionWorkspaceSize(QwenGatedAttentionParams const* params)
{
    using namespace qwen::gated_attention;
    if (params == nullptr)
    {
        return -1;
    }
    return static_cast<int64_t>(layout(attrsOf(*params), sizesOf(*params)).total);
}

extern "C" int qwenLaunchGatedAttention(QwenGatedAttentionParams const* params, cudaStream_t stream)
{
    using namespace qwen;
    using namespace qwen::gated_attention;
    if (params == nullptr || params->workspace == nullptr || !validate(attrsOf(*params)).empty()
        || params->batch < 0 || params->tokens < 0 || params->past < 0 || params->hidden <= 0
        || !isAligned16(params->presentKey) || !isAligned16(params->presentValue)
        || (params->past > 0 && (!isAligned16(params->pastKey) || !isAligned16(params->pastValue))))
    {
        return QWEN_STATUS_BAD_PARAM;
    }
    if (params->batch == 0 || params->tokens == 0)
    {
        return 0; // nothing new; present == past would still need the copy (T = 0 is not a TensorRT shape)
    }
    QwenGatedAttentionParams const p = *params;
    return QWEN_DISPATCH_ACT(p.dtype, T, [&] { return launch<T>(p, stream); });
}
