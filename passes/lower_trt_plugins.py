"""TensorRT plugin lowering: every qwen op becomes one node that TensorRT's ONNX parser maps to a plugin of
plugins/ (libqwen_trt_plugins.so).

TensorRT's ONNX parser imports a node it has no built-in importer for through its plugin fallback: it
looks up a registered creator by the node's op_type, its `plugin_version` attribute (default "1") and its
`plugin_namespace` attribute (default ""), ignoring the node's domain. The other attributes become plugin
fields (INT narrowed to kINT32, FLOAT as kFLOAT32), and only fields the creator lists reach it, so the
creators supply defaults. So each lowered node has:

- op_type: the plugin name (`QwenMoE`, ...: a `Qwen` prefix, because the parser's built-in importers win
  over plugins and TensorRT has its own `MoE` and `RMSNormalization`);
- domain `qwen.trt` (opset 1): the parser ignores it, and a custom domain keeps the model valid for
  onnx.checker and ONNX shape inference (pass `domain=""` for tools that insist on the default domain);
- `plugin_version` (op_table.PLUGIN_VERSION), `plugin_namespace` "qwen", and the qwen op's attributes
  as fields.

Tensor types follow the plugins (the op table's type classes, passes/op_table.py, which the creators'
`kInputs`/`kOutputs` in plugins/<op>/<op>_core.h are proven equal to): activations and weights
in fp16 or bf16 (the type of the node's X if it is 16-bit, else `dtype`), norm scales, RoPE tables,
DeltaNet gate parameters and the recurrent state in fp32, the attention mask in int32 (the exporter's
int64 mask is narrowed with a Cast). Constant weights are converted as new initializers (lazily); a value
that is already a Cast to fp32 of the wanted type is read before that Cast; anything else gets a Cast.
Outputs whose type changes are cast back to the original type, so consumers and graph outputs keep theirs.

The model-local functions of the qwen ops (the fused bodies) are removed once no qwen node is left.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qwen_export.passes.base import PassStats, QwenPass
from qwen_export.passes.names import UniqueNames
from qwen_export.passes.op_table import DOMAIN, OP_TABLE, PLUGIN_NAMESPACE, PLUGIN_VERSION

QWEN_DOMAIN = DOMAIN
PLUGIN_DOMAIN = "qwen.trt"
ACT_DTYPES = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}
# (from, to) Casts that lose nothing: reading their input gives the exact value in `from`.
_WIDENING = {
    (ir.DataType.FLOAT16, ir.DataType.FLOAT),
    (ir.DataType.BFLOAT16, ir.DataType.FLOAT),
    (ir.DataType.INT32, ir.DataType.INT64),
}
FP16_MAX = float(np.finfo(np.float16).max)
INT32_RANGE = (-(2**31), 2**31 - 1)


@dataclass(frozen=True)
class PluginSpec:
    """One plugin's interface, generated from the op table (passes/op_table.py); the creator declares the
    same in plugins/<op>/<op>_core.h (tests/test_plugins_fields.py proves the two equal).

    inputs/outputs: (name, type class) with class "act" (fp16/bf16, X's type), "f32" or "i32".
    fields: (name, "int32" | "float32", default).
    """

    qwen_op: str
    name: str
    inputs: tuple[tuple[str, str], ...]
    outputs: tuple[tuple[str, str], ...]
    fields: tuple[tuple[str, str, float], ...]


PLUGINS: dict[str, PluginSpec] = {
    op.name: PluginSpec(
        op.name,
        op.plugin,
        tuple((p.name, p.kind) for p in op.inputs),
        tuple((p.name, p.kind) for p in op.outputs),
        op.plugin_fields,
    )
    for op in OP_TABLE.values()
}


class LowerTrtPlugins(QwenPass):
    """Lower qwen ops to TensorRT plugin nodes (libqwen_trt_plugins: QwenRMSNorm, QwenGatedAttention, ...).

    Each node keeps its inputs in docs/ops.md order, carries plugin_version/plugin_namespace, and has its
    attributes as plugin fields; inputs are cast to the plugin's types (int64 mask -> int32, fp32
    activations and weights -> `dtype` unless already 16-bit) and changed outputs cast back.
    """

    name: ClassVar[str] = "lower-trt-plugins"

    def __init__(self, dtype: str = "bf16", domain: str = PLUGIN_DOMAIN) -> None:
        super().__init__()
        if dtype not in ACT_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(ACT_DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        self.domain = domain

    def __repr__(self) -> str:
        return f"LowerTrtPlugins({self.dtype!r})"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self._converted: dict[tuple[ir.Value, ir.DataType], ir.Value] = {}
        self._created_casts: list[ir.Node] = []
        self._unique = UniqueNames.of_graph(graph)
        lowered: Counter = Counter()
        kept: dict[str, str] = {}
        casts = 0
        for node in [n for n in graph if n.domain == QWEN_DOMAIN]:
            spec = PLUGINS.get(node.op_type)
            reason = _unfit(node, spec)
            if reason:
                kept[node.name or node.op_type] = reason
                continue
            casts += self._lower(graph, node, spec)
            lowered[node.op_type] += 1
        if lowered:
            graph.opset_imports[self.domain] = 1
            casts -= _drop_dead_casts(graph, self._created_casts)
        removed = []
        if not any(n.domain == QWEN_DOMAIN for n in graph):
            removed = [key for key in model.functions if key[0] == QWEN_DOMAIN]
            for key in removed:
                del model.functions[key]
            graph.opset_imports.pop(QWEN_DOMAIN, None)
        self.stats = PassStats(
            fired=dict(lowered),
            kept=dict(Counter(kept.values())),
            extras={
                "kept_as_qwen": kept,
                "casts": casts,
                "functions_removed": len(removed),
                "dtype": self.dtype,
            },
        )
        return ir.passes.PassResult(model, bool(lowered or removed))

    # --- one node ---------------------------------------------------------------------------------------
    def _lower(self, graph: ir.Graph, node: ir.Node, spec: PluginSpec) -> int:
        x_dtype = _dtype(node.inputs[0])
        x_source = _source_dtype(node.inputs[0])
        act = x_source if x_source in ACT_DTYPES.values() else ACT_DTYPES[self.dtype]
        wanted = {"act": act, "f32": ir.DataType.FLOAT, "i32": ir.DataType.INT32}
        casts = 0
        inputs = []
        for value, (_, cls) in zip(node.inputs, spec.inputs, strict=True):
            converted, inserted = self._as_type(graph, node, value, wanted[cls])
            inputs.append(converted)
            casts += inserted
        attributes = [
            ir.AttrString("plugin_version", PLUGIN_VERSION),
            ir.AttrString("plugin_namespace", PLUGIN_NAMESPACE),
        ]
        for field, kind, default in spec.fields:
            attr = node.attributes.get(field)
            value = default if attr is None else attr.value
            if kind == "int32":
                value = int(value)
                if not INT32_RANGE[0] <= value <= INT32_RANGE[1]:
                    raise ValueError(f"{node.name}: {field}={value} does not fit the plugin's int32 field")
                attributes.append(ir.AttrInt64(field, value))
            else:
                attributes.append(ir.AttrFloat32(field, float(value)))
        plugin = ir.Node(
            self.domain,
            spec.name,
            inputs,
            attributes=attributes,
            num_outputs=len(spec.outputs),
            name=node.name,
        )
        graph.insert_before(node, plugin)
        anchor = plugin
        for old, new, (out_name, cls) in zip(node.outputs, plugin.outputs, spec.outputs, strict=True):
            new.type = ir.TensorType(wanted[cls])
            new.shape = old.shape
            result = new
            # Untyped outputs are taken to be what the qwen op gives for these inputs (fp32 if unknown).
            old_dtype = _dtype(old) or (x_dtype if cls == "act" else None) or ir.DataType.FLOAT
            if cls == "i32":
                old_dtype = _dtype(old) or ir.DataType.INT32
            if old_dtype != wanted[cls]:
                new.name = self._unique(f"{old.name or node.name + '/' + out_name}/{spec.name}")
                cast = _cast_node(new, old_dtype, f"{node.name}/{out_name}_cast_back")
                self._created_casts.append(cast)
                graph.insert_after(anchor, cast)
                anchor = cast
                result = cast.outputs[0]
                result.shape = old.shape
                casts += 1
            name = old.name
            old.replace_all_uses_with(result, replace_graph_outputs=True)
            old.name = None
            result.name = name or self._unique(f"{node.name}/{out_name}")
        graph.remove(node, safe=True)
        return casts

    def _as_type(
        self, graph: ir.Graph, node: ir.Node, value: ir.Value, dtype: ir.DataType
    ) -> tuple[ir.Value, int]:
        """`value` in `dtype`: as is, from before a widening Cast, as a converted constant, or via a Cast."""
        have = _dtype(value)
        if have == dtype:
            return value, 0
        producer = value.producer()
        if (
            producer is not None
            and producer.op_type == "Cast"
            and producer.domain == ""
            and _dtype(producer.inputs[0]) == dtype
            and (dtype, have) in _WIDENING
        ):
            return producer.inputs[0], 0  # e.g. the precision pass's bf16 -> fp32 Cast around a qwen op
        key = (value, dtype)
        if key in self._converted:
            return self._converted[key], 0
        if value.const_value is not None and not value.is_graph_input() and producer is None:
            converted = self._converted_constant(graph, value, dtype)
            self._converted[key] = converted
            return converted, 0
        cast = _cast_node(value, dtype, self._unique(f"{value.name or node.name}/to_{dtype.name.lower()}"))
        cast.outputs[0].name = cast.name
        cast.outputs[0].shape = value.shape
        graph.insert_before(node, cast)
        self._converted[key] = cast.outputs[0]
        return cast.outputs[0], 1

    def _converted_constant(self, graph: ir.Graph, value: ir.Value, dtype: ir.DataType) -> ir.Value:
        tensor = value.const_value
        name = self._unique(f"{value.name}.{dtype.name.lower()}")
        lazy = ir.LazyTensor(_converter(tensor, dtype), dtype=dtype, shape=tensor.shape, name=name)
        converted = ir.Value(name=name, shape=ir.Shape(list(tensor.shape)), type=ir.TensorType(dtype))
        converted.const_value = lazy
        graph.register_initializer(converted)
        return converted


def _drop_dead_casts(graph: ir.Graph, casts: list[ir.Node]) -> int:
    """Removes the cast-backs that later plugins read around (via the widening look-through)."""
    dropped = 0
    for cast in reversed(casts):
        out = cast.outputs[0]
        if not out.uses() and not out.is_graph_output():
            graph.remove(cast, safe=True)
            dropped += 1
    return dropped


def _unfit(node: ir.Node, spec: PluginSpec | None) -> str:
    """Why `node` cannot become its plugin ("" when it can)."""
    if spec is None:
        return f"no TensorRT plugin for qwen.{node.op_type}"
    if len(node.inputs) != len(spec.inputs) or len(node.outputs) != len(spec.outputs):
        return (
            f"has {len(node.inputs)} inputs / {len(node.outputs)} outputs, the plugin takes "
            f"{len(spec.inputs)} / {len(spec.outputs)}"
        )
    if any(v is None for v in node.inputs):
        return "an input is missing"
    fields = {f for f, _, _ in spec.fields}
    extra = sorted(set(node.attributes) - fields)
    if extra:
        return f"attributes {extra} are not fields of {spec.name}"
    if any(attr.is_ref() for attr in node.attributes.values()):
        return "an attribute is a reference (inside a function body)"
    return ""


def _dtype(value: ir.Value | None) -> ir.DataType | None:
    """The value's element type; for an untyped Cast output, the Cast's target type."""
    if value is None:
        return None
    if value.type is not None:
        return value.type.dtype
    producer = value.producer()
    if (
        producer is not None
        and producer.op_type == "Cast"
        and producer.domain == ""
        and "to" in producer.attributes
    ):
        return ir.DataType(producer.attributes["to"].value)
    return None


def _source_dtype(value: ir.Value) -> ir.DataType | None:
    """The 16-bit type `value` was widened from by a Cast, if it was (else its own type)."""
    producer = value.producer()
    if producer is not None and producer.op_type == "Cast" and producer.domain == "":
        inner = _dtype(producer.inputs[0])
        if (inner, _dtype(value)) in _WIDENING:
            return inner
    return _dtype(value)


def _cast_node(value: ir.Value, dtype: ir.DataType, name: str) -> ir.Node:
    node = ir.Node("", "Cast", [value], attributes=[ir.AttrInt64("to", dtype.value)], name=name)
    node.outputs[0].type = ir.TensorType(dtype)
    return node


def _converter(tensor: ir.TensorProtocol, dtype: ir.DataType) -> Any:
    """Loader of `tensor` in `dtype` (fp16 saturates at its finite range instead of becoming inf)."""

    def load() -> ir.TensorProtocol:
        array = tensor.numpy()
        if dtype == ir.DataType.FLOAT16:
            return ir.tensor(np.clip(array.astype(np.float32), -FP16_MAX, FP16_MAX).astype(np.float16))
        if dtype == ir.DataType.BFLOAT16:
            return ir.tensor(array.astype(np.float32).astype(ml_dtypes.bfloat16), dtype=ir.DataType.BFLOAT16)
        if dtype == ir.DataType.INT32:
            return ir.tensor(array.astype(np.int32))
        return ir.tensor(array.astype(dtype.numpy()))

    return load
