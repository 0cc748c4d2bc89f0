"""The fp8-weights pass on hand-built graphs: which folded FP8 weights go back behind DequantizeLinear."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest

from qwen_export.passes.fp8_weights import Fp8Weights
from qwen_export.passes.widen import Fp8Source, Fp8Tensor


def graph_with_weight(k: int, n: int, reader: str = "MatMul") -> ir.Model:
    """x [2, k] @ W [k, n], W an initializer folded from e4m3 [k, n] with fp32 scales [ceil(k/128), n]."""
    rng = np.random.default_rng(0)
    weight = ir.tensor(rng.standard_normal((k, n)).astype(ml_dtypes.float8_e4m3fn))
    scale = ir.tensor(rng.random((-(-k // 128), n)).astype(np.float32) + 0.5)
    folded = ir.Value(name="w", shape=ir.Shape([k, n]), type=ir.TensorType(ir.DataType.BFLOAT16))
    folded.const_value = Fp8Tensor(Fp8Source(weight, scale, 0, 128), "w", ir.DataType.BFLOAT16)
    if reader == "MatMul":
        activation = ir.Value(name="x", shape=ir.Shape([2, k]), type=ir.TensorType(ir.DataType.BFLOAT16))
        node = ir.Node("", "MatMul", [activation, folded], name="reader")
    else:
        activation = ir.Value(name="ids", shape=ir.Shape([2]), type=ir.TensorType(ir.DataType.INT64))
        node = ir.Node("", "Gather", [folded, activation], name="reader")
    graph = ir.Graph([activation], node.outputs, nodes=[node], opset_imports={"": 23})
    graph.register_initializer(folded)
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize(("k", "fires"), [(64, True), (256, True), (200, False)])
def test_input_dimensions_tensorrt_blocks_correctly(k, fires):
    model = graph_with_weight(k, 32)
    p = Fp8Weights()
    p(model)
    dequantize = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert bool(dequantize) == fires, p.stats
    if fires:
        (node,) = dequantize
        assert node.attributes.get_int("output_dtype") == int(ir.DataType.BFLOAT16)
        assert node.inputs[0].dtype == ir.DataType.FLOAT8E4M3FN and node.inputs[1].dtype == ir.DataType.FLOAT
        assert "w" not in model.graph.initializers
    else:
        assert p.stats.kept == {"input dimension not a multiple of 128": 1}


def test_a_gathered_weight_stays_in_the_engine_precision():
    model = graph_with_weight(256, 32, reader="Gather")
    p = Fp8Weights()
    p(model)
    assert p.stats.kept == {"read by Gather": 1} and not p.stats.fired
