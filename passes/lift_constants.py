"""Constant nodes to initializers (onnx_ir's pass)."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common

from qwen_export.passes.base import QwenPass


class LiftConstants(QwenPass):
    """Turn Constant nodes (those inlined function bodies bring) into initializers of their graph.

    Wraps onnx_ir's LiftConstantsToInitializersPass; dedup-initializers and cse then merge the copies.
    """

    name = "lift-constants"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        result = common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
        return ir.passes.PassResult(model, result.modified)
