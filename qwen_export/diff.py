"""`qwen-export diff`: accuracy of an artifact against the reference, with per-layer bisection."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qwen_export.errors import QwenExportError
from qwen_export.exporter.model import layer_output_name
from qwen_export.golden.store import PROMPT_LENGTHS, Golden, load_golden, make_prompt
from qwen_export.metrics import agreement_length, compare_logits
from qwen_export.tolerances import artifact_precision, has_random_weights, tolerance_for

if TYPE_CHECKING:
    from rich.console import Console

PER_LAYER_PROMPT = 65  # crosses the delta rule's 64-token chunk boundary


@dataclass
class DiffReport:
    artifact: str
    against: str
    precision: str
    tolerances: dict[str, float]
    prefill: dict[str, dict[str, float]] = field(default_factory=dict)
    greedy_agreement: int = 0
    greedy_tokens: int = 0
    layers: list[dict[str, Any]] = field(default_factory=list)
    first_bad_layer: int | None = None
    passes: list[dict[str, Any]] = field(default_factory=list)
    first_bad_pass: str | None = None
    reference_dtype: str = "fp32"  # what transformers (or the golden's reference) ran in

    @property
    def passed(self) -> bool:
        t = self.tolerances
        ok = all(
            m["max_abs"] <= t["logits_max_abs"]
            and m["top1_agreement"] >= t["top1_min"]
            and m["kl_mean"] <= t.get("kl_mean_max", float("inf"))
            for m in self.prefill.values()
        )
        return ok and self.first_bad_layer is None and self.first_bad_pass is None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()} | {"passed": self.passed}

    def render(self, console: Console) -> None:
        from rich.table import Table

        headers = ("check", "max |Δ|", "mean |Δ|", "cos min", "top-1", "top-5", "KL mean")
        table = Table(
            *headers,
            title=f"{self.artifact} vs {self.against} ({self.reference_dtype} reference; {self.precision}: "
            f"{self.tolerances})",
        )
        for name, m in self.prefill.items():
            table.add_row(
                name,
                f"{m['max_abs']:.2e}",
                f"{m['mean_abs']:.2e}",
                f"{m['cosine_min']:.6f}",
                f"{m['top1_agreement']:.1%}",
                f"{m['top5_agreement']:.1%}",
                f"{m['kl_mean']:.2e}",
            )
        console.print(table)
        console.print(f"greedy agreement: {self.greedy_agreement}/{self.greedy_tokens} tokens")
        bad = "[red]OUT OF TOLERANCE[/red]"
        for layer in self.layers:
            mark = "ok" if layer["ok"] else bad
            console.print(
                f"layer {layer['layer']:>3}: max |Δ| {layer['max_abs']:.2e} (rel {layer['rel']:.1e}) {mark}"
            )
        for stage in self.passes:
            mark = "ok" if stage["ok"] else bad
            console.print(
                f"pass {stage['stage']:<28} vs reference {stage['max_vs_reference'] or 0:.2e} {mark}"
            )
        if self.first_bad_layer is not None:
            console.print(f"[bold red]first layer out of tolerance: {self.first_bad_layer}[/bold red]")
        if self.first_bad_pass is not None:
            console.print(f"[bold red]first pass out of tolerance: {self.first_bad_pass}[/bold red]")


def reference_layer_outputs(model, input_ids: np.ndarray) -> list[np.ndarray]:
    """Each decoder layer's output from the transformers model, captured with forward hooks."""
    import torch

    layers = sorted(
        (
            (int(m.group(1)), mod)
            for name, mod in model.named_modules()
            if (m := re.search(r"layers\.(\d+)$", name)) and "visual" not in name
        ),
        key=lambda x: x[0],
    )
    captured: dict[int, np.ndarray] = {}
    hooks = [
        mod.register_forward_hook(
            lambda _m, _i, out, i=i: captured.__setitem__(
                i, (out[0] if isinstance(out, tuple) else out).float().numpy()
            )
        )
        for i, mod in layers
    ]
    try:
        with torch.no_grad():
            model(input_ids=torch.as_tensor(input_ids), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [captured[i] for i, _ in layers]


@contextlib.contextmanager
def model_with_layer_outputs(model_path: Path, num_layers: int) -> Iterator[Path]:
    """A temporary copy of the graph beside the original (sharing its external data) that also outputs
    every layer boundary; removed on exit."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    names = {layer_output_name(i) for i in range(num_layers)}
    present = {o for n in proto.graph.node for o in n.output}
    missing = sorted(names - present)
    if missing:
        raise QwenExportError(
            f"{model_path}: layer boundary {missing[0]} not found; per-layer diff needs a graph "
            "whose passes keep the exporter's layer output names"
        )
    for i in range(num_layers):
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(layer_output_name(i)))
    # ONNX Runtime only reads external data from the model's own folder, so the copy lives there briefly.
    fd, name = tempfile.mkstemp(prefix=".layers-", suffix=".onnx", dir=model_path.parent)
    os.close(fd)
    path = Path(name)
    try:
        onnx.save(proto, str(path))
        yield path
    finally:
        path.unlink(missing_ok=True)


def _artifact_model(artifact: Path) -> tuple[Path, dict[str, Any]]:
    from qwen_export.runtime.session import Artifact
    from qwen_export.targets import TARGETS

    art = Artifact.open(artifact)
    known = TARGETS.get(art.target)
    if known is None or not known.runs_on_onnxruntime:
        raise QwenExportError(
            f"{artifact}: diff runs ONNX artifacts on this machine; target {art.target} needs its GPU"
        )
    return art.model_path, art.info


def bisect_passes(
    source_dir: Path, target: str, golden: Golden | None, passes: list | None = None
) -> tuple[str | None, list[dict[str, Any]]]:
    """Re-run the build pipeline from the checkpoint, checking every stage against the reference.

    Returns the first stage out of tolerance ("input" = the export itself, else a pass name) and one
    record per stage. Without a stored golden, the reference outputs are generated now from transformers.
    """
    from qwen_export.exporter.export import load_model_source
    from qwen_export.exporter.model import build_decoder
    from qwen_export.golden.store import generate_golden
    from qwen_export.passes.manager import PassManager
    from qwen_export.passes.numerics import NumericCheck
    from qwen_export.targets import pipeline

    _, spec, ckpt = load_model_source(source_dir)
    with tempfile.TemporaryDirectory() as tmp:
        if golden is None:
            golden = generate_golden(source_dir, Path(tmp) / "golden", str(source_dir))
        manager = PassManager(
            passes if passes is not None else pipeline(target),
            check=NumericCheck(golden, vocab_size=spec.vocab_size),
        )
        _, report = manager.run(build_decoder(spec, ckpt))
    stages = [
        {
            "stage": r.name,
            "max_vs_previous": r.numerics.max_vs_previous,
            "max_vs_reference": r.numerics.max_vs_golden,
            "ok": r.numerics.within_tolerance,
        }
        for r in report.records
        if r.numerics is not None
    ]
    return report.first_failure, stages


def diff_artifact(
    artifact: str | os.PathLike,
    against: str | os.PathLike | None = None,
    per_layer: bool = False,
    golden: Golden | None = None,
    per_pass: bool = False,
    passes: list | None = None,
) -> DiffReport:
    """Compare an artifact with golden outputs (a golden folder) or a live reference (a checkpoint folder).

    per_layer: compare every decoder layer's output with transformers' and name the first out of tolerance.
    per_pass: rebuild the artifact's pipeline (or `passes`) with a check after every pass and name the first
    pass out of tolerance.
    """
    from qwen_export.golden.reference import (
        REFERENCE_DTYPES,
        load_reference,
        reference_forward,
        reference_greedy,
    )
    from qwen_export.runtime.ort_decoder import OrtDecoder
    from qwen_export.runtime.ranks import open_decoder, ranks_root

    model_path, info = _artifact_model(Path(artifact))
    precision = artifact_precision(info)
    tol = tolerance_for(precision, random_weights=has_random_weights(info))
    source_dir = Path(info["source_dir"]) if info.get("source_dir") else None
    against_path = Path(against) if against is not None else None
    if golden is None and against_path is not None and (against_path / "manifest.json").is_file():
        golden = load_golden(against_path)
    reference_dir = against_path if against_path is not None and golden is None else source_dir
    report = DiffReport(str(artifact), str(against_path or reference_dir), precision, tol)
    # A live reference runs in the export's own dtype: a bf16 export is compared with transformers in bf16.
    reference_dtype = info.get("dtype") if info.get("dtype") in REFERENCE_DTYPES else "fp32"
    report.reference_dtype = golden.dtype if golden is not None else reference_dtype
    decoder = open_decoder(model_path)
    model = None

    if golden is not None:
        cases = [(n, *golden.prefill(n)) for n in PROMPT_LENGTHS]
        prompt, ref_tokens = golden.greedy_prompt, golden.greedy_tokens
    else:
        if reference_dir is None or not reference_dir.is_dir():
            raise QwenExportError(
                "pass --against GOLDEN_DIR or a checkpoint folder (the artifact names no source)"
            )
        model = load_reference(reference_dir, reference_dtype)
        vocab = decoder.vocab_size
        cases = [
            (n, ids, reference_forward(model, ids)[0])
            for n in (1, 65, 200)
            for ids in [make_prompt(vocab, n)]
        ]
        prompt = make_prompt(vocab, 16, seed=1235)
        ref_tokens = reference_greedy(model, prompt, 32)[0]
    for length, ids, ref in cases:
        report.prefill[f"prefill_{length}"] = compare_logits(decoder.prefill(ids).logits, ref)
    tokens, _ = decoder.greedy(prompt, ref_tokens.shape[1])
    report.greedy_agreement = agreement_length(tokens[0], ref_tokens[0])
    report.greedy_tokens = int(ref_tokens.shape[1])

    if per_layer:
        if ranks_root(model_path) is not None:
            raise QwenExportError(
                f"{artifact}: --per-layer reads one graph's layer outputs; a ranks artifact has one graph "
                "per rank: diff the unsharded build per layer instead"
            )
        if model is None:
            if reference_dir is None or not reference_dir.is_dir():
                raise QwenExportError("--per-layer needs the checkpoint: pass --against MODEL_DIR")
            model = load_reference(reference_dir, reference_dtype)
        ids = make_prompt(decoder.vocab_size, PER_LAYER_PROMPT)
        refs = reference_layer_outputs(model, ids)
        with model_with_layer_outputs(model_path, len(refs)) as layered_path:
            out = OrtDecoder(layered_path).prefill(ids).extra
        for i, ref in enumerate(refs):
            err = float(np.abs(out[layer_output_name(i)] - ref).max())
            rel = err / max(float(np.abs(ref).max()), 1e-30)
            ok = rel <= tol["layer_rel"]
            report.layers.append({"layer": i, "max_abs": err, "rel": rel, "ok": ok})
            if not ok and report.first_bad_layer is None:
                report.first_bad_layer = i
    if per_pass:
        if source_dir is None or not source_dir.is_dir():
            raise QwenExportError(
                f"{artifact}: --per-pass needs the artifact's source checkpoint ({source_dir})"
            )
        report.first_bad_pass, report.passes = bisect_passes(
            source_dir, info.get("target", "onnx"), golden if golden is not None else None, passes
        )
    return report


def save_polygraphy_outputs(artifact: str | os.PathLike, path: str | os.PathLike, lengths=(1, 65)) -> Path:
    """Our outputs on the standard prompts as Polygraphy RunResults (`polygraphy run --load-outputs PATH`)."""
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult

    from qwen_export.runtime.ranks import open_decoder

    model_path, _ = _artifact_model(Path(artifact))
    decoder = open_decoder(model_path)
    iterations = []
    for length in lengths:
        out = decoder.prefill(make_prompt(decoder.vocab_size, length))
        iterations.append(
            IterationResult(
                {"logits": out.logits, **{f"present.{k}": v for k, v in out.states.items()}},
                runner_name="qwen-export-onnxruntime",
            )
        )
    results = RunResults()
    results.append(("qwen-export-onnxruntime", iterations))
    results.save(str(path))
    return Path(path)
