// The GEMM every plugin uses for its projections and experts: C = A @ W with W in MatMul layout [K, N]
// (row-major, N contiguous), 16-bit A and W, fp32 accumulation.
//
// Two kernels behind one entry point:
// - weight-streaming ("skinny") for few rows (decode, small batches): each weight element is read once
//   with 128-bit coalesced loads, K is split across warps and, when the grid would be too small to fill
//   the GPU, across blocks (fp32 atomics into C). Memory-bound by design.
// - tensor-core tiled (WMMA 16x16x16, 64x64x32 block tiles) for many rows (prefill).
//
// Options cover what the fused ops need: gathered A rows and scattered/accumulated C rows (MoE token
// permutation and weighted combine), per-row scale (routing weight, shared-expert gate), expert groups
// with device-side row/tile offsets (only the selected experts run), and a dual "SwiGLU" mode that
// computes silu(A @ W) * (A @ W2) straight into a 16-bit output.
#pragma once

#include "qwen_launch.h"

namespace qwen
{

// Rows per GEMM tile in grouped mode: tileOff must be computed with the height of the kernel that runs.
constexpr int kSkinnyGroupTileRows = 4;
constexpr int kTiledTileRows = 64;

struct GemmParams
{
    void const* a;           // A [*, K] rows of `lda` elements (activation dtype)
    int32_t const* aRows;    // logical row m reads A row aRows[m] (nullptr: row m)
    void const* w;           // W [K, N], row stride `ldw`; group g uses w + g * wGroupStride
    void const* w2;          // dual mode: the second weight (same strides)
    void* c;                 // plain: f32 C; dual: activation-dtype output
    int32_t const* cRows;    // logical row m writes C row cRows[m] (nullptr: row m)
    float const* rowScale;   // plain: multiply row m by rowScale[m] (nullptr: 1)
    int32_t const* rowOff;   // grouped: [groups + 1] first row of each group (device); nullptr: ungrouped
    int32_t const* tileOff;  // grouped: [groups + 1] first tile of each group (device)
    int64_t lda;
    int64_t ldw;
    int64_t wGroupStride;
    int64_t ldc;
    int64_t m;               // rows (ungrouped), or an upper bound of the total rows (grouped)
    int64_t n;
    int64_t k;
    int64_t maxTiles;        // grouped: an upper bound of tileOff[groups] (sizes the grid)
    int32_t groups;
    int32_t accumulate;      // plain: C += result (atomics); else C = result
    int32_t dual;            // 1: SwiGLU dual mode (never accumulates, never splits K)
    int32_t forceTiled;      // 1: use the tiled kernel whatever the row count (tests)
};

// Which kernel runs for `rows` rows: the streaming one for few rows (never in dual mode).
bool gemmUsesSkinny(int64_t rows, bool grouped);

// Tile height the grouped GEMM will use for these parameters (compute tileOff with it).
int gemmGroupTileRows(GemmParams const& params);

// Upper bound of the number of tiles of `rows` rows spread over at most `groups` non-empty groups.
int64_t gemmMaxTiles(int64_t rows, int64_t groups, int tileRows);

// Launches the GEMM. dtype: QWEN_DTYPE_*. Returns 0 or a CUDA error code.
int gemm(GemmParams const& params, int32_t dtype, cudaStream_t stream);

// Dense row-major projection: out[rows, n] (fp32) = x[rows, k] @ weight[k, n].
inline int project(void const* x, void const* weight, float* out, int64_t rows, int64_t n, int64_t k, int32_t dtype,
    cudaStream_t stream)
{
    GemmParams g{};
    g.a = x;
    g.lda = k;
    g.w = weight;
    g.ldw = n;
    g.c = out;
    g.ldc = n;
    g.m = rows;
    g.n = n;
    g.k = k;
    return gemm(g, dtype, stream);
}

} // namespace qwen
