// Flash-style attention (online softmax over key tiles) with WMMA tensor-core products, plus the split-KV
// combine. See flash_attention.h for the row packing and the masking semantics.
//
// Block: BR query rows (BR / 16 warps, 16 rows each), keys in tiles of BC. Per key tile:
//   S = Q K^T (WMMA, fp32) -> shared; masked online softmax (fp32, 2 lanes per row) -> P (16-bit) and
//   the rescale factor; O (fp32, shared) rescaled per row, then O += P V (WMMA).
// Not tuned: no cp.async double buffering, no register-resident O, no wgmma (docs/plugins.md).
#include "../common/qwen_cuda.cuh"
#include "flash_attention.h"
#include "gated_attention_core.h"

#include <mma.h>

namespace qwen
{
namespace gated_attention
{
namespace
{

constexpr float kMasked = -FLT_MAX; // float32.min, as the reference's masked score

__host__ __device__ constexpr int roundUp128(int bytes)
{
    return (bytes + 127) / 128 * 128;
}

template <int HD, int BR, int BC>
struct FlashSmem
{
    static constexpr int kQLd = HD + 8; // 16-bit tiles
    static constexpr int kSLd = BC + 4; // fp32 scores
    static constexpr int kPLd = BC + 8; // 16-bit probabilities
    static constexpr int kOLd = HD + 4; // fp32 output accumulator
    static constexpr int kQ = 0;
    static constexpr int kK = kQ + roundUp128(BR * kQLd * 2);
    static constexpr int kV = kK + roundUp128(BC * kQLd * 2);
    static constexpr int kS = kV + roundUp128(BC * kQLd * 2);
    static constexpr int kP = kS + roundUp128(BR * kSLd * 4);
    static constexpr int kO = kP + roundUp128(BR * kPLd * 2);
    static constexpr int kM = kO + roundUp128(BR * kOLd * 4);
    static constexpr int kL = kM + roundUp128(BR * 4);
    static constexpr int kA = kL + roundUp128(BR * 4);
    static constexpr int kBytes = kA + roundUp128(BR * 4);
};

// Output row epilogue: o (one element per call) * sigmoid(gate) -> out. Row r of the packed layout.
template <typename T>
__device__ __forceinline__ void writeOut(FlashParams const& p, int64_t b, int kvh, int64_t r, int d, float o)
{
    int64_t const t = r / p.group;
    int const g = static_cast<int>(r % p.group);
    int64_t const h = static_cast<int64_t>(kvh) * p.group + g;
    int64_t const bt = b * p.tokens + t;
    int64_t const nh = static_cast<int64_t>(p.kvHeads) * p.group;
    float const gate = p.gate[bt * nh * 2 * p.headDim + h * 2 * p.headDim + p.headDim + d];
    static_cast<T*>(p.out)[bt * nh * p.headDim + h * p.headDim + d] = fromFloat<T>(o * sigmoidf(gate));
}

// A row with no visible key: the reference's softmax over all-equal (float32.min) scores is uniform over
// all S keys, so the output is the mean of V. Rare (fully padded rows); plain loop. Called by a warp.
template <typename T>
__device__ void meanValueRow(FlashParams const& p, int64_t b, int kvh, int64_t r, int lane)
{
    T const* v = static_cast<T const*>(p.v) + (b * p.kvHeads + kvh) * p.keys * p.headDim;
    float const inv = 1.0F / static_cast<float>(p.keys);
    for (int d = lane; d < p.headDim; d += 32)
    {
        float sum = 0.0F;
        for (int64_t j = 0; j < p.keys; ++j)
        {
            sum += toFloat(v[j * p.headDim + d]);
        }
        writeOut<T>(p, b, kvh, r, d, sum * inv);
    }
}

template <typename T, int HD, int BR, int BC>
__global__ void __launch_bounds__(BR * 2) flashKernel(FlashParams p)
{
    using namespace nvcuda;
    using L = FlashSmem<HD, BR, BC>;
    constexpr int kThreads = BR * 2;
    constexpr int kVec = HD / 8;
    extern __shared__ __align__(128) unsigned char smem[];
    T* Qs = reinterpret_cast<T*>(smem + L::kQ);
    T* Ks = reinterpret_cast<T*>(smem + L::kK);
    T* Vs = reinterpret_cast<T*>(smem + L::kV);
    float* Ss = reinterpret_cast<float*>(smem + L::kS);
    T* Ps = reinterpret_cast<T*>(smem + L::kP);
    float* Os = reinterpret_cast<float*>(smem + L::kO);
    float* rowM = reinterpret_cast<float*>(smem + L::kM);
    float* rowL = reinterpret_cast<float*>(smem + L::kL);
    float* rowA = reinterpret_cast<float*>(smem + L::kA);

    int const tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int64_t const r0 = static_cast<int64_t>(blockIdx.x) * BR;
    int const bk = blockIdx.y;
    int64_t const b = bk / p.kvHeads;
    int const kvh = bk % p.kvHeads;
    int const nRows = static_cast<int>(min(static_cast<int64_t>(BR), p.rows - r0));

    // Keys this block needs: causally up to the last token of its rows, then this split's share.
    int64_t const tMax = min(p.tokens - 1, (r0 + BR - 1) / p.group);
    int64_t const kvEnd = min(p.keys, p.past + tMax + 1);
    int64_t const chunk = (kvEnd + p.splits - 1) / p.splits;
    int64_t const per = (chunk + BC - 1) / BC * BC;
    int64_t const kBegin = static_cast<int64_t>(blockIdx.z) * per;
    int64_t const kEnd = min(kvEnd, kBegin + per);

    T const* qBase = static_cast<T const*>(p.q) + ((b * p.kvHeads + kvh) * p.rows + r0) * HD;
    T const* kBase = static_cast<T const*>(p.k) + (b * p.kvHeads + kvh) * p.keys * HD;
    T const* vBase = static_cast<T const*>(p.v) + (b * p.kvHeads + kvh) * p.keys * HD;
    int32_t const* maskRow = p.mask + b * p.keys;

    uint4 const zero = make_uint4(0, 0, 0, 0);
    for (int idx = tid; idx < BR * kVec; idx += kThreads)
    {
        int const r = idx / kVec, c8 = (idx % kVec) * 8;
        *reinterpret_cast<uint4*>(Qs + r * L::kQLd + c8)
            = r < nRows ? *reinterpret_cast<uint4 const*>(qBase + static_cast<int64_t>(r) * HD + c8) : zero;
    }
    for (int idx = tid; idx < BR * HD; idx += kThreads)
    {
        Os[(idx / HD) * L::kOLd + idx % HD] = 0.0F;
    }
    for (int r = tid; r < BR; r += kThreads)
    {
        rowM[r] = -INFINITY;
        rowL[r] = 0.0F;
    }
    __syncthreads();

    int const myRow = warp * 16 + (lane >> 1); // softmax: 2 lanes per row
    int const half = lane & 1;
    int64_t const myLimit = p.past + (r0 + myRow) / p.group; // last causally visible key

    for (int64_t kb = kBegin; kb < kEnd; kb += BC)
    {
        for (int idx = tid; idx < BC * kVec; idx += kThreads)
        {
            int const j = idx / kVec, c8 = (idx % kVec) * 8;
            int64_t const key = kb + j;
            bool const ok = key < kEnd;
            *reinterpret_cast<uint4*>(Ks + j * L::kQLd + c8)
                = ok ? *reinterpret_cast<uint4 const*>(kBase + key * HD + c8) : zero;
            *reinterpret_cast<uint4*>(Vs + j * L::kQLd + c8)
                = ok ? *reinterpret_cast<uint4 const*>(vBase + key * HD + c8) : zero;
        }
        __syncthreads();

        // S = Q K^T for this warp's 16 rows.
#pragma unroll
        for (int n = 0; n < BC / 16; ++n)
        {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.0F);
#pragma unroll
            for (int kk = 0; kk < HD / 16; ++kk)
            {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bf;
                wmma::load_matrix_sync(af, Qs + warp * 16 * L::kQLd + kk * 16, L::kQLd);
                wmma::load_matrix_sync(bf, Ks + n * 16 * L::kQLd + kk * 16, L::kQLd);
                wmma::mma_sync(acc, af, bf, acc);
            }
            wmma::store_matrix_sync(Ss + warp * 16 * L::kSLd + n * 16, acc, L::kSLd, wmma::mem_row_major);
        }
        __syncwarp();

        // Online softmax for row myRow over this tile's keys (this lane: half of them).
        float* sRow = Ss + myRow * L::kSLd;
        float mx = -INFINITY;
        for (int jj = half * (BC / 2); jj < (half + 1) * (BC / 2); ++jj)
        {
            int64_t const key = kb + jj;
            float s;
            if (key >= kEnd)
            {
                s = -INFINITY; // not this block's key: excluded
            }
            else if (key <= myLimit && maskRow[key] != 0)
            {
                s = sRow[jj] * p.scale;
            }
            else
            {
                s = kMasked;
            }
            sRow[jj] = s;
            mx = fmaxf(mx, s);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        float const mOld = rowM[myRow];
        float const mNew = fmaxf(mOld, mx); // finite: the tile holds at least one key < kEnd
        float const alpha = mOld == -INFINITY ? 0.0F : __expf(mOld - mNew);
        float sum = 0.0F;
        for (int jj = half * (BC / 2); jj < (half + 1) * (BC / 2); ++jj)
        {
            float const s = sRow[jj];
            float const pr = s == -INFINITY ? 0.0F : __expf(s - mNew);
            Ps[myRow * L::kPLd + jj] = fromFloat<T>(pr);
            sum += pr;
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        __syncwarp();
        if (half == 0)
        {
            rowM[myRow] = mNew;
            rowL[myRow] = rowL[myRow] * alpha + sum;
            rowA[myRow] = alpha;
        }
        __syncwarp();
        for (int rr = 0; rr < 16; ++rr)
        {
            int const r = warp * 16 + rr;
            float const a = rowA[r];
            for (int d = lane; d < HD; d += 32)
            {
                Os[r * L::kOLd + d] *= a;
            }
        }
        __syncwarp();

        // O += P V for this warp's rows.
#pragma unroll
        for (int n = 0; n < HD / 16; ++n)
        {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            float* oTile = Os + warp * 16 * L::kOLd + n * 16;
            wmma::load_matrix_sync(acc, oTile, L::kOLd, wmma::mem_row_major);
#pragma unroll
            for (int kk = 0; kk < BC / 16; ++kk)
            {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf;
                wmma::load_matrix_sync(af, Ps + warp * 16 * L::kPLd + kk * 16, L::kPLd);
                wmma::load_matrix_sync(bf, Vs + kk * 16 * L::kQLd + n * 16, L::kQLd);
                wmma::mma_sync(acc, af, bf, acc);
            }
            wmma::store_matrix_sync(oTile, acc, L::kOLd, wmma::mem_row_major);
        }
        __syncthreads(); // K/V tiles are overwritten next
    }

    // Epilogue: each warp writes its own 16 rows.
    for (int rr = 0; rr < 16; ++rr)
    {
        int const r = warp * 16 + rr;
        if (r >= nRows)
        {
            break;
        }
        int64_t const row = r0 + r;
        float const m = rowM[r];
        float const l = rowL[r];
        if (p.splits > 1)
        {
            size_t const base = (static_cast<size_t>(blockIdx.z) * p.batch * p.kvHeads + bk) * p.rows + row;
            for (int d = lane; d < HD; d += 32)
            {
                p.partO[base * HD + d] = Os[r * L::kOLd + d];
            }
            if (lane == 0)
            {
                p.partML[base * 2] = m;
                p.partML[base * 2 + 1] = l;
            }
        }
        else if (m == kMasked)
        {
            meanValueRow<T>(p, b, kvh, row, lane);
        }
        else
        {
            float const inv = 1.0F / l;
            for (int d = lane; d < HD; d += 32)
            {
                writeOut<T>(p, b, kvh, row, d, Os[r * L::kOLd + d] * inv);
            }
        }
    }
}

// Merges the split partials of one (b, kv head, row) per warp.
template <typename T>
__global__ void combineKernel(FlashParams p)
{
    int64_t const w = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
    int const lane = threadIdx.x & 31;
    int64_t const total = p.batch * p.kvHeads * p.rows;
    if (w >= total)
    {
        return;
    }
    int64_t const row = w % p.rows;
    int64_t const bk = w / p.rows;
    int64_t const b = bk / p.kvHeads;
    int const kvh = static_cast<int>(bk % p.kvHeads);
    size_t const stride = static_cast<size_t>(p.batch) * p.kvHeads * p.rows; // between splits
    float mStar = -INFINITY;
    for (int s = 0; s < p.splits; ++s)
    {
        mStar = fmaxf(mStar, p.partML[(s * stride + w) * 2]);
    }
    if (mStar == kMasked)
    {
        meanValueRow<T>(p, b, kvh, row, lane);
        return;
    }
    float l = 0.0F;
    for (int s = 0; s < p.splits; ++s)
    {
        float const ms = p.partML[(s * stride + w) * 2];
        l += p.partML[(s * stride + w) * 2 + 1] * __expf(ms - mStar);
    }
    float const inv = 1.0F / l;
    for (int d = lane; d < p.headDim; d += 32)
    {
        float o = 0.0F;
        for (int s = 0; s < p.splits; ++s)
        {
            float const ms = p.partML[(s * stride + w) * 2];
            o += p.partO[(s * stride + w) * p.headDim + d] * __expf(ms - mStar);
        }
        writeOut<T>(p, b, kvh, row, d, o * inv);
    }
}

template <typename T, int HD, int BR, int BC>
int launchConfig(FlashParams const& p, cudaStream_t stream)
{
    using L = FlashSmem<HD, BR, BC>;
    auto kernel = flashKernel<T, HD, BR, BC>;
    QWEN_CHECK_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::kBytes));
    dim3 const grid(static_cast<unsigned>(ceilDiv(p.rows, BR)), static_cast<unsigned>(p.batch * p.kvHeads),
        static_cast<unsigned>(p.splits));
    kernel<<<grid, BR * 2, L::kBytes, stream>>>(p);
    QWEN_CHECK_LAUNCH();
    return 0;
}

// Picks the largest tile configuration whose shared memory fits this GPU (64x64 needs ~190 KiB at hd 256,
// which only sm_90/sm_100 have; 32x32 fits the ~99 KiB of sm_86/89/120). Few rows (decode) take 32-row
// tiles: less wasted work, and two blocks per SM overlap their loads.
template <typename T, int HD>
int launchHeadDim(FlashParams const& p, cudaStream_t stream)
{
    int const smem = maxSharedMemoryOptin();
    if (p.rows > 32 && FlashSmem<HD, 64, 64>::kBytes <= smem)
    {
        return launchConfig<T, HD, 64, 64>(p, stream);
    }
    if (p.rows > 32 && FlashSmem<HD, 64, 32>::kBytes <= smem)
    {
        return launchConfig<T, HD, 64, 32>(p, stream);
    }
    if (FlashSmem<HD, 32, 32>::kBytes <= smem)
    {
        return launchConfig<T, HD, 32, 32>(p, stream);
    }
    return QWEN_STATUS_UNSUPPORTED;
}

} // namespace

int launchFlashAttention(FlashParams const& p, int32_t dtype, cudaStream_t stream)
{
    if (p.rows <= 0 || p.batch <= 0)
    {
        return 0;
    }
    return QWEN_DISPATCH_ACT(dtype, T, [&] {
        int status = QWEN_STATUS_UNSUPPORTED;
        switch (p.headDim)
        {
        case 32: status = launchHeadDim<T, 32>(p, stream); break;
        case 64: status = launchHeadDim<T, 64>(p, stream); break;
        case 128: status = launchHeadDim<T, 128>(p, stream); break;
        case 256: status = launchHeadDim<T, 256>(p, stream); break;
        default: break;
        }
        if (status != 0 || p.splits <= 1)
        {
            return status;
        }
        int64_t const warps = p.batch * p.kvHeads * p.rows;
        combineKernel<T><<<static_cast<unsigned>(ceilDiv(warps * 32, 256)), 256, 0, stream>>>(p);
        QWEN_CHECK_LAUNCH();
        return 0;
    });
}

} // namespace gated_attention
} // namespace qwen
