"""The MTP draft graph: Qwen3.5's multi-token-prediction layer as its own ONNX model (mtp.onnx).

Inputs: `input_ids` [B, T] (token t+1), `hidden_states` [B, T, hidden] (the main graph's final-normed h_t),
`attention_mask` [B, total], `position_ids` [B, T] (t: the pair sits at the main token's position, as vLLM
feeds it) and the layer's own KV cache `past_key_values.0.{key,value}`.

Outputs: `logits` [B, 1, vocab] of the last pair only (a draft token is taken there, for its token t+2),
`draft_hidden_states` [B, T, hidden] (the draft's normed output, which the next draft step takes as
`hidden_states`) and `present.0.{key,value}`.

The math and its sources are in golden/mtp.py; the layer reuses the exporter's decoder-layer blocks with
the checkpoint's `mtp.` prefix, and shares the main model's embedding and lm_head (copied into mtp.onnx).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qwen_export.exporter.attention import (
    AttentionContext,
    attention_mask_bool,
    gated_attention,
    rotary_tables,
)
from qwen_export.exporter.builder import FLOAT, INT64, GraphBuilder, new_graph, tensor_input
from qwen_export.exporter.checkpoint import Checkpoint, find_text_prefix
from qwen_export.exporter.mlp import dense_mlp, sparse_moe
from qwen_export.exporter.model import (
    HIDDEN_STATES,
    StateSpec,
    lm_head,
    name_output,
    present_shape,
    token_embedding,
)
from qwen_export.exporter.spec import ModelSpec
from qwen_export.exporter.weights import Weights

MTP_PREFIX = "mtp."
DRAFT_HIDDEN_STATES = "draft_hidden_states"  # an ONNX graph cannot name an input and an output alike
DRAFT_LAYER = 0  # published configs have mtp_num_hidden_layers = 1; for k > 1 the layer runs again


def has_mtp(ckpt: Checkpoint) -> bool:
    """Whether the checkpoint carries an MTP layer (any `mtp.*` tensor; a partial one fails the export)."""
    return any(name.startswith(MTP_PREFIX) for name in ckpt.tensors)


def draft_state_specs(spec: ModelSpec) -> list[StateSpec]:
    kv = ("batch", spec.num_key_value_heads, "past_sequence", spec.head_dim)
    return [StateSpec(f"{DRAFT_LAYER}.key", kv), StateSpec(f"{DRAFT_LAYER}.value", kv)]


def build_draft(spec: ModelSpec, ckpt: Checkpoint, keep_fp8: bool = False) -> ir.Model:
    """mtp.onnx for a checkpoint with an MTP layer; a missing or mis-shaped `mtp.*` tensor is named."""
    hidden = spec.hidden_size
    input_ids = tensor_input("input_ids", INT64, ["batch", "sequence"])
    main_hidden = tensor_input(HIDDEN_STATES, FLOAT, ["batch", "sequence", hidden])
    attention_mask = tensor_input("attention_mask", INT64, ["batch", "total_sequence"])
    position_ids = tensor_input("position_ids", INT64, ["batch", "sequence"])
    states = draft_state_specs(spec)
    past = {s.suffix: tensor_input(s.input_name, FLOAT, s.shape) for s in states}
    graph = new_graph(
        "qwen_mtp_draft", [input_ids, main_hidden, attention_mask, position_ids, *past.values()]
    )
    gb = GraphBuilder(graph)
    main = Weights(gb, ckpt, find_text_prefix(ckpt), keep_fp8=keep_fp8)
    w = Weights(gb, ckpt, MTP_PREFIX, keep_fp8=keep_fp8)
    eps = spec.rms_norm_eps

    with gb.scope("mtp"):
        with gb.scope("embed_tokens"):
            embeds = gb.op("Gather", token_embedding(main, spec), input_ids, axis=0)
        with gb.scope("pre_fc_norm_embedding"):
            embeds = gb.rms_norm(embeds, w.zero_centred_scale("pre_fc_norm_embedding.weight", hidden), eps)
        with gb.scope("pre_fc_norm_hidden"):
            normed = gb.rms_norm(main_hidden, w.zero_centred_scale("pre_fc_norm_hidden.weight", hidden), eps)
        with gb.scope("fc"):
            x = gb.op(
                "MatMul",
                gb.op("Concat", embeds, normed, axis=-1),
                w.linear_t("fc.weight", hidden, 2 * hidden),
            )
        with gb.scope("rotary_emb"):
            cos, sin = rotary_tables(gb, position_ids, spec)
        with gb.scope("masks"):
            ctx = AttentionContext(cos, sin, attention_mask_bool(gb, input_ids, attention_mask))

        i = DRAFT_LAYER
        with gb.scope(f"layers.{i}"):
            residual = x
            with gb.scope("input_layernorm"):
                h = gb.rms_norm(x, w.zero_centred_scale(f"layers.{i}.input_layernorm.weight", hidden), eps)
            with gb.scope("self_attn"):
                h, present_key, present_value = gated_attention(
                    gb, w, i, h, past[f"{i}.key"], past[f"{i}.value"], ctx, spec
                )
            x = gb.op("Add", residual, h)
            residual = x
            with gb.scope("post_attention_layernorm"):
                h = gb.rms_norm(
                    x, w.zero_centred_scale(f"layers.{i}.post_attention_layernorm.weight", hidden), eps
                )
            with gb.scope("mlp"):
                h = _draft_mlp(gb, w, ckpt, i, h, spec)
            x = gb.op("Add", residual, h)
        with gb.scope("norm"):
            x = gb.rms_norm(x, w.zero_centred_scale("norm.weight", hidden), eps)
        with gb.scope("lm_head"):  # a draft is sampled from the last position only, as vLLM's are
            last = gb.op("Gather", x, gb.const([-1]), axis=1)  # [B, 1, H]
            logits = lm_head(gb, main, spec, last)

    name_output(graph, logits, "logits", FLOAT, ["batch", 1, spec.vocab_size])
    for s, value in zip(states, (present_key, present_value), strict=True):
        name_output(graph, value, s.output_name, FLOAT, present_shape(s))
    name_output(graph, gb.op("Identity", x), DRAFT_HIDDEN_STATES, FLOAT, ["batch", "sequence", hidden])
    return ir.Model(graph, ir_version=10, producer_name="qwen-export")


def _draft_mlp(
    gb: GraphBuilder, w: Weights, ckpt: Checkpoint, layer: int, x: ir.Value, spec: ModelSpec
) -> ir.Value:
    """The MTP layer's MoE when the checkpoint has its router or the model has no dense MLP, else the
    dense MLP (a missing tensor of either is named by the weights)."""
    if ckpt.has(f"{MTP_PREFIX}layers.{layer}.mlp.gate.weight") or not spec.intermediate_size:
        return sparse_moe(gb, w, layer, x, spec)
    return dense_mlp(gb, w, layer, x, spec)


def draft_io_signature(spec: ModelSpec, model: ir.Model | None = None) -> dict[str, list[dict]]:
    """The draft graph's inputs and outputs (dtypes read from `model` when given)."""
    dtypes = {}
    if model is not None:
        for value in [*model.graph.inputs, *model.graph.outputs]:
            dtypes[value.name] = str(np.dtype(value.type.dtype.numpy()))
    hidden = ["batch", "sequence", spec.hidden_size]

    def entry(name: str, dtype: str, shape: list) -> dict:
        return {"name": name, "dtype": dtypes.get(name, dtype), "shape": shape}

    states = draft_state_specs(spec)
    return {
        "inputs": [
            entry("input_ids", "int64", ["batch", "sequence"]),
            entry(HIDDEN_STATES, "float32", hidden),
            entry("attention_mask", "int64", ["batch", "total_sequence"]),
            entry("position_ids", "int64", ["batch", "sequence"]),
            *(entry(s.input_name, "float32", list(s.shape)) for s in states),
        ],
        "outputs": [
            entry("logits", "float32", ["batch", 1, spec.vocab_size]),
            *(entry(s.output_name, "float32", present_shape(s)) for s in states),
            entry(DRAFT_HIDDEN_STATES, "float32", hidden),
        ],
    }
