"""Image / video + text prompts end to end over a multimodal export (export_model(..., multimodal=True)).

    processor (transformers) -> vision.onnx per modality -> embed.onnx(input_ids), vision rows written at
    the image / video placeholder positions -> mRoPE positions (port of get_rope_index) -> model.onnx
    prefill from empty states -> decode: embed.onnx(token) -> model.onnx with text positions + delta

A batch of prompts (each with its own images / videos and length) runs as one left-padded batch through the
text graph; vision.onnx runs once per modality over all the batch's images (or videos). Library entry points:
`run_multimodal(artifact, prompt, images=[...], videos=[[...]])`, `run_multimodal_batch(artifact, prompts)`,
and `Session.load(artifact)` (runtime/session.py), which streams like a text session.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from qwen_export.errors import QwenExportError
from qwen_export.exporter.vision_spec import VisionSpec
from qwen_export.runtime.artifact_folder import Artifact
from qwen_export.runtime.decoding import decode_tokens_per_s, sample_stream, tokens_per_row
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
from qwen_export.runtime.sampling import GREEDY, SamplingConfig


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


@dataclass(frozen=True)
class MultimodalPrompt:
    """One prompt of a batch: its text and the media its placeholders (or the chat template) refer to."""

    text: str
    images: Sequence[str | Path] = ()
    videos: Sequence[Sequence[str | Path]] = ()  # each video: its frame files (>= 2, same size)


@dataclass
class MultimodalInputs:
    """A left-padded batch of processed prompts: the processor's arrays plus what the text graph needs."""

    rows: list[dict[str, np.ndarray]]  # per prompt: input_ids [1, T_i], mm_token_type_ids, pixel_values, ...
    inputs_embeds: np.ndarray  # [B, T, hidden]
    attention_mask: np.ndarray  # [B, T]: 0 on the left padding
    position_ids: np.ndarray  # [3, B, T]
    rope_delta: np.ndarray  # [B, 1]: decode positions are text positions + delta

    @property
    def batch(self) -> int:
        return len(self.rows)


@dataclass
class MultimodalResult:
    tokens: list[int]  # new tokens (ending at the stop token when one was hit)
    text: str | None
    prompt_tokens: int
    image_grids: list[list[int]]
    video_grids: list[list[int]]
    prefill_logits: np.ndarray  # [1, T, V] (this prompt's positions only, without the batch's padding)
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

    def prompt_arrays(
        self,
        prompt: MultimodalPrompt | str | Sequence[int],
        video_fps: float = 2.0,
        chat: bool | None = None,
    ) -> dict[str, np.ndarray]:
        """One prompt of a batch as the processor's arrays; token ids are taken as they are (text only)."""
        if isinstance(prompt, str):
            prompt = MultimodalPrompt(prompt)
        if isinstance(prompt, MultimodalPrompt):
            return self.preprocess(prompt.text, prompt.images, prompt.videos, video_fps, chat)
        ids = np.asarray([list(prompt)], np.int64)
        return {"input_ids": ids, "mm_token_type_ids": np.zeros_like(ids)}

    def batch_arrays(
        self,
        prompts: Sequence[MultimodalPrompt | str | Sequence[int]],
        video_fps: float = 2.0,
        chat: bool | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """prompt_arrays for every prompt of a batch; an error names the prompt it is about."""
        rows = []
        for b, prompt in enumerate(prompts):
            try:
                rows.append(self.prompt_arrays(prompt, video_fps, chat))
            except QwenExportError as e:
                raise QwenExportError(f"prompt {b}: {e}" if len(prompts) > 1 else str(e)) from None
        return rows

    def encode_vision(self, pixel_values: np.ndarray, grid_thw: np.ndarray) -> np.ndarray:
        """vision.onnx over a list of images (or videos) at once: [merged_patches, hidden]."""
        feeds = vision_graph_feeds(pixel_values, grid_thw, self.vspec)
        return self.vision.run(None, feeds)[0]

    def embed_tokens(self, input_ids: np.ndarray) -> np.ndarray:
        return self.embed.run(None, {"input_ids": np.asarray(input_ids, np.int64)})[0]

    def build_inputs(self, arrays: dict[str, np.ndarray]) -> MultimodalInputs:
        """One processed prompt as a batch of one (see build_batch)."""
        return self.build_batch([arrays])

    def build_batch(self, rows: Sequence[dict[str, np.ndarray]]) -> MultimodalInputs:
        """Processed prompts as one left-padded batch: token embeddings with vision rows at the placeholders
        (as masked_scatter does) and mRoPE positions. vision.onnx runs once per modality over every
        prompt's media (attention stays within each image / frame, so rows do not mix)."""
        if not rows:
            raise QwenExportError("pass at least one prompt")
        self._check_placeholders(rows)
        width = max(r["input_ids"].shape[1] for r in rows)
        ids = np.zeros((len(rows), width), np.int64)
        types = np.zeros_like(ids)
        mask = np.zeros_like(ids)
        for b, arrays in enumerate(rows):  # left padding keeps every row's last token in the last column
            length = arrays["input_ids"].shape[1]
            ids[b, width - length :] = arrays["input_ids"][0]
            types[b, width - length :] = arrays["mm_token_type_ids"][0]
            mask[b, width - length :] = 1
        embeds = self.embed_tokens(ids)
        grids: dict[str, np.ndarray | None] = {}
        for kind, token_id, pixels_key in self._media():
            have = [r for r in rows if r.get(pixels_key) is not None]
            grids[kind] = np.concatenate([r[f"{kind}_grid_thw"] for r in have]) if have else None
            if have:  # row-major placeholder order is the order of the concatenated features
                pixels = np.concatenate([r[pixels_key] for r in have])
                embeds[ids == token_id] = self.encode_vision(pixels, grids[kind])
        positions, delta = rope_index(
            ids, types, grids["image"], grids["video"], self.vspec.spatial_merge_size, mask
        )
        return MultimodalInputs(list(rows), embeds, mask, positions, delta)

    def _media(self) -> tuple[tuple[str, int, str], ...]:
        """(kind, placeholder token id, the processor's pixel key) per modality, images first."""
        return (
            ("image", self.vspec.image_token_id, "pixel_values"),
            ("video", self.vspec.video_token_id, "pixel_values_videos"),
        )

    def _check_placeholders(self, rows: Sequence[dict[str, np.ndarray]]) -> None:
        """Each prompt's placeholder count must match its own media (merged patches), checked up front."""
        merge = self.vspec.spatial_merge_size**2
        for b, arrays in enumerate(rows):
            where = f"prompt {b}: " if len(rows) > 1 else ""
            for kind, token_id, _ in self._media():
                grid = arrays.get(f"{kind}_grid_thw")
                slots = int((arrays["input_ids"] == token_id).sum())
                if grid is None:
                    if slots:
                        raise QwenExportError(
                            f"{where}the prompt has {kind} placeholder tokens but no {kind} was given"
                        )
                    continue
                features = int(np.prod(grid, axis=1).sum()) // merge
                if slots != features:
                    raise QwenExportError(
                        f"{where}{kind} features and placeholder tokens do not match: {features} features, "
                        f"{slots} tokens"
                    )

    def prefill(self, inputs: MultimodalInputs) -> StepOutput:
        return self.decoder.step_embeds(
            inputs.inputs_embeds,
            inputs.attention_mask,
            inputs.position_ids,
            self.decoder.empty_states(inputs.batch),
        )

    def default_stop_tokens(self) -> tuple[int, ...]:
        """The tokenizer's end-of-sequence token, when it has one."""
        eos = getattr(self.processor.tokenizer, "eos_token_id", None)
        return () if eos is None else (int(eos),)

    # --- generation -----------------------------------------------------------------------------------
    def stream(
        self,
        inputs: MultimodalInputs,
        max_new_tokens: int,
        sampling: SamplingConfig = GREEDY,
        stop_tokens: Sequence[int] = (),
        timings: dict[str, float] | None = None,
        prefill_logits: list[np.ndarray] | None = None,
    ) -> Iterator[np.ndarray]:
        """Yield every row's next token ([B]) per step, as Session.stream does (the same loop);
        `prefill_logits` receives the prefill's logits [B, T, V]."""
        if max_new_tokens < 1:
            raise QwenExportError("max_new_tokens must be at least 1")

        def prefill() -> tuple[np.ndarray, dict[str, np.ndarray]]:
            out = self.prefill(inputs)
            if prefill_logits is not None:
                prefill_logits.append(out.logits)
            return out.logits[:, -1], out.states

        def step(
            tokens: np.ndarray, mask: np.ndarray, positions: np.ndarray, states: dict[str, np.ndarray]
        ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
            # After the prompt, positions are text positions shifted by each row's mRoPE delta.
            position = decode_positions(positions[:, 0] + inputs.rope_delta[:, 0])
            out = self.decoder.step_embeds(self.embed_tokens(tokens), mask, position, states)
            return out.logits[:, -1], out.states

        yield from sample_stream(
            prefill, step, inputs.attention_mask, max_new_tokens, sampling, stop_tokens, timings
        )

    def generate_batch(
        self,
        inputs: MultimodalInputs,
        max_new_tokens: int,
        sampling: SamplingConfig = GREEDY,
        stop_tokens: Sequence[int] = (),
    ) -> list[MultimodalResult]:
        """One result per prompt of the batch; each row stops at its own stop token."""
        timings: dict[str, float] = {}
        captured: list[np.ndarray] = []
        start = time.perf_counter()
        steps = list(self.stream(inputs, max_new_tokens, sampling, stop_tokens, timings, captured))
        total_s = time.perf_counter() - start
        decode_s = timings["decode_end"] - timings["decode_start"]
        width = inputs.attention_mask.shape[1]
        tokenizer = getattr(self.processor, "tokenizer", None)
        results = []
        for row, tokens in enumerate(tokens_per_row(steps, inputs.batch, stop_tokens)):
            arrays = inputs.rows[row]
            length = arrays["input_ids"].shape[1]
            text = tokenizer.decode(tokens, skip_special_tokens=False) if tokenizer is not None else None
            results.append(
                MultimodalResult(
                    tokens=tokens,
                    text=text,
                    prompt_tokens=length,
                    image_grids=_grids(arrays.get("image_grid_thw")),
                    video_grids=_grids(arrays.get("video_grid_thw")),
                    prefill_logits=captured[0][row : row + 1, width - length :],  # without the padding
                    time_to_first_token_s=timings["time_to_first_token_s"],
                    decode_tokens_per_s=decode_tokens_per_s(timings, len(steps)),
                    timings={"decode_s": decode_s, "total_s": total_s},
                )
            )
        return results

    def generate(
        self,
        inputs: MultimodalInputs,
        max_new_tokens: int,
        sampling: SamplingConfig = GREEDY,
        stop_tokens: Sequence[int] = (),
    ) -> MultimodalResult:
        """A batch of one prompt (build_inputs); batches: generate_batch."""
        if inputs.batch != 1:
            raise QwenExportError(f"generate takes one prompt, not {inputs.batch}; use generate_batch")
        return self.generate_batch(inputs, max_new_tokens, sampling, stop_tokens)[0]


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
    prompts = [MultimodalPrompt(prompt, images, videos)]
    return run_multimodal_batch(
        artifact,
        prompts,
        max_new_tokens,
        sampling,
        stop_tokens,
        processor_dir,
        video_fps,
        chat,
        optimize,
        threads,
    )[0]


def run_multimodal_batch(
    artifact: str | Path,
    prompts: Sequence[MultimodalPrompt],
    max_new_tokens: int = 32,
    sampling: SamplingConfig = GREEDY,
    stop_tokens: Sequence[int] | None = None,
    processor_dir: str | Path | None = None,
    video_fps: float = 2.0,
    chat: bool | None = None,
    optimize: bool = True,
    threads: int | None = None,
) -> list[MultimodalResult]:
    """run_multimodal for several prompts at once (one left-padded batch): one result per prompt, each the
    same as running that prompt alone. The timings are the batch's."""
    t0 = time.perf_counter()
    runner = MultimodalRunner(artifact, processor_dir, optimize=optimize, threads=threads)
    load_s = time.perf_counter() - t0
    rows = runner.batch_arrays(prompts, video_fps, chat)
    preprocess_s = time.perf_counter() - t0 - load_s
    inputs = runner.build_batch(rows)
    build_inputs_s = time.perf_counter() - t0 - load_s - preprocess_s
    stops = runner.default_stop_tokens() if stop_tokens is None else stop_tokens
    results = runner.generate_batch(inputs, max_new_tokens, sampling, stops)
    for result in results:
        result.timings.update(load_s=load_s, preprocess_s=preprocess_s, vision_and_embed_s=build_inputs_s)
    return results


def _grids(grid: Any) -> list[list[int]]:
    return [] if grid is None else np.asarray(grid).astype(int).tolist()
