"""Fresh value and initializer names for what a pass adds to a graph."""

from __future__ import annotations

from collections.abc import Iterable

import onnx_ir as ir


class UniqueNames:
    """Hands out `name` itself while it is free, else `name_1`, `name_2`, ...; remembers what it gave."""

    def __init__(self, taken: Iterable[str] = ()) -> None:
        self._taken = set(taken)

    @classmethod
    def of_graph(cls, graph: ir.Graph) -> UniqueNames:
        """Every name the graph's initializers, inputs and node outputs already use."""
        taken = {v.name for v in graph.initializers.values()} | {v.name for v in graph.inputs}
        return cls(taken | {out.name for node in graph for out in node.outputs if out.name})

    def __call__(self, name: str) -> str:
        candidate, n = name, 1
        while candidate in self._taken:
            candidate, n = f"{name}_{n}", n + 1
        self._taken.add(candidate)
        return candidate
