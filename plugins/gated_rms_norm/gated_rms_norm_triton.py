"""Gated RMSNorm, the Gated DeltaNet output norm, per head (docs/ops.md "GatedRMSNorm").

    n = x * rsqrt(mean(x^2) + eps)      fp32 statistics, then rounded to the activation type
    y = n * scale * silu(z)             fp32 products, rounded once to the activation type

This is transformers' `Qwen3_5MoeRMSNormGated` (and Qwen3-Next's / dense Qwen3.5's, which are the same):
the weight is NOT zero-centred (`scale` = the module's weight, initialised to ones), and the normalised x is
cast back to the input dtype before it meets the weight (`self.weight * hidden_states.to(input_dtype)`),
which the kernel reproduces; the gate is taken in fp32 (`silu(gate.to(float32))`). `scale` is fp32 [D].

Rows are [n_rows, D] (n_rows = tokens x value heads, D = head_v_dim) with their own row strides, last axis
contiguous. One program owns BLOCK_M rows and walks them in BLOCK_N-column chunks, keeping the first chunk
in registers (a row no wider than BLOCK_N is read once; wider rows re-read x and z in a second pass). The
launcher picks the narrowest width class that covers D from the same constexprs the AOT build freezes, and
the `_a16` cubin (16-byte vector loads) when pointers, D and row strides allow.
"""

from __future__ import annotations

import triton
import triton.language as tl

from qwen_export.plugins.rms_norm.rms_norm_triton import (
    aligned_signature,
    device_sm,
    is_aligned,
    variant_of,
    width_class,
)
from qwen_export.plugins.triton_support import KernelSpec


@triton.jit
def gated_rms_norm_kernel(
    x_ptr,  # [n_rows, D] activations (row stride stride_x)
    z_ptr,  # [n_rows, D] activations, the gate (row stride stride_z)
    scale_ptr,  # [D] fp32
    y_ptr,  # [n_rows, D] activations
    n_rows,
    D,
    stride_x,
    stride_z,
    stride_y,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    x_rows = x_ptr + rows64[:, None] * stride_x
    z_rows = z_ptr + rows64[:, None] * stride_z
    y_rows = y_ptr + rows64[:, None] * stride_y
    act = y_ptr.dtype.element_ty

    # Pass 1: sum of squares; the first chunk stays in registers.
    mask0 = row_ok[:, None] & (cols[None, :] < D)
    x0 = tl.load(x_rows + cols[None, :], mask=mask0, other=0.0).to(tl.float32)
    sum_sq = tl.sum(x0 * x0, axis=1)
    for start in range(BLOCK_N, D, BLOCK_N):
        c = start + cols
        xc = tl.load(x_rows + c[None, :], mask=row_ok[:, None] & (c[None, :] < D), other=0.0).to(tl.float32)
        sum_sq += tl.sum(xc * xc, axis=1)
    rstd = tl.rsqrt(sum_sq / D + eps)

    # Pass 2: normalise (rounded to the activation type, as transformers does), scale, gate.
    z0 = tl.load(z_rows + cols[None, :], mask=mask0, other=0.0).to(tl.float32)
    s0 = tl.load(scale_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    n0 = (x0 * rstd[:, None]).to(act).to(tl.float32)
    tl.store(y_rows + cols[None, :], (n0 * s0[None, :] * (z0 * tl.sigmoid(z0))).to(act), mask=mask0)
    for start in range(BLOCK_N, D, BLOCK_N):
        c = start + cols
        mask = row_ok[:, None] & (c[None, :] < D)
        xc = tl.load(x_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
        zc = tl.load(z_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + c, mask=c < D, other=0.0).to(tl.float32)
        nc = (xc * rstd[:, None]).to(act).to(tl.float32)
        tl.store(y_rows + c[None, :], (nc * sc[None, :] * (zc * tl.sigmoid(zc))).to(act), mask=mask)


SIGNATURE = {
    "x_ptr": "*{act}", "z_ptr": "*{act}", "scale_ptr": "*fp32", "y_ptr": "*{act}",
    "n_rows": "i32", "D": "i32", "stride_x": "i32", "stride_z": "i32", "stride_y": "i32", "eps": "fp32",
    "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
}  # fmt: skip

# Width classes: BLOCK_N (head_v_dim 64 / 128 / 256) -> (BLOCK_M, num_warps): 4-8 values of x and of z
# per thread, at most 56 registers (40 for the `_a16` cubins) on every SM, no spills (twice that many
# values took 96-200 registers). Wider rows loop over the widest class. The same on every SM for now.
WIDTH_CLASSES: dict[int, tuple[int, int]] = {64: (8, 4), 128: (8, 4), 256: (4, 4)}


# The `_a16` specs: ':16' hints on the pointers, D and the row strides (16-byte vector loads and stores;
# see rms_norm_triton.py), chosen by `is_aligned`.
ALIGNED_INTS = ("D", "stride_x", "stride_z", "stride_y")


def _spec(block_n: int, aligned: bool) -> KernelSpec:
    block_m, warps = WIDTH_CLASSES[block_n]
    return KernelSpec(
        name=f"gated_rms_norm.gated_rms_norm_n{block_n}{'_a16' if aligned else ''}",
        kernel=gated_rms_norm_kernel,
        signature=aligned_signature(SIGNATURE, ALIGNED_INTS) if aligned else SIGNATURE,
        constexprs={"BLOCK_M": block_m, "BLOCK_N": block_n},
        num_warps=warps,
        num_stages=1,
    )


SPEC_BY_CLASS: dict[tuple[int, bool], KernelSpec] = {
    (n, a16): _spec(n, a16) for n in WIDTH_CLASSES for a16 in (False, True)
}
SPECS: list[KernelSpec] = list(SPEC_BY_CLASS.values())


def select_spec(x2, z2, scale, y2=None, block_n=None) -> KernelSpec:
    """The spec a launch on these [n_rows, D] views takes (width class, aligned or not)."""
    dim = x2.shape[-1]
    rows = [t for t in (x2, z2, y2) if t is not None]
    return SPEC_BY_CLASS[(block_n or width_class(dim, WIDTH_CLASSES), is_aligned(dim, rows, [scale]))]


def _rows(t, dim: int):
    if t.shape[-1] != dim or t.stride(-1) != 1:
        raise ValueError(f"gated_rms_norm takes [..., {dim}] tensors whose last axis is contiguous")
    try:
        return t.view(-1, dim)
    except RuntimeError:
        raise ValueError("gated_rms_norm takes evenly strided rows (view-able as [-1, D])") from None


def gated_rms_norm(x, z, scale, eps: float, *, out=None, block_n=None, sm=None):
    """Launch: y = RMSNorm(x) * scale * silu(z) over the last axis.

    x, z: [..., D] activations (fp16/bf16; fp32 too, for checks), z may have its own row stride (a view of
    a projection); scale: fp32 [D], the module's weight as is. block_n forces a width class (tests).
    """
    import torch

    dim = x.shape[-1]
    if scale.shape != (dim,) or scale.dtype != torch.float32 or not scale.is_contiguous():
        raise ValueError(f"scale must be contiguous fp32 [{dim}], got {scale.dtype} {tuple(scale.shape)}")
    if z.shape != x.shape or z.dtype != x.dtype:
        raise ValueError("z must match x in shape and dtype")
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError("out must match x in shape and dtype")
    x2, z2, y2 = _rows(x, dim), _rows(z, dim), _rows(out, dim)
    n_rows = x2.shape[0]
    if n_rows == 0:
        return out
    spec = select_spec(x2, z2, scale, y2, block_n)
    _, constexprs, warps, stages = spec.config(device_sm(x, sm), variant_of(x.dtype))
    grid = (triton.cdiv(n_rows, constexprs["BLOCK_M"]),)
    gated_rms_norm_kernel[grid](
        x2, z2, scale, y2, n_rows, dim, x2.stride(0), z2.stride(0), y2.stride(0), float(eps),
        **constexprs, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out
