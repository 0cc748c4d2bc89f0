"""What diff and profile need to drive a multimodal artifact with the text tools' machinery: its text path
as a token-id decoder, and where each vision block ends in vision.onnx."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qwen_export.errors import QwenExportError
from qwen_export.exporter.vision_spec import VisionSpec
from qwen_export.runtime.multimodal import EmbedsDecoder
from qwen_export.runtime.ort_decoder import OrtDecoder, StepOutput

VISION_BLOCK = re.compile(r"^/visual/blocks\.(\d+)/")
# A node directly in a block's scope (not in norm1/attn/norm2/mlp): the residual adds; the last one ends it.
_BLOCK_LEVEL = re.compile(r"^/visual/blocks\.(\d+)/[^/]+$")


class TextEmbedsDecoder(EmbedsDecoder):
    """A multimodal artifact's text path driven like a text decoder: token ids go through embed.onnx, and a
    text-only prompt has the same position on the three mRoPE axes. prefill / greedy are OrtDecoder's."""

    embed: Callable[[np.ndarray], np.ndarray]

    @classmethod
    def wrap(cls, decoder: OrtDecoder, embed: Callable[[np.ndarray], np.ndarray]) -> TextEmbedsDecoder:
        """A view of a loaded text graph (its session shared, not loaded again) with the embedding."""
        view = cls.__new__(cls)
        view.__dict__.update(decoder.__dict__)
        view.embed = embed
        return view

    def step(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        states: Mapping[str, np.ndarray],
    ) -> StepOutput:
        positions = np.broadcast_to(position_ids, (3, *np.shape(position_ids)))
        return self.step_embeds(
            self.embed(np.asarray(input_ids, np.int64)), attention_mask, positions, states
        )


def vision_block_outputs(vision_path: Path, depth: int) -> list[str]:
    """The value each vision block ends with (its last residual add), by the exporter's node scopes, which
    the vision pipelines keep."""
    import onnx

    proto = onnx.load(str(vision_path), load_external_data=False)
    last: dict[int, str] = {}
    for node in proto.graph.node:
        m = _BLOCK_LEVEL.match(node.name)
        if m and node.op_type == "Add":
            last[int(m.group(1))] = node.output[0]
    missing = [i for i in range(depth) if i not in last]
    if missing:
        raise QwenExportError(
            f"{vision_path}: the end of vision block {missing[0]} was not found; per-layer diff needs a "
            "vision graph whose passes keep the exporter's /visual/blocks.<i>/ node names"
        )
    return [last[i] for i in range(depth)]


def vision_spec(info: Mapping[str, Any]) -> VisionSpec:
    """The vision spec a multimodal artifact's manifest (or export.json) records."""
    spec = info["multimodal"]["vision_spec"]
    return VisionSpec(**{**spec, "mrope_section": tuple(spec["mrope_section"])})


def token_decoder(model_path: Path, info: Mapping[str, Any]) -> OrtDecoder:
    """An artifact's text graph driven by token ids (the tools' prompts): as it is, or for a multimodal
    artifact through its embed.onnx."""
    from qwen_export.runtime.ranks import open_decoder

    decoder = open_decoder(model_path)
    if info.get("multimodal"):
        decoder = TextEmbedsDecoder.wrap(decoder, embed_function(model_path.parent, info))
    return decoder


def embed_function(folder: Path, info: Mapping[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    """embed.onnx of a multimodal artifact as a function of token ids (optimizations off, like the tools)."""
    import onnxruntime as ort

    from qwen_export.runtime.ort_decoder import session_options

    path = folder / info["multimodal"]["graphs"]["embed"]
    session = ort.InferenceSession(str(path), session_options(False), providers=["CPUExecutionProvider"])
    return lambda ids: session.run(None, {"input_ids": np.asarray(ids, np.int64)})[0]
