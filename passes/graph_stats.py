"""Graph size and op histograms, counted in the top graph, its subgraphs and model-local functions."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import onnx_ir as ir


def op_key(node: ir.Node) -> str:
    return f"{node.domain}.{node.op_type}" if node.domain else node.op_type


def _subgraph_nodes(nodes) -> list[ir.Node]:
    found = []
    for node in nodes:
        for attr in node.attributes.values():
            if attr.is_ref():
                continue
            if attr.type == ir.AttributeType.GRAPH:
                found += list(ir.traversal.RecursiveGraphIterator(attr.as_graph()))
            elif attr.type == ir.AttributeType.GRAPHS:
                for g in attr.as_graphs():
                    found += list(ir.traversal.RecursiveGraphIterator(g))
    return found


@dataclass(frozen=True)
class NodeCounts:
    """`graph`: top-level nodes; `subgraphs`: nodes in their control-flow bodies; `functions`: nodes in
    model-local function bodies (their subgraphs included), each function counted once."""

    graph: int
    subgraphs: int
    functions: int

    @property
    def total(self) -> int:
        return self.graph + self.subgraphs + self.functions

    def to_json(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def node_counts(model: ir.Model) -> NodeCounts:
    top = list(model.graph)
    in_functions = 0
    for f in model.functions.values():
        body = list(f)
        in_functions += len(body) + len(_subgraph_nodes(body))
    return NodeCounts(len(top), len(_subgraph_nodes(top)), in_functions)


def op_histogram(model: ir.Model, everywhere: bool = False) -> Counter:
    """Op counts in the top graph, or (everywhere) also in subgraphs and function bodies."""
    nodes = list(model.graph)
    if everywhere:
        nodes += _subgraph_nodes(nodes)
        for f in model.functions.values():
            body = list(f)
            nodes += body + _subgraph_nodes(body)
    return Counter(op_key(n) for n in nodes)


def histogram_delta(before: Counter, after: Counter) -> dict[str, int]:
    """Nonzero count changes, largest first."""
    keys = set(before) | set(after)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in keys}
    return dict(sorted(((k, v) for k, v in delta.items() if v), key=lambda kv: (-abs(kv[1]), kv[0])))
