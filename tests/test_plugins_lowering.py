"""The TensorRT plugin lowering's graph surgery: casts to the plugins' types, shared mask narrowing, outputs
cast back, constants converted, local functions removed, and the result still a valid ONNX model."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto
from plugin_graphs import qwen_graph

from qwen_export.passes.lower_trt_plugins import PLUGIN_DOMAIN, LowerTrtPlugins


def lowered(proto: onnx.ModelProto | None = None, **kwargs) -> tuple[ir.Model, LowerTrtPlugins]:
    model = ir.from_proto(proto if proto is not None else qwen_graph())
    pass_ = LowerTrtPlugins(**kwargs)
    result = pass_(model)
    assert result.modified
    return model, pass_


def plugin(model: ir.Model, name: str) -> ir.Node:
    (node,) = [n for n in model.graph if n.op_type == name]
    return node


def test_result_is_valid_onnx_without_qwen_ops_or_functions():
    model, pass_ = lowered()
    assert pass_.stats.extras["functions_removed"] == 1 and not pass_.stats.extras["kept_as_qwen"]
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    assert not list(proto.functions)
    assert {o.domain: o.version for o in proto.opset_import} == {"": 17, PLUGIN_DOMAIN: 1}
    assert not [n for n in proto.graph.node if n.domain == "qwen"]


def test_int64_mask_is_narrowed_once_for_all_plugins():
    model, _ = lowered()
    casts = [n for n in model.graph if n.op_type == "Cast" and n.inputs[0].name == "attention_mask"]
    assert len(casts) == 1 and casts[0].attributes["to"].value == ir.DataType.INT32
    readers = sorted(u.node.op_type for u in casts[0].outputs[0].uses())
    assert readers == ["QwenGatedAttention", "QwenGatedDeltaNet"]


def test_graph_outputs_keep_their_names_and_types():
    model, _ = lowered()
    outputs = {v.name: v.dtype for v in model.graph.outputs}
    assert outputs == {
        n: ir.DataType.FLOAT
        for n in ["y", "present_key", "present_value", "present_conv", "present_recurrent"]
    }
    # The fp32 recurrent state goes straight through: the plugin keeps it in fp32, no cast.
    deltanet = plugin(model, "QwenGatedDeltaNet")
    assert deltanet.outputs[2].name == "present_recurrent"
    assert deltanet.inputs[3].name == "past_recurrent"


def test_weights_become_bf16_initializers_and_norm_scales_stay_fp32():
    source = qwen_graph()
    model, _ = lowered(source)
    moe = plugin(model, "QwenMoE")
    router = moe.inputs[1]
    assert router.dtype == ir.DataType.BFLOAT16 and router.const_value is not None
    original = next(t for t in source.graph.initializer if t.name == "router")
    expected = onnx.numpy_helper.to_array(original).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(router.const_value.numpy(), expected)
    attention = plugin(model, "QwenGatedAttention")
    assert [attention.inputs[i].name for i in (10, 11)] == ["q_norm.plus_one", "k_norm.plus_one"]
    assert attention.inputs[10].dtype == ir.DataType.FLOAT


def test_fp16_activations_set_the_plugin_type_and_casts_are_read_around():
    model, _ = lowered(qwen_graph(x_dtype=TensorProto.FLOAT16), dtype="bf16")
    norm = plugin(model, "QwenRMSNorm")
    assert norm.inputs[0].name == "x"  # read before the graph's fp16 -> fp32 Cast
    assert norm.outputs[0].dtype == ir.DataType.FLOAT16
    # Downstream plugins read the fp16 RMSNorm output around its cast back to fp32.
    attention = plugin(model, "QwenGatedAttention")
    assert attention.inputs[0] is norm.outputs[0]
    assert attention.inputs[6].dtype == ir.DataType.FLOAT16


def test_unknown_qwen_op_is_kept_with_its_function():
    model, pass_ = lowered(qwen_graph(extra_op="FutureOp"))
    assert list(pass_.stats.extras["kept_as_qwen"].values()) == ["no TensorRT plugin for qwen.FutureOp"]
    assert pass_.stats.extras["functions_removed"] == 0
    assert [n.op_type for n in model.graph if n.domain == "qwen"] == ["FutureOp"]
    assert "qwen" in model.graph.opset_imports


def test_default_domain_on_request():
    model, _ = lowered(domain="")
    names = {n.op_type for n in model.graph if n.domain == ""}
    assert {"QwenRMSNorm", "QwenMoE", "QwenGatedAttention"} <= names


def test_bad_dtype_is_refused():
    with pytest.raises(ValueError, match="dtype must be one of"):
        LowerTrtPlugins(dtype="fp8")
