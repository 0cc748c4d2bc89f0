"""Validate an ONNX artifact against golden reference outputs (prefill logits, greedy tokens, states)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qwen_export.errors import QwenExportError
from qwen_export.golden.store import PROMPT_LENGTHS, Golden
from qwen_export.metrics import compare_logits
from qwen_export.tolerances import artifact_precision, tolerance_for

if TYPE_CHECKING:
    from rich.console import Console

FP32_TOLERANCE = tolerance_for("fp32")["logits_max_abs"]


@dataclass
class CheckRow:
    name: str
    max_abs: float
    top1_agreement: float | None
    passed: bool


@dataclass
class ValidationReport:
    model: str
    tolerance: float
    rows: list[CheckRow] = field(default_factory=list)
    greedy_match_length: int = 0
    greedy_tokens: int = 0
    precision: str = "fp32"  # the artifact's, which set the tolerance
    reference_dtype: str = "fp32"  # the golden reference's
    emulated: bool = False  # a low-precision graph run in fp32 with rounding (runtime/emulation.py)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.rows) and self.greedy_match_length == self.greedy_tokens

    def to_json(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def render(self, console: Console) -> None:
        from rich.table import Table

        run = f"{self.precision}{' emulated in fp32' if self.emulated else ''}"
        title = f"{self.model} ({run}) vs golden ({self.reference_dtype} reference), tol {self.tolerance:g}"
        table = Table("check", "max |Δ|", "top-1", "result", title=title)
        for r in self.rows:
            top1 = "" if r.top1_agreement is None else f"{r.top1_agreement:.1%}"
            table.add_row(
                r.name, f"{r.max_abs:.2e}", top1, "[green]ok[/green]" if r.passed else "[red]FAIL[/red]"
            )
        ok = self.greedy_match_length == self.greedy_tokens
        table.add_row(
            "greedy tokens identical",
            f"{self.greedy_match_length}/{self.greedy_tokens}",
            "",
            "[green]ok[/green]" if ok else "[red]FAIL[/red]",
        )
        console.print(table)


# Precisions validate holds to max |Δ| and identical greedy tokens; quantized ones go to diff.
VALIDATED_PRECISIONS = ("fp32", "bf16", "fp16")


def validate_artifact(
    artifact: str | Path, golden_dir: str | Path, tolerance: float | None = None
) -> ValidationReport:
    """An export or build folder (or a .onnx file) against a golden folder, with the max |Δ| of the
    artifact's precision (a bf16 export: bf16's) unless `tolerance` is given; quantized artifacts are
    refused (their tolerances are diff's)."""
    import json

    from qwen_export.artifact import EXPORT_INFO_FILE, MANIFEST_FILE, MODEL_FILE
    from qwen_export.golden.store import load_golden

    artifact = Path(artifact)
    model_path = artifact / MODEL_FILE if artifact.is_dir() else artifact
    if artifact.is_dir() and not model_path.is_file() and (artifact / MANIFEST_FILE).is_file():
        from qwen_export.runtime.session import Artifact

        model_path = Artifact.open(artifact).model_path  # a ranks artifact: rank 0's; all ranks run
    if not model_path.is_file():
        raise QwenExportError(f"{model_path}: no such model; pass a folder written by `qwen-export export`")
    precision = "fp32"
    for record in (artifact / MANIFEST_FILE, artifact / EXPORT_INFO_FILE):
        if record.is_file():
            precision = artifact_precision(json.loads(record.read_text()))
            break
    if precision not in VALIDATED_PRECISIONS:
        raise QwenExportError(
            f"{artifact}: a {precision} artifact; validate holds fp32/bf16/fp16 artifacts to their max |Δ| "
            f"and identical greedy tokens. Use `qwen-export diff {artifact}`, which applies the "
            f"{precision} tolerances"
        )
    if tolerance is None:
        tolerance = tolerance_for(precision)["logits_max_abs"]
    return validate_onnx(model_path, load_golden(golden_dir), tolerance, precision)


def _row(name: str, ours: np.ndarray, ref: np.ndarray, tol: float, logits: bool = True) -> CheckRow:
    if logits:
        metrics = compare_logits(ours, ref)
        return CheckRow(name, metrics["max_abs"], metrics["top1_agreement"], metrics["max_abs"] <= tol)
    err = float(np.abs(ours - ref).max()) if ours.size else 0.0
    return CheckRow(name, err, None, err <= tol)


def validate_onnx(
    model_path: str | Path, golden: Golden, tolerance: float = FP32_TOLERANCE, precision: str = "fp32"
) -> ValidationReport:
    """Run the artifact on ONNX Runtime CPU (optimizations off; a bf16/fp16 graph emulated in fp32) and
    compare with the golden outputs."""
    from qwen_export.runtime.ranks import open_decoder

    decoder = open_decoder(model_path)
    report = ValidationReport(
        str(model_path),
        tolerance,
        precision=precision,
        reference_dtype=golden.dtype,
        emulated=decoder.emulated,
    )
    out = None
    for length in PROMPT_LENGTHS:
        ids, ref = golden.prefill(length)
        out = decoder.prefill(ids)
        report.rows.append(_row(f"prefill {length} tokens: logits", out.logits, ref, tolerance))
    states = golden.final_states()
    ours = decoder.whole_states(out.states)  # a ranks artifact's shards put together
    worst = max(states, key=lambda k: float(np.abs(ours[k] - states[k]).max()))
    report.rows.append(
        _row(
            f"prefill {max(PROMPT_LENGTHS)}: states (worst {worst})",
            ours[worst],
            states[worst],
            tolerance,
            logits=False,
        )
    )
    tokens, step_logits = decoder.greedy(golden.greedy_prompt, golden.greedy_tokens.shape[1])
    report.rows.append(
        _row("decode through states: step logits", step_logits, golden.greedy_logits, tolerance)
    )
    same = (tokens == golden.greedy_tokens)[0]
    report.greedy_tokens = int(same.size)
    report.greedy_match_length = int(same.size if same.all() else same.argmin())
    return report
