"""Flash-style prefill of gated attention: GQA, causal + padding mask, past KV, fused sigmoid output gate.

q [B, T, nh, hd] (normed, rotated: qk_norm_rope's output), the KV cache [B, kv, S_cap, hd] holding
S = past + T keys, attention_mask int32 [B, S] (1 = attend), the gate as the q_proj output's second half
per head ([B, T, nh, 2*hd], offset by hd). Output [B, T, nh*hd] = softmax(q k^T * scale + mask) v *
sigmoid(gate), ready for o_proj.

The q heads of one kv head are packed into the rows of one tile (row r: token r // group, head r % group),
so each K/V tile is loaded once for the whole group. Online softmax in the exp2 domain, fp32 accumulation.
Masking follows the reference exactly: a masked score is float32.min (not -inf), so a row with no visible
key (a left-padding query) is the mean of V over all S keys. Such rows are found after the causal range
and the rest of the keys is then visited for their tile only.
"""

from __future__ import annotations

import triton
import triton.language as tl

from qwen_export.plugins.triton_support import KernelSpec

from .qk_norm_rope_triton import HEAD_DIMS, device_sm, variant_of

MASKED = tl.constexpr(-3.4028234663852886e38)  # float32.min: the reference's masked score
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def attend_tile(q, acc, m_i, l_i, k_base, v_base, mask_base, start, limit, S, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):  # fmt: skip
    """One key tile [start, start + BLOCK_N) of the online softmax. `limit` [rows]: the last key index each
    row may see (causality); keys at or past S do not exist (-inf), masked ones score float32.min."""
    offs_n = start + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    exists = offs_n < S
    # int32 offsets within one (b, kv head) slice; K is loaded transposed, [HEAD_DIM, BLOCK_N].
    k = tl.load(k_base + offs_n[None, :] * HEAD_DIM + d[:, None], mask=exists[None, :], other=0.0)
    v = tl.load(v_base + offs_n[:, None] * HEAD_DIM + d[None, :], mask=exists[:, None], other=0.0)
    keep = tl.load(mask_base + offs_n, mask=exists, other=0)
    if q.dtype == tl.float32:
        s = tl.dot(q, k, input_precision="ieee")
    else:
        s = tl.dot(q, k)
    s = s * qk_scale
    visible = (offs_n[None, :] <= limit[:, None]) & (keep[None, :] != 0)
    s = tl.where(visible, s, MASKED)
    s = tl.where(exists[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if q.dtype == tl.float32:
        pv = tl.dot(p, v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def flash_prefill_kernel(
    q_ptr,  # [B, T, nh, hd]
    gate_ptr,  # q_proj output [B, T, nh, 2*hd] offset by hd
    k_cache_ptr,  # [B, kv, S_cap, hd]
    v_cache_ptr,  # [B, kv, S_cap, hd]
    mask_ptr,  # [B, S] int32
    out_ptr,  # [B, T, nh*hd]
    T,
    nh,
    kv,
    group,  # nh // kv
    past,
    S_cap,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // kv).to(tl.int64)
    kvh = pid_bh % kv
    S = past + T
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < T * group
    t = rows // group
    d = tl.arange(0, HEAD_DIM)
    # Row r is (token t, head kvh * group + r % group): a 64-bit base for the block's first token, then
    # 32-bit offsets (keeps the per-element address math narrow).
    t0 = (pid_m * BLOCK_M) // group
    base = ((b * T + t0) * nh + kvh * group) * HEAD_DIM
    row_off = ((t - t0) * nh + rows % group) * HEAD_DIM
    q = tl.load(q_ptr + base + row_off[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
    k_base = k_cache_ptr + (b * kv + kvh) * S_cap * HEAD_DIM
    v_base = v_cache_ptr + (b * kv + kvh) * S_cap * HEAD_DIM
    mask_base = mask_ptr + b * S
    limit = past + t
    qk_scale = scale * LOG2E

    m_i = tl.full((BLOCK_M,), MASKED, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    t_last = tl.minimum(T - 1, (pid_m * BLOCK_M + BLOCK_M - 1) // group)
    causal_end = past + t_last + 1
    for start in range(0, causal_end, BLOCK_N):
        acc, m_i, l_i = attend_tile(
            q, acc, m_i, l_i, k_base, v_base, mask_base, start, limit, S, qk_scale, HEAD_DIM, BLOCK_N
        )
    # Rows that saw no key average V over every key, as the reference's all-float32.min softmax does.
    n_blind = tl.sum(tl.where(row_ok & (m_i == MASKED), 1, 0))
    rest = tl.cdiv(causal_end, BLOCK_N) * BLOCK_N
    rest_end = tl.where(n_blind > 0, S, rest)
    for start in range(rest, rest_end, BLOCK_N):
        acc, m_i, l_i = attend_tile(
            q, acc, m_i, l_i, k_base, v_base, mask_base, start, limit, S, qk_scale, HEAD_DIM, BLOCK_N
        )

    gate = tl.load(gate_ptr + 2 * base + 2 * row_off[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
    out = acc / l_i[:, None] * tl.sigmoid(gate.to(tl.float32))
    tl.store(
        out_ptr + base + row_off[:, None] + d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None]
    )


_SIGNATURE = {
    "q_ptr": "*{act}", "gate_ptr": "*{act}", "k_cache_ptr": "*{act}", "v_cache_ptr": "*{act}",
    "mask_ptr": "*i32", "out_ptr": "*{act}", "T": "i32", "nh": "i32", "kv": "i32", "group": "i32",
    "past": "i32", "S_cap": "i32", "scale": "fp32",
    "HEAD_DIM": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
}  # fmt: skip

# Frozen tiles (no autotuning), chosen from what triton 3.9 + ptxas report for each SM (shared memory and
# register spills; no GPU timing yet). head_dim 256: 64 x 32 tiles and 8 warps everywhere (64-key tiles
# spill more; 128 KiB of K/V stages would not fit the ~100 KiB of sm_86/89/120a). head_dim 128: 128 x 64
# on the large-shared-memory SMs, 64 x 32 on sm_86/89/120a. head_dim 32/64: 128 x 64, 8 warps.
_SMALL_SMEM = ("sm_86", "sm_89", "sm_120a")
_TILES = {  # head_dim -> (large-smem SMs, sm_86/89/120a): BLOCK_M, BLOCK_N, num_warps
    256: ((64, 32, 8), (64, 32, 8)),
    128: ((128, 64, 8), (64, 32, 4)),
    64: ((128, 64, 8), (64, 64, 4)),
    32: ((128, 64, 8), (64, 64, 4)),
}


def _spec(head_dim: int) -> KernelSpec:
    (bm, bn, warps), (small_m, small_n, small_warps) = _TILES[head_dim]
    small = {"BLOCK_M": small_m, "BLOCK_N": small_n, "num_warps": small_warps}
    return KernelSpec(
        name=f"gated_attention.flash_prefill_hd{head_dim}",
        kernel=flash_prefill_kernel,
        signature=_SIGNATURE,
        constexprs={"HEAD_DIM": head_dim, "BLOCK_M": bm, "BLOCK_N": bn},
        num_warps=warps,
        num_stages=2,
        per_sm={sm: dict(small) for sm in _SMALL_SMEM},
    )


SPECS: list[KernelSpec] = [_spec(hd) for hd in HEAD_DIMS]
SPEC_BY_HEAD_DIM = dict(zip(HEAD_DIMS, SPECS, strict=True))


def flash_prefill(
    q, q_proj, k_cache, v_cache, mask, past: int, scale: float, out=None, sm: str | None = None
):
    """Launch: q [B, T, nh, hd], q_proj [B, T, nh, 2*hd] (gate half), caches [B, kv, S_cap, hd] holding
    past + T keys, mask int32 [B, past + T]. Returns out [B, T, nh*hd]."""
    import torch

    B, T, nh, hd = q.shape
    kv, S_cap = k_cache.shape[1], k_cache.shape[2]
    if hd not in SPEC_BY_HEAD_DIM or nh % kv or past + T > S_cap or tuple(mask.shape) != (B, past + T):
        raise ValueError(f"flash_prefill: unsupported shapes q {tuple(q.shape)} cache {tuple(k_cache.shape)}")
    if mask.dtype != torch.int32:
        raise ValueError("flash_prefill takes an int32 attention mask")
    if S_cap * hd >= 2**31:
        raise ValueError(f"a cache of {S_cap} x {hd} per (batch, kv head) overflows 32-bit key offsets")
    for t in (q, q_proj, k_cache, v_cache, mask):
        if not t.is_contiguous():
            raise ValueError("flash_prefill takes contiguous tensors")
    if out is None:
        out = torch.empty((B, T, nh * hd), dtype=q.dtype, device=q.device)
    group = nh // kv
    _, constexprs, warps, stages = SPEC_BY_HEAD_DIM[hd].config(device_sm(q, sm), variant_of(q.dtype))
    grid = (triton.cdiv(T * group, constexprs["BLOCK_M"]), B * kv)
    flash_prefill_kernel[grid](
        q, q_proj[..., hd:], k_cache, v_cache, mask, out,
        T, nh, kv, group, past, S_cap, float(scale),
        **constexprs, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out
