"""Assemble the decoder graph: one graph for prefill and decode, with every state as explicit I/O."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from qwen_export.exporter.attention import (
    AttentionContext,
    attention_mask_bool,
    gated_attention,
    mrope_rotary_tables,
    rotary_tables,
)
from qwen_export.exporter.builder import FLOAT, INT64, GraphBuilder, new_graph, tensor_input
from qwen_export.exporter.checkpoint import Checkpoint, find_text_prefix
from qwen_export.exporter.deltanet import gated_deltanet
from qwen_export.exporter.mlp import dense_mlp, sparse_moe
from qwen_export.exporter.spec import ModelSpec
from qwen_export.exporter.vision_spec import DEFAULT_MROPE_SECTION
from qwen_export.exporter.weights import Weights, row_blocks, transpose_2d

if TYPE_CHECKING:
    from qwen_export.exporter.shard import RankContext


@dataclass(frozen=True)
class StateSpec:
    """One carried state: the graph has input `past_key_values.<suffix>` and output `present.<suffix>`."""

    suffix: str
    shape: tuple[int | str, ...]

    @property
    def input_name(self) -> str:
        return f"past_key_values.{self.suffix}"

    @property
    def output_name(self) -> str:
        return f"present.{self.suffix}"


def state_specs(spec: ModelSpec) -> list[StateSpec]:
    states = []
    for i, kind in enumerate(spec.layer_types):
        if kind == "full_attention":
            kv = ("batch", spec.num_key_value_heads, "past_sequence", spec.head_dim)
            states += [StateSpec(f"{i}.key", kv), StateSpec(f"{i}.value", kv)]
        else:
            states += [
                StateSpec(f"{i}.conv_state", ("batch", spec.conv_dim, spec.linear_conv_kernel_dim - 1)),
                StateSpec(
                    f"{i}.recurrent_state",
                    (
                        "batch",
                        spec.linear_num_value_heads,
                        spec.linear_key_head_dim,
                        spec.linear_value_head_dim,
                    ),
                ),
            ]
    return states


HIDDEN_STATES = "hidden_states"  # the final norm's output [B, T, hidden], which the MTP draft graph takes


def layer_output_name(layer: int) -> str:
    """Name of the value holding decoder layer `layer`'s output (the residual stream after its MLP)."""
    return f"/layers.{layer}/output"


def present_shape(state: StateSpec) -> list[int | str]:
    return ["total_sequence" if d == "past_sequence" else d for d in state.shape]


def build_decoder(
    spec: ModelSpec,
    ckpt: Checkpoint,
    debug_hidden_states: bool = False,
    multimodal: bool = False,
    mrope_section: Sequence[int] = DEFAULT_MROPE_SECTION,
    keep_fp8: bool = False,
    rank: RankContext | None = None,
    final_hidden: bool = False,
) -> ir.Model:
    """The text tower as an ONNX model whose initializers load lazily from the checkpoint.

    `rank` builds one rank of a tensor/expert-parallel split instead (exporter/shard.py): `spec` and `ckpt`
    are then the rank's (`rank_spec`, `RankCheckpoint`), and the graph gains the collectives.

    `final_hidden` adds output `hidden_states` [B, T, hidden], the final norm's output, which the MTP draft
    graph takes.

    `keep_fp8` keeps an FP8 checkpoint's quantized weights e4m3 behind blocked DequantizeLinear nodes;
    otherwise they are dequantized when the model is saved.

    `multimodal=True` (opt-in) builds the variant the vision runtime drives: input `inputs_embeds`
    [B, T, hidden] instead of `input_ids` (the runtime embeds tokens and places vision features) and
    mRoPE `position_ids` [3, B, T] (t, h, w) split over the rotary frequencies by `mrope_section`.
    """
    if multimodal:
        tokens = tensor_input("inputs_embeds", FLOAT, ["batch", "sequence", spec.hidden_size])
        position_ids = tensor_input("position_ids", INT64, [3, "batch", "sequence"])
    else:
        tokens = tensor_input("input_ids", INT64, ["batch", "sequence"])
        position_ids = tensor_input("position_ids", INT64, ["batch", "sequence"])
    attention_mask = tensor_input("attention_mask", INT64, ["batch", "total_sequence"])
    states = state_specs(spec)
    past = {s.suffix: tensor_input(s.input_name, FLOAT, s.shape) for s in states}
    graph = new_graph("qwen_decoder", [tokens, attention_mask, position_ids, *past.values()])
    gb = GraphBuilder(graph)
    w = Weights(gb, ckpt, find_text_prefix(ckpt), keep_fp8=keep_fp8)
    hidden = spec.hidden_size
    present: dict[str, ir.Value] = {}
    layer_outputs: list[ir.Value] = []

    if multimodal:
        x = tokens
    else:
        with gb.scope("embed_tokens"):
            if rank is None:
                x = gb.op("Gather", token_embedding(w, spec), tokens, axis=0)
            else:
                x = rank.embed(gb, token_embedding(w, spec), tokens)
    with gb.scope("rotary_emb"):
        if multimodal:
            cos, sin = mrope_rotary_tables(gb, position_ids, spec, mrope_section)
        else:
            cos, sin = rotary_tables(gb, position_ids, spec)
    with gb.scope("masks"):
        # Dimension 1 of input_ids [B, T] and of inputs_embeds [B, T, H] is the sequence length.
        ctx = AttentionContext(cos, sin, attention_mask_bool(gb, tokens, attention_mask))
        seq = gb.op("Gather", gb.op("Shape", tokens), gb.const([1]), axis=0)
        current = gb.op("Slice", attention_mask, gb.op("Neg", seq), gb.const([2**62]), gb.const([1]))
        token_mask = gb.unsqueeze(gb.op("Cast", current, to=FLOAT), [2])  # [B, T, 1]

    for i, kind in enumerate(spec.layer_types):
        with gb.scope(f"layers.{i}"):
            residual = x
            with gb.scope("input_layernorm"):
                h = gb.rms_norm(
                    x, w.zero_centred_scale(f"layers.{i}.input_layernorm.weight", hidden), spec.rms_norm_eps
                )
            if kind == "full_attention":
                with gb.scope("self_attn"):
                    h, k, v = gated_attention(gb, w, i, h, past[f"{i}.key"], past[f"{i}.value"], ctx, spec)
                present[f"{i}.key"], present[f"{i}.value"] = k, v
            else:
                with gb.scope("linear_attn"):
                    h, conv, rec = gated_deltanet(
                        gb, w, i, h, token_mask, past[f"{i}.conv_state"], past[f"{i}.recurrent_state"], spec
                    )
                present[f"{i}.conv_state"], present[f"{i}.recurrent_state"] = conv, rec
            if rank is not None:  # o_proj / out_proj are row-parallel: each rank holds a partial sum
                h = rank.all_reduce(gb, h)
            x = gb.op("Add", residual, h)
            residual = x
            with gb.scope("post_attention_layernorm"):
                h = gb.rms_norm(
                    x,
                    w.zero_centred_scale(f"layers.{i}.post_attention_layernorm.weight", hidden),
                    spec.rms_norm_eps,
                )
            with gb.scope("mlp"):
                h = (
                    sparse_moe(gb, w, i, h, spec, rank)
                    if spec.mlp_types[i] == "moe"
                    else dense_mlp(gb, w, i, h, spec)
                )
                if rank is not None:
                    h = rank.all_reduce(gb, h)
            x = gb.op("Add", residual, h)
            x.name = layer_output_name(i)  # a stable name so diff can find layer boundaries after passes
            layer_outputs.append(x)

    with gb.scope("norm"):
        x = gb.rms_norm(x, w.zero_centred_scale("norm.weight", hidden), spec.rms_norm_eps)
    with gb.scope("lm_head"):
        logits = lm_head(gb, w, spec, x)
        if rank is not None:
            logits = rank.gather_logits(gb, logits)
    vocab = spec.vocab_size * (rank.nb_rank if rank is not None else 1)
    name_output(graph, logits, "logits", FLOAT, ["batch", "sequence", vocab])
    for s in states:
        name_output(graph, present[s.suffix], s.output_name, FLOAT, present_shape(s))
    if final_hidden:  # what the MTP draft graph (exporter/mtp.py) starts from
        name_output(graph, gb.op("Identity", x), HIDDEN_STATES, FLOAT, ["batch", "sequence", hidden])
    if debug_hidden_states:
        for i, value in enumerate(layer_outputs):
            name_output(
                graph, gb.op("Identity", value), f"hidden_states.{i}", FLOAT, ["batch", "sequence", hidden]
            )
    return ir.Model(graph, ir_version=10, producer_name="qwen-export")


def lm_head(gb: GraphBuilder, w: Weights, spec: ModelSpec, x: ir.Value) -> ir.Value:
    """logits [B, T, vocab] of the normed hidden state `x` (the embedding's transpose when tied)."""
    hidden, ckpt = spec.hidden_size, w.ckpt
    head_source = "embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"
    if spec.tie_word_embeddings and ckpt.has("lm_head.weight"):
        ckpt.require("lm_head.weight", (spec.vocab_size, hidden))
        ckpt.used.add("lm_head.weight")  # a saved copy of the tied embedding: accounted for, not exported
    return gb.op(
        "MatMul",
        x,
        w.derived(
            head_source + ".T",
            [(head_source, (spec.vocab_size, hidden))],
            (hidden, spec.vocab_size),
            lambda a: transpose_2d(a[0]),
            layout_only=True,
            pieces=row_blocks(w.full_name(head_source), spec.vocab_size, hidden, _transposed),
            piece_axis=1,  # [hidden, vocab] written in blocks of vocab columns
        ),
    )


def token_embedding(w: Weights, spec: ModelSpec) -> ir.Value:
    """The `embed_tokens.weight` initializer [vocab, hidden]."""
    return w.derived(
        "embed_tokens.weight",
        [("embed_tokens.weight", (spec.vocab_size, spec.hidden_size))],
        (spec.vocab_size, spec.hidden_size),
        layout_only=True,
        pieces=row_blocks(w.full_name("embed_tokens.weight"), spec.vocab_size, spec.hidden_size),
    )


def _transposed(arrays: list[np.ndarray]) -> np.ndarray:
    return transpose_2d(arrays[0])


def name_output(graph: ir.Graph, value: ir.Value, name: str, dtype: ir.DataType, shape: list) -> None:
    if value.is_graph_output() or value.is_graph_input():
        value = _identity(graph, value)
    value.name = name
    value.type = ir.TensorType(dtype)
    value.shape = ir.Shape(shape)
    graph.outputs.append(value)


def _identity(graph: ir.Graph, value: ir.Value) -> ir.Value:
    node = ir.Node("", "Identity", [value], name=f"/outputs/Identity_{len(graph.outputs)}")
    graph.append(node)
    return node.outputs[0]
