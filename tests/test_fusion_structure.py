"""Fusion structure: which qwen ops each fusion makes, that nothing of a fused block stays in the top graph,
that every qwen node satisfies docs/ops.md, and that a check refuses a non-matching block and says why."""

from __future__ import annotations

import re

import onnx_ir as ir
import pytest
from passes_support import EXPECTED_FUSED, TINY_PRESETS, expected_top_graph, exported

from qwen_export.passes.functions import MAX_BODY_CONSTANT, qwen_op_counts
from qwen_export.passes.fuse_gated_attention import FuseGatedAttention
from qwen_export.passes.fuse_gated_deltanet import FuseGatedDeltaNet
from qwen_export.passes.fuse_moe import FuseMoE
from qwen_export.passes.graph_stats import op_histogram
from qwen_export.passes.manager import PassManager
from qwen_export.passes.pipeline import cleanup, fusions
from qwen_export.passes.qwen_ops import DOMAIN, OPS, problems
from qwen_export.targets import pipeline

pytestmark = pytest.mark.usefixtures("verify_every_pass")

FUSION_OF = {
    "fuse-gated-rms-norm": "GatedRMSNorm",
    "fuse-rms-norm": "RMSNorm",
    "fuse-gated-deltanet": "GatedDeltaNet",
    "fuse-gated-attention": "GatedAttention",
    "fuse-moe": "MoE",
}


@pytest.fixture(scope="module")
def fused():
    cache = {}

    def get(preset: str):
        if preset not in cache:
            cache[preset] = PassManager(pipeline("fused")).run(exported(preset))
        return cache[preset]

    return get


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_each_fusion_fires_once_per_block(fused, preset):
    model, report = fused(preset)
    top, nested = EXPECTED_FUSED[preset]
    fired = {r.name: r.stats.fired[FUSION_OF[r.name]] for r in report.records if r.name in FUSION_OF}
    # RMSNorm fires for the 9 layer/final norms and the 2 q/k norms the attention fusion then nests.
    assert fired == {
        "fuse-gated-rms-norm": nested["GatedRMSNorm"],
        "fuse-rms-norm": top["RMSNorm"] + nested["RMSNorm"],
        "fuse-gated-deltanet": top["GatedDeltaNet"],
        "fuse-gated-attention": top["GatedAttention"],
        "fuse-moe": top.get("MoE", 0),
    }
    assert all(not r.stats.kept for r in report.records), [r.stats for r in report.records]
    counts = qwen_op_counts(model)
    assert dict(counts["top"]) == top
    assert dict(counts["nested"]) == nested


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_no_op_of_a_fused_block_is_left_in_the_top_graph(fused, preset):
    model, _ = fused(preset)
    assert dict(op_histogram(model)) == expected_top_graph(preset)
    fused_scope = re.compile(
        r"^/(layers\.\d+/(linear_attn|self_attn|input_layernorm|post_attention_layernorm)|norm)/"
    )
    moe_layers = {i for i in range(4) if f"/layers.{i}/mlp/MoE_0" in {n.name for n in model.graph}}
    for node in model.graph:
        in_moe = any(node.name.startswith(f"/layers.{i}/mlp/") for i in moe_layers)
        if fused_scope.match(node.name) or in_moe:
            assert node.domain == DOMAIN, f"{node.name} ({node.op_type}) left behind in a fused block"


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_qwen_nodes_follow_the_op_spec(fused, preset):
    model, _ = fused(preset)
    nodes = [n for n in model.graph if n.domain == DOMAIN]
    assert nodes and all(not problems(n) for n in nodes), [p for n in nodes for p in problems(n)]
    attrs = {n.op_type: {k: a.value for k, a in n.attributes.items()} for n in nodes}
    assert attrs["GatedAttention"] == {
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 32,
        "rotary_dim": 8,
        "epsilon": pytest.approx(1e-6),
        "scale": pytest.approx(32**-0.5),
    }
    assert attrs["GatedDeltaNet"] == {
        "num_k_heads": 2,
        "num_v_heads": 4,
        "head_k_dim": 16,
        "head_v_dim": 16,
        "conv_kernel": 4,
        "epsilon": pytest.approx(1e-6),
    }
    if "MoE" in attrs:
        assert attrs["MoE"] == {"top_k": 2, "normalize": 1}
    for node in nodes:  # weights stay initializers, passed as op inputs in spec order
        for name, value in zip(OPS[node.op_type].inputs, node.inputs, strict=True):
            if name.endswith(
                ("weight", "norm", "scale", "gate_up", "down", "dt_bias", "neg_exp_A")
            ) or name in ("shared_gate", "shared_up", "shared_down", "shared_expert_gate"):
                assert value.const_value is not None, f"{node.name}: {name}"


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_each_op_has_one_shared_function_with_live_attributes(fused, preset):
    model, _ = fused(preset)
    functions = {f.name: f for f in model.functions.values()}
    assert set(functions) == set(EXPECTED_FUSED[preset][0]) | {"GatedRMSNorm"}
    assert len(model.functions) == len(functions)  # one definition per op: layers share their bodies
    for f in functions.values():
        sig = OPS[f.name]
        assert [v.name for v in f.inputs] == list(sig.inputs)
        assert [v.name for v in f.outputs] == list(sig.outputs)
        assert sorted(f.attributes) == sorted(sig.attributes)
        for node in f:
            value = node.attributes.get("value")
            assert value is None or value.value.size <= MAX_BODY_CONSTANT, (
                f"{f.name} holds a weight: {node.name}"
            )
    nested = {f.name: [n for n in f if n.domain == DOMAIN] for f in functions.values()}
    assert [n.op_type for n in nested["GatedDeltaNet"]] == ["GatedRMSNorm"]
    assert [n.op_type for n in nested["GatedAttention"]] == ["RMSNorm", "RMSNorm"]
    for node in nested["GatedDeltaNet"] + nested["GatedAttention"]:
        assert node.attributes["epsilon"].ref_attr_name == "epsilon"
    refs = {
        f.name: {
            n.attributes["value_float"].ref_attr_name
            for n in f
            if n.op_type == "Constant" and "value_float" in n.attributes
        }
        for f in functions.values()
    }
    assert refs["RMSNorm"] == refs["GatedRMSNorm"] == {"epsilon"} and refs["GatedAttention"] == {"scale"}


def test_portable_lowering_leaves_standard_onnx_with_layer_scopes():
    model, _ = PassManager(pipeline("onnx")).run(exported("tiny-qwen3.5-moe"))
    assert not any(n.domain == DOMAIN for n in ir.traversal.RecursiveGraphIterator(model.graph))
    assert not model.functions and DOMAIN not in model.opset_imports
    names = [n.name for n in model.graph]
    assert "/layers.0/linear_attn/GatedDeltaNet_0/conv/Conv_0" in names
    assert "/layers.0/linear_attn/GatedDeltaNet_0/norm/GatedRMSNorm_0/Sqrt_0" in names
    assert "/layers.3/self_attn/GatedAttention_0/RMSNorm_1/Pow_0" in names
    assert len(set(names)) == len(names)


# --- checks refuse what is not the block, and say why ------------------------------------------------


def _fused_until(preset: str, stop: str) -> ir.Model:
    passes = [*cleanup(), *fusions()]
    model = exported(preset)
    for p in passes[: [getattr(p, "name", "") for p in passes].index(stop)]:
        model = p(model).model
    return model


def _node(model: ir.Model, name: str) -> ir.Node:
    return next(n for n in model.graph if n.name == name)


def test_deltanet_refuses_a_scan_that_is_not_a_delta_rule():
    model = _fused_until("tiny-qwen3.5-moe", "fuse-gated-deltanet")
    body = _node(model, "/layers.1/linear_attn/delta_rule/Scan_0").attributes["body"].as_graph()
    sub = next(n for n in body if n.op_type == "Sub")
    v, mem = sub.inputs
    sub.replace_input_with(0, mem)
    sub.replace_input_with(1, v)  # S^T k - v instead of v - S^T k
    p = FuseGatedDeltaNet()
    p(model)
    assert p.stats.fired == {"GatedDeltaNet": 2}
    assert p.stats.kept == {"Scan body is not a delta rule step": 1}


def test_deltanet_refuses_a_conv_that_is_not_depthwise():
    model = _fused_until("tiny-qwen3.5", "fuse-gated-deltanet")
    conv = _node(model, "/layers.0/linear_attn/conv/Conv_0")
    conv.attributes["group"] = ir.AttrInt64("group", 1)
    p = FuseGatedDeltaNet()
    p(model)
    assert p.stats.kept == {"conv is not depthwise (group != channels)": 1}


def test_attention_refuses_weights_that_are_not_initializers():
    model = _fused_until("tiny-qwen3.5", "fuse-gated-attention")
    matmul = next(n for n in model.graph if n.op_type == "MatMul" and "o_proj" in (n.inputs[1].name or ""))
    copy = ir.Node("", "Identity", [matmul.inputs[1]], name="/copy_o_weight")
    model.graph.insert_before(matmul, copy)
    matmul.replace_input_with(1, copy.outputs[0])
    p = FuseGatedAttention()
    p(model)
    assert p.stats.fired == {"GatedAttention": 0}
    assert p.stats.kept == {"weights are not initializers": 1}


def test_attention_refuses_mismatched_norm_epsilons():
    model = _fused_until("tiny-qwen3.5", "fuse-gated-attention")
    _node(model, "/layers.3/self_attn/RMSNorm_1").attributes["epsilon"] = ir.AttrFloat32("epsilon", 1e-5)
    p = FuseGatedAttention()
    p(model)
    assert p.stats.kept == {"q_norm and k_norm epsilons differ": 1}


def test_moe_refuses_a_router_that_keeps_the_smallest_experts():
    model = _fused_until("tiny-qwen3.5-moe", "fuse-moe")
    _node(model, "/layers.2/mlp/router/TopK_0").attributes["largest"] = ir.AttrInt64("largest", 0)
    p = FuseMoE()
    p(model)
    assert p.stats.fired == {"MoE": 3}
    assert p.stats.kept == {"router keeps the smallest probabilities, not the largest": 1}


def test_fusion_postcondition_rejects_an_invalid_qwen_node():
    model, _ = PassManager(pipeline("fused")).run(exported("tiny-qwen3.5"))
    node = next(n for n in model.graph if n.op_type == "GatedAttention")
    node.attributes["num_heads"] = ir.AttrInt64("num_heads", 3)
    with pytest.raises(ir.passes.PostconditionError, match="num_heads 3 is not a multiple of num_kv_heads 2"):
        FuseMoE()(model)
