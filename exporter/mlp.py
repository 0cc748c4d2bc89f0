"""Feed-forward blocks: the sparse MoE (router, SwiGLU experts, gated shared expert) and the dense MLP."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from qwen_export.exporter.builder import FLOAT, GraphBuilder
from qwen_export.exporter.checkpoint import expert_layout
from qwen_export.exporter.spec import ModelSpec
from qwen_export.exporter.weights import FP8, Weights, stack_experts, stack_gate_up, transpose_2d

if TYPE_CHECKING:
    from qwen_export.exporter.shard import RankContext


def swiglu_mlp(gb: GraphBuilder, w: Weights, p: str, x: ir.Value, hidden: int, inter: int) -> ir.Value:
    gate = gb.op("MatMul", x, w.linear_t(p + "gate_proj.weight", inter, hidden))
    up = gb.op("MatMul", x, w.linear_t(p + "up_proj.weight", inter, hidden))
    return gb.op("MatMul", gb.op("Mul", gb.silu(gate), up), w.linear_t(p + "down_proj.weight", hidden, inter))


def _expert_weights(w: Weights, p: str, spec: ModelSpec, experts: range) -> tuple[ir.Value, ir.Value]:
    """Stacked expert weights in MatMul layout: gate_up [E, H, 2I] and down [E, I, H] of `experts` (global
    indices: all of them, or one rank's group). Each is written one expert at a time (a 397B layer's
    gate_up is 8.6 GB in bf16); an FP8 checkpoint's experts stay e4m3 behind a blocked DequantizeLinear
    when the export keeps FP8."""
    h, i = spec.hidden_size, spec.moe_intermediate_size
    e = len(experts)
    full = w.full_name
    if expert_layout(w.ckpt, w.prefix + p, spec) == "stacked":
        gate_up_name, down_name = p + "experts.gate_up_proj", p + "experts.down_proj"
        gate_up = w.derived(
            gate_up_name + ".T",
            [(gate_up_name, (e, 2 * i, h))],
            (e, h, 2 * i),
            lambda a: a[0].transpose(0, 2, 1),
            layout_only=True,
            pieces=[([(full(gate_up_name), k)], _one_transposed) for k in experts],
        )
        down = w.derived(
            down_name + ".T",
            [(down_name, (e, h, i))],
            (e, i, h),
            lambda a: a[0].transpose(0, 2, 1),
            layout_only=True,
            pieces=[([(full(down_name), k)], _one_transposed) for k in experts],
        )
        return gate_up, down
    gate, up, down_proj = (p + "experts.{e}." + m + ".weight" for m in ("gate_proj", "up_proj", "down_proj"))
    gates = [(gate.format(e=k), (i, h)) for k in experts]
    ups = [(up.format(e=k), (i, h)) for k in experts]
    downs = [(down_proj.format(e=k), (h, i)) for k in experts]
    fp8 = w.is_fp8(gate.format(e=0))
    dtype = FP8 if fp8 else FLOAT
    gate_up = w.derived(
        p + "experts.gate_up_proj.T",
        gates + ups,
        (e, h, 2 * i),
        lambda a: stack_gate_up(a[:e], a[e:]),
        layout_only=True,
        pieces=[([full(gates[k][0]), full(ups[k][0])], _gate_up_transposed) for k in range(e)],
        dtype=dtype,
    )
    down = w.derived(
        p + "experts.down_proj.T",
        downs,
        (e, i, h),
        lambda a: stack_experts(a).transpose(0, 2, 1),
        layout_only=True,
        pieces=[([full(downs[k][0])], _one_transposed) for k in range(e)],
        dtype=dtype,
    )
    if not fp8:
        return gate_up, down
    gate_or_up = p + "experts.{e}.{part}.weight"
    gate_up_scale = w.fp8_scale_t(gate_or_up, i, h, experts=e, parts=("gate_proj", "up_proj"))
    return (
        w.dequantize(gate_up, gate_up_scale, axis=1),
        w.dequantize(down, w.fp8_scale_t(down_proj, h, i, experts=e), axis=1),
    )


def _one_transposed(arrays: list[np.ndarray]) -> np.ndarray:
    return transpose_2d(arrays[0])[None]


def _gate_up_transposed(arrays: list[np.ndarray]) -> np.ndarray:
    return transpose_2d(np.concatenate(arrays, axis=0))[None]


def sparse_moe(
    gb: GraphBuilder, w: Weights, layer: int, x: ir.Value, spec: ModelSpec, rank: RankContext | None = None
) -> ir.Value:
    """softmax(fp32) router -> top-k -> renormalise -> SwiGLU experts -> + sigmoid-gated shared expert.

    Every expert's weights are in the graph. This portable form evaluates all experts and weights the
    unselected ones by exactly zero; the fusion passes replace it with a sparse MoE op. With `rank`, the
    router still routes over every expert, and the rank runs its expert group's experts only (a partial
    sum the caller all-reduces).
    """
    p = f"layers.{layer}.mlp."
    h, e, inter = spec.hidden_size, spec.num_experts, spec.moe_intermediate_size
    tokens = gb.reshape(x, [-1, h])  # [N, H]

    with gb.scope("router"):
        logits = gb.op("MatMul", tokens, w.linear_t(p + "gate.weight", e, h))
        probs = gb.op("Softmax", logits, axis=-1)
        top_values, top_indices = gb.op_multi(
            "TopK", [probs, gb.const([spec.num_experts_per_tok])], 2, axis=-1
        )
        if spec.norm_topk_prob:
            top_values = gb.op("Div", top_values, gb.op("ReduceSum", top_values, gb.const([-1]), keepdims=1))
        zeros = gb.op("ConstantOfShape", gb.op("Shape", probs), value=ir.tensor(np.zeros(1, np.float32)))
        routing = gb.op("ScatterElements", zeros, top_indices, top_values, axis=1)  # [N, E]
    experts = range(e) if rank is None else rank.experts()
    if len(experts) < e:
        routing = rank.routing_columns(gb, routing)  # [N, E / ep]: this rank's expert group

    with gb.scope("experts"):
        gate_up, down = _expert_weights(w, p, spec, experts)
        hidden_up = gb.op("MatMul", tokens, gate_up)  # [E, N, 2I]
        gate, up = gb.op_multi("Split", [hidden_up, gb.const([inter, inter])], 2, axis=-1)
        expert_out = gb.op("MatMul", gb.op("Mul", gb.silu(gate), up), down)  # [E, N, H]
        weights = gb.unsqueeze(gb.transpose(routing, [1, 0]), [2])  # [E, N, 1]
        routed = gb.op("ReduceSum", gb.op("Mul", expert_out, weights), gb.const([0]), keepdims=0)

    with gb.scope("shared_expert"):
        shared = swiglu_mlp(gb, w, p + "shared_expert.", tokens, h, spec.shared_expert_intermediate_size)
        shared_gate = gb.op(
            "Sigmoid", gb.op("MatMul", tokens, w.linear_t(p + "shared_expert_gate.weight", 1, h))
        )
        shared = gb.op("Mul", shared, shared_gate)

    return gb.op("Reshape", gb.op("Add", routed, shared), gb.op("Shape", x))


def dense_mlp(gb: GraphBuilder, w: Weights, layer: int, x: ir.Value, spec: ModelSpec) -> ir.Value:
    return swiglu_mlp(gb, w, f"layers.{layer}.mlp.", x, spec.hidden_size, spec.intermediate_size)
