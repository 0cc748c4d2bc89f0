"""The ONNX Runtime lowering (passes/lower_ort.py): every qwen op, lowered to com.microsoft contrib ops and
run on ONNX Runtime's CPU kernels, matches the NumPy reference of docs/ops.md (prefill, decode with past
state, left padding in a batch); and the whole tiny Qwen3.5-MoE model lowered for `ort` matches the HF
golden with fewer nodes than onnxruntime-genai's model builder makes for the same checkpoint."""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxruntime as ort
import pytest

from qwen_export import cpu_kernels
from qwen_export.passes.lower_cpu_deltanet import CPU_DOMAIN
from qwen_export.passes.lower_ort import LowerToOrt
from qwen_export.tolerances import FP32_MAX_ABS

import qwen_op_reference as ref

TOL = FP32_MAX_ABS
GENAI_NODES = (
    154  # onnxruntime-genai 0.18.0 builder, tiny-qwen3.5-moe as Qwen3_5MoeForConditionalGeneration, fp32 cpu
)
# What lower-ort itself emits for that model (docs/ort-lowering.md): per op (9 norms, 3 DeltaNet x 15,
# attention 11, 4 MoE x 9) and once per graph; the rest of the 131 nodes are the exporter's (8).
ORT_OP_NODES, ORT_SHARED_NODES = 101, 22

FLOAT = ir.DataType.FLOAT
INT64 = ir.DataType.INT64


def qwen_model(op: str, inputs: list[tuple[str, np.ndarray, bool]], outputs: list[str], **attrs) -> ir.Model:
    """A one-node model: `inputs` are (name, example array, is_weight); weights become initializers."""
    graph_inputs, values, initializers = [], [], []
    for name, array, is_weight in inputs:
        dtype = INT64 if array.dtype == np.int64 else FLOAT
        value = ir.Value(
            name=name, type=ir.TensorType(dtype), shape=ir.Shape([f"{name}_{i}" for i in range(array.ndim)])
        )
        if is_weight:
            value.shape = ir.Shape(list(array.shape))
            value.const_value = ir.tensor(array, name=name)
            initializers.append(value)
        else:
            graph_inputs.append(value)
        values.append(value)
    node = ir.Node(
        "qwen",
        op,
        values,
        ir.convenience.convert_attributes(attrs),
        num_outputs=len(outputs),
        name=f"/block/{op}_0",
    )
    for out, name in zip(node.outputs, outputs, strict=True):
        out.name, out.type = name, ir.TensorType(FLOAT)
    graph = ir.Graph(
        graph_inputs,
        list(node.outputs),
        nodes=[node],
        initializers=initializers,
        opset_imports={"": 23, "qwen": 1},
        name=op,
    )
    return ir.Model(graph, ir_version=10)


def lower(model: ir.Model, deltanet: str = "contrib") -> ir.Model:
    result = LowerToOrt(deltanet=deltanet)(model)
    assert result.modified
    common.RemoveUnusedNodesPass()(model)
    assert not [n for n in model.graph if n.domain == "qwen"], "qwen ops left after lowering"
    return model


def session(model: ir.Model, optimize: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.intra_op_num_threads = 1
    if any(n.domain == CPU_DOMAIN for n in model.graph):
        options.register_custom_ops_library(str(cpu_kernels.library_path()))
    return ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def run(model: ir.Model, feeds: dict[str, np.ndarray], optimize: bool = False) -> list[np.ndarray]:
    return session(model, optimize).run(None, feeds)


def max_err(actual: list[np.ndarray], expected: tuple[np.ndarray, ...]) -> float:
    errors = []
    for a, b in zip(actual, expected, strict=True):
        assert a.shape == b.shape, (a.shape, b.shape)
        errors.append(float(np.abs(a.astype(np.float64) - b).max()) if a.size else 0.0)
    return max(errors)


def rnd(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def left_padded_mask(batch: int, total: int, pads: list[int]) -> np.ndarray:
    mask = np.ones((batch, total), np.int64)
    for b, pad in enumerate(pads):
        mask[b, :pad] = 0
    return mask


# --------------------------------------------------------------------------------------- norms


def test_rms_norm_alone_becomes_rmsnormalization():
    rng = np.random.default_rng(0)
    x, scale = rnd(rng, 2, 5, 64), rnd(rng, 64, scale=0.1) + 1
    model = lower(qwen_model("RMSNorm", [("x", x, False), ("scale", scale, True)], ["y"], epsilon=1e-6))
    assert [n.op_type for n in model.graph] == ["RMSNormalization"]
    assert max_err(run(model, {"x": x}), ref.rms_norm(x, scale, epsilon=1e-6)) < TOL


def test_residual_add_and_rms_norm_become_skip_simplified_layer_norm():
    """The residual stream keeps its name and readers: the Skip op's sum output replaces the Add."""
    rng = np.random.default_rng(1)
    a, b, scale = rnd(rng, 2, 3, 32), rnd(rng, 2, 3, 32), rnd(rng, 32, scale=0.1) + 1
    va, vb = (ir.Value(name=n, type=ir.TensorType(FLOAT), shape=ir.Shape(["batch", "seq", 32])) for n in "ab")
    vs = ir.Value(name="scale", type=ir.TensorType(FLOAT), shape=ir.Shape([32]), const_value=ir.tensor(scale))
    add = ir.Node("", "Add", [va, vb], name="/layers.0/Add_1")
    add.outputs[0].name = "/layers.0/output"
    norm = ir.Node(
        "qwen", "RMSNorm", [add.outputs[0], vs], [ir.AttrFloat32("epsilon", 1e-6)], name="/norm/RMSNorm_0"
    )
    norm.outputs[0].name = "normed"
    after = ir.Node("", "Mul", [add.outputs[0], add.outputs[0]], name="/after/Mul_0")
    after.outputs[0].name = "squared"
    for v in (norm.outputs[0], after.outputs[0]):
        v.type = ir.TensorType(FLOAT)
    graph = ir.Graph(
        [va, vb],
        [norm.outputs[0], after.outputs[0]],
        nodes=[add, norm, after],
        initializers=[vs],
        opset_imports={"": 23, "qwen": 1},
    )
    model = lower(ir.Model(graph, ir_version=10))
    ops = [n.op_type for n in model.graph]
    assert ops == ["SkipSimplifiedLayerNormalization", "Mul"]
    assert model.graph.node(1).inputs[0].name == "/layers.0/output"
    y, squared = run(model, {"a": a, "b": b})
    assert max_err([y], ref.rms_norm(a + b, scale, epsilon=1e-6)) < TOL
    assert max_err([squared], ((a + b) ** 2,)) < TOL


def test_gated_rms_norm():
    rng = np.random.default_rng(2)
    x, z, scale = rnd(rng, 2, 5, 4, 16), rnd(rng, 2, 5, 4, 16), rnd(rng, 16, scale=0.1) + 1
    model = lower(
        qwen_model(
            "GatedRMSNorm", [("x", x, False), ("z", z, False), ("scale", scale, True)], ["y"], epsilon=1e-6
        )
    )
    assert [n.op_type for n in model.graph] == ["GatedRMSNorm"]
    assert max_err(run(model, {"x": x, "z": z}), ref.gated_rms_norm(x, z, scale, epsilon=1e-6)) < TOL


# --------------------------------------------------------------------------------------- MoE


def moe_case(rng: np.random.Generator, hidden=32, experts=8, inter=16, shared=24):
    return [
        ("router_weight", rnd(rng, hidden, experts, scale=2 / hidden**0.5), True),
        ("gate_up", rnd(rng, experts, hidden, 2 * inter, scale=0.2), True),
        ("down", rnd(rng, experts, inter, hidden, scale=0.2), True),
        ("shared_gate", rnd(rng, hidden, shared, scale=0.2), True),
        ("shared_up", rnd(rng, hidden, shared, scale=0.2), True),
        ("shared_down", rnd(rng, shared, hidden, scale=0.2), True),
        ("shared_expert_gate", rnd(rng, hidden, 1, scale=0.3), True),
    ]


@pytest.mark.parametrize("normalize", [1, 0])
@pytest.mark.parametrize("shape", [(2, 7), (1, 1), (6,)], ids=["prefill", "decode", "2d"])
def test_moe(normalize, shape):
    rng = np.random.default_rng(3)
    x = rnd(rng, *shape, 32)
    weights = moe_case(rng)
    model = lower(qwen_model("MoE", [("x", x, False), *weights], ["y"], top_k=2, normalize=normalize))
    ops = collections.Counter(n.op_type for n in model.graph)
    assert ops == {
        "MatMul": 2,
        "Split": 1,
        "Reshape": 1,
        "MoE": 1,
        "QuickGelu": 1,
        "Mul": 1,
        "Sigmoid": 1,
        "GatedAdd": 1,
    }
    expected = ref.moe(x, *(w for _, w, _ in weights), top_k=2, normalize=normalize)
    assert max_err(run(model, {"x": x}), expected) < TOL


# --------------------------------------------------------------------------------------- GatedDeltaNet

DN = dict(num_k_heads=2, num_v_heads=4, head_k_dim=16, head_v_dim=8, conv_kernel=4, epsilon=1e-6)


def deltanet_weights(rng: np.random.Generator, hidden=32, nk=2, nv=4, dk=16, dv=8, kernel=4):
    channels = 2 * nk * dk + nv * dv
    return [
        ("qkv_weight", rnd(rng, hidden, channels, scale=0.3), True),
        ("z_weight", rnd(rng, hidden, nv * dv, scale=0.3), True),
        ("b_weight", rnd(rng, hidden, nv, scale=0.3), True),
        ("a_weight", rnd(rng, hidden, nv, scale=0.3), True),
        ("conv_weight", rnd(rng, channels, 1, kernel, scale=0.5), True),
        ("neg_exp_A", -np.exp(rnd(rng, nv, scale=0.5)), True),
        ("dt_bias", rnd(rng, nv, scale=0.5), True),
        ("norm_weight", rnd(rng, dv, scale=0.1) + 1, True),
        ("out_weight", rnd(rng, nv * dv, hidden, scale=0.3), True),
    ]


def deltanet_model(rng: np.random.Generator, x, mask, conv, rec):
    weights = deltanet_weights(rng)
    acts = [
        ("x", x, False),
        ("attention_mask", mask, False),
        ("past_conv", conv, False),
        ("past_recurrent", rec, False),
    ]
    model = qwen_model("GatedDeltaNet", [*acts, *weights], ["y", "present_conv", "present_recurrent"], **DN)
    return model, [w for _, w, _ in weights]


@pytest.mark.parametrize(
    "batch,new,past_state,pads",
    [(1, 70, False, [0]), (2, 6, False, [0, 3]), (2, 1, True, [0, 2]), (2, 5, True, [0, 0])],
    ids=["prefill-70", "prefill-leftpad", "decode-leftpad", "chunk-with-state"],
)
@pytest.mark.parametrize("deltanet", ["contrib", "qwen-cpu"])
def test_gated_deltanet(batch, new, past_state, pads, deltanet):
    """Both ORT lowerings: the com.microsoft chain, and the one qwen.cpu GatedDeltaRule kernel."""
    rng = np.random.default_rng(4)
    channels = 2 * 2 * 16 + 4 * 8
    past = 5 if past_state else 0
    x = rnd(rng, batch, new, 32)
    mask = left_padded_mask(batch, past + new, pads)
    conv = rnd(rng, batch, channels, 3) if past_state else np.zeros((batch, channels, 3), np.float32)
    rec = rnd(rng, batch, 4, 16, 8, scale=0.3) if past_state else np.zeros((batch, 4, 16, 8), np.float32)
    model, weights = deltanet_model(rng, x, mask, conv, rec)
    expected = ref.gated_deltanet(x, mask, conv, rec, *weights, **DN)
    model = lower(model, deltanet)
    ops = collections.Counter(n.op_type for n in model.graph)
    if deltanet == "contrib":
        assert {"CausalConvWithState", "LinearAttentionGate", "LinearAttention", "GatedRMSNorm"} <= set(ops)
    else:
        assert ops["GatedDeltaRule"] == 1 and ops["MatMul"] == 2 and "LinearAttention" not in ops, ops
    actual = run(model, {"x": x, "attention_mask": mask, "past_conv": conv, "past_recurrent": rec})
    real = mask[:, -new:] == 1
    assert max_err([actual[0][real]], (expected[0][real],)) < TOL
    assert max_err(actual[1:], expected[1:]) < TOL


# --------------------------------------------------------------------------------------- GatedAttention

ATT = dict(num_heads=4, num_kv_heads=2, head_dim=32, rotary_dim=8, epsilon=1e-6, scale=32**-0.5)


def rotary_tables(
    positions: np.ndarray, rotary_dim: int, theta: float = 10000.0
) -> tuple[np.ndarray, np.ndarray]:
    inv_freq = 1.0 / theta ** (np.arange(0, rotary_dim, 2) / rotary_dim)
    freqs = positions[..., None] * inv_freq
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


def attention_weights(rng: np.random.Generator, hidden=64, nh=4, kv=2, hd=32):
    return [
        ("q_weight", rnd(rng, hidden, nh * 2 * hd, scale=0.2), True),
        ("k_weight", rnd(rng, hidden, kv * hd, scale=0.2), True),
        ("v_weight", rnd(rng, hidden, kv * hd, scale=0.2), True),
        ("o_weight", rnd(rng, nh * hd, hidden, scale=0.2), True),
        ("q_norm", rnd(rng, hd, scale=0.1) + 1, True),
        ("k_norm", rnd(rng, hd, scale=0.1) + 1, True),
    ]


@pytest.mark.parametrize("attention", ["gqa", "onnx"])
@pytest.mark.parametrize(
    "batch,new,past,pads",
    [(2, 7, 0, [0, 3]), (2, 1, 6, [0, 2]), (1, 4, 5, [0]), (3, 1, 9, [0, 4, 9]), (2, 3, 4, [0, 2])],
    ids=["prefill-leftpad", "decode-leftpad", "chunk-with-past", "decode-one-real-key", "chunk-batch2"],
)
def test_gated_attention(attention, batch, new, past, pads):
    rng = np.random.default_rng(5)
    x = rnd(rng, batch, new, 64)
    mask = left_padded_mask(batch, past + new, pads)
    positions = np.where(mask == 0, 1, np.cumsum(mask, -1) - 1)[:, -new:]  # as the runtime makes them
    cos, sin = rotary_tables(positions.astype(np.float64), ATT["rotary_dim"])
    pk, pv = rnd(rng, batch, 2, past, 32), rnd(rng, batch, 2, past, 32)
    weights = attention_weights(rng)
    acts = [
        ("x", x, False),
        ("attention_mask", mask, False),
        ("cos", cos, False),
        ("sin", sin, False),
        ("past_key", pk, False),
        ("past_value", pv, False),
    ]
    model = qwen_model("GatedAttention", [*acts, *weights], ["y", "present_key", "present_value"], **ATT)
    expected = ref.gated_attention(x, mask, cos, sin, pk, pv, *(w for _, w, _ in weights), **ATT)
    result = LowerToOrt(attention=attention)(model)
    assert result.modified and not [n for n in model.graph if n.domain == "qwen"]
    ops = collections.Counter(n.op_type for n in model.graph)
    assert (
        ops["GroupQueryAttention" if attention == "gqa" else "Attention"] == 1 and ops["RotaryEmbedding"] == 1
    )
    feeds = {"x": x, "attention_mask": mask, "cos": cos, "sin": sin, "past_key": pk, "past_value": pv}
    if attention == "gqa" and batch > 1 and new > 1 and past > 0:
        with pytest.raises(Exception, match="batch_size must be 1"):  # GQA's CPU kernel restriction
            run(model, feeds)
        return
    actual = run(model, feeds)
    real = mask[:, -new:] == 1  # padded query rows attend to nothing real: their output is don't-care
    assert max_err([actual[0][real]], (expected[0][real],)) < TOL
    assert max_err(actual[1:], expected[1:]) < TOL


def test_gated_attention_rank4_mrope_tables():
    """cos/sin as the exporter's [B, 1, T, rot], from independent per-frequency positions (interleaved
    mRoPE picks t/h/w per frequency): each token reads its own table row, whatever made it."""
    rng = np.random.default_rng(8)
    batch, new, rot = 2, 5, ATT["rotary_dim"]
    x, mask = rnd(rng, batch, new, 64), left_padded_mask(batch, new, [0, 1])
    inv_freq = 1.0 / 10000.0 ** (np.arange(0, rot, 2) / rot)
    freqs = rng.integers(0, 40, (batch, new, rot // 2)) * inv_freq
    cos = np.cos(np.concatenate([freqs, freqs], -1)).astype(np.float32)
    sin = np.sin(np.concatenate([freqs, freqs], -1)).astype(np.float32)
    pk = pv = np.zeros((batch, 2, 0, 32), np.float32)
    weights = attention_weights(rng)
    acts = [("x", x, False), ("attention_mask", mask, False), ("cos", cos[:, None], False)]
    acts += [("sin", sin[:, None], False), ("past_key", pk, False), ("past_value", pv, False)]
    model = lower(qwen_model("GatedAttention", [*acts, *weights], ["y", "k", "v"], **ATT))
    expected = ref.gated_attention(x, mask, cos, sin, pk, pv, *(w for _, w, _ in weights), **ATT)
    feeds = {"x": x, "attention_mask": mask, "cos": cos[:, None], "sin": sin[:, None], "past_key": pk}
    actual = run(model, {**feeds, "past_value": pv})
    real = mask == 1
    assert max_err([actual[0][real]], (expected[0][real],)) < TOL
    assert max_err(actual[1:], expected[1:]) < TOL


def test_non_constant_weight_stays_qwen():
    """A node the contrib ops cannot take is left for the portable lowering, untouched."""
    rng = np.random.default_rng(6)
    x = rnd(rng, 2, 3, 32)
    weights = moe_case(rng)
    weights[0] = ("router_weight", weights[0][1], False)  # a graph input, not an initializer
    model = qwen_model("MoE", [("x", x, False), *weights], ["y"], top_k=2, normalize=1)
    pass_ = LowerToOrt()
    assert not pass_(model).modified
    assert [n.op_type for n in model.graph] == ["MoE"]
    assert "router_weight is not a constant" in next(iter(pass_.stats.extras["kept_as_qwen"].values()))


# --------------------------------------------------------------------------------------- whole model


def test_tiny_moe_model_ort_target_matches_golden_with_fewer_nodes_than_genai():
    from passes_support import exported, golden

    from qwen_export.passes.numerics import NumericCheck
    from qwen_export.targets import pipeline

    model = exported("tiny-qwen3.5-moe")
    passes = pipeline("ort")
    for p in passes:
        p(model)
    lowering = next(p for p in passes if isinstance(p, LowerToOrt))
    assert lowering.stats.fired == {"RMSNorm": 9, "GatedDeltaNet": 3, "GatedAttention": 1, "MoE": 4}
    assert (
        lowering.stats.extras["nodes_emitted"] <= ORT_OP_NODES
        and lowering.stats.extras["shared_nodes"] <= ORT_SHARED_NODES
    )
    ops = collections.Counter(f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in model.graph)
    assert not any(op.startswith("qwen::") for op in ops)
    assert not model.functions
    nodes = len(model.graph)
    assert nodes <= GENAI_NODES, f"{nodes} nodes, onnxruntime-genai makes {GENAI_NODES}: {ops}"
    for op in (
        "MoE",
        "GroupQueryAttention",
        "LinearAttention",
        "CausalConvWithState",
        "RotaryEmbedding",
        "SkipSimplifiedLayerNormalization",
        "LinearAttentionGate",
        "GatedRMSNorm",
    ):
        assert ops[f"com.microsoft::{op}"] > 0, op
    numerics = NumericCheck(golden("tiny-qwen3.5-moe")).measure(model)
    assert numerics.max_vs_golden is not None and numerics.max_vs_golden < TOL, numerics.to_json()


def test_tiny_moe_model_ort_target_runs_with_ort_graph_optimizations():
    """ORT's own fusions (ORT_ENABLE_ALL) keep the lowered graph's numbers."""
    from passes_support import exported

    from qwen_export.targets import pipeline

    model = exported("tiny-qwen3.5-moe")
    for p in pipeline("ort"):
        p(model)
    rng = np.random.default_rng(7)
    feeds = {"input_ids": rng.integers(0, 512, (2, 9)), "attention_mask": left_padded_mask(2, 9, [0, 4])}
    feeds["position_ids"] = np.where(
        feeds["attention_mask"] == 0, 1, np.cumsum(feeds["attention_mask"], -1) - 1
    )
    for value in model.graph.inputs:
        if value.name.startswith("past_key_values."):
            dims = [2 if not isinstance(d, int) and str(d) == "batch" else d for d in value.shape]
            feeds[value.name] = np.zeros([0 if not isinstance(d, int) else d for d in dims], np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data")
        outs = []
        for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
            options = ort.SessionOptions()
            options.graph_optimization_level = level
            outs.append(
                ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)
            )
    real = feeds["attention_mask"] == 1
    assert np.abs(outs[0][0][real] - outs[1][0][real]).max() < TOL
    for a, b in zip(outs[0][1:], outs[1][1:], strict=True):
        assert np.abs(a - b).max() < TOL
