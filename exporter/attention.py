"""Gated full attention (Qwen3.5 / Qwen3-Next) in standard ONNX ops, with an explicit KV cache."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qwen_export.exporter.builder import GraphBuilder
from qwen_export.exporter.spec import ModelSpec
from qwen_export.exporter.weights import Weights


@dataclass
class AttentionContext:
    """Per-graph tensors shared by every attention layer."""

    cos: ir.Value  # [batch, 1, sequence, rotary_dim]
    sin: ir.Value
    allowed: ir.Value  # bool [batch, 1, 1, sequence, total_sequence]: causal and not padding


def rotary_tables(gb: GraphBuilder, position_ids: ir.Value, spec: ModelSpec) -> tuple[ir.Value, ir.Value]:
    """cos/sin of the partial RoPE; text positions use one index on every mRoPE axis, which is plain RoPE."""
    dim = spec.rotary_dim
    inv_freq = 1.0 / (spec.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    positions = gb.unsqueeze(gb.op("Cast", position_ids, to=ir.DataType.FLOAT), [-1])
    freqs = gb.op("Mul", positions, gb.const(inv_freq.astype(np.float32), np.float32))
    emb = gb.op("Concat", freqs, freqs, axis=-1)
    return gb.unsqueeze(gb.op("Cos", emb), [1]), gb.unsqueeze(gb.op("Sin", emb), [1])


def mrope_axes(rotary_dim: int, mrope_section: Sequence[int]) -> np.ndarray:
    """Which position axis (0 = t, 1 = h, 2 = w) drives each rotary frequency under interleaved mRoPE.

    Mirrors Qwen3_5TextRotaryEmbedding.recomposition_frequencies: frequency i follows h when i % 3 == 1
    and i < 3 * section[1], w when i % 3 == 2 and i < 3 * section[2], and t otherwise.
    """
    axes = np.zeros(rotary_dim // 2, dtype=np.int64)
    for axis, offset in ((1, 1), (2, 2)):
        axes[offset : 3 * mrope_section[axis] : 3] = axis
    return axes


def mrope_rotary_tables(
    gb: GraphBuilder, position_ids: ir.Value, spec: ModelSpec, mrope_section: Sequence[int]
) -> tuple[ir.Value, ir.Value]:
    """cos/sin [B, 1, T, rotary_dim] from mRoPE position ids [3, B, T] (t, h, w).

    Each frequency takes its position from one axis before the multiply, which is exactly the
    reference's per-axis multiply followed by its interleaved pick.
    """
    dim = spec.rotary_dim
    inv_freq = 1.0 / (spec.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    with gb.scope("mrope"):
        picked = gb.op("Gather", position_ids, gb.const(mrope_axes(dim, mrope_section)), axis=0)  # [F,B,T]
        positions = gb.op("Cast", gb.transpose(picked, [1, 2, 0]), to=ir.DataType.FLOAT)  # [B, T, F]
        freqs = gb.op("Mul", positions, gb.const(inv_freq.astype(np.float32), np.float32))
        emb = gb.op("Concat", freqs, freqs, axis=-1)
        return gb.unsqueeze(gb.op("Cos", emb), [1]), gb.unsqueeze(gb.op("Sin", emb), [1])


def attention_mask_bool(gb: GraphBuilder, input_ids: ir.Value, attention_mask: ir.Value) -> ir.Value:
    """Key j is visible to query t when j <= past + t and attention_mask[b, j] == 1."""
    seq = gb.op("Gather", gb.op("Shape", input_ids), gb.const(1), axis=0)
    total = gb.op("Gather", gb.op("Shape", attention_mask), gb.const(1), axis=0)
    past = gb.op("Sub", total, seq)
    q_pos = gb.op("Range", past, total, gb.const(1))
    k_pos = gb.op("Range", gb.const(0), total, gb.const(1))
    causal = gb.op("LessOrEqual", gb.unsqueeze(k_pos, [0]), gb.unsqueeze(q_pos, [1]))  # [T, S]
    not_padding = gb.unsqueeze(gb.op("Cast", attention_mask, to=ir.DataType.BOOL), [1, 2, 3])  # [B,1,1,1,S]
    return gb.op("And", causal, not_padding)


def _apply_rope(gb: GraphBuilder, x: ir.Value, ctx: AttentionContext, spec: ModelSpec) -> ir.Value:
    rot, half = spec.rotary_dim, spec.rotary_dim // 2
    x_rot = gb.slice(x, 0, rot, -1)
    x1, x2 = gb.slice(x_rot, 0, half, -1), gb.slice(x_rot, half, rot, -1)
    rotated = gb.op("Concat", gb.op("Neg", x2), x1, axis=-1)
    embedded = gb.op("Add", gb.op("Mul", x_rot, ctx.cos), gb.op("Mul", rotated, ctx.sin))
    if rot == spec.head_dim:
        return embedded
    return gb.op("Concat", embedded, gb.slice(x, rot, spec.head_dim, -1), axis=-1)


def gated_attention(
    gb: GraphBuilder,
    w: Weights,
    layer: int,
    x: ir.Value,
    past_key: ir.Value,
    past_value: ir.Value,
    ctx: AttentionContext,
    spec: ModelSpec,
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Returns (output [B,T,H], present_key, present_value)."""
    p = f"layers.{layer}.self_attn."
    nh, kv, hd, hidden = spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim, spec.hidden_size
    groups = nh // kv
    bias = spec.attention_bias

    q_and_gate = gb.linear(
        x,
        w.linear_t(p + "q_proj.weight", nh * hd * 2, hidden),
        w.vector(p + "q_proj.bias", nh * hd * 2) if bias else None,
    )
    query, gate = gb.op_multi(
        "Split", [gb.reshape(q_and_gate, [0, 0, nh, 2 * hd]), gb.const([hd, hd])], 2, axis=-1
    )
    gate = gb.reshape(gate, [0, 0, nh * hd])
    key = gb.linear(
        x,
        w.linear_t(p + "k_proj.weight", kv * hd, hidden),
        w.vector(p + "k_proj.bias", kv * hd) if bias else None,
    )
    value = gb.linear(
        x,
        w.linear_t(p + "v_proj.weight", kv * hd, hidden),
        w.vector(p + "v_proj.bias", kv * hd) if bias else None,
    )

    eps = spec.rms_norm_eps
    query = gb.rms_norm(query, w.zero_centred_scale(p + "q_norm.weight", hd), eps)
    key = gb.rms_norm(gb.reshape(key, [0, 0, kv, hd]), w.zero_centred_scale(p + "k_norm.weight", hd), eps)
    query = _apply_rope(gb, gb.transpose(query, [0, 2, 1, 3]), ctx, spec)  # [B, nh, T, hd]
    key = _apply_rope(gb, gb.transpose(key, [0, 2, 1, 3]), ctx, spec)  # [B, kv, T, hd]
    value = gb.transpose(gb.reshape(value, [0, 0, kv, hd]), [0, 2, 1, 3])

    present_key = gb.op("Concat", past_key, key, axis=2)
    present_value = gb.op("Concat", past_value, value, axis=2)

    # GQA without copying the cache: query head h reads kv head h // groups.
    q5 = gb.reshape(query, [0, kv, groups, -1, hd])
    k5 = gb.unsqueeze(present_key, [2])
    v5 = gb.unsqueeze(present_value, [2])
    scores = gb.op("MatMul", q5, gb.transpose(k5, [0, 1, 2, 4, 3]))
    scores = gb.op("Mul", scores, gb.const(hd**-0.5, np.float32))
    scores = gb.op("Where", ctx.allowed, scores, gb.const(np.finfo(np.float32).min, np.float32))
    probs = gb.op("Softmax", scores, axis=-1)
    attn = gb.op("MatMul", probs, v5)  # [B, kv, groups, T, hd]
    attn = gb.transpose(gb.reshape(attn, [0, nh, -1, hd]), [0, 2, 1, 3])
    attn = gb.op("Mul", gb.reshape(attn, [0, 0, nh * hd]), gb.op("Sigmoid", gate))
    out = gb.linear(
        attn,
        w.linear_t(p + "o_proj.weight", hidden, nh * hd),
        w.vector(p + "o_proj.bias", hidden) if bias else None,
    )
    return out, present_key, present_value
