"""A thin generation runtime over an artifact folder: prefill, then decode through the carried states."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from qwen_export.artifact import (
    DRAFT_FILE,
    EXPORT_INFO_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    RANKS_FORMAT,
    READABLE_FORMATS,
)
from qwen_export.errors import QwenExportError
from qwen_export.runtime.ort_decoder import OrtDecoder, positions_from_mask
from qwen_export.runtime.sampling import Sampler, SamplingConfig
from qwen_export.runtime.tokenizer import Tokenizer
from qwen_export.targets import TARGETS

if TYPE_CHECKING:
    from qwen_export.runtime.multimodal import MultimodalPrompt, MultimodalRunner

GREEDY = SamplingConfig()
# One decode step: (new tokens [B, 1], attention mask [B, T] with them, states) -> (logits [B, V], states)
StepFn = Callable[[np.ndarray, np.ndarray, Any], tuple[np.ndarray, Any]]


class Backend(Protocol):
    name: str
    vocab_size: int

    def empty_bound_states(self, batch: int) -> dict[str, Any]: ...

    def step_bound(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        states: dict[str, Any],
    ) -> tuple[np.ndarray, dict[str, Any]]: ...


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per prompt (stopped rows end at their stop token)
    time_to_first_token_s: float
    decode_tokens_per_s: float
    texts: list[str] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    speculative: dict[str, Any] | None = None  # acceptance per draft position (SpeculativeStats.to_json)


@dataclass
class Artifact:
    folder: Path
    info: dict[str, Any]
    model_path: Path
    target: str

    @classmethod
    def open(cls, folder: str | Path) -> Artifact:
        folder = Path(folder)
        for name in (MANIFEST_FILE, EXPORT_INFO_FILE):
            if (folder / name).is_file():
                info_path = folder / name
                break
        else:
            raise QwenExportError(
                f"{folder}: not an artifact folder (no {MANIFEST_FILE} or {EXPORT_INFO_FILE})"
            )
        try:
            info = json.loads(info_path.read_text())
        except json.JSONDecodeError as e:
            raise QwenExportError(f"{info_path}: malformed JSON ({e})") from None
        fmt = info.get("format")
        if fmt not in READABLE_FORMATS:
            raise QwenExportError(
                f"{info_path}: format {fmt!r} comes from another qwen-export version; "
                f"this one reads {', '.join(READABLE_FORMATS)} (rebuild the artifact)"
            )
        target = info.get("target", "onnx")
        model_entry = info.get("model", MODEL_FILE)  # engine manifests describe their source model instead
        model_path = folder / (model_entry if isinstance(model_entry, str) else MODEL_FILE)
        if fmt == RANKS_FORMAT:  # one graph per rank; rank 0's stands for the artifact's interface
            from qwen_export.runtime.ranks import check_ranks

            model_path = check_ranks(folder, info)[0] / MODEL_FILE
        known = TARGETS.get(target)
        onnx_target = known is not None and known.runs_on_onnxruntime
        if onnx_target and not model_path.is_file():
            raise QwenExportError(f"{folder}: {model_path.name} is missing (the artifact is incomplete)")
        if onnx_target and not (model_path.parent / (model_path.name + ".data")).is_file():
            raise QwenExportError(f"{folder}: {model_path.name}.data is missing (the artifact is incomplete)")
        for name in info.get("files", {}):  # everything the build wrote, the CPU kernel library included
            if not (folder / name).is_file():
                raise QwenExportError(f"{folder}: {name} is missing (the artifact is incomplete)")
        return cls(folder, info, model_path, target)

    @property
    def draft_path(self) -> Path | None:
        """The MTP draft graph beside an ONNX Runtime artifact's model, if it has one."""
        draft = self.info.get("draft")
        if not draft:
            return None
        path = self.model_path.parent / draft.get("graph", DRAFT_FILE)
        if not path.is_file():
            raise QwenExportError(f"{self.folder}: {path.name} is missing (the artifact is incomplete)")
        return path


class Session:
    """Generation over one artifact; pick a backend from the artifact's target."""

    def __init__(
        self,
        backend: Backend,
        artifact: Artifact | None = None,
        tokenizer: Tokenizer | None = None,
        max_context: int | None = None,
        draft: OrtDecoder | None = None,
        multimodal: MultimodalRunner | None = None,
    ):
        self.backend = backend
        self.artifact = artifact
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.draft = draft  # the MTP draft graph, for speculative decoding
        self.multimodal = multimodal  # a multimodal artifact's three graphs and processor

    @classmethod
    def load(
        cls, folder: str | Path, providers: list[str] | None = None, threads: int | None = None
    ) -> Session:
        artifact = Artifact.open(folder)
        known = TARGETS.get(artifact.target)
        source_dir = artifact.info.get("source_dir")
        max_context = (artifact.info.get("deploy") or {}).get("max_context")
        if artifact.info.get("multimodal"):
            if known is not None and known.kind == "engine":
                raise QwenExportError(
                    f"{artifact.folder}: multimodal TensorRT engines do not run in the Python runtime yet; "
                    "run the multimodal ONNX export or an ONNX Runtime build"
                )
            from qwen_export.runtime.multimodal import MultimodalRunner

            runner = MultimodalRunner(artifact.folder, providers=providers, threads=threads)
            return cls(runner.decoder, artifact, Tokenizer.find(source_dir), max_context, multimodal=runner)
        if known is not None and known.kind == "engine":
            from qwen_export.runtime.tensorrt_backend import TensorRTBackend

            backend: Backend = TensorRTBackend.from_artifact(artifact)
        else:
            from qwen_export.runtime.ranks import open_decoder

            backend = open_decoder(artifact.model_path, optimize=True, providers=providers, threads=threads)
        draft = None
        if artifact.draft_path is not None and isinstance(backend, OrtDecoder):
            # One thread: the draft is one layer, and a second intra-op pool would spin against the main
            # graph's between their alternating runs (3x slower verify steps on 2 cores).
            draft = OrtDecoder(artifact.draft_path, optimize=True, providers=providers, threads=1)
        return cls(backend, artifact, Tokenizer.find(source_dir), max_context, draft)

    # --- input handling -------------------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise QwenExportError("this artifact's checkpoint has no tokenizer.json; pass token ids (--ids)")
        return self.tokenizer.encode(prompt)

    def _check(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise QwenExportError("every prompt needs at least one token")
        vocab = self.backend.vocab_size
        for row, p in enumerate(prompts):
            bad = [t for t in p if not 0 <= int(t) < vocab]
            if bad:
                raise QwenExportError(
                    f"prompt {row}: token id {bad[0]} is outside the vocabulary [0, {vocab})"
                )
        longest = max(len(p) for p in prompts) + max_new_tokens
        if self.max_context is not None and longest > self.max_context:
            raise QwenExportError(
                f"prompt + new tokens = {longest} exceeds the artifact's max context "
                f"{self.max_context}; rebuild with a larger --max-context"
            )

    # --- generation -----------------------------------------------------------------------------------
    def speculative_decoder(self, k: int, sampling: SamplingConfig = GREEDY, rollback: str = "refeed"):
        """The MTP speculative decoder over this session's graphs; a one-line error where it cannot run."""
        from qwen_export.runtime.speculative import SpeculativeDecoder, check_speculative

        check_speculative(k)
        if self.draft is None:
            where = self.artifact.folder if self.artifact else "this session"
            raise QwenExportError(
                f"{where}: no MTP draft graph (mtp.onnx); export or build from a checkpoint whose mtp.* "
                "tensors are present, for an ONNX Runtime target, to decode speculatively"
            )
        if not sampling.greedy:
            raise QwenExportError("--speculative decodes greedily (lossless); drop the sampling options")
        return SpeculativeDecoder(self.backend, self.draft, k, rollback)  # type: ignore[arg-type]

    def stream(
        self,
        prompts: Sequence[Sequence[int]] | Sequence[MultimodalPrompt | str],
        max_new_tokens: int,
        sampling: SamplingConfig = GREEDY,
        stop_tokens: Sequence[int] = (),
        timings: dict[str, float] | None = None,
        speculative: int = 0,
        stats: Any = None,
    ) -> Iterator[np.ndarray]:
        """Yield every prompt's next token ([B] int64) per step; finished rows repeat their stop token.

        `speculative=k` drafts k tokens a round with the MTP layer and verifies them in one step (greedy
        only, the same tokens as plain decoding); `stats` (a SpeculativeStats) then collects acceptance.
        A multimodal artifact's session takes MultimodalPrompts (or plain text, or token ids) and runs
        them as one left-padded batch (runtime/multimodal.py)."""
        if self.multimodal is not None:
            yield from self._stream_multimodal(
                prompts, max_new_tokens, sampling, stop_tokens, timings, speculative
            )
            return
        self._check(prompts, max_new_tokens)  # type: ignore[arg-type]
        batch, width = len(prompts), max(len(p) for p in prompts)
        ids = np.zeros((batch, width), np.int64)
        mask = np.zeros((batch, width), np.int64)
        for row, p in enumerate(prompts):  # left padding keeps every row's last token in the last column
            ids[row, width - len(p) :] = p
            mask[row, width - len(p) :] = 1
        if speculative:
            decoder = self.speculative_decoder(speculative, sampling)
            yield from decoder.stream(ids, mask, max_new_tokens, stop_tokens, timings, stats)
            return
        backend = self.backend

        def prefill() -> tuple[np.ndarray, Any]:
            return backend.step_bound(ids, mask, positions_from_mask(mask), backend.empty_bound_states(batch))

        def step(tokens: np.ndarray, step_mask: np.ndarray, states: Any) -> tuple[np.ndarray, Any]:
            return backend.step_bound(tokens, step_mask, positions_from_mask(step_mask)[:, -1:], states)

        yield from sample_stream(prefill, step, mask, max_new_tokens, sampling, stop_tokens, timings)

    def _stream_multimodal(
        self,
        prompts: Sequence[Any],
        max_new_tokens: int,
        sampling: SamplingConfig,
        stop_tokens: Sequence[int],
        timings: dict[str, float] | None,
        speculative: int,
    ) -> Iterator[np.ndarray]:
        runner = self.multimodal
        assert runner is not None
        if speculative:
            raise QwenExportError("speculative decoding runs on text artifacts; this one is multimodal")
        if not prompts:
            raise QwenExportError("every prompt needs at least one token")
        t0 = time.perf_counter()
        rows = runner.batch_arrays(prompts)
        self._check([r["input_ids"][0].tolist() for r in rows], max_new_tokens)
        t1 = time.perf_counter()
        inputs = runner.build_batch(rows)
        if timings is not None:
            timings.update(preprocess_s=t1 - t0, vision_and_embed_s=time.perf_counter() - t1)
        yield from runner.stream(inputs, max_new_tokens, sampling, stop_tokens, timings)

    def generate(
        self,
        prompts: Sequence[Sequence[int]] | Sequence[MultimodalPrompt | str],
        max_new_tokens: int,
        sampling: SamplingConfig = GREEDY,
        stop_tokens: Sequence[int] = (),
        speculative: int = 0,
    ) -> GenerationResult:
        """New tokens for every prompt; `speculative=k` decodes with k MTP drafts a round (greedy), and the
        result's `speculative` then reports acceptance per draft position."""
        timings: dict[str, float] = {}
        stats = None
        if speculative:
            from qwen_export.runtime.speculative import SpeculativeStats

            stats = SpeculativeStats(speculative)
        steps = list(self.stream(prompts, max_new_tokens, sampling, stop_tokens, timings, speculative, stats))
        tokens = tokens_per_row(steps, len(prompts), stop_tokens)
        decode_s = timings["decode_end"] - timings["decode_start"]
        rate = decode_tokens_per_s(timings, len(steps), len(prompts))
        texts = [self.tokenizer.decode(t) for t in tokens] if self.tokenizer else None
        extra = {k: timings[k] for k in ("preprocess_s", "vision_and_embed_s") if k in timings}
        return GenerationResult(
            tokens,
            timings["time_to_first_token_s"],
            rate,
            texts,
            {"decode_s": decode_s, "steps": float(len(steps)), **extra},
            stats.to_json() if stats is not None else None,
        )


def sample_stream(
    prefill: Callable[[], tuple[np.ndarray, Any]],
    step: StepFn,
    mask: np.ndarray,
    max_new_tokens: int,
    sampling: SamplingConfig = GREEDY,
    stop_tokens: Sequence[int] = (),
    timings: dict[str, float] | None = None,
) -> Iterator[np.ndarray]:
    """The decode loop every backend shares: `prefill()` gives the last-position logits [B, V] and states,
    then each step samples a token per row ([B], yielded) and feeds it back with the mask grown by one.
    Rows that hit a stop token repeat it until all rows are done."""
    batch = mask.shape[0]
    sampler = Sampler(sampling)
    stops = np.array(list(stop_tokens), np.int64)
    done = np.zeros(batch, bool)
    start = time.perf_counter()
    logits, states = prefill()
    for index in range(max_new_tokens):
        token = sampler(logits)
        token = np.where(done, stops[0] if stops.size else token, token)
        done |= np.isin(token, stops)
        if timings is not None and index == 0:
            timings["time_to_first_token_s"] = time.perf_counter() - start
            timings["decode_start"] = time.perf_counter()
        yield token
        if done.all() or index == max_new_tokens - 1:
            break
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        logits, states = step(token[:, None], mask, states)
    if timings is not None:
        timings["decode_end"] = time.perf_counter()


def tokens_per_row(steps: Sequence[np.ndarray], batch: int, stop_tokens: Sequence[int]) -> list[list[int]]:
    """The streamed [B] tokens as one list per row, each cut after its first stop token."""
    table = np.stack(steps, axis=1) if steps else np.zeros((batch, 0), np.int64)
    tokens = []
    for row in table.tolist():
        hit = next((i for i, t in enumerate(row) if t in stop_tokens), None)
        tokens.append(row if hit is None else row[: hit + 1])
    return tokens


def decode_tokens_per_s(timings: dict[str, float], steps: int, batch: int = 1) -> float:
    """Tokens per second over the decode steps `stream` timed (the first token comes from the prefill)."""
    decode_s = timings["decode_end"] - timings["decode_start"]
    decode_steps = max(steps - 1, 0)
    return decode_steps * batch / decode_s if decode_s > 0 and decode_steps else 0.0
