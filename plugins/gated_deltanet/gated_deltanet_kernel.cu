// Fused Gated DeltaNet block: mask -> projections -> causal conv (+state) + SiLU -> l2norm, gates ->
// delta rule (recurrent or chunked, fp32 state) -> gated RMSNorm -> out_proj.
#include "../common/norm.cuh"
#include "../common/qwen_cuda.cuh"
#include "../common/qwen_gemm.h"
#include "delta_rule.h"
#include "gated_deltanet_core.h"
#include "gated_deltanet_launch.h"

#include <algorithm>

namespace qwen
{
namespace gated_deltanet
{
namespace
{

// xm[b, t, :] = x[b, t, :] * mask[b, maskLen - T + t]  (padding tokens must not reach the state)
template <typename T>
__global__ void maskKernel(T const* x, int32_t const* mask, int64_t batch, int64_t tokens, int64_t maskLen,
    int64_t hidden, T* xm)
{
    int64_t const total = batch * tokens * hidden;
    for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
         idx += static_cast<int64_t>(gridDim.x) * blockDim.x)
    {
        int64_t const bt = idx / hidden;
        int64_t const b = bt / tokens, t = bt % tokens;
        bool const keep = mask[b * maskLen + maskLen - tokens + t] != 0;
        xm[idx] = keep ? x[idx] : fromFloat<T>(0.0F);
    }
}

constexpr int kMaxConvKernel = 8;

// One thread per (batch, channel): slides the K-wide window over the tokens, keeping it in registers.
// mixed [B*T, C] is overwritten in place with silu(conv); the window's last K-1 inputs become the state.
template <typename T>
__global__ void convKernel(float* mixed, T const* pastConv, T const* convWeight, T* presentConv, int64_t batch,
    int64_t tokens, int64_t channels, int kernel)
{
    int64_t const idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
    if (idx >= batch * channels)
    {
        return;
    }
    int64_t const b = idx / channels, c = idx % channels;
    float w[kMaxConvKernel];
    float window[kMaxConvKernel]; // the K-1 previous inputs
#pragma unroll
    for (int i = 0; i < kMaxConvKernel; ++i)
    {
        w[i] = i < kernel ? toFloat(convWeight[c * kernel + i]) : 0.0F;
        window[i] = i < kernel - 1 ? toFloat(pastConv[(b * channels + c) * (kernel - 1) + i]) : 0.0F;
    }
    for (int64_t t = 0; t < tokens; ++t)
    {
        float* cell = mixed + (b * tokens + t) * channels + c;
        float const in = *cell;
        float acc = 0.0F;
#pragma unroll
        for (int i = 0; i < kMaxConvKernel; ++i)
        {
            if (i < kernel - 1)
            {
                acc = fmaf(w[i], window[i], acc);
            }
            else if (i == kernel - 1)
            {
                acc = fmaf(w[i], in, acc);
            }
        }
        *cell = siluf(acc);
        // Shift left by one and append `in` (static indices only: the window stays in registers).
#pragma unroll
        for (int i = 0; i < kMaxConvKernel - 1; ++i)
        {
            if (i < kernel - 2)
            {
                window[i] = window[i + 1];
            }
            else if (i == kernel - 2)
            {
                window[i] = in;
            }
        }
    }
#pragma unroll
    for (int i = 0; i < kMaxConvKernel - 1; ++i)
    {
        if (i < kernel - 1)
        {
            presentConv[(b * channels + c) * (kernel - 1) + i] = fromFloat<T>(window[i]);
        }
    }
}

constexpr int kPrepWarps = 4;

// One block per (batch, token): l2norm of every q and k head (q also scaled by 1/sqrt(dk)) into the
// [B, nk, T, dk] layouts; beta = sigmoid(b) and g = neg_exp_A * softplus(a + dt_bias) into [B, nv, T].
__global__ void __launch_bounds__(kPrepWarps * 32) prepKernel(float const* conv, float const* bProj,
    float const* aProj, float const* negExpA, float const* dtBias, float* q, float* k, float* beta, float* g,
    int64_t tokens, int64_t channels, int nk, int nv, int dk)
{
    int64_t const bt = blockIdx.x;
    int64_t const b = bt / tokens, t = bt % tokens;
    int const lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float const qScale = rsqrtf(static_cast<float>(dk));
    for (int vec = warp; vec < 2 * nk; vec += kPrepWarps)
    {
        bool const isQ = vec < nk;
        int const head = isQ ? vec : vec - nk;
        float const* src = conv + bt * channels + static_cast<int64_t>(vec) * dk;
        float ss = 0.0F;
        for (int i = lane; i < dk; i += 32)
        {
            ss = fmaf(src[i], src[i], ss);
        }
        float const inv = rsqrtf(warpSum(ss) + 1e-6F) * (isQ ? qScale : 1.0F);
        float* dst = (isQ ? q : k) + ((b * nk + head) * tokens + t) * dk;
        for (int i = lane; i < dk; i += 32)
        {
            dst[i] = src[i] * inv;
        }
    }
    for (int h = threadIdx.x; h < nv; h += blockDim.x)
    {
        int64_t const src = bt * nv + h;
        int64_t const dst = (b * nv + h) * tokens + t;
        beta[dst] = sigmoidf(bProj[src]);
        g[dst] = negExpA[h] * softplusf(aProj[src] + dtBias[h]);
    }
}

constexpr int kNormWarps = 8;

// normed[row] = RMSNorm(o[row]; norm_weight) * silu(z[row]), rows = B*T*nv of dv elements.
template <typename T>
__global__ void __launch_bounds__(kNormWarps * 32) gatedNormKernel(
    float const* o, float const* z, float const* normWeight, T* out, int64_t rows, int64_t dv, float eps)
{
    int64_t const row = static_cast<int64_t>(blockIdx.x) * kNormWarps + (threadIdx.x >> 5);
    if (row >= rows)
    {
        return;
    }
    warpRmsNormRow<float, float, T>(o + row * dv, z + row * dv, normWeight, out + row * dv, dv, eps,
        threadIdx.x & 31, false);
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

Attrs attrsOf(QwenGatedDeltaNetParams const& p)
{
    return Attrs{p.numKHeads, p.numVHeads, p.headKDim, p.headVDim, p.convKernel, p.epsilon};
}

Sizes sizesOf(QwenGatedDeltaNetParams const& p)
{
    return Sizes{p.batch, p.tokens, p.hidden};
}

template <typename T>
int launch(QwenGatedDeltaNetParams const& p, cudaStream_t stream)
{
    Attrs const a = attrsOf(p);
    RuleMode const mode = static_cast<RuleMode>(p.ruleMode);
    Layout const l = layout(a, sizesOf(p), mode);
    char* ws = static_cast<char*>(p.workspace);
    auto f32 = [&](size_t off) { return reinterpret_cast<float*>(ws + off); };
    int64_t const bt = p.batch * p.tokens;
    int64_t const h = p.hidden, nk = p.numKHeads, nv = p.numVHeads, dk = p.headKDim, dv = p.headVDim;
    int64_t const c = convDim(a);
    T* xm = reinterpret_cast<T*>(ws + l.xMasked);
    T* normed = reinterpret_cast<T*>(ws + l.normed);

    maskKernel<T><<<gridFor(bt * h, 256), 256, 0, stream>>>(
        static_cast<T const*>(p.x), p.mask, p.batch, p.tokens, p.maskLen, h, xm);
    QWEN_CHECK_LAUNCH();
    QWEN_CHECK_STATUS(project(xm, p.qkvWeight, f32(l.mixed), bt, c, h, p.dtype, stream));
    QWEN_CHECK_STATUS(project(xm, p.zWeight, f32(l.z), bt, nv * dv, h, p.dtype, stream));
    QWEN_CHECK_STATUS(project(xm, p.bWeight, f32(l.b), bt, nv, h, p.dtype, stream));
    QWEN_CHECK_STATUS(project(xm, p.aWeight, f32(l.a), bt, nv, h, p.dtype, stream));

    convKernel<T><<<gridFor(p.batch * c, 256), 256, 0, stream>>>(f32(l.mixed), static_cast<T const*>(p.pastConv),
        static_cast<T const*>(p.convWeight), static_cast<T*>(p.presentConv), p.batch, p.tokens, c, p.convKernel);
    QWEN_CHECK_LAUNCH();
    prepKernel<<<static_cast<unsigned>(bt), kPrepWarps * 32, 0, stream>>>(f32(l.mixed), f32(l.b), f32(l.a),
        p.negExpA, p.dtBias, f32(l.q), f32(l.k), f32(l.beta), f32(l.g), p.tokens, c, p.numKHeads, p.numVHeads,
        p.headKDim);
    QWEN_CHECK_LAUNCH();

    RuleParams r{};
    r.q = f32(l.q);
    r.k = f32(l.k);
    r.conv = f32(l.mixed);
    r.beta = f32(l.beta);
    r.g = f32(l.g);
    r.stateIn = p.pastRecurrent;
    r.stateOut = p.presentRecurrent;
    r.o = f32(l.o);
    r.batch = p.batch;
    r.tokens = p.tokens;
    r.convDim = c;
    r.vOffset = 2 * nk * dk;
    r.nk = p.numKHeads;
    r.nv = p.numVHeads;
    r.dk = p.headKDim;
    r.dv = p.headVDim;
    if (usesChunked(mode, p.tokens))
    {
        r.u = f32(l.u);
        r.w = f32(l.w);
        r.aqk = f32(l.aqk);
        r.gcum = f32(l.gcum);
        int64_t const chunks = ceilDiv(p.tokens, kChunk);
        for (int64_t c0 = 0; c0 < chunks; c0 += l.segChunks)
        {
            // After the first segment the state lives in stateOut.
            r.stateIn = c0 == 0 ? p.pastRecurrent : p.presentRecurrent;
            QWEN_CHECK_STATUS(launchChunkedSegment(r, c0, std::min(l.segChunks, chunks - c0), stream));
        }
    }
    else
    {
        QWEN_CHECK_STATUS(launchRecurrent(r, stream));
    }

    int64_t const normRows = bt * nv;
    gatedNormKernel<T><<<static_cast<unsigned>(ceilDiv(normRows, kNormWarps)), kNormWarps * 32, 0, stream>>>(
        f32(l.o), f32(l.z), p.normWeight, normed, normRows, dv, p.epsilon);
    QWEN_CHECK_LAUNCH();
    QWEN_CHECK_STATUS(project(normed, p.outWeight, f32(l.yAcc), bt, h, nv * dv, p.dtype, stream));
    convertKernel<T><<<gridFor(bt * h, 256), 256, 0, stream>>>(f32(l.yAcc), bt * h, static_cast<T*>(p.y));
    QWEN_CHECK_LAUNCH();
    return 0;
}

} // namespace
} // namespace gated_deltanet
} // namespace qwen

extern "C" int64_t qwenGatedDeltaNetParamsSize(void)
{
    return sizeof(QwenGatedDeltaNetParams);
}

extern "C" int64_t qwenGatedDeltaNetWorkspaceSize(QwenGatedDeltaNetParams const* params)
{
    using namespace qwen::gated_deltanet;
    if (params == nullptr)
    {
        return -1;
    }
    return static_cast<int64_t>(
        layout(attrsOf(*params), sizesOf(*params), static_cast<RuleMode>(params->ruleMode)).total);
}

extern "C" int qwenLaunchGatedDeltaNet(QwenGatedDeltaNetParams const* params, cudaStream_t stream)
{
    using namespace qwen;
    using namespace qwen::gated_deltanet;
    if (params == nullptr || params->workspace == nullptr || !validate(attrsOf(*params)).empty()
        || params->batch < 0 || params->tokens < 0 || params->hidden <= 0 || params->maskLen < params->tokens
        || params->ruleMode < 0 || params->ruleMode > 2)
    {
        return QWEN_STATUS_BAD_PARAM;
    }
    if (params->batch == 0 || params->tokens == 0)
    {
        return 0;
    }
    QwenGatedDeltaNetParams const p = *params;
    return QWEN_DISPATCH_ACT(p.dtype, T, [&] { return launch<T>(p, stream); });
}
