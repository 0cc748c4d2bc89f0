"""Image / video + text prompts end to end over a multimodal export (export_model(..., multimodal=True)).

    processor (transformers) -> vision.onnx per modality -> embed.onnx(input_ids), vision rows written at
    the image / video placeholder positions -> mRoPE positions (port of get_rope_index) -> model.onnx
    prefill from empty states -> decode: embed.onnx(token) -> model.onnx with text positions + delta

Library entry point for the CLI: `run_multimodal(artifact, prompt, images=[...], videos=[[...]])`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from qwen_export.errors import QwenExportError
from qwen_export.exporter.vision_spec import VisionSpec
from qwen_export.runtime.mrope import decode_positions, rope_index
from qwen_export.runtime.multimodal_inputs import (
    check_token_ids,
    load_image,
    load_processor,
    load_video_frames,
    process,
    prompt_text,
    vision_graph_feeds,
)
from qwen_export.runtime.ort_decoder import (
    OrtDecoder,
    StepOutput,
    session_options,
)
from qwen_export.runtime.sampling import Sampler, SamplingConfig
from qwen_export.runtime.session import Artifact

GREEDY = SamplingConfig()


class EmbedsDecoder(OrtDecoder):
    """OrtDecoder over the multimodal text graph, which takes `inputs_embeds` and [3, B, T] positions."""

    def step_embeds(
        self,
        inputs_embeds: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        states: Mapping[str, np.ndarray],
    ) -> StepOutput:
        feeds = {
            "inputs_embeds": np.ascontiguousarray(inputs_embeds, np.float32),
            "attention_mask": np.asarray(attention_mask, np.int64),
            "position_ids": np.ascontiguousarray(position_ids, np.int64),
        }
        return self.run_feeds(feeds, states)


@dataclass
class MultimodalInputs:
    """A processed prompt: the processor's arrays plus what the text graph needs."""

    arrays: dict[str, np.ndarray]  # input_ids, mm_token_type_ids, pixel_values, image_grid_thw, ...
    inputs_embeds: np.ndarray  # [1, T, hidden]
    position_ids: np.ndarray  # [3, 1, T]
    rope_delta: np.ndarray  # [1, 1]: decode positions are text positions + delta

    @property
    def input_ids(self) -> np.ndarray:
        return self.arrays["input_ids"]


@dataclass
class MultimodalResult:
    tokens: list[int]  # new tokens (ending at the stop token when one was hit)
    text: str | None
    prompt_tokens: int
    image_grids: list[list[int]]
    video_grids: list[list[int]]
    prefill_logits: np.ndarray  # [1, T, V]
    time_to_first_token_s: float
    decode_tokens_per_s: float
    timings: dict[str, float] = field(default_factory=dict)


class MultimodalRunner:
    """The three graphs of a multimodal artifact plus the checkpoint's processor."""

    def __init__(
        self,
        artifact: str | Path,
        processor_dir: str | Path | None = None,
        optimize: bool = True,
        threads: int | None = None,
        providers: list[str] | None = None,
    ):
        self.artifact = Artifact.open(artifact)
        info = self.artifact.info.get("multimodal")
        if not info:
            raise QwenExportError(
                f"{self.artifact.folder}: not a multimodal export (re-export with multimodal=True from a "
                "*ForConditionalGeneration checkpoint)"
            )
        self.vspec = VisionSpec(
            **{**info["vision_spec"], "mrope_section": tuple(info["vision_spec"]["mrope_section"])}
        )
        folder = self.artifact.folder
        for name in info["graphs"].values():
            if not (folder / name).is_file() or not (folder / (name + ".data")).is_file():
                raise QwenExportError(
                    f"{folder}: {name} or its .data file is missing (the artifact is incomplete)"
                )
        providers = providers or ["CPUExecutionProvider"]
        self.decoder = EmbedsDecoder(folder / info["graphs"]["text"], optimize, providers, threads)
        options = session_options(optimize, threads)
        self.vision = ort.InferenceSession(
            str(folder / info["graphs"]["vision"]), options, providers=providers
        )
        self.embed = ort.InferenceSession(str(folder / info["graphs"]["embed"]), options, providers=providers)
        source = processor_dir or self.artifact.info.get("source_dir")
        if source is None:
            raise QwenExportError("the artifact names no source folder; pass processor_dir=")
        self.processor = load_processor(source)
        check_token_ids(self.processor, self.vspec)

    # --- stages ---------------------------------------------------------------------------------------
    def preprocess(
        self,
        prompt: str,
        images: Sequence[str | Path] = (),
        videos: Sequence[Sequence[str | Path]] = (),
        video_fps: float = 2.0,
        chat: bool | None = None,
    ) -> dict[str, np.ndarray]:
        """Files -> the processor's arrays (bad files raise QwenExportError before the processor runs)."""
        pil_images = [load_image(p) for p in images]
        frames = [load_video_frames(v, self.vspec.temporal_patch_size) for v in videos]
        text = prompt_text(self.processor, prompt, len(pil_images), len(frames), chat)
        return process(self.processor, text, pil_images, frames, video_fps)

    def encode_vision(self, pixel_values: np.ndarray, grid_thw: np.ndarray) -> np.ndarray:
        """vision.onnx over every image (or every video) of the prompt at once: [merged_patches, hidden]."""
        feeds = vision_graph_feeds(pixel_values, grid_thw, self.vspec)
        return self.vision.run(None, feeds)[0]

    def embed_tokens(self, input_ids: np.ndarray) -> np.ndarray:
        return self.embed.run(None, {"input_ids": np.asarray(input_ids, np.int64)})[0]

    def build_inputs(self, arrays: dict[str, np.ndarray]) -> MultimodalInputs:
        """Token embeddings with vision rows at the placeholders (as masked_scatter does) and mRoPE ids."""
        ids = arrays["input_ids"]
        if ids.shape[0] != 1:
            raise QwenExportError("multimodal prompts run one at a time (batch 1)")
        embeds = self.embed_tokens(ids)
        for kind, token_id in (("image", self.vspec.image_token_id), ("video", self.vspec.video_token_id)):
            pixels = arrays.get("pixel_values" if kind == "image" else "pixel_values_videos")
            slots = ids == token_id
            if pixels is None:
                if slots.any():
                    raise QwenExportError(f"the prompt has {kind} placeholder tokens but no {kind} was given")
                continue
            features = self.encode_vision(pixels, arrays[f"{kind}_grid_thw"])
            if int(slots.sum()) != features.shape[0]:
                raise QwenExportError(
                    f"{kind} features and placeholder tokens do not match: {features.shape[0]} features, "
                    f"{int(slots.sum())} tokens"
                )
            embeds[slots] = features
        positions, delta = rope_index(
            ids,
            arrays["mm_token_type_ids"],
            arrays.get("image_grid_thw"),
            arrays.get("video_grid_thw"),
            self.vspec.spatial_merge_size,
        )
        return MultimodalInputs(arrays, embeds, positions, delta)

    def prefill(self, inputs: MultimodalInputs) -> StepOutput:
        mask = np.ones(inputs.input_ids.shape, np.int64)
        return self.decoder.step_embeds(
            inputs.inputs_embeds, mask, inputs.position_ids, self.decoder.empty_states(1)
        )

    # --- generation -----------------------------------------------------------------------------------
    def generate(
        self,
        inputs: MultimodalInputs,
        max_new_tokens: int,
        sampling: SamplingConfig = GREEDY,
        stop_tokens: Sequence[int] = (),
    ) -> MultimodalResult:
        if max_new_tokens < 1:
            raise QwenExportError("max_new_tokens must be at least 1")
        start = time.perf_counter()
        out = self.prefill(inputs)
        prefill_logits = out.logits
        sampler = Sampler(sampling)
        length = inputs.input_ids.shape[1]
        mask = np.ones((1, length), np.int64)
        tokens: list[int] = []
        first_token_s = decode_start = 0.0
        states, last = out.states, out.logits[:, -1]
        for step in range(max_new_tokens):
            token = int(sampler(last)[0])
            tokens.append(token)
            if step == 0:
                first_token_s = time.perf_counter() - start
                decode_start = time.perf_counter()
            if token in stop_tokens or step == max_new_tokens - 1:
                break
            # After the prompt, positions are text positions shifted by the prompt's mRoPE delta.
            position = decode_positions(np.array([length + step]) + inputs.rope_delta[:, 0])
            mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
            out = self.decoder.step_embeds(self.embed_tokens(np.array([[token]])), mask, position, states)
            states, last = out.states, out.logits[:, -1]
        decode_s = time.perf_counter() - decode_start
        steps = len(tokens) - 1
        tokenizer = getattr(self.processor, "tokenizer", None)
        return MultimodalResult(
            tokens=tokens,
            text=tokenizer.decode(tokens, skip_special_tokens=False) if tokenizer is not None else None,
            prompt_tokens=length,
            image_grids=_grids(inputs.arrays.get("image_grid_thw")),
            video_grids=_grids(inputs.arrays.get("video_grid_thw")),
            prefill_logits=prefill_logits,
            time_to_first_token_s=first_token_s,
            decode_tokens_per_s=steps / decode_s if steps and decode_s > 0 else 0.0,
            timings={"decode_s": decode_s, "total_s": time.perf_counter() - start},
        )


def run_multimodal(
    artifact: str | Path,
    prompt: str,
    images: Sequence[str | Path] = (),
    videos: Sequence[Sequence[str | Path]] = (),
    max_new_tokens: int = 32,
    sampling: SamplingConfig = GREEDY,
    stop_tokens: Sequence[int] | None = None,
    processor_dir: str | Path | None = None,
    video_fps: float = 2.0,
    chat: bool | None = None,
    optimize: bool = True,
    threads: int | None = None,
) -> MultimodalResult:
    """Generate from image files and / or videos (each a list of frame files, at least 2) plus a prompt.

    stop_tokens=None stops at the tokenizer's end-of-sequence token when it has one; pass () to always
    produce max_new_tokens. chat=None wraps the prompt in the checkpoint's chat template when it has one.
    Bad inputs (missing, empty, unreadable or absurd images) raise QwenExportError.
    """
    if not images and not videos:
        raise QwenExportError("pass at least one image or video (text-only prompts: `qwen-export run`)")
    t0 = time.perf_counter()
    runner = MultimodalRunner(artifact, processor_dir, optimize=optimize, threads=threads)
    load_s = time.perf_counter() - t0
    arrays = runner.preprocess(prompt, images, videos, video_fps, chat)
    preprocess_s = time.perf_counter() - t0 - load_s
    inputs = runner.build_inputs(arrays)
    build_inputs_s = time.perf_counter() - t0 - load_s - preprocess_s
    if stop_tokens is None:
        eos = getattr(runner.processor.tokenizer, "eos_token_id", None)
        stop_tokens = () if eos is None else (int(eos),)
    result = runner.generate(inputs, max_new_tokens, sampling, stop_tokens)
    result.timings.update(load_s=load_s, preprocess_s=preprocess_s, vision_and_embed_s=build_inputs_s)
    return result


def _grids(grid: Any) -> list[list[int]]:
    return [] if grid is None else np.asarray(grid).astype(int).tolist()
