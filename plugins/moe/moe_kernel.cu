// Fused MoE: router GEMM -> fp32 softmax + top-k -> expert histogram, offsets, token permutation ->
// grouped SwiGLU GEMMs over the selected experts only -> weighted scatter-add combine; shared expert
// (SwiGLU, scaled by sigmoid(x @ shared_expert_gate)) accumulated into the same fp32 buffer.
#include "../common/qwen_cuda.cuh"
#include "../common/qwen_gemm.h"
#include "moe_core.h"
#include "moe_launch.h"

#include <algorithm>
#include <climits>

namespace qwen
{
namespace moe
{
namespace
{

constexpr int kRouterWarps = 4;

// One warp per token: softmax over E in fp32 (kept in shared memory), then top-k by k rounds of warp
// argmax (ties: lowest expert index), then optional renormalisation. Counts each expert's assignments.
__global__ void __launch_bounds__(kRouterWarps * 32) routerTopKKernel(float const* logits, int64_t tokens,
    int64_t experts, int topK, int normalize, int32_t* topIdx, float* topW, int32_t* counts)
{
    extern __shared__ float sProbs[];
    int const warp = threadIdx.x >> 5;
    int const lane = threadIdx.x & 31;
    int64_t const token = static_cast<int64_t>(blockIdx.x) * kRouterWarps + warp;
    if (token >= tokens)
    {
        return; // only warp-level synchronisation below
    }
    float* probs = sProbs + warp * experts;
    float const* row = logits + token * experts;

    float m = -INFINITY;
    for (int64_t e = lane; e < experts; e += 32)
    {
        m = fmaxf(m, row[e]);
    }
    m = warpMax(m);
    float sum = 0.0F;
    for (int64_t e = lane; e < experts; e += 32)
    {
        float const p = __expf(row[e] - m);
        probs[e] = p;
        sum += p;
    }
    float const inv = 1.0F / warpSum(sum);
    for (int64_t e = lane; e < experts; e += 32)
    {
        probs[e] *= inv;
    }
    __syncwarp();

    int myIdx = 0;
    float myW = 0.0F;
    float selected = 0.0F;
    for (int j = 0; j < topK; ++j)
    {
        float best = -1.0F; // probabilities are >= 0; taken ones are set to -2
        int bestIdx = INT_MAX;
        for (int64_t e = lane; e < experts; e += 32)
        {
            float const v = probs[e];
            if (v > best)
            {
                best = v;
                bestIdx = static_cast<int>(e);
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
        {
            float const ov = __shfl_xor_sync(0xffffffffu, best, o);
            int const oi = __shfl_xor_sync(0xffffffffu, bestIdx, o);
            if (ov > best || (ov == best && oi < bestIdx))
            {
                best = ov;
                bestIdx = oi;
            }
        }
        if (lane == j)
        {
            myIdx = bestIdx;
            myW = best;
        }
        selected += best;
        if (bestIdx % 32 == lane)
        {
            probs[bestIdx] = -2.0F; // the lane that owns this expert's slot marks it
        }
        __syncwarp();
    }
    if (lane < topK)
    {
        topIdx[token * topK + lane] = myIdx;
        topW[token * topK + lane] = normalize ? myW / selected : myW;
        atomicAdd(&counts[myIdx], 1);
    }
}

constexpr int kScanThreads = 1024;

// Exclusive scans of the expert counts (rows) and of their GEMM tiles; resets the scatter cursors.
__global__ void __launch_bounds__(kScanThreads) expertOffsetsKernel(int32_t const* counts, int experts,
    int tileRows, int32_t* rowOff, int32_t* tileOff, int32_t* cursor)
{
    __shared__ int sRows[kScanThreads];
    __shared__ int sTiles[kScanThreads];
    int const t = threadIdx.x;
    int const per = (experts + kScanThreads - 1) / kScanThreads;
    int const begin = min(experts, t * per);
    int const end = min(experts, begin + per);
    int rows = 0, tiles = 0;
    for (int e = begin; e < end; ++e)
    {
        rows += counts[e];
        tiles += (counts[e] + tileRows - 1) / tileRows;
    }
    sRows[t] = rows;
    sTiles[t] = tiles;
    __syncthreads();
    for (int o = 1; o < kScanThreads; o <<= 1)
    {
        int const r = t >= o ? sRows[t - o] : 0;
        int const ti = t >= o ? sTiles[t - o] : 0;
        __syncthreads();
        sRows[t] += r;
        sTiles[t] += ti;
        __syncthreads();
    }
    int rowBase = sRows[t] - rows;
    int tileBase = sTiles[t] - tiles;
    for (int e = begin; e < end; ++e)
    {
        rowOff[e] = rowBase;
        tileOff[e] = tileBase;
        cursor[e] = 0;
        rowBase += counts[e];
        tileBase += (counts[e] + tileRows - 1) / tileRows;
    }
    if (t == kScanThreads - 1)
    {
        rowOff[experts] = sRows[t];
        tileOff[experts] = sTiles[t];
    }
}

// Permuted row of each (token, slot) assignment, grouped by expert.
__global__ void scatterKernel(int32_t const* topIdx, float const* topW, int64_t assignments, int topK,
    int32_t const* rowOff, int32_t* cursor, int32_t* permToken, float* permW)
{
    for (int64_t a = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; a < assignments;
         a += static_cast<int64_t>(gridDim.x) * blockDim.x)
    {
        int const e = topIdx[a];
        int const pos = rowOff[e] + atomicAdd(&cursor[e], 1);
        permToken[pos] = static_cast<int32_t>(a / topK);
        permW[pos] = topW[a];
    }
}

// out[r, i] = silu(gu[r, i]) * gu[r, inter + i]
template <typename T>
__global__ void swigluKernel(float const* gu, int64_t ldgu, int64_t rows, int64_t inter, T* out, int64_t ldo)
{
    int64_t const total = rows * inter;
    for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
         idx += static_cast<int64_t>(gridDim.x) * blockDim.x)
    {
        int64_t const r = idx / inter;
        int64_t const i = idx % inter;
        float const g = gu[r * ldgu + i];
        float const u = gu[r * ldgu + inter + i];
        out[r * ldo + i] = fromFloat<T>(siluf(g) * u);
    }
}

__global__ void sigmoidKernel(float* v, int64_t n)
{
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    {
        v[i] = sigmoidf(v[i]);
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

Attrs attrsOf(QwenMoEParams const& p)
{
    return Attrs{p.topK, p.normalize};
}

Sizes sizesOf(QwenMoEParams const& p)
{
    return Sizes{p.tokens, p.hidden, p.experts, p.inter, p.sharedInter};
}

template <typename T>
int launchSegment(QwenMoEParams const& p, Layout const& l, int64_t tok0, int64_t segN, cudaStream_t stream)
{
    char* ws = static_cast<char*>(p.workspace);
    auto f32 = [&](size_t off) { return reinterpret_cast<float*>(ws + off); };
    auto i32 = [&](size_t off) { return reinterpret_cast<int32_t*>(ws + off); };
    int64_t const h = p.hidden, e = p.experts, inter = p.inter, is = p.sharedInter;
    int64_t const rows = segN * p.topK;
    T const* x = static_cast<T const*>(p.x) + tok0 * h;
    T* act = reinterpret_cast<T*>(ws + l.act);
    T* sharedAct = reinterpret_cast<T*>(ws + l.sharedAct);
    float* acc = f32(l.acc);
    int32_t const dtype = p.dtype;

    QWEN_CHECK_CUDA(cudaMemsetAsync(i32(l.counts), 0, e * sizeof(int32_t), stream));
    QWEN_CHECK_CUDA(cudaMemsetAsync(acc, 0, segN * h * sizeof(float), stream));

    // Router logits [segN, E] in fp32.
    GemmParams g{};
    g.a = x;
    g.lda = h;
    g.w = p.routerWeight;
    g.ldw = e;
    g.c = f32(l.logits);
    g.ldc = e;
    g.m = segN;
    g.n = e;
    g.k = h;
    g.forceTiled = p.forceTiled;
    QWEN_CHECK_STATUS(gemm(g, dtype, stream));

    unsigned const routerBlocks = static_cast<unsigned>(ceilDiv(segN, kRouterWarps));
    size_t const routerSmem = static_cast<size_t>(kRouterWarps) * e * sizeof(float);
    if (routerSmem > 48 * 1024)
    {
        QWEN_CHECK_CUDA(cudaFuncSetAttribute(
            routerTopKKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(routerSmem)));
    }
    routerTopKKernel<<<routerBlocks, kRouterWarps * 32, routerSmem, stream>>>(
        f32(l.logits), segN, e, p.topK, p.normalize, i32(l.topIdx), f32(l.topW), i32(l.counts));
    QWEN_CHECK_LAUNCH();

    // Expert GEMM shape decides the tile height of the device-side tile schedule.
    GemmParams gu{};
    gu.a = x;
    gu.lda = h;
    gu.aRows = i32(l.permToken);
    gu.w = p.gateUp;
    gu.ldw = 2 * inter;
    gu.wGroupStride = h * 2 * inter;
    gu.m = rows;
    gu.k = h;
    gu.rowOff = i32(l.rowOff);
    gu.tileOff = i32(l.tileOff);
    gu.groups = static_cast<int32_t>(e);
    gu.forceTiled = p.forceTiled;
    bool const skinny = !p.forceTiled && gemmUsesSkinny(rows, true);
    gu.dual = skinny ? 0 : 1;
    int const tileRows = gemmGroupTileRows(gu);
    gu.maxTiles = gemmMaxTiles(rows, e, tileRows);

    expertOffsetsKernel<<<1, kScanThreads, 0, stream>>>(
        i32(l.counts), static_cast<int>(e), tileRows, i32(l.rowOff), i32(l.tileOff), i32(l.cursor));
    QWEN_CHECK_LAUNCH();
    scatterKernel<<<gridFor(rows, 256), 256, 0, stream>>>(i32(l.topIdx), f32(l.topW), rows, p.topK,
        i32(l.rowOff), i32(l.cursor), i32(l.permToken), f32(l.permW));
    QWEN_CHECK_LAUNCH();

    if (skinny)
    {
        gu.c = f32(l.gateUp);
        gu.ldc = 2 * inter;
        gu.n = 2 * inter;
        QWEN_CHECK_STATUS(gemm(gu, dtype, stream));
        swigluKernel<T><<<gridFor(rows * inter, 256), 256, 0, stream>>>(f32(l.gateUp), 2 * inter, rows, inter, act, inter);
        QWEN_CHECK_LAUNCH();
    }
    else
    {
        gu.w2 = static_cast<T const*>(p.gateUp) + inter;
        gu.c = act;
        gu.ldc = inter;
        gu.n = inter;
        QWEN_CHECK_STATUS(gemm(gu, dtype, stream));
    }

    // Down projection: scatter-add each permuted row, scaled by its routing weight, into its token's row.
    GemmParams dn{};
    dn.a = act;
    dn.lda = inter;
    dn.w = p.down;
    dn.ldw = h;
    dn.wGroupStride = inter * h;
    dn.c = acc;
    dn.ldc = h;
    dn.cRows = i32(l.permToken);
    dn.rowScale = f32(l.permW);
    dn.accumulate = 1;
    dn.m = rows;
    dn.n = h;
    dn.k = inter;
    dn.rowOff = i32(l.rowOff);
    dn.tileOff = i32(l.tileOff);
    dn.groups = static_cast<int32_t>(e);
    dn.maxTiles = gu.maxTiles;
    dn.forceTiled = p.forceTiled;
    if (gemmGroupTileRows(dn) != tileRows)
    {
        return QWEN_STATUS_BAD_PARAM; // tile schedules of the two expert GEMMs must agree
    }
    QWEN_CHECK_STATUS(gemm(dn, dtype, stream));

    // Shared expert: silu(x @ Wg) * (x @ Wu), then @ Wd scaled by sigmoid(x @ shared_expert_gate).
    GemmParams sg{};
    sg.a = x;
    sg.lda = h;
    sg.w = p.sharedGate;
    sg.ldw = is;
    sg.m = segN;
    sg.n = is;
    sg.k = h;
    sg.forceTiled = p.forceTiled;
    if (!p.forceTiled && gemmUsesSkinny(segN, false))
    {
        sg.c = f32(l.sharedGU);
        sg.ldc = 2 * is;
        QWEN_CHECK_STATUS(gemm(sg, dtype, stream));
        sg.w = p.sharedUp;
        sg.c = f32(l.sharedGU) + is;
        QWEN_CHECK_STATUS(gemm(sg, dtype, stream));
        swigluKernel<T><<<gridFor(segN * is, 256), 256, 0, stream>>>(f32(l.sharedGU), 2 * is, segN, is, sharedAct, is);
        QWEN_CHECK_LAUNCH();
    }
    else
    {
        sg.dual = 1;
        sg.w2 = p.sharedUp;
        sg.c = sharedAct;
        sg.ldc = is;
        QWEN_CHECK_STATUS(gemm(sg, dtype, stream));
    }
    GemmParams sgate{};
    sgate.a = x;
    sgate.lda = h;
    sgate.w = p.sharedExpertGate;
    sgate.ldw = 1;
    sgate.c = f32(l.sharedGate);
    sgate.ldc = 1;
    sgate.m = segN;
    sgate.n = 1;
    sgate.k = h;
    sgate.forceTiled = p.forceTiled;
    QWEN_CHECK_STATUS(gemm(sgate, dtype, stream));
    sigmoidKernel<<<gridFor(segN, 256), 256, 0, stream>>>(f32(l.sharedGate), segN);
    QWEN_CHECK_LAUNCH();

    GemmParams sd{};
    sd.a = sharedAct;
    sd.lda = is;
    sd.w = p.sharedDown;
    sd.ldw = h;
    sd.c = acc;
    sd.ldc = h;
    sd.rowScale = f32(l.sharedGate);
    sd.accumulate = 1;
    sd.m = segN;
    sd.n = h;
    sd.k = is;
    sd.forceTiled = p.forceTiled;
    QWEN_CHECK_STATUS(gemm(sd, dtype, stream));

    convertKernel<T><<<gridFor(segN * h, 256), 256, 0, stream>>>(acc, segN * h, static_cast<T*>(p.y) + tok0 * h);
    QWEN_CHECK_LAUNCH();
    return 0;
}

} // namespace
} // namespace moe
} // namespace qwen

extern "C" int64_t qwenMoEParamsSize(void)
{
    return sizeof(QwenMoEParams);
}

extern "C" int64_t qwenMoEWorkspaceSize(QwenMoEParams const* params)
{
    using namespace qwen::moe;
    if (params == nullptr)
    {
        return -1;
    }
    return static_cast<int64_t>(layout(attrsOf(*params), sizesOf(*params)).total);
}

extern "C" int qwenLaunchMoE(QwenMoEParams const* params, cudaStream_t stream)
{
    using namespace qwen;
    using namespace qwen::moe;
    if (params == nullptr || params->workspace == nullptr || params->tokens < 0 || params->hidden <= 0
        || params->experts <= 0 || params->experts > kMaxExperts || params->inter <= 0 || params->sharedInter <= 0
        || !validate(attrsOf(*params)).empty() || params->topK > params->experts)
    {
        return QWEN_STATUS_BAD_PARAM;
    }
    QwenMoEParams const p = *params;
    Layout const l = layout(attrsOf(p), sizesOf(p));
    return QWEN_DISPATCH_ACT(p.dtype, T, [&] {
        for (int64_t tok0 = 0; tok0 < p.tokens; tok0 += l.segTokens)
        {
            int64_t const segN = std::min(l.segTokens, p.tokens - tok0);
            QWEN_CHECK_STATUS(launchSegment<T>(p, l, tok0, segN, stream));
        }
        return 0;
    });
}
