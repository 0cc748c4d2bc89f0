"""The token-embedding graph of a multimodal export: input_ids [B, T] -> inputs_embeds [B, T, hidden].

The multimodal text graph takes `inputs_embeds`, so the runtime embeds the prompt with this graph, writes
the vision tower's output over the image / video placeholder rows, and embeds each decoded token with it.
"""

from __future__ import annotations

import onnx_ir as ir

from qwen_export.exporter.builder import FLOAT, INT64, GraphBuilder, new_graph, tensor_input
from qwen_export.exporter.checkpoint import Checkpoint, find_text_prefix
from qwen_export.exporter.model import token_embedding
from qwen_export.exporter.spec import ModelSpec
from qwen_export.exporter.weights import Weights

EMBED_OUTPUT = "inputs_embeds"


def embed_io_signature(spec: ModelSpec) -> dict[str, list[dict]]:
    return {
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}],
        "outputs": [
            {"name": EMBED_OUTPUT, "dtype": "float32", "shape": ["batch", "sequence", spec.hidden_size]}
        ],
    }


def build_token_embedder(spec: ModelSpec, ckpt: Checkpoint) -> ir.Model:
    input_ids = tensor_input("input_ids", INT64, ["batch", "sequence"])
    graph = new_graph("qwen_embed_tokens", [input_ids])
    gb = GraphBuilder(graph)
    w = Weights(gb, ckpt, find_text_prefix(ckpt))
    with gb.scope("embed_tokens"):
        out = gb.op("Gather", token_embedding(w, spec), input_ids, axis=0)
    out.name = EMBED_OUTPUT
    out.type = ir.TensorType(FLOAT)
    out.shape = ir.Shape(["batch", "sequence", spec.hidden_size])
    graph.outputs.append(out)
    return ir.Model(graph, ir_version=10, producer_name="qwen-export")
