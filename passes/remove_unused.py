"""Dead-code elimination (onnx_ir's passes)."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common

from qwen_export.passes.base import QwenPass


class RemoveUnused(QwenPass):
    """Remove nodes, model-local functions and opset imports nothing uses.

    Wraps onnx_ir's RemoveUnusedNodesPass, RemoveUnusedFunctionsPass and RemoveUnusedOpsetsPass.
    """

    name = "remove-unused"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for p in (
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(),
        ):
            modified |= p(model).modified
        return ir.passes.PassResult(model, modified)
