"""Sparse MoE fusion: router softmax, top-k, renormalise, SwiGLU experts, gated shared expert -> qwen.MoE."""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from qwen_export.passes.functions import int_list
from qwen_export.passes.fusion import FusionPass, FusionRule, MatchResult
from qwen_export.passes.onnxscript_adapter import OrValue


def silu(op, x):
    return op.Mul(x, op.Sigmoid(x))


class MoERule(FusionRule):
    op = "MoE"

    def pattern(
        self,
        op,
        x,
        router_weight,
        gate_up,
        down,
        shared_gate,
        shared_up,
        shared_down,
        shared_expert_gate,
        tokens_shape,
        k,
        expert_split,
    ):
        tokens = op.Reshape(x, tokens_shape)  # [N, H]

        # Router: softmax in fp32, top-k, optionally renormalised, scattered back to a dense [N, E] weight.
        probs = op.Softmax(op.MatMul(tokens, router_weight), axis=-1)
        top_values, top_indices = op.TopK(probs, k, axis=-1, _outputs=["top_values", "top_indices"])
        top_values = OrValue(
            [op.Div(top_values, op.ReduceSum(top_values, [-1], keepdims=1)), top_values],
            tag_var="normalize",
            tag_values=[1, 0],
        )
        zeros = op.ConstantOfShape(op.Shape(probs), _outputs=["zeros"])
        routing = op.ScatterElements(zeros, top_indices, top_values, axis=1)

        # Experts: y_e = (silu(x @ gate_e) * (x @ up_e)) @ down_e, weighted and summed over experts.
        gate, up = op.Split(op.MatMul(tokens, gate_up), expert_split, axis=-1, _outputs=2)
        expert_out = op.MatMul(op.Mul(silu(op, gate), up), down)
        weights = op.Unsqueeze(op.Transpose(routing, perm=[1, 0]), [2])
        routed = op.ReduceSum(op.Mul(expert_out, weights), [0], keepdims=0)

        shared = op.MatMul(
            op.Mul(silu(op, op.MatMul(tokens, shared_gate)), op.MatMul(tokens, shared_up)), shared_down
        )
        shared = op.Mul(shared, op.Sigmoid(op.MatMul(tokens, shared_expert_gate)))
        return op.Reshape(op.Add(routed, shared), op.Shape(x))

    def check(self, context, **b: Any) -> MatchResult:
        names = (
            "router_weight",
            "gate_up",
            "down",
            "shared_gate",
            "shared_up",
            "shared_down",
            "shared_expert_gate",
        )
        missing = [b[n] for n in names if b[n].const_value is None]
        if missing:
            return self.refuse("weights are not initializers", *missing)
        s = {n: list(b[n].const_value.shape) for n in names}
        if len(s["router_weight"]) != 2 or len(s["gate_up"]) != 3 or len(s["down"]) != 3:
            return self.refuse("router or expert weights have the wrong rank", b["router_weight"])
        hidden, experts = s["router_weight"]
        inter = s["down"][1]
        shared = s["shared_gate"][1] if len(s["shared_gate"]) == 2 else None
        if (
            s["gate_up"] != [experts, hidden, 2 * inter]
            or s["down"] != [experts, inter, hidden]
            or s["shared_up"] != [hidden, shared]
            or s["shared_down"] != [shared, hidden]
            or s["shared_gate"] != [hidden, shared]
            or s["shared_expert_gate"] != [hidden, 1]
        ):
            return self.refuse(
                "expert weights do not match [E, H, 2I] / [E, I, H] and the shared expert's", b["gate_up"]
            )
        if int_list(b["tokens_shape"]) != [-1, hidden]:
            return self.refuse("tokens are not flattened to [N, hidden]", b["tokens_shape"])
        if int_list(b["expert_split"]) != [inter, inter]:
            return self.refuse("gate_up is not split into equal gate and up halves", b["expert_split"])
        k = int_list(b["k"])
        if k is None or len(k) != 1 or not 1 <= k[0] <= experts:
            return self.refuse("top-k is not a constant within the expert count", b["k"])
        topk = b["top_values"].producer().attributes
        if topk.get("largest", ir.AttrInt64("largest", 1)).value != 1:
            return self.refuse("router keeps the smallest probabilities, not the largest", b["top_values"])
        fill = b["zeros"].producer().attributes.get("value")
        if fill is not None and fill.value.numpy().reshape(-1).tolist() != [0.0]:
            return self.refuse("unselected experts are not weighted by zero", b["zeros"])
        self._attrs = dict(top_k=k[0], normalize=int(b["normalize"]))
        return MatchResult()


class FuseMoE(FusionPass):
    """Fuse each sparse MoE block (router, top-k, experts, gated shared expert) into one qwen.MoE.

    The exporter evaluates every expert and weights the unselected ones by zero; the fused op is free to
    compute only the selected ones. Dense MLP layers (no router) are left as they are.
    """

    name = "fuse-moe"
    rule = MoERule
