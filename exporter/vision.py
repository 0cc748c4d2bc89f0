"""The Qwen3.5 vision tower as an ONNX graph over a dynamic number of patches.

Graph I/O (all images or frames of one call are packed along the patch axis, as in transformers):
  pixel_values   float32 [patches, C*T*P*P]  the processor's flattened patches, spatial-merge-block order
  interp_indices int64   [patches, 4]        bilinear taps into the learned position-embedding table
  interp_weights float32 [patches, 4]        their weights
  position_ids   int64   [patches, 2]        (row, col) of each patch, for the 2-D rotary embedding
  cu_seqlens     int64   [segments + 1]      attention segment bounds (one segment per image / frame)
  -> vision_embeds float32 [patches / merge**2, out_hidden_size]   the patch merger's output

The grid-dependent inputs are what `transformers.vision_utils` computes from `grid_thw` (see
`qwen_export.runtime.multimodal_inputs.vision_graph_feeds`); names match the keys transformers accepts as
precomputed kwargs. Everything with weights (patch embedding, position-embedding mix, blocks, merger) is
in the graph.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qwen_export.errors import CheckpointError
from qwen_export.exporter.builder import FLOAT, INT64, GraphBuilder, new_graph, tensor_input
from qwen_export.exporter.checkpoint import Checkpoint
from qwen_export.exporter.vision_spec import VISION_ACTIVATIONS, VisionSpec
from qwen_export.exporter.weights import Weights

VISION_PREFIXES = ("model.visual.", "visual.")
INTERPOLATION_TAPS = 4  # bilinear, as Qwen3_5VisionModel resamples its position grid
LAYER_NORM_EPS = 1e-6  # nn.LayerNorm(eps=1e-6) in every vision block and the merger
VISION_OUTPUT = "vision_embeds"


def find_vision_prefix(ckpt: Checkpoint) -> str:
    for prefix in VISION_PREFIXES:
        if ckpt.has(prefix + "patch_embed.proj.weight"):
            return prefix
    raise CheckpointError(
        f"{ckpt.model_dir}: missing tensor model.visual.patch_embed.proj.weight; the multimodal export "
        "needs the vision tower's weights"
    )


def vision_io_signature(vspec: VisionSpec) -> dict[str, list[dict]]:
    return {
        "inputs": [
            {"name": "pixel_values", "dtype": "float32", "shape": ["patches", vspec.patch_dim]},
            {"name": "interp_indices", "dtype": "int64", "shape": ["patches", INTERPOLATION_TAPS]},
            {"name": "interp_weights", "dtype": "float32", "shape": ["patches", INTERPOLATION_TAPS]},
            {"name": "position_ids", "dtype": "int64", "shape": ["patches", 2]},
            {"name": "cu_seqlens", "dtype": "int64", "shape": ["segment_bounds"]},
        ],
        "outputs": [
            {"name": VISION_OUTPUT, "dtype": "float32", "shape": ["merged_patches", vspec.out_hidden_size]}
        ],
    }


def build_vision_encoder(vspec: VisionSpec, ckpt: Checkpoint) -> ir.Model:
    """Qwen3_5[Moe]VisionModel.forward (the pooled merger output) with initializers read lazily."""
    sig = vision_io_signature(vspec)["inputs"]
    dtypes = {"float32": FLOAT, "int64": INT64}
    inputs = {i["name"]: tensor_input(i["name"], dtypes[i["dtype"]], i["shape"]) for i in sig}
    graph = new_graph("qwen_vision", list(inputs.values()))
    gb = GraphBuilder(graph)
    w = Weights(gb, ckpt, find_vision_prefix(ckpt))
    hidden = vspec.hidden_size

    with gb.scope("visual"):
        with gb.scope("patch_embed"):
            x = _patch_embed(gb, w, inputs["pixel_values"], vspec)
        with gb.scope("pos_embed"):
            table = w.derived(
                "pos_embed.weight",
                [("pos_embed.weight", (vspec.num_position_embeddings, hidden))],
                (vspec.num_position_embeddings, hidden),
            )
            taps = gb.op("Gather", table, inputs["interp_indices"], axis=0)  # [N, 4, hidden]
            mixed = gb.op("Mul", taps, gb.unsqueeze(inputs["interp_weights"], [2]))
            x = gb.op("Add", x, gb.op("ReduceSum", mixed, gb.const([1]), keepdims=0))
        with gb.scope("rotary_pos_emb"):
            cos, sin = _axial_rotary(gb, inputs["position_ids"], vspec)
        with gb.scope("attention_segments"):
            allowed = _segment_mask(gb, x, inputs["cu_seqlens"])
        for i in range(vspec.depth):
            with gb.scope(f"blocks.{i}"):
                x = _block(gb, w, i, x, cos, sin, allowed, vspec)
        with gb.scope("merger"):
            out = _merger(gb, w, x, vspec)

    out.name = VISION_OUTPUT
    out.type = ir.TensorType(FLOAT)
    out.shape = ir.Shape(["merged_patches", vspec.out_hidden_size])
    graph.outputs.append(out)
    return ir.Model(graph, ir_version=10, producer_name="qwen-export")


def _patch_embed(gb: GraphBuilder, w: Weights, pixels: ir.Value, vspec: VisionSpec) -> ir.Value:
    """Conv3d with kernel == stride over one patch each: a MatMul with the flattened kernel."""
    e, c, t, p = vspec.hidden_size, vspec.in_channels, vspec.temporal_patch_size, vspec.patch_size
    kernel = w.derived(
        "patch_embed.proj.weight.T",
        [("patch_embed.proj.weight", (e, c, t, p, p))],
        (vspec.patch_dim, e),
        lambda a: a[0].reshape(e, -1).T,
    )
    return gb.linear(pixels, kernel, w.vector("patch_embed.proj.bias", e))


def _axial_rotary(gb: GraphBuilder, position_ids: ir.Value, vspec: VisionSpec) -> tuple[ir.Value, ir.Value]:
    """cos/sin [N, 1, head_dim]: rows use the first quarter of frequencies, columns the second, twice."""
    dim = vspec.head_dim // 2
    inv_freq = 1.0 / (vspec.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    positions = gb.unsqueeze(gb.op("Cast", position_ids, to=FLOAT), [-1])  # [N, 2, 1]
    freqs = gb.op("Mul", positions, gb.const(inv_freq.astype(np.float32), np.float32))  # [N, 2, dim/2]
    freqs = gb.reshape(freqs, [0, dim])  # [N, dim]: row frequencies then column frequencies
    emb = gb.unsqueeze(gb.op("Concat", freqs, freqs, axis=-1), [1])  # [N, 1, head_dim]
    return gb.op("Cos", emb), gb.op("Sin", emb)


def _segment_mask(gb: GraphBuilder, x: ir.Value, cu_seqlens: ir.Value) -> ir.Value:
    """bool [N, N]: patches attend only within their own segment [cu[s], cu[s+1])."""
    n = gb.op("Gather", gb.op("Shape", x), gb.const(0), axis=0)
    patch = gb.unsqueeze(gb.op("Range", gb.const(0), n, gb.const(1)), [1])  # [N, 1]
    bounds = gb.unsqueeze(gb.op("Slice", cu_seqlens, gb.const([1]), gb.const([2**62])), [0])  # [1, S]
    passed = gb.op("Cast", gb.op("GreaterOrEqual", patch, bounds), to=INT64)
    segment = gb.op("ReduceSum", passed, gb.const([1]), keepdims=0)  # [N]
    return gb.op("Equal", gb.unsqueeze(segment, [1]), gb.unsqueeze(segment, [0]))


def _layer_norm(gb: GraphBuilder, w: Weights, name: str, x: ir.Value, size: int) -> ir.Value:
    return gb.op(
        "LayerNormalization",
        x,
        w.vector(name + ".weight", size),
        w.vector(name + ".bias", size),
        axis=-1,
        epsilon=LAYER_NORM_EPS,
    )


def _dense(gb: GraphBuilder, w: Weights, name: str, x: ir.Value, out_f: int, in_f: int) -> ir.Value:
    return gb.linear(x, w.linear_t(name + ".weight", out_f, in_f), w.vector(name + ".bias", out_f))


def _rope(gb: GraphBuilder, x: ir.Value, cos: ir.Value, sin: ir.Value, head_dim: int) -> ir.Value:
    half = head_dim // 2
    x1, x2 = gb.slice(x, 0, half, -1), gb.slice(x, half, head_dim, -1)
    rotated = gb.op("Concat", gb.op("Neg", x2), x1, axis=-1)
    return gb.op("Add", gb.op("Mul", x, cos), gb.op("Mul", rotated, sin))


def _block(
    gb: GraphBuilder,
    w: Weights,
    i: int,
    x: ir.Value,
    cos: ir.Value,
    sin: ir.Value,
    allowed: ir.Value,
    vspec: VisionSpec,
) -> ir.Value:
    p = f"blocks.{i}."
    e, heads, hd = vspec.hidden_size, vspec.num_heads, vspec.head_dim
    with gb.scope("norm1"):
        h = _layer_norm(gb, w, p + "norm1", x, e)
    with gb.scope("attn"):
        qkv = gb.reshape(_dense(gb, w, p + "attn.qkv", h, 3 * e, e), [0, 3, heads, hd])
        parts = gb.op_multi("Split", [qkv, gb.const([1, 1, 1])], 3, axis=1)
        q, k, v = (gb.squeeze(t, [1]) for t in parts)  # [N, heads, hd]
        q = gb.transpose(_rope(gb, q, cos, sin, hd), [1, 0, 2])  # [heads, N, hd]
        k = gb.transpose(_rope(gb, k, cos, sin, hd), [1, 2, 0])  # [heads, hd, N]
        v = gb.transpose(v, [1, 0, 2])
        scores = gb.op("Mul", gb.op("MatMul", q, k), gb.const(hd**-0.5, np.float32))
        scores = gb.op("Where", allowed, scores, gb.const(np.finfo(np.float32).min, np.float32))
        attn = gb.op("MatMul", gb.op("Softmax", scores, axis=-1), v)  # [heads, N, hd]
        attn = gb.reshape(gb.transpose(attn, [1, 0, 2]), [0, e])
        x = gb.op("Add", x, _dense(gb, w, p + "attn.proj", attn, e, e))
    with gb.scope("norm2"):
        h = _layer_norm(gb, w, p + "norm2", x, e)
    with gb.scope("mlp"):
        h = _dense(gb, w, p + "mlp.linear_fc1", h, vspec.intermediate_size, e)
        h = gb.op("Gelu", h, approximate=VISION_ACTIVATIONS[vspec.hidden_act])
        h = _dense(gb, w, p + "mlp.linear_fc2", h, e, vspec.intermediate_size)
    return gb.op("Add", x, h)


def _merger(gb: GraphBuilder, w: Weights, x: ir.Value, vspec: VisionSpec) -> ir.Value:
    """LayerNorm per patch, then each spatial-merge block of patches (consecutive rows) through an MLP."""
    merged = vspec.merged_hidden_size
    h = _layer_norm(gb, w, "merger.norm", x, vspec.hidden_size)
    h = gb.reshape(h, [-1, merged])
    h = _dense(gb, w, "merger.linear_fc1", h, merged, merged)
    h = gb.op("Gelu", h, approximate="none")  # nn.GELU()
    return _dense(gb, w, "merger.linear_fc2", h, vspec.out_hidden_size, merged)
