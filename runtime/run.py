"""What `qwen-export run` asks and gets back: a parsed request, streamed text generation or a multimodal
run, and a result that prints itself as JSON or a one-line summary."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwen_export.errors import QwenExportError
from qwen_export.runtime.sampling import GREEDY, SamplingConfig

if TYPE_CHECKING:
    from rich.console import Console


@dataclass(frozen=True)
class RunRequest:
    artifact: Path
    prompt: str | None
    token_ids: list[int] | None
    max_new_tokens: int
    sampling: SamplingConfig
    stop_ids: list[int] | None  # None: the tokenizer's end-of-sequence token (multimodal), else never stop
    images: list[Path] = field(default_factory=list)
    videos: list[list[Path]] = field(default_factory=list)
    speculative: int = 0  # MTP draft tokens per step (0: plain decoding)

    @classmethod
    def parse(
        cls,
        artifact: Path,
        *,
        prompt: str | None,
        ids: str | None,
        max_new_tokens: int,
        greedy: bool,
        temperature: float,
        top_k: int,
        top_p: float,
        seed: int | None,
        stop: str | None,
        images: Sequence[Path] = (),
        videos: Sequence[str] = (),
        speculative: int | None = None,
    ) -> RunRequest:
        """The command line's strings as a request; a malformed number is a one-line error."""
        try:
            sampling = SamplingConfig(
                greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
            )
        except ValueError as e:
            raise QwenExportError(str(e)) from None
        token_ids = _token_ids("--ids", ids) if ids is not None else None
        stop_ids = _token_ids("--stop", stop) if stop else None
        given = [  # options of sampling set away from their defaults, which greedy decoding would ignore
            option
            for option, value, default in (
                ("--temperature", temperature, GREEDY.temperature),
                ("--top-k", top_k, GREEDY.top_k),
                ("--top-p", top_p, GREEDY.top_p),
                ("--seed", seed, GREEDY.seed),
            )
            if value != default
        ]
        if greedy and given:
            options = ", ".join(given)
            if speculative is not None:  # adding --sample would be refused in turn
                raise QwenExportError(f"--speculative decodes greedily (lossless); drop {options}")
            raise QwenExportError(f"{options} only apply to sampling: add --sample (decoding is greedy)")
        if (images or videos) and prompt is None:
            raise QwenExportError("images and videos go with --prompt TEXT (the processor places them)")
        frames = [[Path(f) for f in v.split(",")] for v in videos]
        if speculative is not None:
            from qwen_export.runtime.speculative import check_speculative

            check_speculative(speculative)
            if images or videos:
                raise QwenExportError("--speculative decodes text artifacts; drop --image/--video")
        return cls(
            artifact, prompt, token_ids, max_new_tokens, sampling, stop_ids, list(images), frames,
            speculative or 0,
        )  # fmt: skip


def _token_ids(option: str, text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        message = f"{option} {text!r}: token ids are comma-separated integers, e.g. 1,2,3"
        raise QwenExportError(message) from None


@dataclass
class RunResult:
    ids: list[int]
    text: str | None
    backend: str | None
    time_to_first_token_s: float
    decode_tokens_per_s: float
    prompt_ids: list[int] | None = None
    prompt_tokens: int | None = None
    echo_text: bool = False  # the text was not streamed, so the summary prints it
    speculative: dict[str, Any] | None = None  # acceptance per draft position (SpeculativeStats.to_json)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.prompt_ids is not None:
            data["prompt_ids"] = self.prompt_ids
        data |= {"ids": self.ids, "text": self.text}
        if self.backend is not None:
            data["backend"] = self.backend
        if self.prompt_tokens is not None:
            data["prompt_tokens"] = self.prompt_tokens
        if self.speculative is not None:
            data["speculative"] = self.speculative
        return data | {
            "time_to_first_token_s": round(self.time_to_first_token_s, 6),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
        }

    def render(self, console: Console) -> None:
        if self.echo_text:
            print(self.text)
        else:
            print()
        backend = f" · {self.backend}" if self.backend else ""
        if self.speculative is not None:
            rates = ", ".join(f"{a:.2f}" for a in self.speculative["acceptance_per_position"])
            backend += f" · speculative {self.speculative['k']}, acceptance per position {rates}"
        console.print(
            f"[dim]{len(self.ids)} tokens · first token {self.time_to_first_token_s * 1e3:.1f} ms · "
            f"decode {self.decode_tokens_per_s:.1f} tokens/s{backend}[/dim]"
        )


def stream_text(request: RunRequest, on_piece: Callable[[str], None] | None = None) -> RunResult:
    """Generate from a text artifact, handing each new token's text to `on_piece` as it comes."""
    from qwen_export.runtime.session import Session, decode_tokens_per_s

    session = Session.load(request.artifact)
    token_ids = request.token_ids if request.token_ids is not None else session.encode(request.prompt or "")
    timings: dict[str, float] = {}
    generated: list[int] = []
    stops = request.stop_ids or []
    stats = None
    if request.speculative:
        from qwen_export.runtime.speculative import SpeculativeStats

        stats = SpeculativeStats(request.speculative)
    steps = session.stream(
        [token_ids], request.max_new_tokens, request.sampling, stops, timings, request.speculative, stats
    )
    for step in steps:
        generated.append(int(step[0]))
        if on_piece is not None:
            tokenizer = session.tokenizer
            on_piece(tokenizer.decode([generated[-1]]) if tokenizer else f"{generated[-1]} ")
    text = session.tokenizer.decode(generated) if session.tokenizer else None
    rate = decode_tokens_per_s(timings, len(generated))
    return RunResult(
        generated,
        text,
        session.backend.name,
        timings["time_to_first_token_s"],
        rate,
        prompt_ids=token_ids,
        speculative=stats.to_json() if stats is not None else None,
    )


def run_multimodal_request(request: RunRequest) -> RunResult:
    from qwen_export.runtime.multimodal import run_multimodal

    result = run_multimodal(
        request.artifact,
        request.prompt or "",
        images=request.images,
        videos=request.videos,
        max_new_tokens=request.max_new_tokens,
        sampling=request.sampling,
        stop_tokens=request.stop_ids,
    )
    return RunResult(
        result.tokens,
        result.text,
        None,
        result.time_to_first_token_s,
        result.decode_tokens_per_s,
        prompt_tokens=result.prompt_tokens,
        echo_text=True,
    )
