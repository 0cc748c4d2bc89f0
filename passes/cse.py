"""Common-subexpression elimination (onnx_ir's pass)."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common

from qwen_export.passes.base import QwenPass


class EliminateCommonSubexpressions(QwenPass):
    """Merge nodes that compute the same op on the same inputs with the same attributes.

    Wraps onnx_ir's CommonSubexpressionEliminationPass (the top graph). After portable lowering it merges
    the per-layer copies of the mask arithmetic that inlining duplicates.
    """

    name = "cse"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, common.CommonSubexpressionEliminationPass()(model).modified)
