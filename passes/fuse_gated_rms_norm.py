"""GatedRMSNorm fusion: `RMSNorm(x; scale, eps) * silu(z)` -> qwen.GatedRMSNorm."""

from __future__ import annotations

from qwen_export.passes.functions import float_scalar
from qwen_export.passes.fuse_rms_norm import check_norm, rms_norm
from qwen_export.passes.fusion import FusionPass, FusionRule, MatchResult


class GatedRMSNormRule(FusionRule):
    op = "GatedRMSNorm"

    def pattern(self, op, x, z, scale, epsilon):
        return op.Mul(rms_norm(op, x, scale, epsilon), op.Mul(z, op.Sigmoid(z)))

    def check(self, context, x, z, scale, epsilon, **_) -> MatchResult:
        return check_norm(self, x, scale, epsilon)

    def rewrite(self, op, x, z, scale, epsilon, **_):
        return self.emit(op, x, z, scale, epsilon=float_scalar(epsilon))

    def attribute_uses(self, bindings):
        return [(bindings["eps_add"].producer(), 1, "epsilon")]


class FuseGatedRMSNorm(FusionPass):
    """Fuse the SiLU-gated RMSNorm (the DeltaNet output norm) into one qwen.GatedRMSNorm.

    Matches `Mul(RMSNorm(x; scale, eps), Mul(z, Sigmoid(z)))`. Runs before fuse-rms-norm, which would
    otherwise take the inner norm.
    """

    name = "fuse-gated-rms-norm"
    rule = GatedRMSNormRule
