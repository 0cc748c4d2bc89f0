"""A thin generation runtime over an artifact folder: prefill, then decode through the carried states."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from qwen_export.errors import QwenExportError
from qwen_export.runtime.artifact_folder import Artifact
from qwen_export.runtime.decoding import decode_tokens_per_s, sample_stream, tokens_per_row
from qwen_export.runtime.ort_decoder import OrtDecoder, positions_from_mask
from qwen_export.runtime.sampling import GREEDY, SamplingConfig
from qwen_export.runtime.tokenizer import Tokenizer
from qwen_export.targets import TARGETS

if TYPE_CHECKING:
    from qwen_export.runtime.multimodal import MultimodalPrompt, MultimodalRunner


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


# A verify graph whose weights are smaller than this runs on the calling thread: a step whose weights stay
# in the caches gains little from a second core, and a second intra-op pool spins against the main graph's
# session. On the trained reference model (4.7 MB of int4 weights, 2 cores) greedy k = 1 decoding ran at
# 0.96x plain decoding with the session's two threads, 1.13x with one (medians of 9 alternating rounds).
SMALL_MODEL_BYTES = 16 << 20


def _weight_bytes(model_path: Path) -> int:
    data = model_path.parent / (model_path.name + ".data")
    return data.stat().st_size if data.is_file() else 0


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
        self.verify: OrtDecoder | None = None  # its verify graph, composed when first needed
        self._ort_options: dict[str, Any] = {}  # how load() made the backend (for the verify graph)
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
        session = cls(backend, artifact, Tokenizer.find(source_dir), max_context, draft)
        session._ort_options = {"providers": providers, "threads": threads}
        return session

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
    def speculative_decoder(self, k: int, sampling: SamplingConfig = GREEDY, rollback: str | None = None):
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
        if self.verify is None:  # a draft graph exists beside an OrtDecoder's only
            from qwen_export.runtime.verify_graph import compose_verify_graph

            main_path = self.backend.model_path  # type: ignore[attr-defined]
            graph = compose_verify_graph(main_path, self.draft.model_path)
            options = dict(self._ort_options)
            if _weight_bytes(main_path) < SMALL_MODEL_BYTES:
                options["threads"] = 1
            self.verify = OrtDecoder(main_path, optimize=True, graph=graph, **options)
        return SpeculativeDecoder(self.verify, self.draft, k, rollback)

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

        def step(
            tokens: np.ndarray, step_mask: np.ndarray, positions: np.ndarray, states: Any
        ) -> tuple[np.ndarray, Any]:
            return backend.step_bound(tokens, step_mask, positions, states)

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
