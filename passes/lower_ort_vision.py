"""The vision tower's ONNX Runtime lowering: bias + GELU -> com.microsoft FastGelu / BiasGelu.

ONNX Runtime's own optimizer makes the same fusions when its graph optimizations are on; doing it in the
artifact means the graph that is checked is the graph that runs, with optimizations on or off.
"""

from __future__ import annotations

import onnx_ir as ir

from qwen_export.passes.onnxscript_adapter import MatchResult
from qwen_export.passes.standard_rewrite import StandardRewritePass, StandardRule

MS_DOMAIN = "com.microsoft"


class _BiasGeluRule(StandardRule):
    approximate: str

    def pattern(self, op, x, bias):
        return op.Gelu(op.Add(x, bias), _outputs=["gelu"])

    def check(self, context, x, bias, gelu, **_) -> MatchResult:
        if gelu.producer().attributes.get_string("approximate", "none") != self.approximate:
            return MatchResult().fail("another GELU approximation")
        if bias.const_value is None or len(bias.const_value.shape) != 1:
            return self.refuse("the bias is not a constant vector", bias)
        last = x.shape[-1] if x.shape is not None and x.shape.rank() else None
        if isinstance(last, int) and last != bias.const_value.shape[0]:
            return self.refuse("the bias length differs from the last axis", bias)
        return MatchResult()


class FastGeluRule(_BiasGeluRule):
    kind = "FastGelu"
    approximate = "tanh"

    def rewrite(self, op, x, bias, **_):
        return op.FastGelu(x, bias, _domain=MS_DOMAIN)


class BiasGeluRule(_BiasGeluRule):
    kind = "BiasGelu"
    approximate = "none"

    def rewrite(self, op, x, bias, **_):
        return op.BiasGelu(x, bias, _domain=MS_DOMAIN)


class LowerVisionToOrt(StandardRewritePass):
    """Lower the vision tower's bias + GELU pairs to ONNX Runtime's contrib FastGelu (tanh approximation,
    the blocks' MLP) and BiasGelu (exact, the patch merger)."""

    name = "lower-vision-ort"
    rules = (FastGeluRule, BiasGeluRule)

    def prepare_opsets(self, model: ir.Model) -> None:
        if self.stats.fired_total:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            model.graph.opset_imports.setdefault(MS_DOMAIN, 1)
