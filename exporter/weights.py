"""Graph initializers drawn from checkpoint tensors, checked against the shapes config.json implies."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from qwen_export.exporter.builder import GraphBuilder
from qwen_export.exporter.checkpoint import Checkpoint, Transform


class Weights:
    """Turns checkpoint tensors under `prefix` into graph initializers named without the prefix."""

    def __init__(self, gb: GraphBuilder, ckpt: Checkpoint, prefix: str):
        self.gb = gb
        self.ckpt = ckpt
        self.prefix = prefix

    def full_name(self, name: str) -> str:
        return name if name.startswith("lm_head") else self.prefix + name

    def derived(
        self,
        graph_name: str,
        sources: Sequence[tuple[str, Sequence[int]]],
        shape: Sequence[int],
        transform: Transform | None = None,
    ) -> ir.Value:
        full = [self.full_name(s) for s, _ in sources]
        for f, (_, s_shape) in zip(full, sources, strict=True):
            self.ckpt.require(f, s_shape)
        tensor = self.ckpt.lazy(full, shape, transform, name=graph_name)
        return self.gb.initializer(graph_name, tensor)

    def linear_t(self, name: str, out_features: int, in_features: int) -> ir.Value:
        """nn.Linear weight [out, in] stored transposed [in, out] for MatMul."""
        return self.derived(
            name + ".T", [(name, (out_features, in_features))], (in_features, out_features), lambda a: a[0].T
        )

    def vector(self, name: str, size: int) -> ir.Value:
        return self.derived(name, [(name, (size,))], (size,))

    def optional_vector(self, name: str, size: int) -> ir.Value | None:
        return self.vector(name, size) if self.ckpt.has(self.full_name(name)) else None

    def zero_centred_scale(self, name: str, size: int) -> ir.Value:
        """Qwen3.5 RMSNorm weights are stored centred at zero; the graph multiplies by (1 + w)."""
        return self.derived(name + ".plus_one", [(name, (size,))], (size,), lambda a: 1.0 + a[0])


def stack_experts(arrays: list[np.ndarray]) -> np.ndarray:
    return np.stack(arrays, axis=0)


def stack_gate_up(gates: list[np.ndarray], ups: list[np.ndarray]) -> np.ndarray:
    """Per-expert gate/up [I, H] -> [E, H, 2I] (gate columns, then up columns), as a view over one
    [E, 2, I, H] buffer: one copy, and a later re-layout composes with the view."""
    i, h = gates[0].shape
    buf = np.empty((len(gates), 2, i, h), np.float32)
    for k, (gate, up) in enumerate(zip(gates, ups, strict=True)):
        buf[k, 0], buf[k, 1] = gate, up
    return buf.reshape(len(gates), 2 * i, h).transpose(0, 2, 1)
