"""Initializer deduplication (onnx_ir's pass)."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common

from qwen_export.passes.base import PassStats, QwenPass

SIZE_LIMIT = 1024  # elements: only small tensors are compared, so weights are never read for this


class DeduplicateInitializers(QwenPass):
    """Merge initializers of up to 1024 elements that hold identical data (same dtype, shape and bytes).

    Wraps onnx_ir's DeduplicateInitializersPass; large weights are skipped without being read.
    """

    name = "dedup-initializers"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = len(model.graph.initializers)
        common.DeduplicateInitializersPass(size_limit=SIZE_LIMIT)(model)
        self.stats = PassStats(extras={"merged": before - len(model.graph.initializers)})
        return ir.passes.PassResult(model, before != len(model.graph.initializers))
