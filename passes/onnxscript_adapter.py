"""The one place qwen-export touches onnxscript's rewriter, private parts included.

Written for onnxscript==0.7.2, the pin in pyproject.toml (`PINNED_ONNXSCRIPT`). Every other module imports
the rewriter through this one, and `tests/test_onnxscript_adapter.py` fails if any other file imports a
private onnxscript module. When the pin moves, run `check_onnxscript_shape()` (the test does): each line it
returns names one private piece below that changed shape, and this module is what to update.

Public names (re-exported from `onnxscript.rewriter.pattern`): `MatchResult`, `OrValue`, `Pattern`,
`RewriteRule`, `RewriteRuleClassBase`, `RewriteRuleSet`, `SimplePatternMatcher`, `Var`.

Private names, and why each is needed:

- `onnxscript.rewriter._rewrite_rule.ReplacementSubgraph`: what `RewriteRule.try_rewrite` returns.
  `FusionPass` calls `try_rewrite` itself instead of letting a `RewriteRuleSet` splice the replacement in,
  because it wraps the matched block in a model-local function; it reads the fields `new_nodes` and
  `match` (and `match.nodes`, `.outputs`, `.bindings`). `onnxscript.rewriter.pattern` does not export it.
- `SimplePatternMatcher._init_match(verbose)`, `._match_node(pattern_node, node)`,
  `._multi_match(candidate, check_removable=...)` and the instance attributes `_match` (the `MatchResult`
  `_init_match` creates and `_match_node` fills), `_graph` (the graph `_match_node` requires bound values
  to belong to) and `_tracer` (set by `match`, mirrored here): `NearbyOutputsMatcher` overrides `match`
  for patterns with several output nodes. onnxscript 0.7.2 tries every combination of same-op nodes of the
  whole graph for the further output nodes, which is quadratic in the layer count for DeltaNet's conv-state
  Slice; the override looks only among the consumers of values the first output node's match bound, then
  reuses onnxscript's own per-node matching through these private methods.
- `GraphPattern.output_nodes` / `.has_single_output_node` and `NodePattern.op_identifier()` (onnxscript's
  private `_pattern_ir`, reached through `self.pattern`; never imported): how the override finds the
  pattern's output nodes and filters candidates by op.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import onnx_ir as ir

ADAPTER = "qwen_export.passes.onnxscript_adapter"
PINNED_ONNXSCRIPT = "0.7.2"  # keep equal to the onnxscript pin in pyproject.toml (a test checks)


def installed_onnxscript_version() -> str:
    """The onnxscript version installed here, or a word saying why there is none."""
    try:
        return importlib.metadata.version("onnxscript")
    except importlib.metadata.PackageNotFoundError:
        try:
            return str(importlib.import_module("onnxscript").__version__)
        except Exception:  # any failure means "unknown" here
            return "not installed"


try:
    from onnxscript.rewriter._rewrite_rule import ReplacementSubgraph
    from onnxscript.rewriter.pattern import (
        MatchResult,
        OrValue,
        Pattern,
        RewriteRule,
        RewriteRuleClassBase,
        RewriteRuleSet,
        SimplePatternMatcher,
        Var,
    )
except ImportError as exc:
    raise ImportError(
        f"{ADAPTER} could not import from onnxscript ({exc}); installed onnxscript is "
        f"{installed_onnxscript_version()}, the adapter is written for onnxscript=={PINNED_ONNXSCRIPT} "
        f"(pyproject.toml pin): install the pinned version or update {ADAPTER}"
    ) from exc

__all__ = [
    "ADAPTER",
    "PINNED_ONNXSCRIPT",
    "MatchResult",
    "NearbyOutputsMatcher",
    "OrValue",
    "Pattern",
    "ReplacementSubgraph",
    "RewriteRule",
    "RewriteRuleClassBase",
    "RewriteRuleSet",
    "SimplePatternMatcher",
    "Var",
    "check_onnxscript_shape",
    "installed_onnxscript_version",
]


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


# --- shape check -------------------------------------------------------------------------------------------

_PUBLIC = "onnxscript.rewriter.pattern"
_PRIVATE = "onnxscript.rewriter._rewrite_rule"

# (module, names) this adapter imports.
_IMPORTS: dict[str, tuple[str, ...]] = {
    _PUBLIC: (
        "MatchResult",
        "OrValue",
        "Pattern",
        "RewriteRule",
        "RewriteRuleClassBase",
        "SimplePatternMatcher",
        "Var",
    ),
    _PRIVATE: ("ReplacementSubgraph",),
}

# (class, method, positional parameter names after self, keyword parameters): how this project calls it.
_CALLS: tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("SimplePatternMatcher", "__init__", ("pattern",), ()),
    (
        "SimplePatternMatcher",
        "match",
        ("model", "graph_or_function", "node"),
        ("verbose", "remove_nodes", "tracer"),
    ),
    ("SimplePatternMatcher", "_init_match", ("verbose",), ()),
    ("SimplePatternMatcher", "_match_node", ("pattern_node", "node"), ()),
    ("SimplePatternMatcher", "_multi_match", ("candidate",), ("check_removable",)),
    ("MatchResult", "fail", ("reason", "failure_source"), ()),
    (
        "RewriteRule",
        "__init__",
        ("target_pattern", "replacement_pattern", "condition_function"),
        ("matcher", "name", "remove_nodes"),
    ),
    ("RewriteRule", "try_rewrite", ("model", "graph_or_function", "node"), ()),
    ("RewriteRuleClassBase", "__init__", (), ("name", "remove_nodes")),
    ("Pattern", "__init__", ("target_pattern",), ("name",)),
    ("Pattern", "match", ("model", "graph_or_function", "node"), ("check_nodes_are_removable",)),
)

# Instance attributes of SimplePatternMatcher that NearbyOutputsMatcher sets or reads, as onnxscript's own
# matcher code must still spell them for the override to stay equivalent.
_MATCHER_ATTRIBUTES = ("_match", "_graph", "_tracer")
_MATCH_RESULT_PROPERTIES = ("nodes", "outputs", "bindings", "value_bindings", "reason")
_REPLACEMENT_FIELDS = ("match", "new_nodes", "new_outputs")


def check_onnxscript_shape() -> list[str]:
    """One line per private (or relied-on) piece of onnxscript that is missing or changed shape; [] when
    the installed onnxscript still has the shape this adapter is written for."""
    problems: list[str] = []

    def problem(what: str) -> None:
        problems.append(
            f"{ADAPTER}: {what} (installed onnxscript {installed_onnxscript_version()}, adapter written for "
            f"{PINNED_ONNXSCRIPT}); update {ADAPTER}"
        )

    found: dict[str, Any] = {}
    for module_name, names in _IMPORTS.items():
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # report any import failure as a problem line
            problem(f"module {module_name} cannot be imported ({type(exc).__name__}: {exc})")
            continue
        for name in names:
            if hasattr(module, name):
                found[name] = getattr(module, name)
            else:
                problem(f"{module_name}.{name} is missing")

    for cls_name, method, positional, keywords in _CALLS:
        cls = found.get(cls_name)
        if cls is None:
            continue  # already reported
        _check_call(problem, cls, f"{cls_name}.{method}", method, positional, keywords)

    matcher = found.get("SimplePatternMatcher")
    if matcher is not None:
        try:
            source = inspect.getsource(matcher)
        except (OSError, TypeError) as exc:
            problem(f"source of SimplePatternMatcher cannot be read to check its attributes ({exc})")
        else:
            for attribute in _MATCHER_ATTRIBUTES:
                if f"self.{attribute}" not in source:
                    problem(f"SimplePatternMatcher no longer uses the instance attribute {attribute}")

    result = found.get("MatchResult")
    if result is not None:
        for prop in _MATCH_RESULT_PROPERTIES:
            if not hasattr(result, prop):
                problem(f"MatchResult.{prop} is missing")

    replacement = found.get("ReplacementSubgraph")
    if replacement is not None:
        fields = (
            {f.name for f in dataclasses.fields(replacement)}
            if dataclasses.is_dataclass(replacement)
            else set(getattr(replacement, "__annotations__", {}))
        )
        for field in _REPLACEMENT_FIELDS:
            if field not in fields:
                problem(f"ReplacementSubgraph field {field} is missing")

    if not problems:  # the pieces exist; now check that they still behave as the adapter expects
        for what in _smoke_match(found):
            problem(what)
    return problems


def _check_call(
    problem: Callable[[str], None],
    cls: type,
    label: str,
    method: str,
    positional: Sequence[str],
    keywords: Sequence[str],
) -> None:
    func = inspect.getattr_static(cls, method, None)
    if func is None:
        problem(f"{label} is missing")
        return
    try:
        signature = inspect.signature(getattr(cls, method))
    except (TypeError, ValueError) as exc:
        problem(f"{label} has no readable signature ({exc})")
        return
    params = list(signature.parameters.values())[1:]  # drop self
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if list(positional) != names[: len(positional)]:
        problem(f"{label} takes ({', '.join(names)}) where the adapter passes ({', '.join(positional)})")
        return
    try:
        signature.bind(None, *[None] * len(positional), **dict.fromkeys(keywords))
    except TypeError as exc:
        problem(
            f"{label}{signature} no longer accepts the adapter's call "
            f"({len(positional)} positional, keywords {list(keywords)}): {exc}"
        )


def _smoke_match(found: Mapping[str, Any]) -> list[str]:
    """Match a tiny two-output pattern through NearbyOutputsMatcher and `try_rewrite`, and a one-output one
    through `Pattern.match`; the lines say what did not come out as onnxscript 0.7.2 gives it."""

    def two_outputs(op, x):
        a = op.Relu(x)
        return op.Neg(a), op.Abs(a)

    def replacement(op, x):
        return op.Sigmoid(x), op.Tanh(x)

    def one_output(op, x):
        return op.Neg(op.Relu(x))

    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]))
    relu = ir.Node("", "Relu", [x], name="relu")
    neg = ir.Node("", "Neg", relu.outputs, name="neg")
    absolute = ir.Node("", "Abs", relu.outputs, name="abs")
    graph = ir.Graph(
        [x], [neg.outputs[0], absolute.outputs[0]], nodes=[relu, neg, absolute], opset_imports={"": 23}
    )
    model = ir.Model(graph, ir_version=10)
    lines: list[str] = []
    try:
        rule = found["RewriteRule"](
            two_outputs, replacement, None, matcher=NearbyOutputsMatcher, name="smoke", remove_nodes=False
        )
        delta = rule.try_rewrite(model, graph, neg)
        if not isinstance(delta, found["ReplacementSubgraph"]):
            lines.append(
                f"RewriteRule.try_rewrite with NearbyOutputsMatcher returned {type(delta).__name__} for a "
                "two-output pattern, not a ReplacementSubgraph"
            )
        else:
            if len(delta.new_nodes) != 2:
                lines.append(f"ReplacementSubgraph.new_nodes has {len(delta.new_nodes)} nodes, not 2")
            if set(delta.match.nodes) != {relu, neg, absolute}:
                lines.append("ReplacementSubgraph.match.nodes is not the matched nodes")
            if list(delta.match.outputs) != [neg.outputs[0], absolute.outputs[0]]:
                lines.append("ReplacementSubgraph.match.outputs is not the pattern's outputs")
            if delta.match.bindings.get("x") is not x:
                lines.append("ReplacementSubgraph.match.bindings does not bind the pattern input")
        if rule.try_rewrite(model, graph, absolute) is not None:
            lines.append("NearbyOutputsMatcher matched a node that is not the pattern's first output")
        single = found["Pattern"](one_output, name="smoke_single").match(
            model, graph, neg, check_nodes_are_removable=False
        )
        if not single or single.bindings.get("x") is not x:
            lines.append("Pattern.match no longer matches a one-output pattern and binds its input")
        failed = found["MatchResult"]().fail("smoke reason", [neg])
        if failed or failed.reason != "smoke reason":
            lines.append("MatchResult().fail(reason, nodes) no longer gives a failed match with that reason")
    except Exception as exc:  # any exception is a shape change to report
        lines.append(f"matching through the adapter raised {type(exc).__name__}: {exc}")
    return lines
