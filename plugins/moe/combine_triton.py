"""MoE combine: the weighted sum of each token's top-k expert outputs plus the gated shared expert.

`out[t] = sum_j w[t, j] * y[t * k + j] + sigmoid(x[t] . shared_expert_gate) * shared[t]`, all in fp32,
rounded once to the activation type (transformers' `Qwen3_5MoeSparseMoeBlock.forward` after the experts).
Grid (token tiles, H spans): each program computes its tokens' shared-expert gate logits (a dot over all
of H) and the output over its span of H. A prefill takes one span (all of H: the gate is computed once per
token); up to BLOCK_T tokens (decode) the spans are single tiles, so a token spreads over H / BLOCK_H
programs and only the cheap gate dot is repeated.
"""

from __future__ import annotations

import triton
import triton.language as tl

from qwen_export.plugins.triton_support import KernelSpec

from .router_topk_triton import act_of, act_variants, device_sm, empty_alloc


@triton.jit
def combine_kernel(
    x_ptr,  # [T, H] block input, rows stride_xt apart
    y_ptr,  # [T * top_k, H] expert outputs per pair, unweighted
    weights_ptr,  # [T, top_k] fp32 routing weights
    shared_ptr,  # [T, H] shared expert output (before its gate)
    sgate_ptr,  # [H] shared_expert_gate weight
    out_ptr,  # [T, H] out, rows stride_ot apart
    T,
    H,
    h_span,  # columns per program along grid axis 1 (a multiple of BLOCK_H)
    top_k,
    stride_xt,
    stride_ot,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    t64 = t.to(tl.int64)
    lane = tl.arange(0, BLOCK_H)
    # the shared expert's gate: sigmoid(x . shared_expert_gate) over all of H, fp32
    acc = tl.full((BLOCK_T, BLOCK_H), 0, tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h_ok = h0 + lane < H
        xv = tl.load(
            x_ptr + t64[:, None] * stride_xt + h0 + lane[None, :],
            mask=t_ok[:, None] & h_ok[None, :],
            other=0.0,
        )
        sg = tl.load(sgate_ptr + h0 + lane, mask=h_ok, other=0.0)
        acc += xv.to(tl.float32) * sg.to(tl.float32)[None, :]
    gate = 1.0 / (1.0 + tl.exp(-tl.sum(acc, axis=1)))
    first = tl.program_id(1) * h_span
    for h0 in range(first, first + h_span, BLOCK_H):
        h = h0 + lane
        ok = t_ok[:, None] & (h < H)[None, :]
        shared = tl.load(shared_ptr + t64[:, None] * H + h[None, :], mask=ok, other=0.0)
        out = gate[:, None] * shared.to(tl.float32)
        for j in range(0, top_k):
            pair = t64 * top_k + j
            w = tl.load(weights_ptr + pair, mask=t_ok, other=0.0)
            yv = tl.load(y_ptr + pair[:, None] * H + h[None, :], mask=ok, other=0.0)
            out += w[:, None] * yv.to(tl.float32)
        tl.store(out_ptr + t64[:, None] * stride_ot + h[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)


SPEC = KernelSpec(
    name="moe.combine",
    kernel=combine_kernel,
    signature={
        "x_ptr": "*{act}:16",
        "y_ptr": "*{act}:16",
        "weights_ptr": "*fp32",
        "shared_ptr": "*{act}:16",
        "sgate_ptr": "*{act}:16",
        "out_ptr": "*{act}:16",
        "T": "i32",
        "H": "i32:16",
        "h_span": "i32:16",
        "top_k": "i32",
        "stride_xt": "i32:16",
        "stride_ot": "i32:16",
        "BLOCK_T": "constexpr",
        "BLOCK_H": "constexpr",
    },
    constexprs={"BLOCK_T": 8, "BLOCK_H": 256},
    num_warps=4,
    num_stages=1,
    variants=act_variants(),
)
SPECS: list[KernelSpec] = [SPEC]


def moe_combine(x, y, weights, shared, shared_gate_weight, alloc=None, sm: str | None = None):
    """Launch: out [T, H] in x's dtype. shared_gate_weight: the [1, H] (or [H]) shared_expert_gate weight."""
    T, H = x.shape
    top_k = weights.shape[1]
    sgate = shared_gate_weight.reshape(-1)
    if sgate.numel() != H or not sgate.is_contiguous() or x.stride(1) != 1:
        raise ValueError(f"shared_expert_gate {tuple(shared_gate_weight.shape)} does not fit hidden {H}")
    if tuple(y.shape) != (T * top_k, H) or tuple(shared.shape) != (T, H):
        raise ValueError(
            f"expert outputs {tuple(y.shape)} / shared {tuple(shared.shape)} do not fit {T} x {H}"
        )
    alloc = alloc or empty_alloc(x)
    out = alloc("out", (T, H), x.dtype)
    _, c, warps, stages = SPEC.config(device_sm(x, sm), act_of(x.dtype))
    decode = T <= c["BLOCK_T"]
    h_span = c["BLOCK_H"] if decode else triton.cdiv(H, c["BLOCK_H"]) * c["BLOCK_H"]
    combine_kernel[(triton.cdiv(T, c["BLOCK_T"]), triton.cdiv(H, h_span))](
        x, y, weights, shared, sgate, out, T, H, h_span, top_k, x.stride(0), out.stride(0),
        **c, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out
