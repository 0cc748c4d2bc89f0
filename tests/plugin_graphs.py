"""Hand-built qwen-op graphs (onnx.helper) for the TensorRT plugin lowering tests (not a test module).

One decoder-layer-like graph holding every qwen op at the tiny presets' sizes, with fp32 weights and the
exporter's int64 attention mask, plus a model-local function in domain `qwen` (as the fusions emit).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

H, NH, KV, HD, ROT = 64, 4, 2, 32, 8
NK, NV, DK, DV, K = 2, 4, 16, 16, 4
C = 2 * NK * DK + NV * DV
E, INTER, IS, TOP_K = 8, 32, 32, 2


def qwen_graph(
    x_dtype: int = TensorProto.FLOAT, top_k: int = TOP_K, extra_op: str | None = None
) -> onnx.ModelProto:
    """Every qwen op once: RMSNorm -> GatedAttention + GatedDeltaNet -> Add -> GatedRMSNorm -> MoE."""
    rng = np.random.default_rng(0)
    f32 = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("x", x_dtype, ["B", "T", H]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["B", "S"]),
        helper.make_tensor_value_info("cos", f32, ["B", "T", ROT]),
        helper.make_tensor_value_info("sin", f32, ["B", "T", ROT]),
        helper.make_tensor_value_info("past_key", f32, ["B", KV, "P", HD]),
        helper.make_tensor_value_info("past_value", f32, ["B", KV, "P", HD]),
        helper.make_tensor_value_info("past_conv", f32, ["B", C, K - 1]),
        helper.make_tensor_value_info("past_recurrent", f32, ["B", NV, DK, DV]),
    ]
    outputs = [
        helper.make_tensor_value_info("y", f32, ["B", "T", H]),
        helper.make_tensor_value_info("present_key", f32, ["B", KV, "S", HD]),
        helper.make_tensor_value_info("present_value", f32, ["B", KV, "S", HD]),
        helper.make_tensor_value_info("present_conv", f32, ["B", C, K - 1]),
        helper.make_tensor_value_info("present_recurrent", f32, ["B", NV, DK, DV]),
    ]
    shapes = {
        "ln.plus_one": (H,), "q_proj": (H, NH * 2 * HD), "k_proj": (H, KV * HD), "v_proj": (H, KV * HD),
        "o_proj": (NH * HD, H), "q_norm.plus_one": (HD,), "k_norm.plus_one": (HD,), "qkv_proj": (H, C),
        "z_proj": (H, NV * DV), "b_proj": (H, NV), "a_proj": (H, NV), "conv1d": (C, 1, K), "neg_exp_A": (NV,),
        "dt_bias": (NV,), "gated_norm": (DV,), "out_proj": (NV * DV, H), "post_ln.plus_one": (H,),
        "router": (H, E), "gate_up": (E, H, 2 * INTER), "down": (E, INTER, H), "shared_gate": (H, IS),
        "shared_up": (H, IS), "shared_down": (IS, H), "shared_expert_gate": (H, 1),
    }  # fmt: skip
    inits = [
        onnx.numpy_helper.from_array((rng.standard_normal(s) * 0.1).astype(np.float32), n)
        for n, s in shapes.items()
    ]
    q = "qwen"
    nodes = []
    x = "x"
    if x_dtype != f32:
        nodes.append(helper.make_node("Cast", ["x"], ["x_f32"], to=f32, name="/x_cast"))
        x = "x_f32"
    nodes += [
        helper.make_node(
            "RMSNorm",
            [x, "ln.plus_one"],
            ["h"],
            domain=q,
            name="/layers.0/input_layernorm/RMSNorm_0",
            epsilon=1e-6,
        ),
        helper.make_node(
            "GatedAttention",
            [
                "h",
                "attention_mask",
                "cos",
                "sin",
                "past_key",
                "past_value",
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "q_norm.plus_one",
                "k_norm.plus_one",
            ],
            ["attn", "present_key", "present_value"],
            domain=q,
            name="/layers.0/self_attn/GatedAttention_0",
            num_heads=NH,
            num_kv_heads=KV,
            head_dim=HD,
            rotary_dim=ROT,
            epsilon=1e-6,
            scale=HD**-0.5,
        ),
        helper.make_node(
            "GatedDeltaNet",
            [
                "h",
                "attention_mask",
                "past_conv",
                "past_recurrent",
                "qkv_proj",
                "z_proj",
                "b_proj",
                "a_proj",
                "conv1d",
                "neg_exp_A",
                "dt_bias",
                "gated_norm",
                "out_proj",
            ],
            ["dn", "present_conv", "present_recurrent"],
            domain=q,
            name="/layers.1/linear_attn/GatedDeltaNet_0",
            num_k_heads=NK,
            num_v_heads=NV,
            head_k_dim=DK,
            head_v_dim=DV,
            conv_kernel=K,
            epsilon=1e-6,
        ),
        helper.make_node("Add", ["attn", "dn"], ["mixed"], name="/Add_0"),
        helper.make_node(
            "GatedRMSNorm",
            ["mixed", "h", "post_ln.plus_one"],
            ["g"],
            domain=q,
            name="/GatedRMSNorm_0",
            epsilon=1e-6,
        ),
        helper.make_node(
            "MoE",
            [
                "g",
                "router",
                "gate_up",
                "down",
                "shared_gate",
                "shared_up",
                "shared_down",
                "shared_expert_gate",
            ],
            ["y"],
            domain=q,
            name="/layers.0/mlp/MoE_0",
            top_k=top_k,
            normalize=1,
        ),
    ]
    if extra_op is not None:
        nodes[-1].output[0] = "y_moe"
        nodes.append(helper.make_node(extra_op, ["y_moe"], ["y"], domain=q, name=f"/{extra_op}_0"))
    # The fused bodies are model-local functions in domain qwen; one stands in for all here.
    body = [
        helper.make_node("Mul", ["X", "X"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1]),
        helper.make_node("Constant", [], ["eps"], value_float=1e-6),
        helper.make_node("Add", ["ms", "eps"], ["var"]),
        helper.make_node("Sqrt", ["var"], ["rms"]),
        helper.make_node("Div", ["X", "rms"], ["n"]),
        helper.make_node("Mul", ["n", "scale"], ["Y"]),
    ]
    function = helper.make_function(
        q, "RMSNorm", ["X", "scale"], ["Y"], body, [helper.make_opsetid("", 17)], attributes=["epsilon"]
    )
    graph = helper.make_graph(nodes, "qwen_ops", inputs, outputs, inits)
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(q, 1)],
        functions=[function],
        ir_version=10,
    )
