"""Return an export that keeps its checkpoint's precision to the exporter's fp32 form, lazily.

An export keeps a bf16 checkpoint in bf16 (the precision pass ran on it) and an FP8 checkpoint's weights
in e4m3 behind blocked DequantizeLinear nodes. The fusion and lowering passes match the fp32 graph the
exporter builds, so pipelines start here: Casts between float types go (the exporter's own graph casts
integers only), low-precision initializers become fp32 ones converted when read, and each DequantizeLinear
of constants becomes the fp32 initializer it computes. Nothing is converted until a later pass or the
saver reads it, so memory stays one tensor at a time; a bf16 weight survives the round trip exactly.
Engine targets narrow the graph again at the end (their precision pass); `Fp8Weights` puts the e4m3
weights back where the engine can use them, from the record this pass leaves on each folded initializer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from qwen_export.exporter.checkpoint import cast_array
from qwen_export.passes.base import PassStats, QwenPass

FLOAT = ir.DataType.FLOAT
FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}


@dataclass(frozen=True)
class Fp8Source:
    """Where a folded initializer came from: DequantizeLinear(weight, scale, axis, block_size)."""

    weight: ir.TensorProtocol  # e4m3
    scale: ir.TensorProtocol  # fp32, blocked along `axis`
    axis: int
    block_size: int


class Fp8Tensor(ir.LazyTensor):
    """The weights a blocked DequantizeLinear of two constants computes (fp32, or `dtype` after the
    precision pass narrowed them), computed when read, with the e4m3 source kept for a pass that wants it
    back (passes/fp8_weights.py)."""

    def __init__(self, source: Fp8Source, name: str | None, dtype: ir.DataType = FLOAT) -> None:
        self.fp8_source = source
        super().__init__(
            lambda: ir.tensor(cast_array(dequantize(source), self.dtype), dtype=self.dtype, name=self.name),
            dtype=dtype,
            shape=ir.Shape(list(source.weight.shape)),
            name=name,
        )

    def with_dtype(self, dtype: ir.DataType) -> Fp8Tensor:
        return Fp8Tensor(self.fp8_source, self.name, dtype)


def dequantize(source: Fp8Source) -> np.ndarray:
    """ONNX blocked DequantizeLinear in numpy: each scale covers `block_size` entries along `axis`."""
    weight = source.weight.numpy().astype(np.float32)
    scale = np.repeat(source.scale.numpy().astype(np.float32), source.block_size, axis=source.axis)
    scale = np.take(scale, np.arange(weight.shape[source.axis]), axis=source.axis)
    return weight * scale


def _widened(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
    if hasattr(tensor, "with_dtype"):  # a checkpoint tensor read again, in fp32
        return tensor.with_dtype(FLOAT)
    return ir.LazyTensor(
        lambda: ir.tensor(tensor.numpy().astype(np.float32), name=tensor.name),
        dtype=FLOAT,
        shape=tensor.shape,
        name=tensor.name,
    )


class WidenToFp32(QwenPass):
    """Undo an export's precision policy lazily: drop float-to-float Casts, widen bf16/fp16 initializers
    and I/O to fp32, fold DequantizeLinear of constants into fp32 initializers (keeping their FP8 source).

    A no-op on an fp32 export.
    """

    name: ClassVar[str] = "widen-to-fp32"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.stats = PassStats()
        graph = model.graph
        for value in list(graph.initializers.values()):
            tensor = value.const_value
            if tensor is not None and tensor.dtype in FLOAT_TYPES - {FLOAT}:
                value.const_value = _widened(tensor)
                value.type = ir.TensorType(FLOAT)
                self.stats.fire("initializer")
                base = value.name.rsplit(".", 1)[0]  # the precision pass named it "<name>.bf16"
                if value.name.endswith((".bf16", ".fp16")) and base not in graph.initializers:
                    graph.initializers.pop(value.name)
                    value.name = base
                    graph.register_initializer(value)
        self._rewrite(graph)
        for value in [*graph.inputs, *graph.outputs]:
            if value.type is not None and value.type.dtype in FLOAT_TYPES - {FLOAT}:
                value.type = ir.TensorType(FLOAT)
                self.stats.fire("graph io")
        for name, value in list(graph.initializers.items()):
            if not value.uses() and not value.is_graph_output():
                del graph.initializers[name]
        return ir.passes.PassResult(model, modified=self.stats.fired_total > 0)

    def _rewrite(self, graph: ir.Graph) -> None:
        for node in list(graph):
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.GRAPH:
                    self._rewrite(attr.as_graph())
            if node.op_type == "Cast" and node.domain == "" and self._float_to_float(node):
                self._bypass(graph, node, node.inputs[0])
                self.stats.fire("Cast")
            elif node.op_type == "DequantizeLinear" and node.domain == "" and self._fold(graph, node):
                self.stats.fire("DequantizeLinear")
            else:
                for out in node.outputs:
                    if out.type is not None and out.type.dtype in FLOAT_TYPES - {FLOAT}:
                        out.type = ir.TensorType(FLOAT)

    @staticmethod
    def _float_to_float(node: ir.Node) -> bool:
        source, target = node.inputs[0], node.attributes.get_int("to")
        return (
            source is not None
            and source.type is not None
            and source.type.dtype in FLOAT_TYPES
            and target in {int(t) for t in FLOAT_TYPES}
        )

    def _fold(self, graph: ir.Graph, node: ir.Node) -> bool:
        weight, scale = node.inputs[0], node.inputs[1]
        if weight is None or scale is None or weight.const_value is None or scale.const_value is None:
            self.stats.keep("DequantizeLinear of a non-constant")
            return False
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            self.stats.keep("DequantizeLinear with a zero point")
            return False
        axis = node.attributes.get_int("axis", 1)
        source = Fp8Source(
            weight.const_value,
            scale.const_value,
            axis % len(weight.shape),
            node.attributes.get_int("block_size", 0) or 1,
        )
        name = (node.outputs[0].name or weight.name or "dequantized") + ".fp32"
        folded = ir.Value(name=name, shape=weight.shape, type=ir.TensorType(FLOAT))
        folded.const_value = Fp8Tensor(source, name)
        graph.register_initializer(folded)
        self._bypass(graph, node, folded)
        return True

    @staticmethod
    def _bypass(graph: ir.Graph, node: ir.Node, replacement: ir.Value) -> None:
        out = node.outputs[0]
        if out.is_graph_output() and replacement.producer() is not None and not replacement.is_graph_output():
            index = next(i for i, v in enumerate(graph.outputs) if v is out)
            name = out.name
            graph.remove(node, safe=False)
            graph.outputs[index] = replacement  # the producer's value takes the output's name
            replacement.name, replacement.shape = name, out.shape
            return
        if out.is_graph_output():  # the output keeps its name on an Identity
            identity = ir.Node("", "Identity", [replacement], name=node.name)
            graph.insert_before(node, identity)
            name, shape = out.name, out.shape
            out.replace_all_uses_with(identity.outputs[0], replace_graph_outputs=True)
            identity.outputs[0].name, identity.outputs[0].shape = name, shape
            identity.outputs[0].type = ir.TensorType(FLOAT)
            graph.remove(node, safe=True)
            return
        out.replace_all_uses_with(replacement)
        graph.remove(node, safe=True)
