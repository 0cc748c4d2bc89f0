"""ORT lowering of qwen.GatedDeltaNet: CausalConvWithState, LinearAttentionGate, LinearAttention and
GatedRMSNorm.

    Xm          = X * attention_mask[:, -T:]                         (shared [B, T, 1] float mask)
    mixed, z, b, a = Split(MatMul(Xm, [qkv | z | b | a]))            one GEMM for the four projections
    conv, present_conv = CausalConvWithState(mixed^T, conv_weight, -, past_conv; activation=silu)
    qk, v       = Split(conv^T, [2*nk*dk, nv*dv])
    q, k        = Split(RMSNormalization(qk as [B, T, 2*nk, dk]; 1/sqrt(dk), eps=1e-6/dk) as [B, T, 2*nk*dk])
    decay, beta = LinearAttentionGate(a, dt_bias, neg_exp_A, b)     neg_exp_A*softplus(a+dt_bias), sigmoid(b)
    o, present_recurrent = LinearAttention(q, k, v, past_recurrent, decay, beta;
                                           q_num_heads=nk, kv_num_heads=nv, gated_delta, scale=1/sqrt(dk))
    Y           = MatMul(GatedRMSNorm(o, norm_weight, z; silu), out_weight)

l2norm(x) = x / sqrt(sum(x^2) + 1e-6) is an RMS norm with epsilon 1e-6/dk times 1/sqrt(dk), exactly.
LinearAttention with kv_num_heads > q_num_heads is the inverse-GQA case: value head j reads key head
j // (nv/nk), as the op requires; its state is [B, nv, dk, dv], the op's layout. The conv state is
channels-first [B, C, K-1], the op's layout, so the activations are transposed around the conv.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qwen_export.passes.lower_ort_emit import (
    MS_DOMAIN,
    Emitter,
    NotLowered,
    SharedInputs,
    attribute,
    const_shape,
)


@dataclass(frozen=True)
class DeltaNetHeads:
    nk: int
    nv: int
    dk: int
    dv: int
    kernel: int
    channels: int  # 2*nk*dk + nv*dv: the conv's channels (q, k, v)


def project(e: Emitter, node: ir.Node) -> tuple[DeltaNetHeads, ir.Value]:
    """Check a GatedDeltaNet node and emit its input projections as one GEMM on the masked input:
    MatMul(X * mask, [qkv | z | b | a]) -> [B, T, C + nv*dv + 2*nv]. Raises NotLowered before emitting."""
    x, mask, _, _, qkv_w, z_w, b_w, a_w, conv_w = node.inputs[:9]
    nk, nv, dk, dv, kernel = (
        int(attribute(node, a))
        for a in ("num_k_heads", "num_v_heads", "head_k_dim", "head_v_dim", "conv_kernel")
    )
    hidden, channels = const_shape(qkv_w, "qkv_weight")
    if channels != 2 * nk * dk + nv * dv or nk <= 0 or nv % nk:
        raise NotLowered("inconsistent head attributes")
    if const_shape(conv_w, "conv_weight") != (channels, 1, kernel):
        raise NotLowered("conv_weight is not [C, 1, K]")
    for value, what in ((z_w, "z_weight"), (b_w, "b_weight"), (a_w, "a_weight")):
        const_shape(value, what)
    projections = e.ctx.derived(
        f"{qkv_w.name}.ort_qkvzba",
        [qkv_w, z_w, b_w, a_w],
        lambda *w: np.concatenate(w, axis=1),
        (hidden, channels + nv * dv + 2 * nv),
    )
    xm = e.op("Mul", x, SharedInputs(e.ctx).token_mask(mask, x, node))
    return DeltaNetHeads(nk, nv, dk, dv, kernel, channels), e.op("MatMul", xm, projections)


def lower_gated_deltanet(e: Emitter, node: ir.Node) -> list[ir.Value]:
    past_conv, past_recurrent = node.inputs[2:4]
    conv_w, neg_exp_a, dt_bias, norm_w, out_w = node.inputs[8:]
    epsilon = float(attribute(node, "epsilon"))
    h, projected = project(e, node)
    nk, nv, dk, dv, channels = h.nk, h.nv, h.dk, h.dv, h.channels
    l2_scale = e.ctx.const(np.full(dk, dk**-0.5), np.float32)
    mixed, z, b, a = e.split(projected, [channels, nv * dv, nv, nv])
    conv, present_conv = e.op_multi(
        "CausalConvWithState",
        [e.transpose(mixed, [0, 2, 1]), conv_w, None, past_conv],
        2,
        domain=MS_DOMAIN,
        activation="silu",
        ndim=1,
    )
    qk, v = e.split(e.transpose(conv, [0, 2, 1]), [2 * nk * dk, nv * dv])
    qk = e.rms_norm(e.reshape(qk, [0, 0, 2 * nk, dk]), l2_scale, 1e-6 / dk)
    q, k = e.split(e.reshape(qk, [0, 0, 2 * nk * dk]), [nk * dk, nk * dk])
    decay, beta = e.op_multi("LinearAttentionGate", [a, dt_bias, neg_exp_a, b], 2, domain=MS_DOMAIN)
    core, present_recurrent = e.op_multi(
        "LinearAttention",
        [q, k, v, past_recurrent, decay, beta],
        2,
        domain=MS_DOMAIN,
        q_num_heads=nk,
        kv_num_heads=nv,
        update_rule="gated_delta",
        scale=float(dk**-0.5),
    )
    gated = e.op("GatedRMSNorm", core, norm_w, z, domain=MS_DOMAIN, activation="silu", epsilon=epsilon)
    return [e.op("MatMul", gated, out_w), present_conv, present_recurrent]
