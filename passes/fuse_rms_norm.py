"""RMSNorm fusion: `x * 1/sqrt(mean(x^2) + eps) * scale` -> qwen.RMSNorm."""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from qwen_export.passes.functions import float_scalar
from qwen_export.passes.fusion import FusionPass, FusionRule, MatchResult


def rms_norm(op: Any, x: Any, scale: Any, epsilon: Any) -> Any:
    """The exporter's RMSNorm, as the reference computes it (the Add is named for the epsilon use)."""
    mean_square = op.ReduceMean(op.Pow(x, 2.0), [-1], keepdims=1)
    inv_rms = op.Reciprocal(op.Sqrt(op.Add(mean_square, epsilon, _outputs=["eps_add"])))
    return op.Mul(op.Mul(x, inv_rms), scale)


def check_norm(rule: FusionRule, x: ir.Value, scale: ir.Value, epsilon: ir.Value) -> MatchResult:
    if float_scalar(epsilon) is None:
        return rule.refuse("epsilon is not a constant float scalar", epsilon)
    if scale.const_value is None:
        return rule.refuse("scale is not an initializer", scale)
    if len(scale.const_value.shape) != 1:
        return rule.refuse("scale is not a vector", scale)
    if x.dtype not in (None, ir.DataType.FLOAT):
        return rule.refuse("normalised input is not fp32", x)
    last = x.shape[-1] if x.shape is not None and len(x.shape) else None
    if isinstance(last, int) and last != scale.const_value.shape[0]:
        return rule.refuse("scale length differs from the normalised axis", scale)
    return MatchResult()


class RMSNormRule(FusionRule):
    op = "RMSNorm"

    def pattern(self, op, x, scale, epsilon):
        return rms_norm(op, x, scale, epsilon)

    def check(self, context, x, scale, epsilon, **_) -> MatchResult:
        return check_norm(self, x, scale, epsilon)

    def rewrite(self, op, x, scale, epsilon, **_):
        return self.emit(op, x, scale, epsilon=float_scalar(epsilon))

    def attribute_uses(self, bindings):
        return [(bindings["eps_add"].producer(), 1, "epsilon")]


class FuseRMSNorm(FusionPass):
    """Fuse each RMSNorm (input, post-attention, final, q/k norms) into one qwen.RMSNorm.

    Matches `Mul(Mul(x, Reciprocal(Sqrt(Add(ReduceMean(Pow(x, 2), [-1]), eps)))), scale)` with a constant
    scalar epsilon and an initializer scale (the effective `1 + w` multiplier).
    """

    name = "fuse-rms-norm"
    rule = RMSNormRule
