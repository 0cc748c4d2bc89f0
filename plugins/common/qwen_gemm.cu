// GEMM kernels behind qwen::gemm (see qwen_gemm.h for what they compute and when each runs).
#include "qwen_core.h"
#include "qwen_cuda.cuh"
#include "qwen_gemm.h"

#include <mma.h>

#include <algorithm>

namespace qwen
{

int multiProcessorCount()
{
    // Cached per device: the attribute query is cheap, but this runs on every launch.
    static int cached[64] = {};
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64)
    {
        return 132;
    }
    if (cached[device] == 0)
    {
        int count = 0;
        cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
        cached[device] = count > 0 ? count : 132;
    }
    return cached[device];
}

int maxSharedMemoryOptin()
{
    static int cached[64] = {};
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= 64)
    {
        return 48 * 1024;
    }
    if (cached[device] == 0)
    {
        int bytes = 0;
        cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
        cached[device] = bytes > 0 ? bytes : 48 * 1024;
    }
    return cached[device];
}

namespace
{

struct GemmFlags
{
    int32_t vecA; // A rows can be read with 16-byte vectors
    int32_t vecW; // W rows (and every group's base) can be read with 16-byte vectors
    int32_t splits;
};

// Group g such that tileOff[g] <= tile < tileOff[g + 1] (tileOff non-decreasing, tile < tileOff[groups]).
__device__ __forceinline__ int findGroup(int32_t const* tileOff, int groups, int64_t tile)
{
    int lo = 0, hi = groups; // invariant: tileOff[lo] <= tile < tileOff[hi]
    while (hi - lo > 1)
    {
        int const mid = (lo + hi) >> 1;
        if (tileOff[mid] <= tile)
        {
            lo = mid;
        }
        else
        {
            hi = mid;
        }
    }
    return lo;
}

// Resolves a block's rows: [rowBegin, rowEnd) and its group. Returns false when the tile is past the end.
__device__ __forceinline__ bool blockRows(
    GemmParams const& p, int64_t tile, int tileRows, int64_t& rowBegin, int64_t& rowEnd, int& group)
{
    if (p.rowOff == nullptr)
    {
        group = 0;
        rowBegin = tile * tileRows;
        rowEnd = min(rowBegin + tileRows, p.m);
        return rowBegin < p.m;
    }
    if (tile >= p.tileOff[p.groups])
    {
        return false;
    }
    group = findGroup(p.tileOff, p.groups, tile);
    rowBegin = p.rowOff[group] + (tile - p.tileOff[group]) * tileRows;
    rowEnd = min(rowBegin + tileRows, static_cast<int64_t>(p.rowOff[group + 1]));
    return rowBegin < rowEnd;
}

__device__ __forceinline__ void storeResult(GemmParams const& p, int64_t row, int64_t col, float value, bool atomic)
{
    if (p.rowScale != nullptr)
    {
        value *= p.rowScale[row];
    }
    int64_t const outRow = p.cRows != nullptr ? p.cRows[row] : row;
    float* dst = static_cast<float*>(p.c) + outRow * p.ldc + col;
    if (atomic)
    {
        atomicAdd(dst, value);
    }
    else
    {
        *dst = value;
    }
}

// ---- weight-streaming kernel ------------------------------------------------------------------------------
//
// Block: 256 threads = 8 column lanes (8 columns each: 64 columns per block) x 32 K lanes. A warp covers
// 4 consecutive K rows x 64 columns, i.e. four fully used 128-byte segments per load instruction.
constexpr int kSkinnyThreads = 256;
constexpr int kSkinnyCols = 64;
constexpr int kSkinnyKLanes = 32;

template <typename T, int MR>
__global__ void __launch_bounds__(kSkinnyThreads) gemmSkinnyKernel(GemmParams p, GemmFlags f)
{
    int const tid = threadIdx.x;
    int const colLane = tid & 7;
    int const kLane = tid >> 3;
    int const warp = tid >> 5;
    int const lane = tid & 31;

    int64_t rowBegin = 0, rowEnd = 0;
    int group = 0;
    if (!blockRows(p, blockIdx.y, MR, rowBegin, rowEnd, group))
    {
        return;
    }
    int const nRows = static_cast<int>(rowEnd - rowBegin);
    T const* aRow[MR];
#pragma unroll
    for (int r = 0; r < MR; ++r)
    {
        int64_t const row = rowBegin + r;
        int64_t const src = r < nRows ? (p.aRows != nullptr ? p.aRows[row] : row) : 0;
        aRow[r] = static_cast<T const*>(p.a) + src * p.lda;
    }
    T const* w = static_cast<T const*>(p.w) + group * p.wGroupStride;
    int64_t const col0 = static_cast<int64_t>(blockIdx.x) * kSkinnyCols + colLane * 8;
    bool const fullVec = f.vecW && col0 + 8 <= p.n;

    int64_t const kPer = (p.k + f.splits - 1) / f.splits;
    int64_t const kBegin = static_cast<int64_t>(blockIdx.z) * kPer;
    int64_t const kEnd = min(p.k, kBegin + kPer);

    float acc[MR][8];
#pragma unroll
    for (int r = 0; r < MR; ++r)
    {
#pragma unroll
        for (int c = 0; c < 8; ++c)
        {
            acc[r][c] = 0.0F;
        }
    }

    // Four K rows in flight per thread: loads first, then the FMAs (memory-level parallelism).
    constexpr int kUnroll = 4;
    for (int64_t k0 = kBegin + kLane; k0 < kEnd; k0 += kSkinnyKLanes * kUnroll)
    {
        float wv[kUnroll][8];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
        {
            int64_t const k = k0 + static_cast<int64_t>(u) * kSkinnyKLanes;
            if (k < kEnd)
            {
                T const* src = w + k * p.ldw + col0;
                if (fullVec)
                {
                    load8(src, wv[u]);
                }
                else
                {
#pragma unroll
                    for (int c = 0; c < 8; ++c)
                    {
                        wv[u][c] = col0 + c < p.n ? toFloat(src[c]) : 0.0F;
                    }
                }
            }
            else
            {
#pragma unroll
                for (int c = 0; c < 8; ++c)
                {
                    wv[u][c] = 0.0F;
                }
            }
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u)
        {
            int64_t const k = k0 + static_cast<int64_t>(u) * kSkinnyKLanes;
            if (k < kEnd)
            {
#pragma unroll
                for (int r = 0; r < MR; ++r)
                {
                    if (r < nRows)
                    {
                        float const a = toFloat(aRow[r][k]);
#pragma unroll
                        for (int c = 0; c < 8; ++c)
                        {
                            acc[r][c] = fmaf(a, wv[u][c], acc[r][c]);
                        }
                    }
                }
            }
        }
    }

    // Reduce the 4 K lanes of a warp (lanes 8 and 16 apart), then the 8 warps through shared memory.
#pragma unroll
    for (int r = 0; r < MR; ++r)
    {
#pragma unroll
        for (int c = 0; c < 8; ++c)
        {
            acc[r][c] += __shfl_xor_sync(0xffffffffu, acc[r][c], 8);
            acc[r][c] += __shfl_xor_sync(0xffffffffu, acc[r][c], 16);
        }
    }
    __shared__ float red[kSkinnyThreads / 32][MR][kSkinnyCols];
    if (lane < 8)
    {
#pragma unroll
        for (int r = 0; r < MR; ++r)
        {
#pragma unroll
            for (int c = 0; c < 8; ++c)
            {
                red[warp][r][lane * 8 + c] = acc[r][c];
            }
        }
    }
    __syncthreads();
    bool const atomic = p.accumulate != 0 || f.splits > 1;
    for (int idx = tid; idx < MR * kSkinnyCols; idx += kSkinnyThreads)
    {
        int const r = idx / kSkinnyCols;
        int const c = idx % kSkinnyCols;
        int64_t const col = static_cast<int64_t>(blockIdx.x) * kSkinnyCols + c;
        if (r < nRows && col < p.n)
        {
            float sum = 0.0F;
#pragma unroll
            for (int wi = 0; wi < kSkinnyThreads / 32; ++wi)
            {
                sum += red[wi][r][c];
            }
            storeResult(p, rowBegin + r, col, sum, atomic);
        }
    }
}

// ---- tensor-core tiled kernel -------------------------------------------------------------------------
//
// Block: 128 threads = 4 warps in 2 x 2, each computing 32 x 32 of the 64 x 64 tile with 2 x 2 WMMA
// fragments; K advances 32 at a time through shared memory. Straightforward (no cp.async pipeline, no
// swizzle): see docs/plugins.md for what is and is not tuned.
constexpr int kTBM = 64;
constexpr int kTBN = 64;
constexpr int kTBK = 32;
constexpr int kTThreads = 128;
constexpr int kALd = kTBK + 8; // 16-bit elements; keeps WMMA pointers 32-byte aligned, staggers banks
constexpr int kBLd = kTBN + 8;
constexpr int kCLd = kTBN + 4; // floats

template <typename T>
__device__ __forceinline__ void loadTileVec8OrScalar(
    T* dst, T const* src, bool rowValid, int64_t colsLeft, bool vec)
{
    // 8 consecutive elements of one row into shared memory, zero-filled out of range.
    if (rowValid && vec && colsLeft >= 8)
    {
        *reinterpret_cast<uint4*>(dst) = __ldg(reinterpret_cast<uint4 const*>(src));
        return;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i)
    {
        dst[i] = (rowValid && i < colsLeft) ? src[i] : fromFloat<T>(0.0F);
    }
}

template <typename T, bool DUAL>
__global__ void __launch_bounds__(kTThreads) gemmTiledKernel(GemmParams p, GemmFlags f)
{
    using namespace nvcuda;
    constexpr int kABytes = kTBM * kALd * 2;
    constexpr int kBBytes = kTBK * kBLd * 2;
    constexpr int kLoopBytes = kABytes + kBBytes * (DUAL ? 2 : 1);
    constexpr int kEpiBytes = kTBM * kCLd * 4 * (DUAL ? 2 : 1);
    // The K-loop tiles and the epilogue staging are never live together: they share the buffer.
    __shared__ __align__(128) unsigned char smem[kLoopBytes > kEpiBytes ? kLoopBytes : kEpiBytes];
    T* As = reinterpret_cast<T*>(smem);
    T* Bs = reinterpret_cast<T*>(smem + kABytes);
    T* B2s = reinterpret_cast<T*>(smem + kABytes + kBBytes);
    float* Cs = reinterpret_cast<float*>(smem);
    float* C2s = reinterpret_cast<float*>(smem + kTBM * kCLd * 4);

    int64_t rowBegin = 0, rowEnd = 0;
    int group = 0;
    if (!blockRows(p, blockIdx.x, kTBM, rowBegin, rowEnd, group))
    {
        return;
    }
    int64_t const n0 = static_cast<int64_t>(blockIdx.y) * kTBN;
    T const* w = static_cast<T const*>(p.w) + group * p.wGroupStride;
    T const* w2 = DUAL ? static_cast<T const*>(p.w2) + group * p.wGroupStride : nullptr;
    int const tid = threadIdx.x;
    int const warp = tid >> 5;
    int const wm = warp >> 1;
    int const wn = warp & 1;

    // Per-thread A rows for the two 8-element chunks it loads each K step.
    T const* aSrc[2];
    bool aValid[2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
    {
        int const idx = tid + i * kTThreads;
        int const r = idx / (kTBK / 8);
        int64_t const row = rowBegin + r;
        aValid[i] = row < rowEnd;
        int64_t const src = aValid[i] ? (p.aRows != nullptr ? p.aRows[row] : row) : 0;
        aSrc[i] = static_cast<T const*>(p.a) + src * p.lda;
    }

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc2[DUAL ? 2 : 1][DUAL ? 2 : 1];
#pragma unroll
    for (int i = 0; i < 2; ++i)
    {
#pragma unroll
        for (int j = 0; j < 2; ++j)
        {
            wmma::fill_fragment(acc[i][j], 0.0F);
            if constexpr (DUAL)
            {
                wmma::fill_fragment(acc2[i][j], 0.0F);
            }
        }
    }

    for (int64_t k0 = 0; k0 < p.k; k0 += kTBK)
    {
#pragma unroll
        for (int i = 0; i < 2; ++i)
        {
            int const idx = tid + i * kTThreads;
            int const r = idx / (kTBK / 8);
            int const c8 = (idx % (kTBK / 8)) * 8;
            loadTileVec8OrScalar(As + r * kALd + c8, aSrc[i] + k0 + c8, aValid[i], p.k - k0 - c8, f.vecA != 0);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
        {
            int const idx = tid + i * kTThreads;
            int const r = idx / (kTBN / 8);
            int const c8 = (idx % (kTBN / 8)) * 8;
            bool const valid = k0 + r < p.k;
            int64_t const off = (k0 + r) * p.ldw + n0 + c8;
            loadTileVec8OrScalar(Bs + r * kBLd + c8, w + off, valid, p.n - n0 - c8, f.vecW != 0);
            if constexpr (DUAL)
            {
                loadTileVec8OrScalar(B2s + r * kBLd + c8, w2 + off, valid, p.n - n0 - c8, f.vecW != 0);
            }
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kTBK; kk += 16)
        {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af[2];
#pragma unroll
            for (int i = 0; i < 2; ++i)
            {
                wmma::load_matrix_sync(af[i], As + (wm * 32 + i * 16) * kALd + kk, kALd);
            }
#pragma unroll
            for (int j = 0; j < 2; ++j)
            {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf;
                wmma::load_matrix_sync(bf, Bs + kk * kBLd + wn * 32 + j * 16, kBLd);
#pragma unroll
                for (int i = 0; i < 2; ++i)
                {
                    wmma::mma_sync(acc[i][j], af[i], bf, acc[i][j]);
                }
                if constexpr (DUAL)
                {
                    wmma::load_matrix_sync(bf, B2s + kk * kBLd + wn * 32 + j * 16, kBLd);
#pragma unroll
                    for (int i = 0; i < 2; ++i)
                    {
                        wmma::mma_sync(acc2[i][j], af[i], bf, acc2[i][j]);
                    }
                }
            }
        }
        __syncthreads();
    }

    // Epilogue through shared memory: fragments have no documented element layout.
#pragma unroll
    for (int i = 0; i < 2; ++i)
    {
#pragma unroll
        for (int j = 0; j < 2; ++j)
        {
            float* dst = Cs + (wm * 32 + i * 16) * kCLd + wn * 32 + j * 16;
            wmma::store_matrix_sync(dst, acc[i][j], kCLd, wmma::mem_row_major);
            if constexpr (DUAL)
            {
                wmma::store_matrix_sync(C2s + (wm * 32 + i * 16) * kCLd + wn * 32 + j * 16, acc2[i][j], kCLd,
                    wmma::mem_row_major);
            }
        }
    }
    __syncthreads();
    for (int idx = tid; idx < kTBM * kTBN; idx += kTThreads)
    {
        int const r = idx / kTBN;
        int const c = idx % kTBN;
        int64_t const row = rowBegin + r;
        int64_t const col = n0 + c;
        if (row >= rowEnd || col >= p.n)
        {
            continue;
        }
        if constexpr (DUAL)
        {
            float const g = Cs[r * kCLd + c];
            float const u = C2s[r * kCLd + c];
            int64_t const outRow = p.cRows != nullptr ? p.cRows[row] : row;
            static_cast<T*>(p.c)[outRow * p.ldc + col] = fromFloat<T>(siluf(g) * u);
        }
        else
        {
            storeResult(p, row, col, Cs[r * kCLd + c], p.accumulate != 0);
        }
    }
}

template <typename T>
int launchSkinny(GemmParams const& p, GemmFlags f, cudaStream_t stream)
{
    int64_t const colTiles = ceilDiv(p.n, kSkinnyCols);
    int mr = 4;
    int64_t rowTiles = 0;
    if (p.rowOff != nullptr)
    {
        mr = kSkinnyGroupTileRows;
        rowTiles = p.maxTiles;
    }
    else
    {
        mr = p.m <= 1 ? 1 : p.m <= 2 ? 2 : p.m <= 4 ? 4 : 8;
        rowTiles = ceilDiv(p.m, mr);
    }
    if (rowTiles <= 0 || colTiles <= 0)
    {
        return 0;
    }
    // Split K until the grid covers the GPU about twice (each split needs at least 256 rows of K).
    int64_t const blocks = colTiles * rowTiles;
    int64_t const target = 2LL * multiProcessorCount();
    int64_t splits = blocks >= target ? 1 : ceilDiv(target, blocks);
    splits = std::max<int64_t>(1, std::min<int64_t>(splits, ceilDiv(p.k, 256)));
    if (splits > 1 && p.accumulate == 0)
    {
        if (p.cRows != nullptr || p.rowOff != nullptr)
        {
            splits = 1; // scattered or grouped rows: no cheap way to zero C first
        }
        else
        {
            QWEN_CHECK_CUDA(cudaMemset2DAsync(
                p.c, p.ldc * sizeof(float), 0, p.n * sizeof(float), p.m, stream));
        }
    }
    f.splits = static_cast<int32_t>(splits);
    dim3 const grid(static_cast<unsigned>(colTiles), static_cast<unsigned>(rowTiles), static_cast<unsigned>(splits));
    switch (mr)
    {
    case 1: gemmSkinnyKernel<T, 1><<<grid, kSkinnyThreads, 0, stream>>>(p, f); break;
    case 2: gemmSkinnyKernel<T, 2><<<grid, kSkinnyThreads, 0, stream>>>(p, f); break;
    case 4: gemmSkinnyKernel<T, 4><<<grid, kSkinnyThreads, 0, stream>>>(p, f); break;
    default: gemmSkinnyKernel<T, 8><<<grid, kSkinnyThreads, 0, stream>>>(p, f); break;
    }
    QWEN_CHECK_LAUNCH();
    return 0;
}

template <typename T>
int launchTiled(GemmParams const& p, GemmFlags f, cudaStream_t stream)
{
    int64_t const rowTiles = p.rowOff != nullptr ? p.maxTiles : ceilDiv(p.m, kTBM);
    int64_t const colTiles = ceilDiv(p.n, kTBN);
    if (rowTiles <= 0 || colTiles <= 0)
    {
        return 0;
    }
    if (colTiles > 65535)
    {
        return QWEN_STATUS_UNSUPPORTED;
    }
    dim3 const grid(static_cast<unsigned>(rowTiles), static_cast<unsigned>(colTiles));
    f.splits = 1;
    if (p.dual)
    {
        gemmTiledKernel<T, true><<<grid, kTThreads, 0, stream>>>(p, f);
    }
    else
    {
        gemmTiledKernel<T, false><<<grid, kTThreads, 0, stream>>>(p, f);
    }
    QWEN_CHECK_LAUNCH();
    return 0;
}

} // namespace

bool gemmUsesSkinny(int64_t rows, bool grouped)
{
    return rows <= (grouped ? kSkinnyMaxGroupedRows : kSkinnyMaxRows);
}

int gemmGroupTileRows(GemmParams const& p)
{
    bool const skinny = !p.dual && !p.forceTiled && gemmUsesSkinny(p.m, true);
    return skinny ? kSkinnyGroupTileRows : kTiledTileRows;
}

int64_t gemmMaxTiles(int64_t rows, int64_t groups, int tileRows)
{
    // sum over non-empty groups of ceil(rows_g / tileRows) <= rows / tileRows + (non-empty groups)
    return ceilDiv(rows, tileRows) + std::min(rows, groups);
}

int gemm(GemmParams const& p, int32_t dtype, cudaStream_t stream)
{
    if (p.a == nullptr || p.w == nullptr || p.c == nullptr || p.k <= 0 || p.n <= 0
        || (p.dual && (p.w2 == nullptr || p.accumulate)) || (p.rowOff != nullptr && p.tileOff == nullptr))
    {
        return QWEN_STATUS_BAD_PARAM;
    }
    if (p.m <= 0)
    {
        return 0;
    }
    GemmFlags f{};
    f.vecA = (p.lda % 8 == 0) && isAligned16(p.a);
    f.vecW = (p.ldw % 8 == 0) && (p.wGroupStride % 8 == 0) && isAligned16(p.w)
        && (!p.dual || isAligned16(p.w2));
    f.splits = 1;
    bool const skinny = !p.dual && !p.forceTiled && gemmUsesSkinny(p.m, p.rowOff != nullptr);
    return QWEN_DISPATCH_ACT(dtype, T, [&] { return skinny ? launchSkinny<T>(p, f, stream) : launchTiled<T>(p, f, stream); });
}

} // namespace qwen
