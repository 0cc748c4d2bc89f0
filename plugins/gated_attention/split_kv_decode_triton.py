"""Split-KV decode of gated attention (one new token per sequence), then a combine step with the gate fused.

Decode: the S = past + 1 keys of the cache [B, kv, S_cap, hd] are cut into `num_splits` ranges of
`keys_per_split` (a multiple of BLOCK_N). Program (split, b * kv * head_chunks + ...) runs the online
softmax of BLOCK_H q heads of one kv head (the GQA group, padded to a tile) over its range and leaves
unnormalised partials: acc [B, nh, MAX_SPLITS, hd], running max m and sum l [B, nh, MAX_SPLITS] (fp32, m in
the exp2 domain). Combine: one program per (b, q head) merges the splits and writes
sum(exp2(m_s - M) acc_s) / sum(exp2(m_s - M) l_s) * sigmoid(gate) as [B, 1, nh*hd].
Masked keys score float32.min as in the reference (see flash_prefill_triton).
"""

from __future__ import annotations

import triton
import triton.language as tl

from qwen_export.plugins.triton_support import KernelSpec

from .flash_prefill_triton import MASKED, attend_tile
from .qk_norm_rope_triton import HEAD_DIMS, device_sm, variant_of

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def split_kv_decode_kernel(
    q_ptr,  # [B, 1, nh, hd]
    k_cache_ptr,  # [B, kv, S_cap, hd]
    v_cache_ptr,  # [B, kv, S_cap, hd]
    mask_ptr,  # [B, S] int32
    acc_ptr,  # [B, nh, MAX_SPLITS, hd] fp32
    m_ptr,  # [B, nh, MAX_SPLITS] fp32
    l_ptr,  # [B, nh, MAX_SPLITS] fp32
    S,  # keys: past + 1
    S_cap,
    nh,
    kv,
    group,
    keys_per_split,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
):
    split = tl.program_id(0)
    pid = tl.program_id(1)
    chunks = tl.cdiv(group, BLOCK_H)
    b = (pid // (kv * chunks)).to(tl.int64)
    kvh = (pid // chunks) % kv
    g = (pid % chunks) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = g < group
    head = kvh * group + g
    d = tl.arange(0, HEAD_DIM)
    bh = b * nh + head
    q = tl.load(q_ptr + bh[:, None] * HEAD_DIM + d[None, :], mask=row_ok[:, None], other=0.0)
    k_base = k_cache_ptr + (b * kv + kvh) * S_cap * HEAD_DIM
    v_base = v_cache_ptr + (b * kv + kvh) * S_cap * HEAD_DIM
    limit = tl.full((BLOCK_H,), S - 1, tl.int32)

    m_i = tl.full((BLOCK_H,), MASKED, tl.float32)
    l_i = tl.zeros((BLOCK_H,), tl.float32)
    acc = tl.zeros((BLOCK_H, HEAD_DIM), tl.float32)
    lo = split * keys_per_split
    hi = tl.minimum(S, lo + keys_per_split)
    for start in range(lo, hi, BLOCK_N):
        acc, m_i, l_i = attend_tile(
            q, acc, m_i, l_i, k_base, v_base, mask_ptr + b * S, start, limit, hi, scale * LOG2E,
            HEAD_DIM, BLOCK_N,
        )  # fmt: skip
    part = bh * MAX_SPLITS + split
    tl.store(acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=row_ok[:, None])
    tl.store(m_ptr + part, m_i, mask=row_ok)
    tl.store(l_ptr + part, l_i, mask=row_ok)


@triton.jit
def split_kv_combine_kernel(
    acc_ptr,  # [B, nh, MAX_SPLITS, hd] fp32
    m_ptr,  # [B, nh, MAX_SPLITS] fp32
    l_ptr,  # [B, nh, MAX_SPLITS] fp32
    gate_ptr,  # q_proj output [B, 1, nh, 2*hd] offset by hd
    out_ptr,  # [B, 1, nh*hd]
    num_splits,
    HEAD_DIM: tl.constexpr,
    MAX_SPLITS: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)  # b * nh + head
    s = tl.arange(0, MAX_SPLITS)
    used = s < num_splits
    m = tl.load(m_ptr + bh * MAX_SPLITS + s, mask=used, other=float("-inf"))
    l_s = tl.load(l_ptr + bh * MAX_SPLITS + s, mask=used, other=0.0)
    m_max = tl.max(m, axis=0)
    denom = tl.sum(tl.math.exp2(m - m_max) * l_s, axis=0)
    d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros((HEAD_DIM,), tl.float32)
    for i in range(0, num_splits):
        w_i = tl.math.exp2(tl.load(m_ptr + bh * MAX_SPLITS + i) - m_max)
        acc += w_i * tl.load(acc_ptr + (bh * MAX_SPLITS + i) * HEAD_DIM + d)
    gate = tl.load(gate_ptr + bh * 2 * HEAD_DIM + d).to(tl.float32)
    out = acc / denom * tl.sigmoid(gate)
    tl.store(out_ptr + bh * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))


_DECODE_SIGNATURE = {
    "q_ptr": "*{act}", "k_cache_ptr": "*{act}", "v_cache_ptr": "*{act}", "mask_ptr": "*i32",
    "acc_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "S": "i32", "S_cap": "i32", "nh": "i32",
    "kv": "i32", "group": "i32", "keys_per_split": "i32", "scale": "fp32", "HEAD_DIM": "constexpr",
    "BLOCK_H": "constexpr", "BLOCK_N": "constexpr", "MAX_SPLITS": "constexpr",
}  # fmt: skip
_COMBINE_SIGNATURE = {
    "acc_ptr": "*fp32", "m_ptr": "*fp32", "l_ptr": "*fp32", "gate_ptr": "*{act}", "out_ptr": "*{act}",
    "num_splits": "i32", "HEAD_DIM": "constexpr", "MAX_SPLITS": "constexpr",
}  # fmt: skip

# Frozen per SM. MAX_SPLITS bounds the programs one sequence's KV range is cut into (about the SM count
# over the kv heads of a batch-1 decode); BLOCK_N keeps num_stages K and V tiles in shared memory
# (head_dim 256: 64 keys x 2 stages = 128 KiB on sm_80/90a/100a, 32 keys on the ~100 KiB sm_86/89/120a).
_SMALL_SMEM = ("sm_86", "sm_89", "sm_120a")
_MAX_SPLITS = {"sm_80": 32, "sm_86": 32, "sm_89": 32, "sm_90a": 64, "sm_100a": 64, "sm_120a": 32}


def _decode_spec(head_dim: int) -> KernelSpec:
    small_n = 64 if head_dim <= 128 else 32
    per_sm = {sm: {"MAX_SPLITS": n} for sm, n in _MAX_SPLITS.items()}
    for sm in _SMALL_SMEM:
        per_sm[sm]["BLOCK_N"] = small_n
    return KernelSpec(
        name=f"gated_attention.split_kv_decode_hd{head_dim}",
        kernel=split_kv_decode_kernel,
        signature=_DECODE_SIGNATURE,
        constexprs={"HEAD_DIM": head_dim, "BLOCK_H": 16, "BLOCK_N": 64, "MAX_SPLITS": 64},
        num_warps=4 if head_dim <= 128 else 8,
        num_stages=2,
        per_sm=per_sm,
    )


def _combine_spec(head_dim: int) -> KernelSpec:
    return KernelSpec(
        name=f"gated_attention.split_kv_combine_hd{head_dim}",
        kernel=split_kv_combine_kernel,
        signature=_COMBINE_SIGNATURE,
        constexprs={"HEAD_DIM": head_dim, "MAX_SPLITS": 64},
        num_warps=4 if head_dim >= 128 else 2,
        num_stages=1,
        per_sm={sm: {"MAX_SPLITS": n} for sm, n in _MAX_SPLITS.items()},
    )


DECODE_SPECS = {hd: _decode_spec(hd) for hd in HEAD_DIMS}
COMBINE_SPECS = {hd: _combine_spec(hd) for hd in HEAD_DIMS}
SPECS: list[KernelSpec] = [*DECODE_SPECS.values(), *COMBINE_SPECS.values()]


def decode_plan(S: int, head_dim: int, dtype, device, sm: str | None = None, num_splits: int | None = None):
    """(constexprs, num_warps, num_stages, num_splits, keys_per_split) of a decode over S keys.

    By default the KV range is cut into as many splits as MAX_SPLITS allows with at least one key tile each;
    `num_splits` asks for fewer (or more, up to MAX_SPLITS)."""
    import torch

    sm = device_sm(torch.empty(0, device=device), sm)
    _, constexprs, warps, stages = DECODE_SPECS[head_dim].config(sm, variant_of(dtype))
    block_n, max_splits = constexprs["BLOCK_N"], constexprs["MAX_SPLITS"]
    wanted = num_splits or triton.cdiv(S, block_n)
    wanted = max(1, min(max_splits, wanted))
    keys_per_split = triton.cdiv(triton.cdiv(S, wanted), block_n) * block_n
    return constexprs, warps, stages, triton.cdiv(S, keys_per_split), keys_per_split


def decode_workspace_shapes(B: int, nh: int, head_dim: int, max_splits: int):
    """Shapes of the fp32 partials (acc, m, l) a decode needs."""
    return (B, nh, max_splits, head_dim), (B, nh, max_splits), (B, nh, max_splits)


def split_kv_decode(q, q_proj, k_cache, v_cache, mask, scale: float, out=None, workspace=None,
                    num_splits: int | None = None, sm: str | None = None):  # fmt: skip
    """Launch decode + combine: q [B, 1, nh, hd], q_proj [B, 1, nh, 2*hd] (gate half), caches
    [B, kv, S_cap, hd] holding S = mask.shape[1] keys (the new one included), mask int32 [B, S].
    `workspace`: (acc, m, l) fp32 as decode_workspace_shapes says, else allocated. Returns [B, 1, nh*hd]."""
    import torch

    B, T, nh, hd = q.shape
    kv, S_cap = k_cache.shape[1], k_cache.shape[2]
    S = mask.shape[1]
    if T != 1 or hd not in DECODE_SPECS or nh % kv or S > S_cap or mask.shape[0] != B:
        raise ValueError(
            f"split_kv_decode: unsupported shapes q {tuple(q.shape)} cache {tuple(k_cache.shape)}"
        )
    if mask.dtype != torch.int32:
        raise ValueError("split_kv_decode takes an int32 attention mask")
    if S_cap * hd >= 2**31:
        raise ValueError(f"a cache of {S_cap} x {hd} per (batch, kv head) overflows 32-bit key offsets")
    for t in (q, q_proj, k_cache, v_cache, mask):
        if not t.is_contiguous():
            raise ValueError("split_kv_decode takes contiguous tensors")
    constexprs, warps, stages, splits, keys_per_split = decode_plan(S, hd, q.dtype, q.device, sm, num_splits)
    if workspace is None:
        shapes = decode_workspace_shapes(B, nh, hd, constexprs["MAX_SPLITS"])
        workspace = tuple(torch.empty(s, dtype=torch.float32, device=q.device) for s in shapes)
    acc, m_part, l_part = workspace
    if out is None:
        out = torch.empty((B, 1, nh * hd), dtype=q.dtype, device=q.device)
    group = nh // kv
    grid = (splits, B * kv * triton.cdiv(group, constexprs["BLOCK_H"]))
    split_kv_decode_kernel[grid](
        q, k_cache, v_cache, mask, acc, m_part, l_part, S, S_cap, nh, kv, group, keys_per_split, float(scale),
        **constexprs, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    _, combine, warps, stages = COMBINE_SPECS[hd].config(device_sm(q, sm), variant_of(q.dtype))
    split_kv_combine_kernel[(B * nh,)](
        acc, m_part, l_part, q_proj[..., hd:], out, splits, **combine, num_warps=warps, num_stages=stages
    )
    return out
