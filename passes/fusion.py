"""Fusion machinery: an onnxscript rewrite rule per qwen op, applied so that each block becomes one call.

A `FusionRule` is an onnxscript `RewriteRuleClassBase`: `pattern` is the block in standard ops (written
like the math), `check` refuses a structural match and says why, `rewrite` emits exactly one qwen node.
`FusionPass` applies a rule to the top graph: every matched block becomes one call to a model-local
function in domain `qwen` whose body is the matched ops (see `functions.py`). onnxscript's own
`as_function` cannot do this here: it refuses blocks holding a Scan body, and it cannot let the body read
the sequence length from the op's own input instead of `input_ids`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import onnx_ir as ir

from qwen_export.passes.base import PassStats, QwenPass
from qwen_export.passes.functions import extract_function, qwen_op_counts, register_function, scope_of
from qwen_export.passes.onnxscript_adapter import (
    MatchResult,
    NearbyOutputsMatcher,
    ReplacementSubgraph,
    RewriteRule,
    RewriteRuleClassBase,
)
from qwen_export.passes.qwen_ops import DOMAIN, OPS, VERSION, is_qwen, problems


class FusionRule(RewriteRuleClassBase):
    """Base of the qwen fusion rules; subclasses set `op` and write pattern/check/rewrite."""

    op: ClassVar[str]

    def __init__(self) -> None:
        # Blocks share prefix nodes (mask, rotary tables) with other layers; those stay until unused.
        super().__init__(name=type(self).__name__, remove_nodes=False)
        self.refusals: Counter[str] = Counter()

    def refuse(self, reason: str, *where: ir.Node | ir.Value | None) -> MatchResult:
        """A failed check: counted under `reason` in the pass's `stats.kept`, and visible to onnxscript's
        tracer."""
        self.refusals[reason] += 1
        return MatchResult().fail(reason, [w for w in where if w is not None])

    def emit(self, op: Any, *inputs: ir.Value | None, **attributes: Any) -> ir.Value | Sequence[ir.Value]:
        """The one qwen node of this rule, inputs in docs/ops.md order."""
        sig = OPS[self.op]
        if len(inputs) != len(sig.inputs) or set(attributes) != set(sig.attributes):
            raise TypeError(f"qwen.{self.op} takes {sig.inputs} and attributes {sig.attributes}")
        return getattr(op, self.op)(
            *inputs, _domain=DOMAIN, _version=VERSION, _outputs=len(sig.outputs), **attributes
        )

    def rewrite(self, op: Any, **bound: Any) -> ir.Value | Sequence[ir.Value]:
        """The one qwen node: its inputs are the match's values named like the op's inputs (`X` and `Z`
        bind as `x` and `z`), its attributes what `check` derived (`self._attrs`). Rules whose attributes
        come from the match itself (the norms' epsilon) write their own."""
        inputs = [bound[name] if name in bound else bound[name.lower()] for name in OPS[self.op].inputs]
        return self.emit(op, *inputs, **self._attrs)

    def aliases(self, bindings: Mapping[str, Any]) -> dict[ir.Value, int]:
        """Outer values the body reads through a fused-op input instead (value -> input index)."""
        return {}

    def attribute_uses(self, bindings: Mapping[str, Any]) -> list[tuple[ir.Node, int, str]]:
        """(node, input index, float attribute): where the body reads an attribute instead of a constant."""
        return []


class FusionPass(QwenPass):
    """Base of the fusion passes: applies `rule` to the top graph; `stats` counts fired and kept (refused,
    with the reason) blocks."""

    rule: ClassVar[type[FusionRule]]

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        rule_obj = self.rule()
        rule = RewriteRule(
            rule_obj.pattern,
            rule_obj.rewrite,
            rule_obj.check,
            matcher=NearbyOutputsMatcher,
            name=rule_obj.name,
            remove_nodes=False,
        )
        graph = model.graph
        names = {n.name for n in graph}
        fired = 0
        for node in list(graph):
            if node.graph is not graph:  # consumed by an earlier match
                continue
            delta = rule.try_rewrite(model, graph, node)
            if delta is None:
                continue
            self._apply(model, delta, rule_obj, names)
            fired += 1
        if fired:
            graph.sort()
        counts = qwen_op_counts(model)
        self.stats = PassStats(
            fired={rule_obj.op: fired},
            kept=dict(rule_obj.refusals),
            extras={"qwen_ops": {k: dict(sorted(v.items())) for k, v in counts.items()}},
        )
        return ir.passes.PassResult(model, fired > 0)

    def ensures(self, model: ir.Model) -> None:
        found = [p for n in model.graph if is_qwen(n) for p in problems(n)]
        if found:
            raise ir.passes.PostconditionError("; ".join(found))

    @staticmethod
    def _apply(model: ir.Model, delta: ReplacementSubgraph, rule: FusionRule, names: set[str]) -> None:
        graph = model.graph
        if (
            len(delta.new_nodes) != 1
            or delta.new_nodes[0].domain != DOMAIN
            or delta.new_nodes[0].op_type != rule.op
        ):
            raise TypeError(f"{rule.name}.rewrite must emit exactly one qwen.{rule.op} node")
        call = delta.new_nodes[0]
        order = {n: i for i, n in enumerate(graph)}
        matched = sorted(delta.match.nodes, key=order.__getitem__)
        scope = scope_of(delta.match.outputs[0].producer().name)
        call.name = _unique(f"{scope}{rule.op}", names)
        bindings = delta.match.bindings
        function = extract_function(
            call,
            matched,
            delta.match.outputs,
            scope,
            graph.opset_imports.get("", 23),
            rule.aliases(bindings),
            rule.attribute_uses(bindings),
        )
        call.overload = register_function(model, function).overload
        ir.convenience.replace_nodes_and_values(
            graph, matched[-1], [], [call], delta.match.outputs, call.outputs
        )
        for node in reversed(matched):  # shared prefix nodes stay while other blocks still read them
            if all(not v.uses() and not v.is_graph_output() for v in node.outputs):
                graph.remove(node, safe=True)


def _unique(base: str, names: set[str]) -> str:
    k = 0
    while f"{base}_{k}" in names:
        k += 1
    names.add(f"{base}_{k}")
    return f"{base}_{k}"
