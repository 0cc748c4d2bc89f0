"""ONNX shape inference (onnx_ir's pass)."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common

from qwen_export.passes.base import QwenPass


class InferShapes(QwenPass):
    """Annotate value types and shapes with ONNX shape inference (weights are not serialized for it).

    Wraps onnx_ir's ShapeInferencePass; names symbolic dims where ONNX can, which helps runtimes plan memory.
    """

    name = "infer-shapes"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, common.ShapeInferencePass()(model).modified)
