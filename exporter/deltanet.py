"""Gated DeltaNet (linear attention) in standard ONNX ops, with explicit conv and recurrent state.

The delta rule runs as an ONNX Scan over the sequence, so one graph serves any prompt length (and single
token decode) from a carried fp32 state. It computes the same recurrence the reference's chunked kernel
evaluates blockwise; the two differ only in floating-point summation order.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qwen_export.exporter.builder import FLOAT, GraphBuilder, new_graph, tensor_input
from qwen_export.exporter.checkpoint import Checkpoint
from qwen_export.exporter.spec import ModelSpec
from qwen_export.exporter.weights import Weights


def delta_rule_body(spec: ModelSpec) -> ir.Graph:
    """One Scan step: S = S*exp(g); S += k (x) beta*(v - S^T k); o = S^T q (per value head)."""
    nv, dk, dv = spec.linear_num_value_heads, spec.linear_key_head_dim, spec.linear_value_head_dim
    state = tensor_input("state_in", FLOAT, ["batch", nv, dk, dv])
    q_t = tensor_input("q_t", FLOAT, ["batch", nv, dk])
    k_t = tensor_input("k_t", FLOAT, ["batch", nv, dk])
    v_t = tensor_input("v_t", FLOAT, ["batch", nv, dv])
    g_t = tensor_input("g_t", FLOAT, ["batch", nv])
    beta_t = tensor_input("beta_t", FLOAT, ["batch", nv])
    body = new_graph("delta_rule_step", [state, q_t, k_t, v_t, g_t, beta_t])
    b = GraphBuilder(body)
    with b.scope("delta_rule_step"):
        decayed = b.op("Mul", state, b.unsqueeze(b.op("Exp", g_t), [2, 3]))
        k_row = b.unsqueeze(k_t, [2])  # [B, nv, 1, dk]
        kv_mem = b.op("MatMul", k_row, decayed)  # [B, nv, 1, dv]
        delta = b.op("Mul", b.op("Sub", b.unsqueeze(v_t, [2]), kv_mem), b.unsqueeze(beta_t, [2, 3]))
        new_state = b.op("Add", decayed, b.op("MatMul", b.unsqueeze(k_t, [3]), delta))
        out = b.squeeze(b.op("MatMul", b.unsqueeze(q_t, [2]), new_state), [2])  # [B, nv, dv]
        state_out = b.op("Identity", new_state)
    state_out.name, out.name = "state_out", "o_t"
    body.outputs.extend([state_out, out])
    return body


def _l2norm(gb: GraphBuilder, x: ir.Value) -> ir.Value:
    sum_sq = gb.op("ReduceSum", gb.op("Mul", x, x), gb.const([-1]), keepdims=1)
    inv = gb.op("Reciprocal", gb.op("Sqrt", gb.op("Add", sum_sq, gb.const(1e-6, np.float32))))
    return gb.op("Mul", x, inv)


def _qwen3_next_qkvz(spec: ModelSpec, part: str):
    """Qwen3-Next stores q,k,v,z (and b,a) grouped per key head; regroup rows into Qwen3.5's layout."""
    nk, dk, dv = spec.linear_num_key_heads, spec.linear_key_head_dim, spec.linear_value_head_dim
    r = spec.linear_num_value_heads // nk

    def transform(arrays: list[np.ndarray]) -> np.ndarray:
        w = arrays[0]
        hidden = w.shape[-1]
        if part in ("qkv", "z"):
            grouped = w.reshape(nk, 2 * dk + 2 * r * dv, hidden)
            q, k, v, z = np.split(grouped, [dk, 2 * dk, 2 * dk + r * dv], axis=1)
            rows = (
                np.concatenate([q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)])
                if part == "qkv"
                else z.reshape(-1, hidden)
            )
        else:
            b, a = np.split(w.reshape(nk, 2 * r, hidden), [r], axis=1)
            rows = (b if part == "b" else a).reshape(-1, hidden)
        return rows.T

    return transform


def _input_projections(w: Weights, ckpt: Checkpoint, p: str, spec: ModelSpec) -> dict[str, ir.Value]:
    hidden, nv, conv_dim, value_dim = (
        spec.hidden_size,
        spec.linear_num_value_heads,
        spec.conv_dim,
        spec.value_dim,
    )
    if spec.family != "qwen3_next":
        return {
            "qkv": w.linear_t(p + "in_proj_qkv.weight", conv_dim, hidden),
            "z": w.linear_t(p + "in_proj_z.weight", value_dim, hidden),
            "b": w.linear_t(p + "in_proj_b.weight", nv, hidden),
            "a": w.linear_t(p + "in_proj_a.weight", nv, hidden),
        }
    qkvz = (p + "in_proj_qkvz.weight", (conv_dim + value_dim, hidden))
    ba = (p + "in_proj_ba.weight", (2 * nv, hidden))
    return {
        "qkv": w.derived(
            p + "in_proj_qkv.weight.T", [qkvz], (hidden, conv_dim), _qwen3_next_qkvz(spec, "qkv"), True
        ),
        "z": w.derived(
            p + "in_proj_z.weight.T", [qkvz], (hidden, value_dim), _qwen3_next_qkvz(spec, "z"), True
        ),
        "b": w.derived(p + "in_proj_b.weight.T", [ba], (hidden, nv), _qwen3_next_qkvz(spec, "b"), True),
        "a": w.derived(p + "in_proj_a.weight.T", [ba], (hidden, nv), _qwen3_next_qkvz(spec, "a"), True),
    }


def gated_deltanet(
    gb: GraphBuilder,
    w: Weights,
    layer: int,
    x: ir.Value,
    token_mask: ir.Value,
    past_conv: ir.Value,
    past_recurrent: ir.Value,
    spec: ModelSpec,
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """Returns (output [B,T,H], present conv_state, present recurrent_state)."""
    p = f"layers.{layer}.linear_attn."
    nk, nv = spec.linear_num_key_heads, spec.linear_num_value_heads
    dk, dv, kernel = spec.linear_key_head_dim, spec.linear_value_head_dim, spec.linear_conv_kernel_dim
    key_dim, conv_dim = nk * dk, spec.conv_dim

    x = gb.op("Mul", x, token_mask)  # padding tokens must not leak into the state
    proj = _input_projections(w, w.ckpt, p, spec)
    mixed = gb.op("MatMul", x, proj["qkv"])
    z = gb.reshape(gb.op("MatMul", x, proj["z"]), [0, 0, nv, dv])
    b = gb.op("MatMul", x, proj["b"])
    a = gb.op("MatMul", x, proj["a"])

    # Depthwise causal conv over [carried K-1 columns | new tokens]; the last K-1 columns are the new state.
    with gb.scope("conv"):
        window = gb.op("Concat", past_conv, gb.transpose(mixed, [0, 2, 1]), axis=2)
        present_conv = gb.slice(window, -(kernel - 1), np.iinfo(np.int64).max, 2)
        conv_w = w.derived(
            p + "conv1d.weight",
            [(p + "conv1d.weight", (conv_dim, 1, kernel))],
            (conv_dim, 1, kernel),
            layout_only=True,
        )
        conv = gb.op("Conv", window, conv_w, group=conv_dim, kernel_shape=[kernel])
        mixed = gb.transpose(gb.silu(conv), [0, 2, 1])

    query, key, value = gb.op_multi(
        "Split", [mixed, gb.const([key_dim, key_dim, spec.value_dim])], 3, axis=-1
    )
    query = _l2norm(gb, gb.reshape(query, [0, 0, nk, dk]))
    key = _l2norm(gb, gb.reshape(key, [0, 0, nk, dk]))
    value = gb.reshape(value, [0, 0, nv, dv])
    if nv != nk:  # value head j reads key head j // (nv / nk)
        heads = gb.const(np.arange(nv) // (nv // nk))
        query, key = gb.op("Gather", query, heads, axis=2), gb.op("Gather", key, heads, axis=2)
    query = gb.op("Mul", query, gb.const(dk**-0.5, np.float32))

    beta = gb.op("Sigmoid", b)
    neg_a = w.derived(p + "A_log.neg_exp", [(p + "A_log", (nv,))], (nv,), lambda arr: -np.exp(arr[0]))
    dt_bias = w.vector(p + "dt_bias", nv)
    g = gb.op("Mul", neg_a, gb.op("Softplus", gb.op("Add", a, dt_bias)))

    with gb.scope("delta_rule"):
        present_recurrent, core = gb.op_multi(
            "Scan",
            [past_recurrent, query, key, value, g, beta],
            2,
            body=delta_rule_body(spec),
            num_scan_inputs=5,
            scan_input_axes=[1, 1, 1, 1, 1],
            scan_output_axes=[1],
        )

    with gb.scope("norm"):
        normed = gb.rms_norm(core, w.vector(p + "norm.weight", dv), spec.rms_norm_eps)
        gated = gb.op("Mul", normed, gb.silu(z))
    out = gb.op(
        "MatMul",
        gb.reshape(gated, [0, 0, spec.value_dim]),
        w.linear_t(p + "out_proj.weight", spec.hidden_size, spec.value_dim),
    )
    return out, present_conv, present_recurrent
