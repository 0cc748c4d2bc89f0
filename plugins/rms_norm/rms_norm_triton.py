"""RMSNorm, optionally fused with the residual add before it (docs/ops.md "RMSNorm").

    h = x + residual          (HAS_RESIDUAL; rounded to the activation type and written out: the new
                               residual stream, exactly what transformers' `residual + hidden_states` holds)
    y = h * rsqrt(mean(h^2) + eps) * scale

`scale` is fp32 [D], the effective multiplier as the op set stores it: `1 + w` for the zero-centred norms of
Qwen3.5 / Qwen3-Next (the `.plus_one` initializers of docs/ops.md); statistics and products in fp32, y
rounded once to the activation type. Rows are [n_rows, D] with their own row strides (last axis contiguous).

One program owns BLOCK_M rows and walks them in BLOCK_N-column chunks. The first chunk stays in registers,
so a row no wider than BLOCK_N is read once; wider rows take a second pass that re-reads x (or, with a
residual, the h this program just wrote, so `residual_out` may alias `residual`). The launcher picks the
narrowest width class whose BLOCK_N covers D (the widest one loops), from the same constexprs the AOT build
freezes into the cubins, and the `_a16` cubin (16-byte vector loads) when pointers, D and row strides allow.
"""

from __future__ import annotations

import triton
import triton.language as tl

from qwen_export.plugins.triton_support import KernelSpec, device_sm, variant_of


@triton.jit
def rms_norm_kernel(
    x_ptr,  # [n_rows, D] activations (row stride stride_x)
    res_ptr,  # [n_rows, D] activations, the residual stream (read only with HAS_RESIDUAL)
    scale_ptr,  # [D] fp32, the effective multiplier
    y_ptr,  # [n_rows, D] activations
    h_ptr,  # [n_rows, D] activations, x + residual (written only with HAS_RESIDUAL; may alias res_ptr)
    n_rows,
    D,
    stride_x,
    stride_res,
    stride_y,
    stride_h,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    x_rows = x_ptr + rows64[:, None] * stride_x
    y_rows = y_ptr + rows64[:, None] * stride_y
    act = y_ptr.dtype.element_ty
    if HAS_RESIDUAL:
        res_rows = res_ptr + rows64[:, None] * stride_res
        h_rows = h_ptr + rows64[:, None] * stride_h

    # Pass 1: the first chunk stays in registers; later chunks only add to the sum of squares.
    mask0 = row_ok[:, None] & (cols[None, :] < D)
    x0 = tl.load(x_rows + cols[None, :], mask=mask0, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r0 = tl.load(res_rows + cols[None, :], mask=mask0, other=0.0).to(tl.float32)
        h0 = (x0 + r0).to(act)
        tl.store(h_rows + cols[None, :], h0, mask=mask0)
        x0 = h0.to(tl.float32)
    sum_sq = tl.sum(x0 * x0, axis=1)
    for start in range(BLOCK_N, D, BLOCK_N):
        c = start + cols
        mask = row_ok[:, None] & (c[None, :] < D)
        xc = tl.load(x_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            rc = tl.load(res_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
            hc = (xc + rc).to(act)
            tl.store(h_rows + c[None, :], hc, mask=mask)
            xc = hc.to(tl.float32)
        sum_sq += tl.sum(xc * xc, axis=1)
    rstd = tl.rsqrt(sum_sq / D + eps)

    # Pass 2: normalise and scale.
    s0 = tl.load(scale_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    tl.store(y_rows + cols[None, :], (x0 * rstd[:, None] * s0[None, :]).to(act), mask=mask0)
    if HAS_RESIDUAL:
        tl.debug_barrier()  # h of the later chunks, written above by other threads, is read back below
    for start in range(BLOCK_N, D, BLOCK_N):
        c = start + cols
        mask = row_ok[:, None] & (c[None, :] < D)
        if HAS_RESIDUAL:
            xc = tl.load(h_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
        else:
            xc = tl.load(x_rows + c[None, :], mask=mask, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + c, mask=c < D, other=0.0).to(tl.float32)
        tl.store(y_rows + c[None, :], (xc * rstd[:, None] * sc[None, :]).to(act), mask=mask)


SIGNATURE = {
    "x_ptr": "*{act}", "res_ptr": "*{act}", "scale_ptr": "*fp32", "y_ptr": "*{act}", "h_ptr": "*{act}",
    "n_rows": "i32", "D": "i32", "stride_x": "i32", "stride_res": "i32", "stride_y": "i32", "stride_h": "i32",
    "eps": "fp32", "HAS_RESIDUAL": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
}  # fmt: skip

# Width classes: BLOCK_N -> (BLOCK_M, num_warps), 8 values per thread (one 16-byte load of 16-bit
# activations per tensor): at most 48 registers per thread without a residual and 64 with one (40 for the
# `_a16` cubins), no spills, on every SM (ptxas via the AOT build); 16 values per thread took 73-255. Rows
# wider than the widest class loop over it. The same on every SM for now (per_sm empty): nothing measured
# on a GPU yet says they should differ.
WIDTH_CLASSES: dict[int, tuple[int, int]] = {256: (4, 4), 1024: (1, 4), 2048: (1, 8), 4096: (1, 16)}


# The `_a16` specs carry triton.tools.compile's divisibility hint on every pointer and on D and the row
# strides, so loads and stores become 16-byte vectors (LDG.E.128 in the sm_90a SASS, where the generic
# cubins issue one 16-bit LDG per value). The C++ loader refuses an `_a16` launch whose values do not divide
# by 16; `is_aligned` is the test a launcher makes to choose.
ALIGNED_INTS = ("D", "stride_x", "stride_res", "stride_y", "stride_h")


def aligned_signature(signature: dict[str, str], ints) -> dict[str, str]:
    """`signature` with the ':16' hint on every pointer and on the integer arguments `ints`."""
    return {k: f"{v}:16" if v.startswith("*") or k in ints else v for k, v in signature.items()}


def is_aligned(dim: int, rows, vectors=()) -> bool:
    """Whether a launch may take the `_a16` cubin: D a multiple of 16, every [n_rows, D] view in `rows`
    16-byte aligned with a row stride that is a multiple of 16, every 1-D tensor in `vectors` aligned."""
    return (
        dim % 16 == 0
        and all(t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0 for t in rows)
        and all(t.data_ptr() % 16 == 0 for t in vectors)
    )


def _spec(has_residual: bool, block_n: int, aligned: bool) -> KernelSpec:
    block_m, warps = WIDTH_CLASSES[block_n]
    kind = "add_rms_norm" if has_residual else "rms_norm"
    return KernelSpec(
        name=f"rms_norm.{kind}_n{block_n}{'_a16' if aligned else ''}",
        kernel=rms_norm_kernel,
        signature=aligned_signature(SIGNATURE, ALIGNED_INTS) if aligned else SIGNATURE,
        constexprs={"HAS_RESIDUAL": has_residual, "BLOCK_M": block_m, "BLOCK_N": block_n},
        num_warps=warps,
        num_stages=1,
    )


SPEC_BY_CLASS: dict[tuple[bool, int, bool], KernelSpec] = {
    (res, n, a16): _spec(res, n, a16) for res in (False, True) for n in WIDTH_CLASSES for a16 in (False, True)
}
SPECS: list[KernelSpec] = list(SPEC_BY_CLASS.values())


# The SM whose frozen configuration a launch uses; CPU tensors (the interpreter) run as sm_90a.


def width_class(dim: int, classes=WIDTH_CLASSES) -> int:
    """The narrowest BLOCK_N that holds a row of `dim`, else the widest (which loops over the row)."""
    fitting = [n for n in classes if n >= dim]
    return min(fitting) if fitting else max(classes)


def _rows(t, dim: int):
    """`t` as [n_rows, dim] without a copy when its last axis is contiguous and its rows evenly strided."""
    if t.shape[-1] != dim:
        raise ValueError(f"last axis {t.shape[-1]} != {dim}")
    if t.stride(-1) != 1:
        raise ValueError("rms_norm takes tensors whose last axis is contiguous")
    try:
        return t.view(-1, dim)
    except RuntimeError:
        raise ValueError("rms_norm takes evenly strided rows (view-able as [-1, D])") from None


def select_spec(x2, scale, r2=None, y2=None, h2=None, block_n=None) -> KernelSpec:
    """The spec a launch on these [n_rows, D] views takes: its width class (`block_n` forces one) and
    whether it may take the aligned cubin."""
    dim = x2.shape[-1]
    rows = [t for t in (x2, r2, y2, h2) if t is not None]
    return SPEC_BY_CLASS[(r2 is not None, block_n or width_class(dim), is_aligned(dim, rows, [scale]))]


def rms_norm(x, scale, eps: float, residual=None, *, out=None, residual_out=None, block_n=None, sm=None):
    """Launch: (y, h) where h = x + residual (None without a residual) and y = RMSNorm(h or x) * scale.

    x, residual: [..., D] activations (fp16/bf16; fp32 too, for checks); scale: fp32 [D] (`1 + w` for
    zero-centred checkpoints). out / residual_out: where y / h go (residual_out may be `residual`, in place).
    block_n forces a width class (tests use it to reach the looping path).
    """
    import torch

    dim = x.shape[-1]
    if scale.shape != (dim,) or scale.dtype != torch.float32 or not scale.is_contiguous():
        raise ValueError(f"scale must be contiguous fp32 [{dim}], got {scale.dtype} {tuple(scale.shape)}")
    has_res = residual is not None
    if has_res and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError("residual must match x in shape and dtype")
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if has_res and residual_out is None:
        residual_out = torch.empty_like(x, memory_format=torch.contiguous_format)
    for t in (out, residual_out):
        if t is not None and (t.shape != x.shape or t.dtype != x.dtype):
            raise ValueError("out / residual_out must match x in shape and dtype")
    x2, y2 = _rows(x, dim), _rows(out, dim)
    r2 = _rows(residual, dim) if has_res else None
    h2 = _rows(residual_out, dim) if has_res else None
    n_rows = x2.shape[0]
    if n_rows == 0:
        return out, residual_out
    spec = select_spec(x2, scale, r2, y2, h2, block_n)
    if not has_res:  # unused by the kernel; any valid pointer and stride will do
        r2, h2 = x2, y2
    _, constexprs, warps, stages = spec.config(device_sm(x, sm), variant_of(x.dtype))
    grid = (triton.cdiv(n_rows, constexprs["BLOCK_M"]),)
    rms_norm_kernel[grid](
        x2, r2, scale, y2, h2, n_rows, dim,
        x2.stride(0), r2.stride(0), y2.stride(0), h2.stride(0), float(eps),
        **constexprs, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out, residual_out
