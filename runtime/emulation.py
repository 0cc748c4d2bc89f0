"""Low-precision graphs on a CPU that has no kernels for them: ONNX Runtime's CPU provider runs no bf16 op.

`emulate_in_fp32` holds every low-precision tensor in fp32 after rounding it through the low dtype (a Cast
to fp16/bf16 and back after each op that yields one, weights rounded the same way). Each op thus computes
in fp32 from rounded inputs and rounds its result, as GPU kernels do when they accumulate in fp32 and store
fp16/bf16. `emulated_copy` writes such a copy of a saved model for ONNX Runtime to load.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

LOW = {ir.DataType.FLOAT16, ir.DataType.BFLOAT16}


def _standard_reads(value: ir.Value) -> bool:
    """Whether a standard ONNX op reads `value`. Custom ops (our CPU kernels' Int4Linear with its fp16
    scales) define their own input types and keep them."""
    return any(use.node.domain in ("", "ai.onnx") for use in value.uses())


def _standard_op(node: ir.Node | None) -> bool:
    return node is not None and node.domain in ("", "ai.onnx")


def needs_emulation(model: ir.Model) -> bool:
    """Whether the graph computes anything in bf16 or fp16 with standard ops (a float16 KV cache that only
    our CPU attention kernel reads and writes needs none)."""
    graph = model.graph
    values = [v for v in graph.inputs if _standard_reads(v)]
    values += [v for v in graph.outputs if _standard_op(v.producer())]
    values += [v for v in graph.initializers.values() if _standard_reads(v)]
    values += [out for node in graph if _standard_op(node) for out in node.outputs]
    return any(v.type is not None and v.type.dtype in LOW for v in values)


class EmulatedCopy:
    """An fp32-emulated copy of a low-precision model file (or of a model in memory whose weights are in
    files), in a temporary folder that lives as long as this object (ONNX Runtime reads it once, at session
    creation)."""

    def __init__(self, model: str | Path | ir.Model) -> None:
        model = ir.external_data.load_to_model(model if isinstance(model, ir.Model) else ir.load(model))
        emulate_in_fp32(model)
        self._folder = tempfile.TemporaryDirectory(prefix="qwen-emulated-")
        self.path = Path(self._folder.name) / "model.onnx"
        ir.save(model, self.path, external_data="model.onnx.data")

    def close(self) -> None:
        self._folder.cleanup()


def emulate_in_fp32(model: ir.Model) -> ir.Model:
    """Rewrite a low-precision graph to fp32 with a round trip through the low dtype after every op that
    yields one (in place; returns the model). The result runs wherever fp32 runs."""
    _emulate_graph(model.graph, top=True)
    return model


def _round_after(graph: ir.Graph, node: ir.Node, value: ir.Value, low: ir.DataType) -> None:
    """Follow `value` (now fp32) with Cast(low) -> Cast(fp32) and move its readers to the rounded copy."""
    down = ir.Node("", "Cast", [value], attributes=[ir.AttrInt64("to", int(low))], name=f"{value.name}/round")
    up = ir.Node(
        "",
        "Cast",
        [down.outputs[0]],
        attributes=[ir.AttrInt64("to", int(ir.DataType.FLOAT))],
        name=f"{value.name}/widen",
    )
    down.outputs[0].name, down.outputs[0].type = f"{value.name}/low", ir.TensorType(low)
    rounded = up.outputs[0]
    rounded.name, rounded.type, rounded.shape = (
        f"{value.name}/rounded",
        ir.TensorType(ir.DataType.FLOAT),
        value.shape,
    )
    graph.insert_after(node, [down, up])
    for use in list(value.uses()):
        if use.node is not down:
            use.node.replace_input_with(use.idx, rounded)
    for i, out in enumerate(graph.outputs):
        if out is value:  # a graph output keeps its name on the rounded value
            name = value.name
            value.name = f"{name}/unrounded"
            rounded.name = name
            graph.outputs[i] = rounded


def _emulate_graph(graph: ir.Graph, top: bool) -> None:
    fp32 = ir.DataType.FLOAT
    for name, value in list(graph.initializers.items()):
        tensor = value.const_value
        if tensor is not None and tensor.dtype in LOW and _standard_reads(value):
            value.const_value = ir.tensor(tensor.numpy().astype(np.float32), name=name)
            value.type = ir.TensorType(fp32)
    if top:
        for value in graph.inputs:
            if value.type is not None and value.type.dtype in LOW:
                value.type = ir.TensorType(fp32)
    for node in list(graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                _emulate_graph(attr.as_graph(), top=False)
        if node.attributes.get_int("output_dtype") in {int(t) for t in LOW}:  # DequantizeLinear
            node.attributes["output_dtype"] = ir.AttrInt64("output_dtype", int(fp32))
        if node.op_type == "Cast" and node.attributes.get_int("to") in {int(t) for t in LOW}:
            low = ir.DataType(node.attributes.get_int("to"))
            node.attributes["to"] = ir.AttrInt64("to", int(fp32))
            node.outputs[0].type = ir.TensorType(low)  # rounded below like any low-precision result
        for out in node.outputs:
            if out.type is not None and out.type.dtype in LOW:
                low = out.type.dtype
                out.type = ir.TensorType(fp32)
                _round_after(graph, node, out, low)
