"""Depthwise causal conv1d + SiLU with a carried conv state (Gated DeltaNet, docs/ops.md step 3).

One program owns (batch row, BLOCK_C channels) and walks the tokens in BLOCK_T tiles, so it reads the old
conv state before it writes the new one: `state_out` may alias `state_in` (in-place update).

- x [B, T, C] activations (token stride `stride_x`, channels contiguous), the in_proj_qkv output.
- weight [C, KERNEL] activations (conv1d.weight squeezed), no bias (Qwen's conv has none).
- state_in / state_out [B, C, KERNEL-1] fp32: the last KERNEL-1 inputs before / after these tokens.
- mask [B, mask_len] int32; token t is column mask_len - T + t. Padding is left padding: a row with
  n_pad zeros among its last T columns has its real tokens at t >= n_pad (a zero after a one is not
  supported here; the delta-rule kernels take any mask). Padding tokens are inert: they do not enter the
  window (the state is left as if they were absent, bit for bit) and their output is 0.
- out [B, T, C] activations: silu(conv), contiguous.

Prefill and decode run the same kernel; the decode variants freeze BLOCK_T = 1 (one token per launch).
"""

from __future__ import annotations

import dataclasses

import triton
import triton.language as tl

from qwen_export.plugins.gated_deltanet.recurrent_delta_rule_triton import (
    check_aligned,
    launch_config,
    runtime_args,
)
from qwen_export.plugins.triton_support import KernelSpec, aligned16


@triton.jit
def causal_conv_kernel(
    x_ptr,
    weight_ptr,
    mask_ptr,
    state_in_ptr,
    state_out_ptr,
    out_ptr,
    T,
    C,
    mask_len,
    stride_x,
    use_state,
    KERNEL: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    S: tl.constexpr = KERNEL - 1  # state columns
    SP: tl.constexpr = 8  # state columns, padded (KERNEL <= 9)

    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    x_row = x_ptr + b * T * stride_x
    out_row = out_ptr + b * T * C
    state_row = state_in_ptr + b * C * S

    # Real tokens of this row (left padding: they are the last n_real of the T).
    m_row = mask_ptr + b * mask_len + (mask_len - T)
    n_real = 0
    for m0 in range(0, T, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        n_real += tl.sum((tl.load(m_row + m, mask=m < T, other=0) != 0).to(tl.int32), axis=0)
    n_pad = T - n_real

    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        r = t - n_pad  # index among the real tokens; < 0 for padding
        live = (t < T) & (r >= 0)
        acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for i in tl.static_range(KERNEL):
            j = r - S + i  # real index of this tap's input; < 0 reads the carried state
            from_x = live & (j >= 0)
            xv = tl.load(
                x_row + (n_pad + j).to(tl.int64)[:, None] * stride_x + c[None, :],
                mask=from_x[:, None] & c_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            from_s = live & (j < 0) & ((j * 0 + use_state) != 0)
            sv = tl.load(
                state_row + c[None, :] * S + (S + j)[:, None],
                mask=from_s[:, None] & c_ok[None, :],
                other=0.0,
            )
            w = tl.load(weight_ptr + c * KERNEL + i, mask=c_ok, other=0.0).to(tl.float32)
            acc += (xv + sv) * w[None, :]
        y = acc / (1.0 + tl.exp(-acc))
        y = tl.where(live[:, None], y, 0.0)
        tl.store(
            out_row + t.to(tl.int64)[:, None] * C + c[None, :],
            y.to(out_ptr.dtype.element_ty),
            mask=(t < T)[:, None] & c_ok[None, :],
        )

    # New state: the last S inputs of (old state, real tokens).
    s = tl.arange(0, SP)
    j = n_real - S + s
    s_ok = s < S
    from_x = s_ok & (j >= 0)
    xv = tl.load(
        x_row + (n_pad + j).to(tl.int64)[None, :] * stride_x + c[:, None],
        mask=from_x[None, :] & c_ok[:, None],
        other=0.0,
    ).to(tl.float32)
    from_s = s_ok & (j < 0) & ((j * 0 + use_state) != 0)
    sv = tl.load(
        state_row + c[:, None] * S + (S + j)[None, :], mask=from_s[None, :] & c_ok[:, None], other=0.0
    )
    tl.store(
        state_out_ptr + b * C * S + c[:, None] * S + s[None, :],
        xv + sv,
        mask=s_ok[None, :] & c_ok[:, None],
    )


SIGNATURE = {
    "x_ptr": "*{act}",
    "weight_ptr": "*{act}",
    "mask_ptr": "*i32",
    "state_in_ptr": "*fp32",
    "state_out_ptr": "*fp32",
    "out_ptr": "*{act}",
    "T": "i32",
    "C": "i32",
    "mask_len": "i32",
    "stride_x": "i32",
    "use_state": "i32",
    "KERNEL": "constexpr",
    "BLOCK_C": "constexpr",
    "BLOCK_T": "constexpr",
    "BLOCK_M": "constexpr",
}

# Multiples of 16 at every launch (see recurrent_delta_rule_triton.ALIGNED_16): the AOT build's hints.
ALIGNED_16 = ("x_ptr", "weight_ptr", "mask_ptr", "state_in_ptr", "state_out_ptr", "out_ptr", "C", "stride_x")

SPEC = KernelSpec(
    name="gated_deltanet.causal_conv",
    kernel=causal_conv_kernel,
    signature=aligned16(SIGNATURE, ALIGNED_16),
    constexprs={"KERNEL": 4, "BLOCK_C": 128, "BLOCK_T": 16, "BLOCK_M": 256},
    num_warps=8,
    num_stages=1,
    variants={
        "fp16": {"act": "fp16"},
        "bf16": {"act": "bf16"},
        # one token per launch: a row of channels per program
        "fp16_decode": {"act": "fp16", "BLOCK_T": 1, "BLOCK_C": 256, "num_warps": 4},
        "bf16_decode": {"act": "bf16", "BLOCK_T": 1, "BLOCK_C": 256, "num_warps": 4},
    },
)


# The plugin's conv state has the activation type ([B, C, K-1], as transformers' cache holds it): the same
# kernel with 16-bit state pointers. The state holds past inputs, so it round-trips exactly (loads widen,
# the store narrows values that were activations to begin with).
ACT_STATE_SPEC = dataclasses.replace(
    SPEC,
    name="gated_deltanet.causal_conv_act_state",
    signature=aligned16({**SIGNATURE, "state_in_ptr": "*{act}", "state_out_ptr": "*{act}"}, ALIGNED_16),
)


def grid(batch: int, channels: int, block_c: int) -> tuple[int, int]:
    return (triton.cdiv(channels, block_c), batch)


def causal_conv(x, weight, conv_state=None, mask=None, state_out=None, out=None):
    """silu(causal depthwise conv) of x [B, T, C] with weight [C, K]; returns (out [B, T, C], new state
    [B, C, K-1] fp32). `conv_state` None starts from zeros; `state_out` may be `conv_state` (in place);
    `mask` [B, S] int32 (S >= T), None = no padding. Block sizes are SPEC's (decode variants for T == 1)."""
    import torch

    batch, tokens, channels = x.shape
    kernel = weight.shape[-1]
    assert weight.shape == (channels, kernel) and 2 <= kernel <= 9
    assert x.stride(2) == 1 and (batch == 1 or x.stride(0) == tokens * x.stride(1))
    variant = {torch.bfloat16: "bf16"}.get(x.dtype, "fp16") + ("_decode" if tokens == 1 else "")
    consts, warps, stages = launch_config(SPEC, variant, x.device)
    consts["KERNEL"] = kernel
    if mask is None:
        mask = torch.ones((batch, tokens), dtype=torch.int32, device=x.device)
    assert mask.dtype == torch.int32 and mask.is_contiguous()
    assert mask.shape[0] == batch and mask.shape[1] >= tokens
    if state_out is None:
        state_out = torch.empty((batch, channels, kernel - 1), dtype=torch.float32, device=x.device)
    if out is None:
        out = torch.empty((batch, tokens, channels), dtype=x.dtype, device=x.device)
    use_state = conv_state is not None
    state_in = conv_state if use_state else state_out
    assert state_in.dtype == state_out.dtype and state_in.dtype in (torch.float32, x.dtype)
    assert state_in.is_contiguous() and state_out.is_contiguous() and out.is_contiguous()
    values = (x, weight, mask, state_in, state_out, out, tokens, channels, mask.stride(0), x.stride(1))
    args = runtime_args(SPEC, values + (int(use_state),))
    check_aligned(args, ALIGNED_16)
    causal_conv_kernel[grid(batch, channels, consts["BLOCK_C"])](  # ACT_STATE_SPEC's kernel: the same
        **args, **consts, num_warps=warps, num_stages=stages
    )
    return out, state_out
