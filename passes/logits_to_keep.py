"""The vocabulary projection on the positions the caller asks for: a `logits_to_keep` graph input.

Generation needs only the last position's logits, and on the CPU the lm_head of a long prefill is a large
share of the work (a 2048-token prefill of small-qwen3.5-moe: 67 of its 200 G int4 multiply-adds). The input
is an int64 scalar with a default of 0 (an initializer that is also a graph input, which ONNX Runtime lets a
run override): 0 keeps every position, as transformers' `logits_to_keep=0` does, so every caller that feeds
nothing (the checks, `validate`, `diff`) gets the full [B, T, V] logits; N keeps the last N positions. The
runtime's generation steps (`OrtDecoder.step_bound`) feed 1.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qwen_export.passes.base import PassStats, QwenPass

LOGITS_TO_KEEP = "logits_to_keep"
# The ops that can be the vocabulary projection: before and after weight quantization and the CPU kernels.
PROJECTIONS = {("", "MatMul"), ("com.microsoft", "MatMulNBits"), ("qwen.cpu", "Int4Linear")}


class LogitsToKeep(QwenPass):
    """Add the `logits_to_keep` input (int64 scalar, default 0 = every position): the lm_head reads only the
    last N positions of the final hidden states when a run feeds N."""

    name = "logits-to-keep"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.stats = PassStats()
        graph = model.graph
        logits = next((v for v in graph.outputs if v.name == "logits"), None)
        head = logits.producer() if logits is not None else None
        if head is None or (head.domain, head.op_type) not in PROJECTIONS:
            self.stats.keep("logits do not come straight from a vocabulary projection")
            return ir.passes.PassResult(model, False)
        if any(v.name == LOGITS_TO_KEEP for v in graph.inputs):
            return ir.passes.PassResult(model, False)
        keep = ir.Value(name=LOGITS_TO_KEEP, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]))
        keep.const_value = ir.tensor(np.array(0, np.int64), name=LOGITS_TO_KEEP)
        graph.inputs.append(keep)
        graph.register_initializer(keep)

        def const(name: str, values: list[int]) -> ir.Value:
            node = ir.node("Constant", [], attributes={"value": ir.tensor(np.array(values, np.int64))})
            node.name = node.outputs[0].name = f"/lm_head/logits_to_keep/{name}"
            graph.insert_before(head, node)
            return node.outputs[0]

        axes, ends = const("axes", [0]), const("ends", [np.iinfo(np.int64).max])
        nodes = [ir.node("Neg", [keep])]
        nodes.append(ir.node("Unsqueeze", [nodes[-1].outputs[0], axes]))
        hidden = head.inputs[0]
        nodes.append(ir.node("Slice", [hidden, nodes[-1].outputs[0], ends, const("sequence_axis", [1])]))
        for node in nodes:
            node.name = node.outputs[0].name = f"/lm_head/logits_to_keep/{node.op_type}"
            graph.insert_before(head, node)
        head.replace_input_with(0, nodes[-1].outputs[0])
        self.stats.fire("Slice")
        return ir.passes.PassResult(model, True)
