// Gated delta rule, fp32: S = S * exp(g); S += k (x) (beta * (v - S^T k)); o = S^T q.
//
// Every kernel splits the state's value columns into blocks of 32 (all the rule's updates are column-wise
// independent), one block per (batch, value head, 32 columns). Each thread of such a block owns fixed
// state entries, so reading stateIn up front and writing stateOut at the end is safe when they alias.
#include "../common/qwen_cuda.cuh"
#include "delta_rule.h"
#include "gated_deltanet_core.h"

#include <algorithm>

namespace qwen
{
namespace gated_deltanet
{
namespace
{

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kCols = 32;
constexpr int kC = static_cast<int>(kChunk); // 64
constexpr int kAld = kC + 1;                  // padded row stride of 64 x 64 tiles

__device__ __forceinline__ void headsOf(RuleParams const& p, int bh, int& b, int& vh, int& kh)
{
    b = bh / p.nv;
    vh = bh % p.nv;
    kh = vh / (p.nv / p.nk);
}

// ---- recurrent (decode) --------------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads) recurrentKernel(RuleParams p)
{
    extern __shared__ float smem[];
    int const dk = p.dk, dv = p.dv;
    float* S = smem;          // [dk][32]
    float* qs = S + dk * kCols; // [dk]
    float* ks = qs + dk;        // [dk]
    float* red = ks + dk;       // [8][32]
    int const tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int b, vh, kh;
    headsOf(p, blockIdx.x, b, vh, kh);
    int const j = blockIdx.y * kCols + lane;
    bool const colOk = j < dv;
    size_t const stateBase = (static_cast<size_t>(b) * p.nv + vh) * dk * dv;
    for (int i = warp; i < dk; i += kWarps)
    {
        S[i * kCols + lane] = colOk ? p.stateIn[stateBase + static_cast<size_t>(i) * dv + j] : 0.0F;
    }
    int64_t const T = p.tokens;
    for (int64_t t = 0; t < T; ++t)
    {
        __syncthreads(); // the previous token is done with qs, ks, red
        size_t const qkRow = ((static_cast<size_t>(b) * p.nk + kh) * T + t) * dk;
        for (int i = tid; i < dk; i += kThreads)
        {
            qs[i] = p.q[qkRow + i];
            ks[i] = p.k[qkRow + i];
        }
        size_t const gi = (static_cast<size_t>(b) * p.nv + vh) * T + t;
        float const beta = p.beta[gi];
        float const decay = expf(p.g[gi]);
        __syncthreads();
        float part = 0.0F;
        for (int i = warp; i < dk; i += kWarps)
        {
            float const s = S[i * kCols + lane] * decay;
            S[i * kCols + lane] = s;
            part = fmaf(ks[i], s, part);
        }
        red[warp * kCols + lane] = part;
        __syncthreads();
        float kv = 0.0F;
#pragma unroll
        for (int w = 0; w < kWarps; ++w)
        {
            kv += red[w * kCols + lane];
        }
        float const v = colOk ? p.conv[(static_cast<size_t>(b) * T + t) * p.convDim + p.vOffset
                                    + static_cast<size_t>(vh) * dv + j]
                              : 0.0F;
        float const delta = beta * (v - kv);
        __syncthreads(); // every thread has read red
        float part2 = 0.0F;
        for (int i = warp; i < dk; i += kWarps)
        {
            float const s = fmaf(ks[i], delta, S[i * kCols + lane]);
            S[i * kCols + lane] = s;
            part2 = fmaf(qs[i], s, part2);
        }
        red[warp * kCols + lane] = part2;
        __syncthreads();
        if (warp == 0 && colOk)
        {
            float o = 0.0F;
#pragma unroll
            for (int w = 0; w < kWarps; ++w)
            {
                o += red[w * kCols + lane];
            }
            p.o[((static_cast<size_t>(b) * T + t) * p.nv + vh) * dv + j] = o;
        }
    }
    for (int i = warp; i < dk; i += kWarps)
    {
        if (colOk)
        {
            p.stateOut[stateBase + static_cast<size_t>(i) * dv + j] = S[i * kCols + lane];
        }
    }
}

// ---- chunked (prefill): chunk-parallel preparation ------------------------------------------------------
//
// Per (batch, value head, chunk), with gc the in-chunk cumulative sum of g and kb = k * beta:
//   A    = (I + StrictLower((kb k^T) * exp(gc_t - gc_s)))^-1      (forward substitution, as in HF)
//   U    = A @ (v * beta)                           [64, dv]
//   W    = A @ (k * beta * exp(gc))                 [64, dk]
//   Aqk  = Lower((q k^T) * exp(gc_t - gc_s))        [64, 64]
// Positions past the sequence end are zero (k, v, beta, g), which makes them inert.

__global__ void __launch_bounds__(kThreads) chunkPrepKernel(RuleParams p, int64_t chunkBegin, int64_t chunks)
{
    extern __shared__ float smem[];
    int const dk = p.dk, dv = p.dv;
    int const ldk = dk + 1;
    int const ldb = max(dk, dv) + 1;
    float* Ks = smem;               // [64][ldk]
    float* A = Ks + kC * ldk;       // [64][65]
    float* buf = A + kC * kAld;     // [64][ldb]  v * beta, then q
    float* rowTmp = buf + kC * ldb; // [64]
    float* gc = rowTmp + kC;        // [64]
    float* bt = gc + kC;            // [64]
    int const tid = threadIdx.x;
    int64_t const T = p.tokens;
    int64_t const c = chunkBegin + blockIdx.x;
    int64_t const t0 = c * kC;
    int const len = static_cast<int>(min(static_cast<int64_t>(kC), T - t0));
    int b, vh, kh;
    headsOf(p, blockIdx.y, b, vh, kh);
    size_t const item = static_cast<size_t>(blockIdx.y) * chunks + blockIdx.x;
    size_t const qkBase = ((static_cast<size_t>(b) * p.nk + kh) * T + t0) * dk;
    size_t const gBase = (static_cast<size_t>(b) * p.nv + vh) * T + t0;

    for (int idx = tid; idx < kC * dk; idx += kThreads)
    {
        int const t = idx / dk, i = idx % dk;
        Ks[t * ldk + i] = t < len ? p.k[qkBase + static_cast<size_t>(t) * dk + i] : 0.0F;
    }
    if (tid < kC)
    {
        bt[tid] = tid < len ? p.beta[gBase + tid] : 0.0F;
        gc[tid] = tid < len ? p.g[gBase + tid] : 0.0F;
    }
    __syncthreads();
    if (tid == 0)
    {
        for (int t = 1; t < kC; ++t)
        {
            gc[t] += gc[t - 1];
        }
    }
    __syncthreads();

    // Strictly lower -(kb k^T) * decay.
    for (int idx = tid; idx < kC * kC; idx += kThreads)
    {
        int const t = idx / kC, s = idx % kC;
        float val = 0.0F;
        if (s < t)
        {
            float dot = 0.0F;
            for (int i = 0; i < dk; ++i)
            {
                dot = fmaf(Ks[t * ldk + i], Ks[s * ldk + i], dot);
            }
            val = -bt[t] * dot * expf(gc[t] - gc[s]);
        }
        A[t * kAld + s] = val;
    }
    __syncthreads();
    // Row i: A[i, j] += sum_{j < m < i} A_old[i, m] * A[m, j] (rows < i final). Row i copied first: its
    // entries are read while being rewritten.
    for (int i = 1; i < kC; ++i)
    {
        if (tid < i)
        {
            rowTmp[tid] = A[i * kAld + tid];
        }
        __syncthreads();
        if (tid < i)
        {
            float acc = rowTmp[tid];
            for (int m = tid + 1; m < i; ++m)
            {
                acc = fmaf(rowTmp[m], A[m * kAld + tid], acc);
            }
            A[i * kAld + tid] = acc;
        }
        __syncthreads();
    }
    if (tid < kC)
    {
        A[tid * kAld + tid] = 1.0F;
    }
    // U = A @ (v * beta)
    for (int idx = tid; idx < kC * dv; idx += kThreads)
    {
        int const t = idx / dv, jj = idx % dv;
        buf[t * ldb + jj] = t < len
            ? p.conv[(static_cast<size_t>(b) * T + t0 + t) * p.convDim + p.vOffset + static_cast<size_t>(vh) * dv + jj]
                * bt[t]
            : 0.0F;
    }
    __syncthreads();
    for (int idx = tid; idx < kC * dv; idx += kThreads)
    {
        int const t = idx / dv, jj = idx % dv;
        float acc = 0.0F;
        for (int s = 0; s <= t; ++s)
        {
            acc = fmaf(A[t * kAld + s], buf[s * ldb + jj], acc);
        }
        p.u[(item * kC + t) * dv + jj] = acc;
    }
    __syncthreads();
    // Aqk = Lower(q k^T * decay)
    for (int idx = tid; idx < kC * dk; idx += kThreads)
    {
        int const t = idx / dk, i = idx % dk;
        buf[t * ldb + i] = t < len ? p.q[qkBase + static_cast<size_t>(t) * dk + i] : 0.0F;
    }
    __syncthreads();
    for (int idx = tid; idx < kC * kC; idx += kThreads)
    {
        int const t = idx / kC, s = idx % kC;
        float val = 0.0F;
        if (s <= t)
        {
            float dot = 0.0F;
            for (int i = 0; i < dk; ++i)
            {
                dot = fmaf(buf[t * ldb + i], Ks[s * ldk + i], dot);
            }
            val = dot * expf(gc[t] - gc[s]);
        }
        p.aqk[(item * kC + t) * kC + s] = val;
    }
    __syncthreads();
    // W = A @ (k * beta * exp(gc))
    for (int idx = tid; idx < kC * dk; idx += kThreads)
    {
        int const t = idx / dk, i = idx % dk;
        Ks[t * ldk + i] *= bt[t] * expf(gc[t]);
    }
    __syncthreads();
    for (int idx = tid; idx < kC * dk; idx += kThreads)
    {
        int const t = idx / dk, i = idx % dk;
        float acc = 0.0F;
        for (int s = 0; s <= t; ++s)
        {
            acc = fmaf(A[t * kAld + s], Ks[s * ldk + i], acc);
        }
        p.w[(item * kC + t) * dk + i] = acc;
    }
    if (tid < kC)
    {
        p.gcum[item * kC + tid] = gc[tid];
    }
}

// ---- chunked (prefill): sequential state pass -----------------------------------------------------------
//
// Per chunk, for this block's 32 value columns of the state S [dk, 32]:
//   Vn = U - W @ S
//   o  = exp(gc) * (q @ S) + Aqk @ Vn
//   S  = S * exp(gc_last) + (k * exp(gc_last - gc))^T @ Vn

__global__ void __launch_bounds__(kThreads) chunkStateKernel(RuleParams p, int64_t chunkBegin, int64_t chunks)
{
    extern __shared__ float smem[];
    int const dk = p.dk, dv = p.dv;
    int const ldk = dk + 1;
    float* S = smem;              // [dk][32]
    float* st = S + dk * kCols;   // [64][ldk] W, then q, then k
    float* vn = st + kC * ldk;    // [64][32]
    float* aq = vn + kC * kCols;  // [64][65]
    float* eq = aq + kC * kAld;   // [64] exp(gc)
    float* ek = eq + kC;          // [64] exp(gc_last - gc)
    float* last = ek + kC;        // [1]  exp(gc_last)
    int const tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int b, vh, kh;
    headsOf(p, blockIdx.x, b, vh, kh);
    int const j = blockIdx.y * kCols + lane;
    bool const colOk = j < dv;
    int64_t const T = p.tokens;
    size_t const stateBase = (static_cast<size_t>(b) * p.nv + vh) * dk * dv;
    for (int i = warp; i < dk; i += kWarps)
    {
        S[i * kCols + lane] = colOk ? p.stateIn[stateBase + static_cast<size_t>(i) * dv + j] : 0.0F;
    }
    for (int64_t cl = 0; cl < chunks; ++cl)
    {
        int64_t const t0 = (chunkBegin + cl) * kC;
        int const len = static_cast<int>(min(static_cast<int64_t>(kC), T - t0));
        size_t const item = static_cast<size_t>(blockIdx.x) * chunks + cl;
        size_t const qkBase = ((static_cast<size_t>(b) * p.nk + kh) * T + t0) * dk;
        __syncthreads(); // the previous chunk is done with st, vn, aq
        for (int idx = tid; idx < kC * dk; idx += kThreads)
        {
            int const t = idx / dk, i = idx % dk;
            st[t * ldk + i] = p.w[(item * kC + t) * dk + i];
        }
        for (int idx = tid; idx < kC * kC; idx += kThreads)
        {
            int const t = idx / kC, s = idx % kC;
            aq[t * kAld + s] = p.aqk[(item * kC + t) * kC + s];
        }
        if (tid < kC)
        {
            float const g = p.gcum[item * kC + tid];
            float const gl = p.gcum[item * kC + kC - 1];
            eq[tid] = expf(g);
            ek[tid] = expf(gl - g);
            if (tid == 0)
            {
                last[0] = expf(gl);
            }
        }
        __syncthreads();
        for (int t = warp; t < kC; t += kWarps)
        {
            float acc = 0.0F;
            for (int i = 0; i < dk; ++i)
            {
                acc = fmaf(st[t * ldk + i], S[i * kCols + lane], acc);
            }
            float const u = colOk ? p.u[(item * kC + t) * dv + j] : 0.0F;
            vn[t * kCols + lane] = u - acc;
        }
        __syncthreads();
        for (int idx = tid; idx < kC * dk; idx += kThreads)
        {
            int const t = idx / dk, i = idx % dk;
            st[t * ldk + i] = t < len ? p.q[qkBase + static_cast<size_t>(t) * dk + i] : 0.0F;
        }
        __syncthreads();
        for (int t = warp; t < len; t += kWarps)
        {
            float acc = 0.0F;
            for (int i = 0; i < dk; ++i)
            {
                acc = fmaf(st[t * ldk + i], S[i * kCols + lane], acc);
            }
            acc *= eq[t];
            for (int s = 0; s <= t; ++s)
            {
                acc = fmaf(aq[t * kAld + s], vn[s * kCols + lane], acc);
            }
            if (colOk)
            {
                p.o[((static_cast<size_t>(b) * T + t0 + t) * p.nv + vh) * dv + j] = acc;
            }
        }
        __syncthreads();
        for (int idx = tid; idx < kC * dk; idx += kThreads)
        {
            int const t = idx / dk, i = idx % dk;
            st[t * ldk + i] = t < len ? p.k[qkBase + static_cast<size_t>(t) * dk + i] : 0.0F;
        }
        __syncthreads();
        for (int i = warp; i < dk; i += kWarps)
        {
            float acc = S[i * kCols + lane] * last[0];
            for (int t = 0; t < kC; ++t)
            {
                acc = fmaf(st[t * ldk + i] * ek[t], vn[t * kCols + lane], acc);
            }
            S[i * kCols + lane] = acc;
        }
    }
    for (int i = warp; i < dk; i += kWarps)
    {
        if (colOk)
        {
            p.stateOut[stateBase + static_cast<size_t>(i) * dv + j] = S[i * kCols + lane];
        }
    }
}

template <typename Kernel>
int prepareSmem(Kernel kernel, size_t bytes)
{
    if (bytes > static_cast<size_t>(maxSharedMemoryOptin()))
    {
        return QWEN_STATUS_UNSUPPORTED;
    }
    if (bytes > 48 * 1024)
    {
        QWEN_CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
    }
    return 0;
}

} // namespace

int launchRecurrent(RuleParams const& p, cudaStream_t stream)
{
    size_t const smem = (static_cast<size_t>(p.dk) * kCols + 2 * p.dk + kWarps * kCols) * sizeof(float);
    QWEN_CHECK_STATUS(prepareSmem(recurrentKernel, smem));
    dim3 const grid(static_cast<unsigned>(p.batch * p.nv), static_cast<unsigned>(ceilDiv(p.dv, kCols)));
    recurrentKernel<<<grid, kThreads, smem, stream>>>(p);
    QWEN_CHECK_LAUNCH();
    return 0;
}

int launchChunkedSegment(RuleParams const& p, int64_t chunkBegin, int64_t chunks, cudaStream_t stream)
{
    int const ldk = p.dk + 1;
    int const ldb = std::max(p.dk, p.dv) + 1;
    size_t const prepSmem = (static_cast<size_t>(kC) * ldk + kC * kAld + kC * ldb + 3 * kC) * sizeof(float);
    size_t const stateSmem
        = (static_cast<size_t>(p.dk) * kCols + kC * ldk + kC * kCols + kC * kAld + 2 * kC + 1) * sizeof(float);
    QWEN_CHECK_STATUS(prepareSmem(chunkPrepKernel, prepSmem));
    QWEN_CHECK_STATUS(prepareSmem(chunkStateKernel, stateSmem));
    dim3 const prepGrid(static_cast<unsigned>(chunks), static_cast<unsigned>(p.batch * p.nv));
    chunkPrepKernel<<<prepGrid, kThreads, prepSmem, stream>>>(p, chunkBegin, chunks);
    QWEN_CHECK_LAUNCH();
    dim3 const stateGrid(static_cast<unsigned>(p.batch * p.nv), static_cast<unsigned>(ceilDiv(p.dv, kCols)));
    chunkStateKernel<<<stateGrid, kThreads, stateSmem, stream>>>(p, chunkBegin, chunks);
    QWEN_CHECK_LAUNCH();
    return 0;
}

} // namespace gated_deltanet
} // namespace qwen
