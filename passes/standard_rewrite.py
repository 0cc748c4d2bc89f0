"""Rewrites into standard or ONNX Runtime ops (no qwen op, no function): onnxscript rules applied in place.

The vision tower's blocks have fused ops in ONNX itself (opset-23 Attention) and in ONNX Runtime's contrib
set (FastGelu, BiasGelu), so their passes rewrite straight into those instead of going through a qwen op.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, ClassVar

import onnx_ir as ir

from qwen_export.passes.base import PassStats, QwenPass
from qwen_export.passes.onnxscript_adapter import MatchResult, RewriteRuleClassBase, RewriteRuleSet


class StandardRule(RewriteRuleClassBase):
    """A rule whose `check` refusals are counted by reason (the pass's `stats.kept`); `kind` names what it
    emits in `stats.fired`."""

    kind: ClassVar[str]

    def __init__(self) -> None:
        super().__init__(name=type(self).__name__)
        self.refusals: Counter[str] = Counter()

    def refuse(self, reason: str, *where: ir.Node | ir.Value | None) -> MatchResult:
        self.refusals[reason] += 1
        return MatchResult().fail(reason, [w for w in where if w is not None])


class StandardRewritePass(QwenPass):
    """Applies each of `rules` to the top graph until none matches; counts what fired per rule kind."""

    rules: ClassVar[tuple[type[StandardRule], ...]]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.stats = PassStats()
        for rule_cls in self.rules:
            rule = rule_cls()
            fired = RewriteRuleSet([rule.rule()]).apply_to_model(model)
            self.stats.fire(rule.kind, fired)
            for reason, count in rule.refusals.items():
                self.stats.keep(reason, count)
        self.prepare_opsets(model)
        return ir.passes.PassResult(model, self.stats.fired_total > 0)

    def prepare_opsets(self, model: ir.Model) -> None:
        """Opset imports the emitted ops need (a pass that emits contrib ops adds their domain)."""


def scalar(value: ir.Value) -> Any:
    """A constant scalar's Python value, or None."""
    const = value.const_value
    if const is None or const.size != 1:
        return None
    return const.numpy().reshape(()).item()
