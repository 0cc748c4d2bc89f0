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

    from qwen_export.golden.multimodal import MultimodalCase
    from qwen_export.runtime.multimodal import MultimodalRunner

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
    # Multimodal artifacts: per image / video case, vision features and greedy agreement (its prefill logits
    # are in `prefill`), and per vision block, its output against transformers' (--per-layer).
    media: dict[str, dict[str, Any]] = field(default_factory=dict)
    vision_blocks: list[dict[str, Any]] = field(default_factory=list)
    first_bad_vision_block: int | None = None

    @property
    def passed(self) -> bool:
        t = self.tolerances
        ok = all(
            m["max_abs"] <= t["logits_max_abs"]
            and m["top1_agreement"] >= t["top1_min"]
            and m["kl_mean"] <= t.get("kl_mean_max", float("inf"))
            for m in self.prefill.values()
        )
        ok = ok and all(m["vision_ok"] for m in self.media.values())
        bad = (self.first_bad_layer, self.first_bad_pass, self.first_bad_vision_block)
        return ok and all(b is None for b in bad)

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
        for case, m in self.media.items():
            console.print(
                f"{case}: vision features max |Δ| {m['vision_max_abs']:.2e} (rel {m['vision_rel']:.1e}) "
                f"{'ok' if m['vision_ok'] else bad}; greedy agreement {m['greedy_agreement']}/"
                f"{m['greedy_tokens']} tokens"
            )
        for kind, rows in (("layer", self.layers), ("vision block", self.vision_blocks)):
            for row in rows:
                console.print(
                    f"{kind} {row['layer']:>3}: max |Δ| {row['max_abs']:.2e} (rel {row['rel']:.1e}) "
                    f"{'ok' if row['ok'] else bad}"
                )
        for stage in self.passes:
            mark = "ok" if stage["ok"] else bad
            console.print(
                f"pass {stage['stage']:<28} vs reference {stage['max_vs_reference'] or 0:.2e} {mark}"
            )
        if self.first_bad_layer is not None:
            console.print(f"[bold red]first layer out of tolerance: {self.first_bad_layer}[/bold red]")
        if self.first_bad_vision_block is not None:
            console.print(
                f"[bold red]first vision block out of tolerance: {self.first_bad_vision_block}[/bold red]"
            )
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


def model_with_layer_outputs(model_path: Path, num_layers: int) -> contextlib.AbstractContextManager[Path]:
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
    return graph_with_outputs(model_path, [layer_output_name(i) for i in range(num_layers)])


@contextlib.contextmanager
def graph_with_outputs(model_path: Path, names: list[str]) -> Iterator[Path]:
    """A temporary copy of the graph beside the original (sharing its external data) that also outputs the
    intermediate values `names`; removed on exit."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    for name in names:
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
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
    A multimodal artifact's text prompts go through embed.onnx; it also runs the image and video cases (the
    golden's, else made now: golden/multimodal.py), and per_layer also compares every vision block.
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
    if against_path is not None and not against_path.is_dir():
        raise QwenExportError(
            f"--against {against_path}: no such folder (a golden folder from `qwen-export golden`, or a "
            "checkpoint folder)"
        )
    if golden is None and against_path is not None and (against_path / "manifest.json").is_file():
        golden = load_golden(against_path)
    reference_dir = against_path if against_path is not None and golden is None else source_dir
    report = DiffReport(str(artifact), str(against_path or reference_dir), precision, tol)
    # A live reference runs in the export's own dtype: a bf16 export is compared with transformers in bf16.
    reference_dtype = info.get("dtype") if info.get("dtype") in REFERENCE_DTYPES else "fp32"
    report.reference_dtype = golden.dtype if golden is not None else reference_dtype
    runner = None
    if info.get("multimodal"):
        if per_pass:
            raise QwenExportError(
                f"{artifact}: --per-pass rebuilds the text pipeline only; a multimodal build checks every "
                "stage of its three graphs with `qwen-export build --multimodal --check`"
            )
        from qwen_export.multimodal_tools import TextEmbedsDecoder
        from qwen_export.runtime.multimodal import MultimodalRunner

        runner = MultimodalRunner(Path(artifact), optimize=False)
        decoder = TextEmbedsDecoder.wrap(runner.decoder, runner.embed_tokens)
    else:
        decoder = open_decoder(model_path)
    loaded: list[Any] = []

    def reference(why: str) -> Any:
        """transformers' model, loaded once, when something needs it live."""
        if not loaded:
            if reference_dir is None or not reference_dir.is_dir():
                raise QwenExportError(why)
            loaded.append(load_reference(reference_dir, reference_dtype))
        return loaded[0]

    if golden is not None:
        cases = [(n, *golden.prefill(n)) for n in PROMPT_LENGTHS]
        prompt, ref_tokens = golden.greedy_prompt, golden.greedy_tokens
    else:
        model = reference("pass --against GOLDEN_DIR or a checkpoint folder (the artifact names no source)")
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
    media = golden.multimodal_cases if golden is not None and runner is not None else []
    if runner is not None and not media:
        from qwen_export.golden.multimodal import live_cases

        model = reference("pass --against with a multimodal golden or the checkpoint folder")
        with tempfile.TemporaryDirectory() as media_dir:  # the processor reads the PNGs once
            media = live_cases(model, runner.processor, runner.vspec.temporal_patch_size, Path(media_dir))
    if runner is not None:
        _diff_media(report, runner, media)

    if per_layer:
        if ranks_root(model_path) is not None:
            raise QwenExportError(
                f"{artifact}: --per-layer reads one graph's layer outputs; a ranks artifact has one graph "
                "per rank: diff the unsharded build per layer instead"
            )
        model = reference("--per-layer needs the checkpoint: pass --against MODEL_DIR")
        ids = make_prompt(decoder.vocab_size, PER_LAYER_PROMPT)
        refs = reference_layer_outputs(model, ids)
        with model_with_layer_outputs(model_path, len(refs)) as layered_path:
            layered = OrtDecoder(layered_path)
            if runner is not None:
                layered = TextEmbedsDecoder.wrap(layered, runner.embed_tokens)
            out = layered.prefill(ids).extra
        report.layers, report.first_bad_layer = _compare_layers(
            [out[layer_output_name(i)] for i in range(len(refs))], refs, tol["layer_rel"]
        )
        if runner is not None:
            report.vision_blocks, report.first_bad_vision_block = _diff_vision_blocks(
                runner, model, *media[0].pixels, tol["layer_rel"]
            )
    if per_pass:
        if source_dir is None or not source_dir.is_dir():
            raise QwenExportError(
                f"{artifact}: --per-pass needs the artifact's source checkpoint ({source_dir})"
            )
        report.first_bad_pass, report.passes = bisect_passes(
            source_dir, info.get("target", "onnx"), golden if golden is not None else None, passes
        )
    return report


def _compare_layers(
    ours: list[np.ndarray], refs: list[np.ndarray], layer_rel: float
) -> tuple[list[dict[str, Any]], int | None]:
    """One row per layer (max |Δ|, relative to the reference's max |value|) and the first out of tolerance."""
    rows, first_bad = [], None
    for i, (out, ref) in enumerate(zip(ours, refs, strict=True)):
        err = float(np.abs(out - ref).max())
        rel = err / max(float(np.abs(ref).max()), 1e-30)
        rows.append({"layer": i, "max_abs": err, "rel": rel, "ok": rel <= layer_rel})
        if rel > layer_rel and first_bad is None:
            first_bad = i
    return rows, first_bad


def _diff_media(report: DiffReport, runner: MultimodalRunner, cases: list[MultimodalCase]) -> None:
    """Each image / video case on the reference's own processor arrays: vision features (per-layer
    tolerance, relative to their scale), prefill logits (all the logits metrics) and greedy agreement."""
    from qwen_export.golden.multimodal import feature_error

    for case in cases:
        err, rel = feature_error(runner.encode_vision(*case.pixels), case.vision_features)
        result = runner.generate(runner.build_inputs(case.arrays), case.greedy_tokens.shape[1])
        report.prefill[f"{case.name}_prefill"] = compare_logits(result.prefill_logits, case.prefill_logits)
        report.media[case.name] = {
            "vision_max_abs": err,
            "vision_rel": rel,
            "vision_ok": rel <= report.tolerances["layer_rel"],
            "greedy_agreement": agreement_length(np.asarray(result.tokens), case.greedy_tokens[0]),
            "greedy_tokens": int(case.greedy_tokens.shape[1]),
        }


def _diff_vision_blocks(
    runner: MultimodalRunner, model: Any, pixels: np.ndarray, grid_thw: np.ndarray, layer_rel: float
) -> tuple[list[dict[str, Any]], int | None]:
    """Every vision block's output on one image's processed pixels against transformers' blocks (forward
    hooks); vision.onnx's block ends become extra outputs of a temporary copy."""
    import onnxruntime as ort

    from qwen_export.golden.multimodal import reference_vision
    from qwen_export.multimodal_tools import vision_block_outputs
    from qwen_export.runtime.multimodal_inputs import vision_graph_feeds
    from qwen_export.runtime.ort_decoder import session_options

    _, refs = reference_vision(model, pixels, grid_thw, blocks=True)
    vision_path = runner.artifact.folder / runner.artifact.info["multimodal"]["graphs"]["vision"]
    names = vision_block_outputs(vision_path, len(refs))
    with graph_with_outputs(vision_path, names) as layered:
        session = ort.InferenceSession(
            str(layered), session_options(False), providers=["CPUExecutionProvider"]
        )
        ours = session.run(names, vision_graph_feeds(pixels, grid_thw, runner.vspec))
        del session  # it holds the copy open
    return _compare_layers(ours, refs, layer_rel)


def save_polygraphy_outputs(artifact: str | os.PathLike, path: str | os.PathLike, lengths=(1, 65)) -> Path:
    """Our outputs on the standard prompts as Polygraphy RunResults (`polygraphy run --load-outputs PATH`)."""
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult

    from qwen_export.multimodal_tools import token_decoder

    model_path, info = _artifact_model(Path(artifact))
    decoder = token_decoder(model_path, info)
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
