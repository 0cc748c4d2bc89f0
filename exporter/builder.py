"""A thin convenience layer over onnx-ir for emitting graphs with scoped, readable node names."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

OPSET = 23
FLOAT = ir.DataType.FLOAT
INT64 = ir.DataType.INT64


class GraphBuilder:
    """Adds nodes to an `ir.Graph`; node names carry the module scope (`/layers.3/self_attn/MatMul_2`).

    The scope names match Hugging Face module paths so that later tools (diff, profile) can map nodes back
    to decoder layers.
    """

    def __init__(self, graph: ir.Graph, parent: GraphBuilder | None = None):
        self.graph = graph
        self._scopes: list[str] = []
        self._counts: dict[str, int] = {}
        # Subgraph builders share the root's constant cache only through their own initializers.
        self._consts: dict[tuple[Any, ...], ir.Value] = {}
        self._parent = parent

    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        self._scopes.append(name)
        try:
            yield
        finally:
            self._scopes.pop()

    def node_name(self, op_type: str) -> str:
        """A fresh scoped name for a node built elsewhere (the collectives)."""
        return self._node_name(op_type)

    def _node_name(self, op_type: str) -> str:
        prefix = "/" + "/".join(self._scopes) if self._scopes else ""
        key = f"{prefix}/{op_type}"
        n = self._counts.get(key, 0)
        self._counts[key] = n + 1
        return f"{key}_{n}"

    def op(self, op_type: str, *inputs: ir.Value | None, domain: str = "", **attrs: Any) -> ir.Value:
        return self.op_multi(op_type, inputs, 1, domain=domain, **attrs)[0]

    def op_multi(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        num_outputs: int,
        domain: str = "",
        **attrs: Any,
    ) -> Sequence[ir.Value]:
        attributes = [ir.convenience.convert_attribute(k, v) for k, v in attrs.items() if v is not None]
        node = ir.Node(
            domain,
            op_type,
            inputs,
            attributes=attributes,
            num_outputs=num_outputs,
            name=self._node_name(op_type),
        )
        self.graph.append(node)
        for i, out in enumerate(node.outputs):
            out.name = f"{node.name}/output_{i}"
        return node.outputs

    def initializer(self, name: str, tensor: ir.TensorProtocol) -> ir.Value:
        value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype))
        value.const_value = tensor
        self.graph.register_initializer(value)
        return value

    def const(self, data: Any, dtype: np.dtype | type = np.int64) -> ir.Value:
        """A small constant, shared by value within this graph."""
        array = np.asarray(data, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = f"const_{array.dtype.name}_{len(self._consts)}"
            self._consts[key] = self.initializer(name, ir.tensor(array, name=name))
        return self._consts[key]

    # --- common compositions -------------------------------------------------------------------
    def silu(self, x: ir.Value) -> ir.Value:
        return self.op("Mul", x, self.op("Sigmoid", x))

    def linear(self, x: ir.Value, weight_t: ir.Value, bias: ir.Value | None = None) -> ir.Value:
        y = self.op("MatMul", x, weight_t)
        return self.op("Add", y, bias) if bias is not None else y

    def reshape(self, x: ir.Value, shape: Sequence[int]) -> ir.Value:
        return self.op("Reshape", x, self.const(list(shape)))

    def slice(self, x: ir.Value, start: int, end: int, axis: int) -> ir.Value:
        return self.op("Slice", x, self.const([start]), self.const([end]), self.const([axis]))

    def unsqueeze(self, x: ir.Value, axes: Sequence[int]) -> ir.Value:
        return self.op("Unsqueeze", x, self.const(list(axes)))

    def squeeze(self, x: ir.Value, axes: Sequence[int]) -> ir.Value:
        return self.op("Squeeze", x, self.const(list(axes)))

    def transpose(self, x: ir.Value, perm: Sequence[int]) -> ir.Value:
        return self.op("Transpose", x, perm=list(perm))

    def rms_norm(self, x: ir.Value, scale: ir.Value, eps: float) -> ir.Value:
        """x * rsqrt(mean(x^2) + eps) * scale over the last axis, in the reference's order of operations."""
        variance = self.op(
            "ReduceMean", self.op("Pow", x, self.const(2.0, np.float32)), self.const([-1]), keepdims=1
        )
        inv_rms = self.op(
            "Reciprocal", self.op("Sqrt", self.op("Add", variance, self.const(eps, np.float32)))
        )
        return self.op("Mul", self.op("Mul", x, inv_rms), scale)


def new_graph(name: str, inputs: Sequence[ir.Value]) -> ir.Graph:
    return ir.Graph(inputs, [], nodes=[], opset_imports={"": OPSET}, name=name)


def tensor_input(name: str, dtype: ir.DataType, shape: Sequence[int | str | None]) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(list(shape)))
