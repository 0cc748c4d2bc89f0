"""The plugin nodes the TensorRT lowering emits, checked against the creators' tables in the C++ sources:
plugin names, version, namespace, field names and types (int32 narrowing), and I/O tensor types. The
creators' tables (plugins/<op>/<op>_core.h) are a copy of the op table (passes/op_table.py) that C++ needs;
the first test proves the copy equal."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from plugin_graphs import qwen_graph
from plugin_tables import creator_table

from qwen_export.passes.lower_trt_plugins import PLUGIN_DOMAIN, PLUGINS, LowerTrtPlugins
from qwen_export.passes.op_table import OP_TABLE, PLUGIN_NAMESPACE, PLUGIN_VERSION
from qwen_export.passes.qwen_ops import OPS

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
CLASS_DTYPES = {"f32": {ir.DataType.FLOAT}, "i32": {ir.DataType.INT32}}
ACT = {ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
TABLES = {creator_table(op).name: creator_table(op) for op in OP_TABLE}


@pytest.mark.parametrize("op", sorted(OP_TABLE))
def test_creator_tables_are_the_op_table(op):
    """kPluginName, kFields (names, types, defaults, order), kInputs and kOutputs (names, type classes,
    order) of plugins/<op>/<op>_core.h, and the common version and namespace, equal the op table's."""
    table, spec = creator_table(op), OP_TABLE[op]
    assert table.name == spec.plugin == f"Qwen{op}"  # not a TensorRT built-in op name: built-in importers win
    assert table.fields == spec.plugin_fields
    assert table.inputs == tuple((p.name, p.kind) for p in spec.inputs)
    assert table.outputs == tuple((p.name, p.kind) for p in spec.outputs)
    assert (table.version, table.namespace) == (PLUGIN_VERSION, PLUGIN_NAMESPACE) == ("2", "qwen")
    assert len(table.aliases) == len(table.outputs)


@pytest.mark.parametrize("op", sorted(OP_TABLE))
def test_lowering_table_is_the_creators(op):
    """What the lowering emits (PLUGINS, generated from the op table) is what the creator declares."""
    table, spec = creator_table(op), PLUGINS[op]
    assert (spec.qwen_op, spec.name, spec.fields, spec.inputs, spec.outputs) == (
        op,
        table.name,
        table.fields,
        table.inputs,
        table.outputs,
    )


def test_every_op_has_a_plugin():
    assert list(PLUGINS) == list(OPS) == list(OP_TABLE)


@pytest.mark.parametrize("op", sorted(OP_TABLE))
def test_plugins_take_the_qwen_op_interface(op):
    """Inputs/outputs in docs/ops.md order, and every attribute of the op is a plugin field."""
    table, sig = creator_table(op), OPS[op]
    assert tuple(name for name, _ in table.inputs) == sig.inputs
    assert tuple(name for name, _ in table.outputs) == sig.outputs
    fields = {name: kind for name, kind, _ in table.fields}
    assert set(fields) == set(sig.attributes)
    assert {a for a in sig.int_attributes} == {f for f, k in fields.items() if k == "int32"}
    assert {a for a in sig.float_attributes} == {f for f, k in fields.items() if k == "float32"}


def check_plugin_node(node: ir.Node) -> None:
    table = TABLES[node.op_type]
    attrs = dict(node.attributes)
    version, namespace = attrs.pop("plugin_version"), attrs.pop("plugin_namespace")
    assert version.type == ir.AttributeType.STRING and version.value == table.version
    assert namespace.type == ir.AttributeType.STRING and namespace.value == table.namespace
    assert set(attrs) == {name for name, _, _ in table.fields}, node.name
    for name, kind, _ in table.fields:
        attr = attrs[name]
        if kind == "int32":  # the parser narrows INT attributes to kINT32 fields
            assert attr.type == ir.AttributeType.INT and INT32_MIN <= attr.value <= INT32_MAX
        else:
            assert attr.type == ir.AttributeType.FLOAT
    assert len(node.inputs) == len(table.inputs) and len(node.outputs) == len(table.outputs)
    act = node.inputs[0].dtype
    assert act in ACT
    for value, (name, cls) in [
        *zip(node.inputs, table.inputs, strict=True),
        *zip(node.outputs, table.outputs, strict=True),
    ]:
        allowed = {act} if cls == "act" else CLASS_DTYPES[cls]
        assert value.dtype in allowed, f"{node.name} {name}: {value.dtype}, plugin takes {cls}"


def test_hand_built_graph_lowers_to_creator_nodes():
    model = ir.from_proto(qwen_graph())
    LowerTrtPlugins()(model)
    plugins = [n for n in model.graph if n.domain == PLUGIN_DOMAIN]
    assert sorted(n.op_type for n in plugins) == sorted(t.name for t in TABLES.values())
    for node in plugins:
        check_plugin_node(node)


def test_fused_preset_lowers_to_creator_nodes():
    from passes_support import exported

    from qwen_export.passes.manager import PassManager
    from qwen_export.targets import pipeline

    model, _ = PassManager(pipeline("fused")).run(exported("tiny-qwen3.5-moe"))
    pass_ = LowerTrtPlugins()
    pass_(model)
    assert pass_.stats.fired == {"RMSNorm": 9, "GatedDeltaNet": 3, "GatedAttention": 1, "MoE": 4}
    assert not any(n.domain == "qwen" for n in model.graph)
    plugins = [n for n in model.graph if n.domain == PLUGIN_DOMAIN]
    assert len(plugins) == 17
    for node in plugins:
        check_plugin_node(node)


def test_int_attribute_beyond_int32_is_refused():
    model = ir.from_proto(qwen_graph(top_k=2**31))
    with pytest.raises(ValueError, match="top_k=2147483648 does not fit"):
        LowerTrtPlugins()(model)
