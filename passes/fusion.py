"""Fusion machinery: an onnxscript rewrite rule per qwen op, applied so that each block becomes one call.

A `FusionRule` is an onnxscript `RewriteRuleClassBase`: `pattern` is the block in standard ops (written
like the math), `check` refuses a structural match and says why, `rewrite` emits exactly one qwen node.
`FusionPass` applies a rule to the top graph: every matched block becomes one call to a model-local
function in domain `qwen` whose body is the matched ops (see `functions.py`). onnxscript's own
`as_function` cannot do this here: it refuses blocks holding a Scan body, and it cannot let the body read
the sequence length from the op's own input instead of `input_ids`.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import onnx_ir as ir
from onnxscript.rewriter import _basics
from onnxscript.rewriter._matcher import SimplePatternMatcher
from onnxscript.rewriter._rewrite_rule import ReplacementSubgraph, RewriteRule, RewriteRuleClassBase

from qwen_export.passes.base import QwenPass
from qwen_export.passes.functions import extract_function, qwen_op_counts, register_function, scope_of
from qwen_export.passes.qwen_ops import DOMAIN, OPS, VERSION, is_qwen, problems

MatchResult = _basics.MatchResult


class FusionRule(RewriteRuleClassBase):
    """Base of the qwen fusion rules; subclasses set `op` and write pattern/check/rewrite."""

    op: ClassVar[str]

    def __init__(self) -> None:
        # Blocks share prefix nodes (mask, rotary tables) with other layers; those stay until unused.
        super().__init__(name=type(self).__name__, remove_nodes=False)
        self.refusals: Counter[str] = Counter()

    def refuse(self, reason: str, *where: ir.Node | ir.Value | None) -> MatchResult:
        """A failed check: counted under `reason` in the pass's stats, and visible to onnxscript's tracer."""
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

    def aliases(self, bindings: Mapping[str, Any]) -> dict[ir.Value, int]:
        """Outer values the body reads through a fused-op input instead (value -> input index)."""
        return {}

    def attribute_uses(self, bindings: Mapping[str, Any]) -> list[tuple[ir.Node, int, str]]:
        """(node, input index, float attribute): where the body reads an attribute instead of a constant."""
        return []


class NearbyOutputsMatcher(SimplePatternMatcher):
    """onnxscript's matcher, except that a pattern's further output nodes (DeltaNet's conv-state Slice) are
    looked for among the consumers of values the first output node's match bound, rather than among every
    node of the graph, which made matching quadratic in the layer count."""

    def match(self, model, graph_or_function, node, *, verbose=0, remove_nodes=True, tracer=None):
        if self.pattern.has_single_output_node:
            return super().match(
                model, graph_or_function, node, verbose=verbose, remove_nodes=remove_nodes, tracer=tracer
            )
        self._tracer = tracer
        graph = graph_or_function
        self._graph = graph if isinstance(graph, ir.Graph) else graph.graph
        first, *rest = self.pattern.output_nodes
        self._init_match(verbose)
        if not self._match_node(first, node):
            return self._match
        near = {user for v in self._match.value_bindings.values() if v is not None for user, _ in v.uses()}
        candidates = [[n for n in near if p.op_identifier() in (None, n.op_identifier())] for p in rest]
        match = MatchResult().fail("the pattern's other outputs are not computed next to its first")
        for combination in itertools.product(*candidates):
            self._init_match(verbose)
            match = self._multi_match([node, *combination], check_removable=remove_nodes)
            if match:
                return match
        return match


class FusionPass(QwenPass):
    """Base of the fusion passes: applies `rule` to the top graph; `stats` has fired/refused counts."""

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
        self.stats = {
            "fired": {rule_obj.op: fired},
            "refused": dict(rule_obj.refusals),
            "qwen_ops": {k: dict(sorted(v.items())) for k, v in counts.items()},
        }
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
