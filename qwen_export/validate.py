"""Validate an ONNX artifact against golden reference outputs (prefill logits, greedy tokens, states)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from qwen_export.errors import QwenExportError
from qwen_export.golden.multimodal import PIXEL_KEYS
from qwen_export.golden.store import PROMPT_LENGTHS, Golden
from qwen_export.metrics import agreement_length, compare_logits
from qwen_export.tolerances import artifact_precision, tolerance_for

if TYPE_CHECKING:
    from rich.console import Console

    from qwen_export.golden.multimodal import MultimodalCase

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
    greedy_match_length: int = 0  # summed over the cases of a multimodal report (equal only if every case is)
    greedy_tokens: int = 0
    greedy_cases: dict[str, list[int]] = field(default_factory=dict)  # multimodal: case -> [matched, total]
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
        greedy = self.greedy_cases or {"": [self.greedy_match_length, self.greedy_tokens]}
        for case, (matched, total) in greedy.items():
            table.add_row(
                f"{case + ': ' if case else ''}greedy tokens identical",
                f"{matched}/{total}",
                "",
                "[green]ok[/green]" if matched == total else "[red]FAIL[/red]",
            )
        console.print(table)


# Precisions validate holds to max |Δ| and identical greedy tokens; quantized ones go to diff.
VALIDATED_PRECISIONS = ("fp32", "bf16", "fp16")


def validate_artifact(
    artifact: str | Path, golden_dir: str | Path, tolerance: float | None = None
) -> ValidationReport:
    """An export or build folder (or a .onnx file) against a golden folder, with the max |Δ| of the
    artifact's precision (a bf16 export: bf16's) unless `tolerance` is given; quantized artifacts are
    refused (their tolerances are diff's). A multimodal artifact runs the golden's image and video prompts
    (validate_multimodal)."""
    import json

    from qwen_export.artifact import EXPORT_INFO_FILE, MANIFEST_FILE, MODEL_FILE
    from qwen_export.golden.store import load_golden

    artifact = Path(artifact)
    if artifact.is_dir() and any((artifact / f).is_file() for f in (MANIFEST_FILE, EXPORT_INFO_FILE)):
        from qwen_export.runtime.session import Artifact

        info = Artifact.open(artifact).info
        if info.get("multimodal"):
            precision = _validated_precision(artifact, info)
            golden = load_golden(golden_dir)
            limit = tolerance_for(precision)["logits_max_abs"] if tolerance is None else tolerance
            return validate_multimodal(artifact, golden, limit, precision)
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
    _validated_precision(artifact, {"precision": precision})
    if tolerance is None:
        tolerance = tolerance_for(precision)["logits_max_abs"]
    return validate_onnx(model_path, load_golden(golden_dir), tolerance, precision)


def _validated_precision(artifact: Path, info: dict) -> str:
    precision = artifact_precision(info)
    if precision not in VALIDATED_PRECISIONS:
        raise QwenExportError(
            f"{artifact}: an artifact in {precision}; validate holds fp32/bf16/fp16 artifacts to their "
            f"max |Δ| and identical greedy tokens. Use `qwen-export diff {artifact}`, which applies the "
            f"{precision} tolerances"
        )
    return precision


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


def validate_multimodal(
    artifact: str | Path, golden: Golden, tolerance: float = FP32_TOLERANCE, precision: str = "fp32"
) -> ValidationReport:
    """A multimodal artifact (vision.onnx, embed.onnx, model.onnx on inputs_embeds + mRoPE) on the golden's
    image and video prompts, per case: the runtime's preprocessing of the golden's media files against the
    arrays the reference saw; on those arrays, vision features (relative to their scale, within the
    precision's per-layer tolerance), prefill logits (max |Δ| within `tolerance`) and greedy tokens."""
    from qwen_export.golden.multimodal import feature_error
    from qwen_export.runtime.multimodal import MultimodalRunner

    cases = golden.multimodal_cases
    if not cases:
        raise QwenExportError(
            f"{golden.folder}: a text golden; a multimodal artifact is validated on image and video prompts: "
            "regenerate it with `qwen-export golden --model CHECKPOINT` (with its processor files)"
        )
    runner = MultimodalRunner(artifact, optimize=False)
    report = ValidationReport(str(artifact), tolerance, precision=precision, reference_dtype=golden.dtype)
    layer_rel = tolerance_for(precision)["layer_rel"]
    pixel_step = 1 / 255 / min(getattr(runner.processor.image_processor, "image_std", None) or [1.0])
    for case in cases:
        report.rows.append(
            _preprocess_row(case, runner.preprocess(case.prompt, case.images, case.videos), pixel_step)
        )
        err, rel = feature_error(runner.encode_vision(*case.pixels), case.vision_features)
        report.rows.append(
            CheckRow(f"{case.name}: vision features (rel {rel:.1e})", err, None, rel <= layer_rel)
        )
        result = runner.generate(runner.build_inputs(case.arrays), case.greedy_tokens.shape[1])
        report.rows.append(
            _row(f"{case.name}: prefill logits", result.prefill_logits, case.prefill_logits, tolerance)
        )
        report.greedy_cases[case.name] = [
            agreement_length(result.tokens, case.greedy_tokens[0]),
            case.greedy_tokens.shape[1],
        ]
    report.greedy_match_length = sum(m for m, _ in report.greedy_cases.values())
    report.greedy_tokens = sum(n for _, n in report.greedy_cases.values())
    return report


def _preprocess_row(case: MultimodalCase, ours: dict[str, np.ndarray], pixel_step: float) -> CheckRow:
    """Our preprocessing of the case's files against the golden's arrays: ids and grids equal, pixels within
    one uint8 step after normalisation (bit-identical on AVX2 / AVX-512 CPUs; docs/multimodal.md)."""
    same = set(ours) == set(case.arrays) and all(
        ours[k].shape == v.shape and (k in PIXEL_KEYS or np.array_equal(ours[k], v))
        for k, v in case.arrays.items()
    )
    err = max(
        (float(np.abs(ours[k] - case.arrays[k]).max()) for k in PIXEL_KEYS if k in ours and same), default=0.0
    )
    return CheckRow(
        f"{case.name}: preprocessing (ids, grids, pixels)",
        err if same else float("inf"),
        None,
        same and err <= pixel_step * 1.001,
    )
