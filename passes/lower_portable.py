"""Portable lowering: every qwen op becomes its standard-ONNX body (the model-local function it calls)."""

from __future__ import annotations

import onnx_ir as ir

from qwen_export.passes.base import PassStats, QwenPass
from qwen_export.passes.functions import inline_call
from qwen_export.passes.qwen_ops import DOMAIN


class LowerPortable(QwenPass):
    """Lower qwen ops to standard ONNX by inlining their model-local functions (nested calls too).

    Inlined nodes are named `<call name>/<body name>` (for example
    `/layers.0/linear_attn/GatedDeltaNet_0/conv/Conv_0`), so they keep the decoder-layer scope. The qwen
    functions and the `qwen` opset import are removed; the result runs on any ONNX runtime.
    """

    name = "lower-portable"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.stats = PassStats()
        while calls := [n for n in model.graph if n.domain == DOMAIN]:
            for call in calls:
                self.stats.fire(call.op_type)
                inline_call(model, call)
        inlined = self.stats.fired_total
        removed = [key for key in model.functions if key[0] == DOMAIN]
        for key in removed:
            del model.functions[key]
        model.graph.opset_imports.pop(DOMAIN, None)
        model.opset_imports.pop(DOMAIN, None)
        self.stats.extras["functions_removed"] = len(removed)
        return ir.passes.PassResult(model, bool(inlined or removed))

    def ensures(self, model: ir.Model) -> None:
        left = sorted(
            {n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.domain == DOMAIN}
        )
        if left:
            raise ir.passes.PostconditionError(f"qwen ops left after portable lowering: {left}")
