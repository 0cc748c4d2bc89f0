"""`qwen-export diff --text FILE`: what an artifact's precision costs on real text.

The text is tokenized with the checkpoint's tokenizer and scored in the non-overlapping windows the trained
reference model logs its perplexity on (golden/perplexity.py), each from an empty cache. Reported: the
artifact's held-out perplexity and the reference's (transformers in fp32 on the same checkpoint; an FP8
checkpoint's on its dequantized weights), their relative difference, next-token (top-1) agreement with the
reference and the mean KL(reference || artifact) per predicted token, held to the precision's top-1 and KL
bounds (for int4/int8 derived on this kind of text, qwen_export/tolerances.py). ONNX Runtime runs the
artifact with graph optimizations off, as every check does.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qwen_export.errors import QwenExportError
from qwen_export.metrics import log_softmax

if TYPE_CHECKING:
    from rich.console import Console

DEFAULT_WINDOWS = 16  # of golden/perplexity.WINDOW tokens: about 4K predicted tokens


@dataclass
class TextQuality:
    artifact: str
    text: str
    precision: str
    windows: int
    window: int
    predicted_tokens: int
    text_windows: int  # how many the text holds: `windows` scores its first ones
    perplexity: float
    reference_perplexity: float
    top1_agreement: float  # argmax of the artifact's next-token logits == the reference's
    kl_mean: float  # KL(reference || artifact) per predicted token, nats
    tolerances: dict[str, float] = field(default_factory=dict)  # the precision's (qwen_export/tolerances.py)

    @property
    def perplexity_delta(self) -> float:
        """Relative change of perplexity against the reference (0.01 = 1% worse)."""
        return self.perplexity / self.reference_perplexity - 1.0

    @property
    def passed(self) -> bool:
        """Top-1 agreement and mean KL within the precision's bounds (derived on text for int4/int8)."""
        t = self.tolerances
        return self.top1_agreement >= t.get("top1_min", 0.0) and self.kl_mean <= t.get(
            "kl_mean_max", float("inf")
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"perplexity_delta": self.perplexity_delta, "passed": self.passed}

    def _subset_note(self) -> str:
        """Where the text holds more windows than were scored (perplexity varies along a text): how to score
        them all, which is what the trained reference's logged perplexity covers."""
        if self.windows >= self.text_windows:
            return ""
        return f" (the text holds {self.text_windows}: --windows {self.text_windows} scores them all)"

    def render(self, console: Console) -> None:
        from rich.table import Table

        table = Table(
            "perplexity",
            "reference",
            "Δ perplexity",
            "top-1 agreement",
            "KL mean",
            title=f"{self.artifact} ({self.precision}) on {self.text}: {self.windows} windows of "
            f"{self.window} tokens, {self.predicted_tokens} predicted{self._subset_note()}",
        )
        table.add_row(
            f"{self.perplexity:.4f}",
            f"{self.reference_perplexity:.4f}",
            f"{self.perplexity_delta:+.3%}",
            f"{self.top1_agreement:.2%}",
            f"{self.kl_mean:.2e}",
        )
        console.print(table)
        verdict = "[green]within[/green]" if self.passed else "[red]OUT OF[/red]"
        console.print(f"{verdict} the {self.precision} tolerances {self.tolerances}")


def text_windows(source_dir: Path, text_file: Path, windows: int) -> tuple[np.ndarray, int]:
    """The text's first `windows` token windows, tokenized with the checkpoint's tokenizer.json, and how
    many windows the whole text holds."""
    from qwen_export.golden.perplexity import WINDOW, token_windows
    from qwen_export.runtime.tokenizer import Tokenizer

    if not text_file.is_file():
        raise QwenExportError(f"{text_file}: no such text file")
    tokenizer = Tokenizer.find(source_dir)
    if tokenizer is None:
        raise QwenExportError(f"{source_dir}: the checkpoint has no tokenizer.json to tokenize {text_file}")
    ids = tokenizer.encode(text_file.read_text(encoding="utf-8", errors="replace"))
    batch = token_windows(ids, WINDOW, windows)
    if len(batch) == 0:
        raise QwenExportError(f"{text_file}: {len(ids)} tokens, fewer than one window of {WINDOW}")
    return batch, len(ids) // WINDOW


def scores(logits: np.ndarray, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log-probabilities [N, L-1, V] of each next-token distribution, NLL of each target [N, L-1])."""
    logp = log_softmax(logits[:, :-1])
    nll = -np.take_along_axis(logp, windows[:, 1:, None], axis=-1)[..., 0]
    return logp, nll


CHUNK = 4  # windows per forward pass


def reference_logits(reference_dir: Path, batch: np.ndarray) -> list[np.ndarray]:
    """transformers' fp32 logits of every window (an FP8 checkpoint's on its dequantized weights), in
    chunks of CHUNK windows; a benchmark scoring several artifacts computes them once."""
    import torch

    from qwen_export.golden.reference import load_reference

    reference = load_reference(reference_dir)
    chunks = []
    with torch.no_grad():
        for start in range(0, len(batch), CHUNK):
            ids = torch.from_numpy(batch[start : start + CHUNK])
            chunks.append(reference(input_ids=ids, use_cache=False).logits.float().numpy())
    return chunks


def compare_on_windows(
    prefill: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, references: list[np.ndarray]
) -> dict[str, float]:
    """Perplexities, top-1 agreement and mean KL of `prefill` (windows [n, L] -> logits [n, L, V]) against
    the reference logits of the same windows."""
    nll = ref_nll = kl = 0.0
    agree = 0
    for index, ref in enumerate(references):
        ids = batch[index * CHUNK : (index + 1) * CHUNK]
        logq, our_nll = scores(np.asarray(prefill(ids), np.float32), ids)
        logp, their_nll = scores(ref, ids)
        nll += float(our_nll.sum())
        ref_nll += float(their_nll.sum())
        agree += int((logq.argmax(-1) == logp.argmax(-1)).sum())
        kl += float(np.maximum((np.exp(logp) * (logp - logq)).sum(-1), 0.0).sum())
    count = batch.shape[0] * (batch.shape[1] - 1)
    return {
        "perplexity": math.exp(nll / count),
        "reference_perplexity": math.exp(ref_nll / count),
        "top1_agreement": agree / count,
        "kl_mean": kl / count,
    }


def text_quality(
    artifact: str | os.PathLike,
    text_file: str | os.PathLike,
    windows: int | None = None,
    against: str | os.PathLike | None = None,
) -> TextQuality:
    """Score `windows` windows (DEFAULT_WINDOWS when None) of the text with the artifact and with the
    reference: transformers on `against` (a checkpoint folder) or on the artifact's source checkpoint."""
    from qwen_export.diff import _artifact_model
    from qwen_export.multimodal_tools import token_decoder
    from qwen_export.tolerances import artifact_precision, tolerance_for

    model_path, info = _artifact_model(Path(artifact))
    if not info.get("source_dir"):
        raise QwenExportError(f"{artifact}: the artifact does not name its source checkpoint")
    source_dir = Path(info["source_dir"])
    batch, available = text_windows(source_dir, Path(text_file), windows or DEFAULT_WINDOWS)
    decoder = token_decoder(model_path, info)
    metrics = compare_on_windows(
        lambda ids: decoder.prefill(ids).logits,
        batch,
        reference_logits(Path(against) if against is not None else source_dir, batch),
    )
    precision = artifact_precision(info)
    return TextQuality(
        artifact=str(artifact),
        text=str(text_file),
        precision=precision,
        windows=int(batch.shape[0]),
        window=int(batch.shape[1]),
        predicted_tokens=int(batch.shape[0] * (batch.shape[1] - 1)),
        text_windows=available,
        **metrics,
        tolerances={k: v for k, v in tolerance_for(precision).items() if k in ("top1_min", "kl_mean_max")},
    )
