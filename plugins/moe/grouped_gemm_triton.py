"""MoE experts: grouped SwiGLU GEMMs over the active experts only, fp32 accumulation.

Expert e (transformers' `Qwen3_5MoeExperts`): `gate, up = (x @ gate_up_proj[e].T).chunk(2)`,
`y = (silu(gate) * up) @ down_proj[e].T`, with gate_up_proj [E, 2I, H] (gate rows first, then up rows) and
down_proj [E, H, I]. Weights are read in transformers' layout: [E, N, K] with K (the reduced dimension)
contiguous, so loads along K vectorise (the AOT build knows that stride is 1). `w_gate` is
gate_up_proj[:, :I] and `w_up` gate_up_proj[:, I:]: two views of the same tensor.
The "*_kn" specs (W_KN=True) read the TensorRT plugin's layout instead, [E, K, N] with N contiguous
(gate_up [E, H, 2I], gate columns first; down [E, I, H]; the shared expert's [H, Is] / [Is, H]): the same
arguments, `stride_wn` then being the row stride along K, and N a multiple of 16 (the column masks keep
whole 16-element groups, so the N-contiguous loads vectorise).

Grouped path (align_triton.py groups the token-expert pairs by expert, padded to BLOCK_M):
- `gate_up_swiglu_kernel`: per (block, N tile): gate and up tiles of the block's rows with tl.dot into two
  fp32 accumulators, then h = silu(gate) * up in fp32, rounded once to the activation type: h [pairs, I].
- `down_kernel`: y [pairs, H] = h @ down[e].T per block, fp32 accumulation, unweighted (combine weighs).
Decode path (a handful of tokens: no alignment, no padding rows): one program per (N tile, pair) streams the
pair's expert once as a GEMV with fp32 accumulators, N tiles narrow enough that one token's experts spread
over every SM: `gate_up_swiglu_decode_kernel`, `down_decode_kernel`.
ROUTED=False runs a dense single expert (the shared expert) through the same kernels: rows are tokens,
the expert is 0 and nothing is sorted (variants "*_shared").

Tile variants of the grouped path: "fp16"/"bf16" BLOCK_M 64 (prefill, many rows per expert), "*_m16"
BLOCK_M 16 (few rows per expert: a short prompt spread over many experts), "*_shared" the shared expert.
Tile offsets inside one expert's matrix are int32 (an expert's matrix is far below 2**31 elements); the
expert's base offset and the row offsets are int64 (512 experts x 2048 x 4096 is past 2**32).
"""

from __future__ import annotations

import dataclasses

import triton
import triton.language as tl

from qwen_export.plugins.triton_support import KernelSpec

from .align_triton import moe_align
from .router_topk_triton import act_of, act_variants, device_sm, empty_alloc

DECODE_MAX_PAIRS = 64  # token * top_k pairs up to which the auto path is the decode GEMV
SMALL_BLOCK_ROWS = 24  # mean rows per active expert below which the grouped path uses BLOCK_M 16


@triton.jit
def weight_tile(k, n, N, stride_wn, BLOCK_K: tl.constexpr, W_KN: tl.constexpr):
    """Offsets of a [BLOCK_K, BLOCK_N] weight tile and the pointer step per K block: [E, K, N] weights
    (W_KN; columns past N are masked by `weight_tile_mask`) or [E, N, K] ones (rows past N clamped)."""
    if W_KN:
        offs = k[:, None] * stride_wn + n[None, :]
        step = BLOCK_K * stride_wn
    else:
        offs = tl.minimum(n, N - 1)[None, :] * stride_wn + k[:, None]
        step = BLOCK_K
    return offs, step


@triton.jit
def weight_tile_mask(k_ok, n_ok, W_KN: tl.constexpr):
    """The load mask of a weight tile from `weight_tile`: K in range, and N too for [E, K, N] weights."""
    if W_KN:
        mask = k_ok[:, None] & n_ok[None, :]
    else:
        mask = k_ok[:, None]
    return mask


@triton.jit
def _expert_tile(
    N, top_k, sorted_ids_ptr, expert_ids_ptr, stride_we,
    ROUTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """This program's (expert, rows, source tokens, weight offset, column tile). Routed: rows are sorted
    token-expert pairs of one expert (expert < 0: an unused padding block); dense (the shared expert):
    rows are tokens and the expert is 0."""
    pid = tl.program_id(0)
    n_tiles = (N + BLOCK_N - 1) // BLOCK_N
    offs_m = (pid // n_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    if ROUTED:
        expert = tl.load(expert_ids_ptr + pid // n_tiles)
        rows = tl.load(sorted_ids_ptr + offs_m)
        src = rows // top_k
        w_off = expert.to(tl.int64) * stride_we
    else:
        expert = 0
        rows = offs_m
        src = offs_m
        w_off = 0
    return expert, rows, src, w_off, pid % n_tiles


@triton.jit
def gate_up_swiglu_kernel(
    x_ptr,  # [T, K] activations, rows stride_xt apart, contiguous within a row
    wg_ptr,  # gate weight: element (e, n, k) at e * stride_we + n * stride_wn + k
    wu_ptr,  # up weight, same strides
    h_ptr,  # [rows, N] out: silu(gate) * up
    sorted_ids_ptr,  # ROUTED: [n_sorted] int32 pairs grouped by expert (sentinel n_rows)
    expert_ids_ptr,  # ROUTED: [n_sorted / BLOCK_M] int32 (-1: unused block)
    n_rows,  # ROUTED: pairs (T * top_k); else tokens
    top_k,
    N,
    K,
    stride_xt,
    stride_we,
    stride_wn,
    ROUTED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    W_KN: tl.constexpr = False,  # weights [E, K, N], N contiguous: (e, n, k) at e*stride_we + k*stride_wn + n
):
    expert, rows, src, w_off, pid_n = _expert_tile(
        N, top_k, sorted_ids_ptr, expert_ids_ptr, stride_we, ROUTED, BLOCK_M, BLOCK_N
    )
    if expert < 0:
        return
    row_ok = rows < n_rows
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + src.to(tl.int64)[:, None] * stride_xt + k[None, :]
    # [BLOCK_K, BLOCK_N] weight tiles: [E, K, N] columns past N masked, [E, N, K] rows past N clamped
    b_offs, w_step = weight_tile(k, n, N, stride_wn, BLOCK_K, W_KN)
    wg = wg_ptr + w_off
    wu = wu_ptr + w_off
    acc_g = tl.full((BLOCK_M, BLOCK_N), 0, tl.float32)
    acc_u = tl.full((BLOCK_M, BLOCK_N), 0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k < K - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b_mask = weight_tile_mask(k_ok, n_ok, W_KN)
        bg = tl.load(wg + b_offs, mask=b_mask, other=0.0)
        bu = tl.load(wu + b_offs, mask=b_mask, other=0.0)
        acc_g = tl.dot(a, bg, acc_g, input_precision="ieee")
        acc_u = tl.dot(a, bu, acc_u, input_precision="ieee")
        a_ptrs += BLOCK_K
        wg += w_step
        wu += w_step
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # silu(gate) * up
    dst = h_ptr + rows.to(tl.int64)[:, None] * N + n[None, :]
    tl.store(dst, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def down_kernel(
    h_ptr,  # [rows, K] (K = I), contiguous
    w_ptr,  # down weight: element (e, n, k) at e * stride_we + n * stride_wn + k
    y_ptr,  # [rows, N] out (N = H)
    sorted_ids_ptr,
    expert_ids_ptr,
    n_rows,
    N,
    K,
    stride_we,
    stride_wn,
    ROUTED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    W_KN: tl.constexpr = False,  # weights [E, K, N], N contiguous (as gate_up_swiglu_kernel)
):
    expert, rows, _, w_off, pid_n = _expert_tile(
        N, 1, sorted_ids_ptr, expert_ids_ptr, stride_we, ROUTED, BLOCK_M, BLOCK_N
    )
    if expert < 0:
        return
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rows64[:, None] * K + k[None, :]
    b_offs, w_step = weight_tile(k, n, N, stride_wn, BLOCK_K, W_KN)
    w = w_ptr + w_off
    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k < K - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b_mask = weight_tile_mask(k_ok, n_ok, W_KN)
        b = tl.load(w + b_offs, mask=b_mask, other=0.0)
        acc = tl.dot(a, b, acc, input_precision="ieee")
        a_ptrs += BLOCK_K
        w += w_step
    dst = y_ptr + rows64[:, None] * N + n[None, :]
    tl.store(dst, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def gate_up_swiglu_decode_kernel(
    x_ptr,  # [T, K], rows stride_xt apart
    wg_ptr,
    wu_ptr,
    h_ptr,  # [rows, N] out
    ids_ptr,  # ROUTED: [T * top_k] int32 expert of each pair
    top_k,
    N,
    K,
    stride_xt,
    stride_we,
    stride_wn,
    ROUTED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    W_KN: tl.constexpr = False,  # weights [E, K, N], N contiguous (as gate_up_swiglu_kernel)
):
    pid_n = tl.program_id(0)
    row = tl.program_id(1)  # a pair (ROUTED) or a token
    if ROUTED:
        expert = tl.load(ids_ptr + row)
        src = row // top_k
        w_off = expert.to(tl.int64) * stride_we
    else:
        src = row
        w_off = 0
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    xp = x_ptr + src.to(tl.int64) * stride_xt
    wg = wg_ptr + w_off
    wu = wu_ptr + w_off
    if W_KN:
        # [BLOCK_K, BLOCK_N] steps along the contiguous N, reduced over K at the end
        n_ok = n < N
        offs = k[:, None] * stride_wn + n[None, :]
        acc_g = tl.full((BLOCK_K, BLOCK_N), 0, tl.float32)
        acc_u = tl.full((BLOCK_K, BLOCK_N), 0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = k < K - k0
            xk = tl.load(xp + k, mask=k_ok, other=0.0).to(tl.float32)[:, None]
            mask = k_ok[:, None] & n_ok[None, :]
            acc_g += tl.load(wg + offs, mask=mask, other=0.0).to(tl.float32) * xk
            acc_u += tl.load(wu + offs, mask=mask, other=0.0).to(tl.float32) * xk
            xp += BLOCK_K
            wg += BLOCK_K * stride_wn
            wu += BLOCK_K * stride_wn
        g = tl.sum(acc_g, axis=0)
        u = tl.sum(acc_u, axis=0)
    else:
        offs = tl.minimum(n, N - 1)[:, None] * stride_wn + k[None, :]  # [BLOCK_N, BLOCK_K]
        acc_g = tl.full((BLOCK_N, BLOCK_K), 0, tl.float32)
        acc_u = tl.full((BLOCK_N, BLOCK_K), 0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = k < K - k0
            xk = tl.load(xp + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            acc_g += tl.load(wg + offs, mask=k_ok[None, :], other=0.0).to(tl.float32) * xk
            acc_u += tl.load(wu + offs, mask=k_ok[None, :], other=0.0).to(tl.float32) * xk
            xp += BLOCK_K
            wg += BLOCK_K
            wu += BLOCK_K
        g = tl.sum(acc_g, axis=1)
        u = tl.sum(acc_u, axis=1)
    h = g / (1.0 + tl.exp(-g)) * u
    tl.store(h_ptr + row.to(tl.int64) * N + n, h.to(h_ptr.dtype.element_ty), mask=n < N)


@triton.jit
def down_decode_kernel(
    h_ptr,  # [rows, K] contiguous
    w_ptr,
    y_ptr,  # [rows, N] out
    ids_ptr,
    N,
    K,
    stride_we,
    stride_wn,
    ROUTED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    W_KN: tl.constexpr = False,  # weights [E, K, N], N contiguous (as gate_up_swiglu_kernel)
):
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    if ROUTED:
        expert = tl.load(ids_ptr + row)
        w_off = expert.to(tl.int64) * stride_we
    else:
        w_off = 0
    row64 = row.to(tl.int64)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.arange(0, BLOCK_K)
    hp = h_ptr + row64 * K
    w = w_ptr + w_off
    if W_KN:
        n_ok = n < N
        offs = k[:, None] * stride_wn + n[None, :]  # [BLOCK_K, BLOCK_N]
        acc = tl.full((BLOCK_K, BLOCK_N), 0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = k < K - k0
            hk = tl.load(hp + k, mask=k_ok, other=0.0).to(tl.float32)[:, None]
            acc += tl.load(w + offs, mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32) * hk
            hp += BLOCK_K
            w += BLOCK_K * stride_wn
        y = tl.sum(acc, axis=0)
    else:
        offs = tl.minimum(n, N - 1)[:, None] * stride_wn + k[None, :]
        acc = tl.full((BLOCK_N, BLOCK_K), 0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = k < K - k0
            hk = tl.load(hp + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            acc += tl.load(w + offs, mask=k_ok[None, :], other=0.0).to(tl.float32) * hk
            hp += BLOCK_K
            w += BLOCK_K
        y = tl.sum(acc, axis=1)
    tl.store(y_ptr + row64 * N + n, y.to(y_ptr.dtype.element_ty), mask=n < N)


# ":16": the AOT build compiles these as multiples of 16 (bytes for pointers), which lets loads vectorise
# and, for K (the masks `k < K - k0` then hold for whole 16-element groups), lets the pipeliner stage the
# tiles through shared memory (cp.async): without it triton 3.9 leaves the loop unpipelined. The loader
# refuses a launch that breaks a hint. Model widths (H, I) are multiples of 16 in every Qwen3.5.
_GEMM_SIGNATURE = {
    "x_ptr": "*{act}:16", "wg_ptr": "*{act}:16", "wu_ptr": "*{act}:16", "h_ptr": "*{act}:16",
    "sorted_ids_ptr": "*i32", "expert_ids_ptr": "*i32", "n_rows": "i32", "top_k": "i32", "N": "i32",
    "K": "i32:16", "stride_xt": "i32:16", "stride_we": "i32:16", "stride_wn": "i32:16", "ROUTED": "constexpr",
    "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "W_KN": "constexpr",
}  # fmt: skip
_DOWN_SIGNATURE = {
    "h_ptr": "*{act}:16", "w_ptr": "*{act}:16", "y_ptr": "*{act}:16", "sorted_ids_ptr": "*i32",
    "expert_ids_ptr": "*i32", "n_rows": "i32", "N": "i32", "K": "i32:16", "stride_we": "i32:16",
    "stride_wn": "i32:16", "ROUTED": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
    "BLOCK_K": "constexpr", "W_KN": "constexpr",
}  # fmt: skip
_GATE_UP_DECODE_SIGNATURE = {
    "x_ptr": "*{act}:16", "wg_ptr": "*{act}:16", "wu_ptr": "*{act}:16", "h_ptr": "*{act}:16",
    "ids_ptr": "*i32", "top_k": "i32", "N": "i32", "K": "i32:16", "stride_xt": "i32:16",
    "stride_we": "i32:16", "stride_wn": "i32:16", "ROUTED": "constexpr", "BLOCK_N": "constexpr",
    "BLOCK_K": "constexpr", "W_KN": "constexpr",
}  # fmt: skip
_DOWN_DECODE_SIGNATURE = {
    "h_ptr": "*{act}:16", "w_ptr": "*{act}:16", "y_ptr": "*{act}:16", "ids_ptr": "*i32", "N": "i32",
    "K": "i32:16", "stride_we": "i32:16", "stride_wn": "i32:16", "ROUTED": "constexpr",
    "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "W_KN": "constexpr",
}  # fmt: skip

# BLOCK_M is per variant (align pads to it, so gate_up and down must agree); per_sm never overrides it.
_GROUPED_TILES = {
    "": {"ROUTED": True, "BLOCK_M": 64},
    "_m16": {"ROUTED": True, "BLOCK_M": 16},
    "_shared": {"ROUTED": False, "BLOCK_M": 64},
}
_DECODE_TILES = {"": {"ROUTED": True}, "_shared": {"ROUTED": False}}
_SMALL_SMEM = ("sm_86", "sm_89", "sm_120a")  # 99 KB of shared memory per block: 2 stages
# gate_up carries two fp32 accumulators (gate and up): 8 warps keep a 64 x 64 pair of them without spills;
# Hopper / datacenter Blackwell (227 KB) take 4 stages.
GATE_UP_SPEC = KernelSpec(
    name="moe.gate_up_swiglu",
    kernel=gate_up_swiglu_kernel,
    signature=_GEMM_SIGNATURE,
    constexprs={"BLOCK_N": 64, "BLOCK_K": 64, "W_KN": False},
    num_warps=8,
    num_stages=3,
    per_sm={
        "sm_90a": {"num_stages": 4},
        "sm_100a": {"num_stages": 4},
        **{sm: {"num_stages": 2} for sm in _SMALL_SMEM},
    },
    variants=act_variants(_GROUPED_TILES),
)
# down has one accumulator: 128-wide N tiles with 8 warps on the big-shared-memory parts.
_WIDE = {"BLOCK_N": 128, "num_warps": 8, "num_stages": 4}
DOWN_SPEC = KernelSpec(
    name="moe.down",
    kernel=down_kernel,
    signature=_DOWN_SIGNATURE,
    constexprs={"BLOCK_N": 64, "BLOCK_K": 64, "W_KN": False},
    num_warps=4,
    num_stages=3,
    per_sm={"sm_90a": _WIDE, "sm_100a": _WIDE, **{sm: {"num_stages": 2} for sm in _SMALL_SMEM}},
    variants=act_variants(_GROUPED_TILES),
)
# GEMV tiles with 8 warps and 2D fp32 accumulators (reduced once at the end): 8K weight elements per step
# and matrix, 32 accumulators per thread and matrix. gate_up: [32 rows, 256 contiguous] steps (two matrices),
# so a 1024-wide expert is 32 programs per pair (320 for one token's 10 experts) of 16 steps over H = 4096;
# down: [64, 128], 64 programs per pair over H = 4096 outputs, 8 steps over I = 1024. Enough programs to keep
# every SM streaming for one token, few enough that each has a loop to pipeline.
_GEMV_PER_SM = {sm: {"num_stages": 2} for sm in _SMALL_SMEM}
GATE_UP_DECODE_SPEC = KernelSpec(
    name="moe.gate_up_swiglu_decode",
    kernel=gate_up_swiglu_decode_kernel,
    signature=_GATE_UP_DECODE_SIGNATURE,
    constexprs={"BLOCK_N": 32, "BLOCK_K": 256, "W_KN": False},
    num_warps=8,
    num_stages=3,
    per_sm=_GEMV_PER_SM,
    variants=act_variants(_DECODE_TILES),
)
DOWN_DECODE_SPEC = KernelSpec(
    name="moe.down_decode",
    kernel=down_decode_kernel,
    signature=_DOWN_DECODE_SIGNATURE,
    constexprs={"BLOCK_N": 64, "BLOCK_K": 128, "W_KN": False},
    num_warps=8,
    num_stages=3,
    per_sm=_GEMV_PER_SM,
    variants=act_variants(_DECODE_TILES),
)


def _kn_spec(spec: KernelSpec, **constexprs) -> KernelSpec:
    """`spec` for weights in the plugin's [E, K, N] layout (W_KN): the same variants, warps, stages and
    per-SM settings, named "<name>_kn"; N gains the ':16' hint (its column masks then keep 16-element
    groups whole and the loads along N vectorise; the plugin refuses widths that are not multiples of 16)."""
    signature = {k: "i32:16" if k == "N" else v for k, v in spec.signature.items()}
    values = {**spec.constexprs, **constexprs, "W_KN": True}
    return dataclasses.replace(spec, name=f"{spec.name}_kn", signature=signature, constexprs=values)


# The plugin's layout (qwenLaunchMoE): the grouped tiles as above (the B tile is [BLOCK_K, BLOCK_N] either
# way); the GEMVs step [BLOCK_K, BLOCK_N] tiles along the contiguous N: 64 columns (128-byte rows) by 128
# rows, 8K weight elements per step and matrix as above, so one token's top-10 experts at I = 1024 are 160
# gate_up programs and, at H = 4096, 640 down programs.
GATE_UP_KN_SPEC = _kn_spec(GATE_UP_SPEC)
DOWN_KN_SPEC = _kn_spec(DOWN_SPEC)
GATE_UP_DECODE_KN_SPEC = _kn_spec(GATE_UP_DECODE_SPEC, BLOCK_N=64, BLOCK_K=128)
DOWN_DECODE_KN_SPEC = _kn_spec(DOWN_DECODE_SPEC, BLOCK_N=64, BLOCK_K=128)

SPECS: list[KernelSpec] = [
    GATE_UP_SPEC, DOWN_SPEC, GATE_UP_DECODE_SPEC, DOWN_DECODE_SPEC,
    GATE_UP_KN_SPEC, DOWN_KN_SPEC, GATE_UP_DECODE_KN_SPEC, DOWN_DECODE_KN_SPEC,
]  # fmt: skip


def _check_weights(x, w_gate, w_up, w_down):
    E, N, K = w_gate.shape
    if tuple(w_up.shape) != (E, N, K) or w_up.stride() != w_gate.stride():
        raise ValueError(f"gate {tuple(w_gate.shape)} and up {tuple(w_up.shape)} views differ")
    if tuple(w_down.shape) != (E, K, N) or x.shape[1] != K:
        raise ValueError(
            f"down {tuple(w_down.shape)} / x {tuple(x.shape)} do not fit gate_up {(E, 2 * N, K)}"
        )
    if w_gate.stride(2) != 1 or w_down.stride(2) != 1 or x.stride(1) != 1:
        raise ValueError(
            "expert weights and x must be contiguous along the reduced dimension (transformers' layout)"
        )
    return E, N, K


def choose_path(n_tokens: int, top_k: int) -> str:
    """ "decode" (GEMV per pair) for a handful of tokens, else "grouped" (align + tiled GEMMs)."""
    return "decode" if n_tokens * top_k <= DECODE_MAX_PAIRS else "grouped"


def experts_swiglu(
    x, w_gate, w_up, w_down, ids=None, path: str | None = None, alloc=None, sm: str | None = None
):
    """Routed experts (ids [T, k] int32) or, with ids None, one dense expert (the shared expert).

    w_gate, w_up: [E, I, H] views (gate_up_proj[:, :I], gate_up_proj[:, I:]); w_down: [E, H, I].
    Returns (y, h, align): y [T * k, H] per pair, unweighted (or [T, H] for the dense expert), h [rows, I],
    align (sorted_ids, expert_ids, offsets) on the routed grouped path, else None."""
    import torch

    E, N, K = _check_weights(x, w_gate, w_up, w_down)
    T = x.shape[0]
    routed = ids is not None
    top_k = ids.shape[1] if routed else 1
    rows = T * top_k
    path = path or choose_path(T, top_k)
    alloc = alloc or empty_alloc(x)
    tag = "" if routed else "shared_"
    h = alloc(f"{tag}h", (rows, N), x.dtype)
    y = alloc(f"{tag}y", (rows, K), x.dtype)
    target = device_sm(x, sm)
    act = act_of(x.dtype)
    sg = w_gate.stride()
    sd = w_down.stride()
    unread = torch.zeros(1, dtype=torch.int32, device=x.device)  # int32 arguments ROUTED=False never reads
    if path == "decode":
        variant = act + ("" if routed else "_shared")
        ids_arg = ids if routed else unread
        _, c, warps, stages = GATE_UP_DECODE_SPEC.config(target, variant)
        gate_up_swiglu_decode_kernel[(triton.cdiv(N, c["BLOCK_N"]), rows)](
            x, w_gate, w_up, h, ids_arg, top_k, N, K, x.stride(0), sg[0], sg[1],
            **c, num_warps=warps, num_stages=stages,
        )  # fmt: skip
        _, c, warps, stages = DOWN_DECODE_SPEC.config(target, variant)
        down_decode_kernel[(triton.cdiv(K, c["BLOCK_N"]), rows)](
            h, w_down, y, ids_arg, K, N, sd[0], sd[1], **c, num_warps=warps, num_stages=stages
        )
        return y, h, None
    if path != "grouped":
        raise ValueError(f"unknown path {path!r} (decode or grouped)")
    if routed:
        small = rows / min(E, rows) < SMALL_BLOCK_ROWS
        variant = act + ("_m16" if small else "")
        block_m = GATE_UP_SPEC.config(target, variant)[1]["BLOCK_M"]
        align = moe_align(ids, E, block_m, alloc=alloc, sm=sm)
        sorted_ids, expert_ids = align[0], align[1]
        n_blocks = expert_ids.shape[0]
    else:
        variant = act + "_shared"
        block_m = GATE_UP_SPEC.config(target, variant)[1]["BLOCK_M"]
        align = None
        sorted_ids = expert_ids = unread
        n_blocks = triton.cdiv(T, block_m)
    _, c, warps, stages = GATE_UP_SPEC.config(target, variant)
    gate_up_swiglu_kernel[(n_blocks * triton.cdiv(N, c["BLOCK_N"]),)](
        x, w_gate, w_up, h, sorted_ids, expert_ids, rows, top_k, N, K, x.stride(0), sg[0], sg[1],
        **c, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    _, c, warps, stages = DOWN_SPEC.config(target, variant)
    down_kernel[(n_blocks * triton.cdiv(K, c["BLOCK_N"]),)](
        h, w_down, y, sorted_ids, expert_ids, rows, K, N, sd[0], sd[1],
        **c, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return y, h, align
