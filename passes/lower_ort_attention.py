"""ORT lowering of qwen.GatedAttention: RMSNormalization, RotaryEmbedding and GroupQueryAttention.

    qk, gate, v = Split(MatMul(X, [query | key | gate | value]))     one GEMM; q_weight's per-head
                                                                     [query, gate] columns regrouped
    qk          = RMSNormalization(qk as [B, T, nh+kv, hd]; [q_norm x nh ; k_norm x kv]) as [B, T, (nh+kv)*hd]
    qk          = RotaryEmbedding(qk, pos, cos_cache, sin_cache; num_heads=nh+kv, rotary_embedding_dim)
    q, k        = Split(qk)
    o, present_key, present_value = GroupQueryAttention(q, k, v, past_key, past_value, seqlens_k,
                                                        total_sequence_length, -, -, -, attention_bias)
    Y           = MatMul(o * Sigmoid(gate), o_weight)

GQA (CPU) notes, from running it: seqlens_k is S-1 for every row and total_sequence_length is S, so the
present cache is concat(past, new) as in the op; left padding goes in through attention_bias
[B, 1, T, S] (0 / float32.min), which the CPU kernel requires at full T (no broadcast). Its built-in
rotary (do_rotary) is not used: for a prompt it derives positions from the first position id only, and
needs rotary_dim/2 to be a multiple of 8. Its q/k-norm inputs are not honoured on CPU. A prompt with
past tokens (T > 1 and P > 0) must have batch 1 (a kernel restriction; decode and first prompt do not).

With `LowerToOrt(attention="onnx")` the attention is opset-23 `Attention` instead (is_causal, the same
bias as attn_mask, past/present concatenated): no batch restriction, no seqlens inputs, as fast on CPU.
"""

from __future__ import annotations

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


def regroup_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, num_heads: int, head_dim: int) -> np.ndarray:
    """[H, nh*2*hd] (per head: query, gate), [H, kv*hd] x2 -> [H, query | key | gate | value]."""
    hidden = q.shape[0]
    per_head = q.reshape(hidden, num_heads, 2, head_dim)
    query = per_head[:, :, 0].reshape(hidden, -1)
    gate = per_head[:, :, 1].reshape(hidden, -1)
    return np.concatenate([query, k, gate, v], axis=1)


def lower_gated_attention(e: Emitter, node: ir.Node) -> list[ir.Value]:
    (x, mask, cos, sin, past_key, past_value, q_w, k_w, v_w, o_w, q_norm, k_norm) = node.inputs
    nh, kv, hd, rot = (
        int(attribute(node, a)) for a in ("num_heads", "num_kv_heads", "head_dim", "rotary_dim")
    )
    epsilon, scale = float(attribute(node, "epsilon")), float(attribute(node, "scale"))
    hidden = const_shape(q_w, "q_weight")[0]
    if kv <= 0 or nh % kv or rot % 2 or not 0 < rot <= hd:
        raise NotLowered("head attributes GQA/RotaryEmbedding cannot take")
    for value, what in ((k_w, "k_weight"), (v_w, "v_weight"), (q_norm, "q_norm"), (k_norm, "k_norm")):
        const_shape(value, what)

    ctx = e.ctx
    qkv = ctx.derived(
        f"{q_w.name}.ort_qkgv",
        [q_w, k_w, v_w],
        lambda q, k, v: regroup_qkv(q, k, v, nh, hd),
        (hidden, (2 * nh + 2 * kv) * hd),
    )
    qk_scale = ctx.derived(
        f"{q_norm.name}.ort_qk_norm",
        [q_norm, k_norm],
        lambda qn, kn: np.concatenate([np.tile(qn, (nh, 1)), np.tile(kn, (kv, 1))]),
        (nh + kv, hd),
    )

    shared = SharedInputs(ctx)
    positions, cos_cache, sin_cache = shared.rotary_caches(cos, sin, rot, x, node)
    use_gqa = ctx.attention == "gqa" or ctx.graph.opset_imports.get("", 0) < 23
    seqlens, total = shared.gqa_lengths(mask, node) if use_gqa else (None, None)
    bias = shared.gqa_bias(mask, x, node)

    qk, gate, v = e.split(e.op("MatMul", x, qkv), [(nh + kv) * hd, nh * hd, kv * hd])
    qk = e.rms_norm(e.reshape(qk, [0, 0, nh + kv, hd]), qk_scale, epsilon)
    qk = e.op(
        "RotaryEmbedding",
        e.reshape(qk, [0, 0, (nh + kv) * hd]),
        positions,
        cos_cache,
        sin_cache,
        domain=MS_DOMAIN,
        num_heads=nh + kv,
        rotary_embedding_dim=rot,
        interleaved=0,
    )
    q, k = e.split(qk, [nh * hd, kv * hd])
    if use_gqa:
        attn, present_key, present_value = e.op_multi(
            "GroupQueryAttention",
            [q, k, v, past_key, past_value, seqlens, total, None, None, None, bias],
            3,
            domain=MS_DOMAIN,
            num_heads=nh,
            kv_num_heads=kv,
            scale=scale,
        )
    else:  # causal with the query block last (j <= P + t), any batch with past tokens
        attn, present_key, present_value = e.op_multi(
            "Attention",
            [q, k, v, bias, past_key, past_value],
            3,
            q_num_heads=nh,
            kv_num_heads=kv,
            is_causal=1,
            scale=scale,
        )
    gated = e.op("Mul", attn, e.op("Sigmoid", gate))
    return [e.op("MatMul", gated, o_w), present_key, present_value]
