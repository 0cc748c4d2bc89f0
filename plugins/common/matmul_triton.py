"""The fused plugins' dense projection GEMM: y[M, N] = x[M, K] @ w[K, N], fp32 accumulation.

x and w are in the activation type (fp16 / bf16), y in it too or, for the "*_f32out" variants, fp32 (the MoE
router's logits); the fp32 accumulator is rounded once to y's type. All three are row-major with their own
row strides in elements (last axes contiguous): w is [K, N] with N contiguous (a transformers nn.Linear
weight transposed once when the engine is built), x and y may be views with wider rows (a slice of a fused
projection's output).

One program owns one [BLOCK_M, BLOCK_N] tile of y and walks K in BLOCK_K steps with `tl.dot` into an fp32
accumulator. Rows of x past M are clamped to row M - 1 (their results are never stored), so x loads mask
only K; w loads mask K and the columns past N (the contiguous axis: clamping there would defeat vector
loads). The 1-D grid is `matmul_grid`: tiles are numbered in groups of GROUP_M tile rows (column by column
inside a group), so the programs running at once share GROUP_M x-tiles and a few w-tiles in L2.

Two tile classes, frozen as constexprs (no autotuning; `select_spec` picks, the C++ launcher mirrors it and
takes the grid from the chosen cubin's own BLOCK_M / BLOCK_N):
- prefill (M > DECODE_MAX_ROWS): 128 x 128 tiles, BLOCK_K 64, 8 warps, GROUP_M 8.
- decode (M <= DECODE_MAX_ROWS = 16): BLOCK_M 16 (one tile row holds every token), 32-wide N tiles, BLOCK_K
  256: a GEMV streams w once, over N / 32 programs (a 4096-wide projection: 128 programs, about one per SM
  of an H100 / H200), each with a long K loop to pipeline.
Those are the `_a16` specs, which carry the ":16" divisibility hint on the pointers, K, N and the row strides
(`is_aligned` says when a launch may take them): loads become 16-byte vectors and the K loop is staged
through shared memory with cp.async, which triton 3.9 does not do without the hints (see
moe/grouped_gemm_triton.py). Every Qwen3.5 projection width is a multiple of 16. The generic specs (any
alignment) are the fallback, with smaller tiles (`TILES`).

Offsets: row offsets of x, y and w are int64 (rows x row stride may pass 2**31); column offsets are int32.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

from qwen_export.plugins.triton_support import KernelSpec, aligned16, device_sm, variant_of

DECODE_MAX_ROWS = 16  # M up to which the decode tile class runs
INT32_MAX = 2**31 - 1


@triton.jit
def matmul_kernel(
    x_ptr,  # [M, K] activations, rows stride_x apart, contiguous within a row
    w_ptr,  # [K, N] weight (activation type), rows stride_w apart, contiguous within a row
    y_ptr,  # [M, N] out: activation type or fp32, rows stride_y apart
    M,
    N,
    K,
    stride_x,
    stride_w,
    stride_y,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped order: GROUP_M tile rows at a time, walked column by column (the last group may be shorter).
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tl.minimum(rows, M - 1).to(tl.int64)[:, None] * stride_x + k[None, :]
    b_ptrs = w_ptr + k.to(tl.int64)[:, None] * stride_w + cols[None, :]
    step_w = stride_w.to(tl.int64) * BLOCK_K
    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k < K - k0
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision="ieee")
        a_ptrs += BLOCK_K
        b_ptrs += step_w
    dst = y_ptr + rows.to(tl.int64)[:, None] * stride_y + cols[None, :]
    tl.store(dst, acc.to(y_ptr.dtype.element_ty), mask=(rows < M)[:, None] & col_ok[None, :])


SIGNATURE = {
    "x_ptr": "*{act}", "w_ptr": "*{act}", "y_ptr": "*{out}", "M": "i32", "N": "i32", "K": "i32",
    "stride_x": "i32", "stride_w": "i32", "stride_y": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
    "BLOCK_K": "constexpr", "GROUP_M": "constexpr",
}  # fmt: skip
# the arguments the `_a16` specs hint as multiples of 16 (pointers: 16-byte aligned)
ALIGNED = ("x_ptr", "w_ptr", "y_ptr", "N", "K", "stride_x", "stride_w", "stride_y")
ALIGNED_SIGNATURE = aligned16(SIGNATURE, ALIGNED)

VARIANTS = {
    "fp16": {"act": "fp16"},
    "bf16": {"act": "bf16"},
    "fp16_f32out": {"act": "fp16", "out": "fp32"},  # the MoE router's fp32 logits
    "bf16_f32out": {"act": "bf16", "out": "fp32"},
}

# Tile classes, frozen per (class, aligned): (constexprs, num_warps, num_stages). The `_a16` cubins are the
# fast path: with the hints, loads are 16-byte cp.async copies into shared memory (LDGSTS.128; wgmma on
# sm_90a): at most 97 KB of it (prefill on sm_90a / sm_100a; 64 KB on sm_80 / sm_86 / sm_89), within the
# 99 KB a block may use on sm_86 / sm_89 / sm_120a. Without the hints triton 3.9 loads every element alone
# (LDG.U16) through its own 64-bit pointer held in registers, so the generic cubins (any alignment, any K
# and N: the fallback) take smaller K steps: 128 x 128 x 64 needs 255 registers there and spills on sm_80
# (128 x 128 x 32 at 8 warps: 223-238), 64 x 128 x 32 at 4 warps needs 168 and none; the decode tile with
# BLOCK_K 256 needs 245-255, with 64 96. (ptxas via the AOT build, every SM; no spills anywhere.) The same on
# every SM (per_sm empty): nothing measured on a GPU yet says an SM wants other tiles.
TILES: dict[tuple[str, bool], tuple[dict[str, int], int, int]] = {
    ("prefill", True): ({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, 8, 3),
    ("prefill", False): ({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "GROUP_M": 8}, 4, 3),
    ("decode", True): ({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 256, "GROUP_M": 1}, 4, 3),
    ("decode", False): ({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 1}, 4, 3),
}
TILE_CLASSES = ("prefill", "decode")


def _spec(tile: str, aligned: bool) -> KernelSpec:
    constexprs, warps, stages = TILES[(tile, aligned)]
    return KernelSpec(
        name=f"common.matmul_{tile}{'_a16' if aligned else ''}",
        kernel=matmul_kernel,
        signature=ALIGNED_SIGNATURE if aligned else SIGNATURE,
        constexprs=dict(constexprs),
        num_warps=warps,
        num_stages=stages,
        variants=VARIANTS,
    )


SPEC_BY_CLASS: dict[tuple[str, bool], KernelSpec] = {
    (tile, a16): _spec(tile, a16) for tile in TILE_CLASSES for a16 in (False, True)
}
SPECS: list[KernelSpec] = list(SPEC_BY_CLASS.values())


def tile_class(M: int) -> str:
    """ "decode" for M <= DECODE_MAX_ROWS, else "prefill"."""
    return "decode" if M <= DECODE_MAX_ROWS else "prefill"


def select_spec(M: int, aligned: bool = False, tile: str | None = None) -> KernelSpec:
    """The spec a launch of M rows takes: its tile class (`tile` forces one) and, with `aligned`
    (`is_aligned`), the `_a16` cubin."""
    tile = tile or tile_class(M)
    if tile not in TILE_CLASSES:
        raise ValueError(f"unknown tile class {tile!r} ({' or '.join(TILE_CLASSES)})")
    return SPEC_BY_CLASS[(tile, bool(aligned))]


def matmul_variant(act_dtype, out_dtype) -> str:
    """The variant of activations `act_dtype` writing `out_dtype`: "fp16", "bf16", or "*_f32out" for fp32
    output (fp32 activations, checked under the interpreter only, run as fp16's)."""
    import torch

    return variant_of(act_dtype) + ("_f32out" if out_dtype == torch.float32 else "")


def matmul_grid(M: int, N: int, constexprs: dict) -> tuple[int]:
    """The launch grid (one program per output tile; the C++ launcher mirrors this)."""
    return (triton.cdiv(M, constexprs["BLOCK_M"]) * triton.cdiv(N, constexprs["BLOCK_N"]),)


def is_aligned(x2, w, y2) -> bool:
    """Whether a launch on [M, K] x, [K, N] w and [M, N] y may take the `_a16` cubin: every pointer 16-byte
    aligned, K, N and every row stride a multiple of 16."""
    K, N = w.shape
    return (
        K % 16 == 0
        and N % 16 == 0
        and all(t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0 for t in (x2, w, y2))
    )


def _rows(t, dim: int, what: str):
    """`t` [..., dim] as [rows, dim] without a copy (last axis contiguous, rows evenly strided)."""
    if t.shape[-1] != dim:
        raise ValueError(f"matmul: {what} has last axis {t.shape[-1]}, expected {dim}")
    if t.stride(-1) != 1 and dim > 1:
        raise ValueError(f"matmul: {what} must be contiguous along its last axis")
    try:
        return t.view(math.prod(t.shape[:-1]), dim)
    except RuntimeError:
        raise ValueError(f"matmul: {what} must have evenly strided rows (view-able as [-1, {dim}])") from None


def matmul(x, w, out=None, out_dtype=None, tile: str | None = None, sm: str | None = None):
    """Launch: y = x @ w, returned (as `out` when given).

    x: [..., K] activations (fp16 / bf16; fp32 too, for checks), last axis contiguous, rows evenly strided;
    w: [K, N] in x's dtype, N contiguous. out: [..., N] (any row stride), or allocated contiguous; its dtype
    (else `out_dtype`, else x's) is x's or fp32. `tile` forces a tile class ("prefill" / "decode"); `sm`
    picks whose frozen configuration runs (default: the device's; sm_90a on the CPU)."""
    import torch

    if w.dim() != 2:
        raise ValueError(f"matmul: w must be [K, N], got shape {tuple(w.shape)}")
    K, N = w.shape
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or w.dtype != x.dtype:
        raise ValueError(f"matmul: x and w must share an fp16 / bf16 / fp32 dtype, got {x.dtype}, {w.dtype}")
    if w.stride(1) != 1 and N > 1:
        raise ValueError("matmul: w must be [K, N] with N contiguous (transpose the nn.Linear weight once)")
    out_dtype = out.dtype if out is not None else (out_dtype or x.dtype)
    if out_dtype not in (x.dtype, torch.float32):
        raise ValueError(f"matmul: the output must be {x.dtype} or torch.float32, not {out_dtype}")
    shape = (*x.shape[:-1], N)
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=x.device)
    elif tuple(out.shape) != shape:
        raise ValueError(f"matmul: out has shape {tuple(out.shape)}, expected {shape}")
    x2, y2 = _rows(x, K, "x"), _rows(out, N, "out")
    M = x2.shape[0]
    if M == 0 or N == 0:
        return out
    sizes = (M, N, K, x2.stride(0), w.stride(0), y2.stride(0))
    if max(sizes) > INT32_MAX:
        raise ValueError(f"matmul: sizes and row strides must fit int32, got {sizes}")
    spec = select_spec(M, is_aligned(x2, w, y2), tile)
    _, constexprs, warps, stages = spec.config(device_sm(x, sm), matmul_variant(x.dtype, out_dtype))
    matmul_kernel[matmul_grid(M, N, constexprs)](
        x2, w, y2, *sizes, **constexprs, num_warps=warps, num_stages=stages
    )
    return out
