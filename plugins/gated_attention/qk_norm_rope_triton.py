"""Per-head q/k RMSNorm + partial RoPE of gated attention, appending K (and V) to the KV cache.

Inputs are the projections as the launch code's GEMMs leave them (contiguous):
  q_proj output [B, T, nh, 2*hd] (per head: query, then gate; only the query half is read here),
  k [B, T, kv, hd], v [B, T, kv, hd], cos/sin fp32 [B, T, rotary_dim], q_norm/k_norm weights fp32 [hd].
Outputs: q [B, T, nh, hd] (normed, rotated) and K/V written into the cache [B, kv, S_cap, hd] at
positions past .. past+T-1 (K normed and rotated, V copied).

RMSNorm is the zero-centred one, `x * rsqrt(mean(x^2) + eps) * (1 + w)`, then RoPE on the first
rotary_dim dims (rotate_half convention), all in fp32, rounded once to the activation type.
One program handles BLOCK_T tokens of one head (q heads first, then kv heads).

Variants: "fp16" / "bf16" take the checkpoint's raw weights w (transformers' q_norm/k_norm, this module's
Python launcher); "fp16_scale" / "bf16_scale" (NORM_PLUS_ONE=0) take the effective multiplier `1 + w`, as the
exported graph stores it (docs/ops.md) and the plugin's QwenGatedAttention passes it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from qwen_export.plugins.triton_support import KernelSpec, device_sm, variant_of


@triton.jit
def _norm_rope_tile(
    x_ptr, w_ptr, cos_ptr, sin_ptr, rows, row_ok, x_row_stride, rot, eps, HEAD_DIM: tl.constexpr,
    NORM_PLUS_ONE: tl.constexpr,
):  # fmt: skip
    """RMSNorm(1 + w, or w itself without NORM_PLUS_ONE) then RoPE on the first `rot` dims of a
    [BLOCK_T, HEAD_DIM] tile, in fp32."""
    d = tl.arange(0, HEAD_DIM)
    half = rot // 2
    partner = tl.where(d < half, d + half, d - half)
    rotated = d < rot
    x = tl.load(x_ptr + rows[:, None] * x_row_stride + d[None, :], mask=row_ok[:, None], other=0.0)
    x = x.to(tl.float32)
    xp = tl.load(
        x_ptr + rows[:, None] * x_row_stride + partner[None, :],
        mask=row_ok[:, None] & rotated[None, :],
        other=0.0,
    ).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)
    w = tl.load(w_ptr + d).to(tl.float32)
    wp = tl.load(w_ptr + partner, mask=rotated, other=0.0).to(tl.float32)
    if NORM_PLUS_ONE:
        w = 1.0 + w
        wp = 1.0 + wp
    xn = x * rstd[:, None] * w[None, :]
    xpn = xp * rstd[:, None] * wp[None, :]
    cs_mask = row_ok[:, None] & rotated[None, :]
    cos = tl.load(cos_ptr + rows[:, None] * rot + d[None, :], mask=cs_mask, other=1.0)
    sin = tl.load(sin_ptr + rows[:, None] * rot + d[None, :], mask=cs_mask, other=0.0)
    sign = tl.where(d < half, -1.0, 1.0)
    return tl.where(rotated[None, :], xn * cos + sign[None, :] * xpn * sin, xn)


@triton.jit
def qk_norm_rope_kernel(
    qp_ptr,  # [B, T, nh, 2*hd] q_proj output (query half read)
    k_ptr,  # [B, T, kv, hd]
    v_ptr,  # [B, T, kv, hd]
    qw_ptr,  # [hd] fp32 q_norm weight
    kw_ptr,  # [hd] fp32 k_norm weight
    cos_ptr,  # [B, T, rot] fp32
    sin_ptr,  # [B, T, rot] fp32
    q_out_ptr,  # [B, T, nh, hd]
    k_cache_ptr,  # [B, kv, S_cap, hd]
    v_cache_ptr,  # [B, kv, S_cap, hd]
    n_rows,  # B * T
    T,
    nh,
    kv,
    past,
    S_cap,
    rot,
    eps,
    HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    NORM_PLUS_ONE: tl.constexpr,  # 1: weights are w (multiply by 1 + w); 0: the multiplier itself
):
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    if head < nh:
        x = _norm_rope_tile(
            qp_ptr + head * 2 * HEAD_DIM, qw_ptr, cos_ptr, sin_ptr, rows64, row_ok, nh * 2 * HEAD_DIM,
            rot, eps, HEAD_DIM, NORM_PLUS_ONE,
        )  # fmt: skip
        q_dst = q_out_ptr + (rows64[:, None] * nh + head) * HEAD_DIM + d[None, :]
        tl.store(q_dst, x.to(q_out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        kh = head - nh
        x = _norm_rope_tile(
            k_ptr + kh * HEAD_DIM, kw_ptr, cos_ptr, sin_ptr, rows64, row_ok, kv * HEAD_DIM, rot, eps,
            HEAD_DIM, NORM_PLUS_ONE,
        )  # fmt: skip
        b = rows64 // T
        pos = past + rows64 % T
        cache_rows = (b * kv + kh) * S_cap + pos
        dst = cache_rows[:, None] * HEAD_DIM + d[None, :]
        tl.store(k_cache_ptr + dst, x.to(k_cache_ptr.dtype.element_ty), mask=row_ok[:, None])
        v = tl.load(v_ptr + (rows64[:, None] * kv + kh) * HEAD_DIM + d[None, :], mask=row_ok[:, None])
        tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=row_ok[:, None])


HEAD_DIMS = (32, 64, 128, 256)

_SIGNATURE = {
    "qp_ptr": "*{act}", "k_ptr": "*{act}", "v_ptr": "*{act}", "qw_ptr": "*fp32", "kw_ptr": "*fp32",
    "cos_ptr": "*fp32", "sin_ptr": "*fp32", "q_out_ptr": "*{act}", "k_cache_ptr": "*{act}",
    "v_cache_ptr": "*{act}", "n_rows": "i32", "T": "i32", "nh": "i32", "kv": "i32", "past": "i32",
    "S_cap": "i32", "rot": "i32", "eps": "fp32", "HEAD_DIM": "constexpr", "BLOCK_T": "constexpr",
    "NORM_PLUS_ONE": "constexpr",
}  # fmt: skip

# The activation types, each with raw zero-centred weights w (NORM_PLUS_ONE=1, the Python launcher's) and with
# the effective multiplier 1 + w ("_scale", NORM_PLUS_ONE=0: the plugin launcher's, docs/ops.md).
VARIANTS = {
    "fp16": {"act": "fp16"},
    "bf16": {"act": "bf16"},
    "fp16_scale": {"act": "fp16", "NORM_PLUS_ONE": 0},
    "bf16_scale": {"act": "bf16", "NORM_PLUS_ONE": 0},
}


def _spec(head_dim: int) -> KernelSpec:
    # A program holds several BLOCK_T x head_dim fp32 tiles (x, its rotation partner, cos, sin): 2048
    # values per tile keeps 4 warps under ~175 registers without spills on every SM (ptxas, sm_80..120a).
    return KernelSpec(
        name=f"gated_attention.qk_norm_rope_hd{head_dim}",
        kernel=qk_norm_rope_kernel,
        signature=_SIGNATURE,
        constexprs={"HEAD_DIM": head_dim, "BLOCK_T": 2048 // head_dim, "NORM_PLUS_ONE": 1},
        num_warps=4,
        num_stages=1,
        variants=VARIANTS,
    )


SPECS: list[KernelSpec] = [_spec(hd) for hd in HEAD_DIMS]
SPEC_BY_HEAD_DIM = dict(zip(HEAD_DIMS, SPECS, strict=True))


def qk_norm_rope(q_proj, k, v, q_norm_w, k_norm_w, cos, sin, k_cache, v_cache, past: int, eps: float,
                 q_out=None, sm: str | None = None):  # fmt: skip
    """Launch: returns q [B, T, nh, hd]; writes K/V rows past..past+T-1 of the caches in place."""
    import torch

    B, T, nh, two_hd = q_proj.shape
    hd = two_hd // 2
    kv, S_cap = k_cache.shape[1], k_cache.shape[2]
    rot = cos.shape[-1]
    if hd not in SPEC_BY_HEAD_DIM:
        raise ValueError(f"head_dim {hd} has no kernel (built for {HEAD_DIMS})")
    if rot % 2 or rot > hd or past + T > S_cap:
        raise ValueError(f"rotary_dim {rot} / cache {past}+{T} > {S_cap} do not fit head_dim {hd}")
    for t in (q_proj, k, v, q_norm_w, k_norm_w, cos, sin, k_cache, v_cache):
        if not t.is_contiguous():
            raise ValueError("qk_norm_rope takes contiguous tensors")
    if q_out is None:
        q_out = torch.empty((B, T, nh, hd), dtype=q_proj.dtype, device=q_proj.device)
    spec = SPEC_BY_HEAD_DIM[hd]
    _, constexprs, warps, stages = spec.config(device_sm(q_proj, sm), variant_of(q_proj.dtype))
    grid = (triton.cdiv(B * T, constexprs["BLOCK_T"]), nh + kv)
    qk_norm_rope_kernel[grid](
        q_proj, k, v, q_norm_w, k_norm_w, cos, sin, q_out, k_cache, v_cache,
        B * T, T, nh, kv, past, S_cap, rot, float(eps),
        **constexprs, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return q_out
