"""Library entry point for a deployable artifact: export -> the target's passes -> OUT/.

`build_artifact(BuildRequest(...))` serves every target in the registry (qwen_export/targets.py): ONNX
targets write model.onnx (+ model.onnx.data), manifest.json (source, target, passes, versions, file sizes
and hashes, timings, check verdict) and passes.json (one record per pass); engine targets write
engines/<sm>/model.engine and a manifest that fingerprints everything that went in. OUT is replaced
atomically; nothing is left there on error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwen_export.artifact import (
    BUILD_FORMAT,
    DATA_FILE,
    DRAFT_DATA_FILE,
    DRAFT_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    PASSES_FILE,
    BuildResult,
    file_entries,
)
from qwen_export.errors import QwenExportError
from qwen_export.exporter.checkpoint import Checkpoint
from qwen_export.exporter.export import (
    SpeculativeSpec,
    io_signature,
    resolve_source,
    save_model,
    source_fields,
    tool_versions,
)
from qwen_export.exporter.model import build_decoder
from qwen_export.exporter.mtp import build_draft, draft_io_signature, has_mtp
from qwen_export.exporter.spec import ModelSpec, config_hash, read_config_json
from qwen_export.fsutil import atomic_output_dir, check_writable_parent
from qwen_export.memory import peak_rss_mib
from qwen_export.targets import get_target

if TYPE_CHECKING:
    from rich.console import Console

    from qwen_export.engines.builder import BuildPlan


@dataclass(frozen=True)
class BuildRequest:
    """Everything `build` can be asked; which options a target accepts is its registry entry's `options`
    (the field's `option` metadata names the option)."""

    out: Path
    target: str = "onnx"
    preset: str | None = None
    model_dir: Path | None = None
    check: bool = dataclasses.field(default=False, metadata={"option": "check"})
    golden_dir: Path | None = dataclasses.field(default=None, metadata={"option": "golden"})
    gpu: str | None = dataclasses.field(default=None, metadata={"option": "gpu"})
    precision: str | None = dataclasses.field(default=None, metadata={"option": "precision"})
    max_batch: int | None = dataclasses.field(default=None, metadata={"option": "max_batch"})
    max_prompt: int | None = dataclasses.field(default=None, metadata={"option": "max_prompt"})
    max_context: int | None = dataclasses.field(default=None, metadata={"option": "max_context"})
    spec_file: Path | None = dataclasses.field(default=None, metadata={"option": "spec"})
    workspace_mib: int | None = dataclasses.field(default=None, metadata={"option": "workspace"})
    opt_level: int = dataclasses.field(default=3, metadata={"option": "opt_level"})
    version_compatible: bool = dataclasses.field(default=False, metadata={"option": "version_compatible"})
    hardware_compatibility: str = dataclasses.field(
        default="none", metadata={"option": "hardware_compatibility"}
    )
    timing_cache: Path | None = dataclasses.field(default=None, metadata={"option": "timing_cache"})
    dry_run: bool = dataclasses.field(default=False, metadata={"option": "dry_run"})
    weights: str | None = dataclasses.field(default=None, metadata={"option": "weights"})
    tp: int = dataclasses.field(default=1, metadata={"option": "tp"})
    ep: int = dataclasses.field(default=1, metadata={"option": "ep"})
    # The vision tower and token embedding too (a *ForConditionalGeneration checkpoint); every target with
    # a vision pipeline takes it (qwen_export/targets.py).
    multimodal: bool = False
    max_image_pixels: int | None = dataclasses.field(default=None, metadata={"option": "max_image_pixels"})
    max_video_frames: int | None = dataclasses.field(default=None, metadata={"option": "max_video_frames"})

    def given_options(self) -> list[str]:
        """The options set away from their defaults, by option name."""
        return [
            f.metadata["option"]
            for f in dataclasses.fields(self)
            if "option" in f.metadata and getattr(self, f.name) != f.default
        ]

    def check_options(self) -> None:
        """A one-line error for the first option the target does not take, naming the targets that do."""
        from qwen_export.targets import TARGETS

        target = get_target(self.target)
        for option in self.given_options():
            if option not in target.options:
                takers = ", ".join(t.name for t in TARGETS.values() if option in t.options)
                flag = "--" + option.replace("_", "-")
                raise QwenExportError(f"{flag} is not an option of target {target.name} (it is for {takers})")


def build_artifact(
    request: BuildRequest,
    on_pass_start: Callable | None = None,
    on_pass_end: Callable | None = None,
    log: Callable[[str], None] | None = None,
    console: Console | None = None,
) -> BuildResult | BuildPlan:
    """Build `request.target` from the request's source into `request.out`; an engine target's dry run
    returns its plan instead. Bad input raises QwenExportError before any work."""
    request.check_options()
    if request.multimodal:
        get_target(request.target).vision_passes()  # a target without a vision pipeline says so now
        if request.tp != 1 or request.ep != 1:
            raise QwenExportError("--multimodal builds one graph per tower; it does not shard (--tp/--ep)")
    elif request.max_image_pixels is not None or request.max_video_frames is not None:
        raise QwenExportError(
            "--max-image-pixels and --max-video-frames bound a vision engine: add --multimodal"
        )
    if request.tp != 1 or request.ep != 1:
        from qwen_export.ranks import build_ranks

        if request.check:
            raise QwenExportError(
                "--check runs one graph per stage; a sharded build has one per rank: build it, then "
                "`qwen-export validate OUT` (the ranks run together)"
            )
        return build_ranks(
            request.out, request.tp, request.ep, request.preset, request.model_dir, request.target, log,
            precision=request.precision or "bf16",
        )  # fmt: skip
    if get_target(request.target).kind == "engine":
        return _build_engines(request, log, console)
    return build(
        request.out,
        preset=request.preset,
        model_dir=request.model_dir,
        target=request.target,
        check=request.check,
        golden_dir=request.golden_dir,
        on_pass_start=on_pass_start,
        on_pass_end=on_pass_end,
        log=log,
        multimodal=request.multimodal,
    )


def _build_engines(
    request: BuildRequest, log: Callable[[str], None] | None, console: Console | None
) -> BuildResult | BuildPlan:
    from qwen_export.engines.api import build_engine_artifact, deploy_spec
    from qwen_export.exporter.export import cached_export

    # Everything that can be wrong with the request is reported before any work.
    source_dir, _ = resolve_source(request.preset, request.model_dir)
    deploy = deploy_spec(
        weights=_engine_weights(request.weights, read_config_json(source_dir), source_dir),
        gpu=request.gpu,
        precision=request.precision,
        max_batch=request.max_batch,
        max_prompt=request.max_prompt,
        max_context=request.max_context,
        target=request.target,
        workspace_mib=request.workspace_mib,
        spec_file=request.spec_file,
        max_image_pixels=request.max_image_pixels,
        max_video_frames=request.max_video_frames,
    )
    check_writable_parent(Path(request.out))
    with console.status("exporting…") if console is not None else contextlib.nullcontext():
        exported = cached_export(
            preset=request.preset, model_dir=request.model_dir, log=log, multimodal=request.multimodal
        )
    options = dict(
        dry_run=request.dry_run,
        console=console,
        opt_level=request.opt_level,
        version_compatible=request.version_compatible,
        hardware_compatibility=request.hardware_compatibility,
        timing_cache=request.timing_cache,
    )
    if request.multimodal:
        from qwen_export.engines.multimodal import build_multimodal_engines

        return build_multimodal_engines(exported, deploy, Path(request.out), **options)
    return build_engine_artifact(exported, deploy, request.out, **options)


def _engine_weights(weights: str | None, config: dict[str, Any], source_dir: Path) -> str:
    """An engine's weights: an FP8 checkpoint keeps its e4m3 weights unless told `dequant`; any other
    checkpoint has nothing to keep."""
    from qwen_export.exporter import fp8

    quantized = fp8.fp8_block(config, str(source_dir / "config.json")) is not None
    if weights == "fp8" and not quantized:
        raise QwenExportError(
            f"{source_dir}: --weights fp8 needs an FP8 checkpoint (config.json has no quantization_config)"
        )
    return weights or ("fp8" if quantized else "dequant")


def _golden_for(preset: str | None, golden_dir: str | os.PathLike | None, config: dict[str, Any]):
    """The golden reference the check compares with, or None (then only stage-to-stage differences)."""
    from qwen_export.golden.store import load_golden, repo_golden_dir

    if golden_dir is not None:
        folder = Path(golden_dir)
    elif preset is not None and (repo_golden_dir(preset) / "manifest.json").is_file():
        folder = repo_golden_dir(preset)
    else:
        return None
    golden = load_golden(folder)
    if golden.manifest.get("config_sha256") != config_hash(config):
        raise QwenExportError(
            f"{folder}: this golden reference was made for another config; "
            "regenerate it with `qwen-export golden`"
        )
    return golden


class _SpecMismatch(Exception):
    """config.json's stated fields read differently from transformers' reading of them."""


def build(
    out: str | os.PathLike,
    preset: str | None = None,
    model_dir: str | os.PathLike | None = None,
    target: str = "onnx",
    check: bool = False,
    golden_dir: str | os.PathLike | None = None,
    verify: bool | None = None,
    on_pass_start: Callable | None = None,
    on_pass_end: Callable | None = None,
    log: Callable[[str], None] | None = None,
    multimodal: bool = False,
) -> BuildResult:
    """Export, run the target's pipeline and write the artifact to OUT; nothing is left at OUT on error.

    multimodal: a *ForConditionalGeneration checkpoint's three graphs (text tower on inputs_embeds + mRoPE,
    vision tower, token embedding), each through the target's passes for it (qwen_export/multimodal_build.py).

    check: run every stage in ONNX Runtime against the golden reference (the preset's stored golden, or
    `golden_dir`) and the previous stage. A check that fails is not an error: the artifact is written (for
    inspection) with manifest check.passed = false, and `BuildResult.check_passed` is False.
    """
    out_path = check_writable_parent(Path(out))
    get_target(target)  # an unknown target fails before any work
    start = time.perf_counter()
    source_dir, source = resolve_source(preset, model_dir)
    config = read_config_json(source_dir)
    reading = SpeculativeSpec(config, source_dir / "config.json")
    if multimodal:  # the vision spec reads config.json through transformers too: one import at a time
        reading.join()
    job = dict(out_path=out_path, source_dir=source_dir, source=source, config=config, start=start)
    job |= dict(preset=preset, target=target, check=check, golden_dir=golden_dir, verify=verify, log=log)
    job |= dict(on_pass_start=on_pass_start, on_pass_end=on_pass_end, multimodal=multimodal)
    try:
        return _build(spec=reading.spec, confirm=reading.confirm, **job)
    except _SpecMismatch as e:
        if log:
            log(f"{e}; building again from transformers' reading")
        return _build(spec=reading.confirm(), confirm=None, **job)
    finally:
        reading.join()  # the config thread must not be left importing torch when the interpreter exits


def _build(
    out_path: Path,
    source_dir: Path,
    source: str,
    config: dict[str, Any],
    spec: ModelSpec,
    confirm: Callable[[], ModelSpec] | None,
    start: float,
    preset: str | None,
    target: str,
    check: bool,
    golden_dir: str | os.PathLike | None,
    verify: bool | None,
    on_pass_start: Callable | None,
    on_pass_end: Callable | None,
    log: Callable[[str], None] | None,
    multimodal: bool = False,
) -> BuildResult:
    """One build from `spec`; with `confirm`, the artifact is published only if `confirm()` equals `spec`."""
    from qwen_export.passes.functions import qwen_op_counts
    from qwen_export.passes.graph_stats import node_counts
    from qwen_export.passes.manager import PassManager
    from qwen_export.passes.numerics import NumericCheck

    passes = get_target(target).passes()
    ckpt = Checkpoint.open(source_dir, config)
    towers = None
    if multimodal:
        from qwen_export.multimodal_build import MultimodalBuild

        towers = MultimodalBuild.export(spec, ckpt, config, source_dir, get_target(target))
        model = towers.graphs.text
    # The MTP draft graph goes through the same passes, for speculative decoding on ONNX Runtime.
    with_draft = has_mtp(ckpt) and get_target(target).runs_on_onnxruntime and not multimodal
    if not multimodal:  # fp32, an FP8 checkpoint dequantized: what ONNX Runtime targets run
        model = build_decoder(spec, ckpt, final_hidden=with_draft)
    draft = build_draft(spec, ckpt) if with_draft else None
    left_out = ckpt.account()
    export_s = time.perf_counter() - start

    numeric = None
    if check:
        golden = _golden_for(preset, golden_dir, config)
        if towers is not None:
            numeric = towers.checks(golden, log)
        else:
            if golden is None and log:
                log(
                    "no golden reference for this model: the check compares each stage with the previous "
                    "one only"
                )
            numeric = NumericCheck(golden, vocab_size=spec.vocab_size)

    manager = PassManager(passes, check=numeric, verify=verify, on_start=on_pass_start, on_end=on_pass_end)
    passes_start = time.perf_counter()
    model, report = manager.run(model)
    draft_report = None
    if draft is not None:
        draft, draft_report = PassManager(get_target(target).passes(), verify=verify).run(draft)
    if towers is not None:
        towers.run_passes(verify, on_pass_start, on_pass_end)
        if check:
            towers.merge_into(report)
    passes_s = time.perf_counter() - passes_start

    with atomic_output_dir(out_path) as tmp:
        save_start = time.perf_counter()
        save_model(model, tmp / MODEL_FILE, DATA_FILE)
        if draft is not None:
            save_model(draft, tmp / DRAFT_FILE, DRAFT_DATA_FILE)
        extra_files = towers.save(tmp) if towers is not None else []
        save_s = time.perf_counter() - save_start
        kernels = _copy_cpu_kernels(target, tmp)
        if confirm is not None and confirm() != spec:
            raise _SpecMismatch(f"{source}: config.json's fields read differently through transformers")
        drafts = [DRAFT_FILE, DRAFT_DATA_FILE] if draft is not None else []
        files = file_entries(tmp, [MODEL_FILE, DATA_FILE, *drafts, *extra_files, *kernels])
        passes_json = report.to_json()
        if towers is not None:
            passes_json["multimodal"] = {tower: r.to_json() for tower, r in towers.reports.items()}
        (tmp / PASSES_FILE).write_text(json.dumps(passes_json, indent=2))
        manifest = {
            "format": BUILD_FORMAT,
            **source_fields(source, source_dir, spec, config),
            "target": target,
            "passes": [
                {"name": r.name, "summary": r.summary, "modified": r.modified} for r in report.records
            ],
            "fused_ops": _fused_ops(report),
            "versions": _versions(),
            "io": io_signature(spec, multimodal=multimodal, final_hidden=with_draft),
            "checkpoint": {"tensors": len(ckpt.tensors), "used": len(ckpt.used), "left_out": left_out},
            "graph": {
                "nodes": node_counts(model).to_json(),
                "initializers": len(model.graph.initializers),
                "functions": [":".join(k) for k in model.functions],
                "opset": dict(model.opset_imports),
                "qwen_ops": {k: dict(v) for k, v in qwen_op_counts(model).items()},
            },
            "files": files,
            "timings_s": {
                "export": round(export_s, 3),
                "passes": round(passes_s, 3),
                "save": round(save_s, 3),
                "total": round(time.perf_counter() - start, 3),
            },
            "peak_rss_mib": round(peak_rss_mib(), 1),
            "check": {
                "enabled": check,
                "tolerance": report.tolerance,
                "passed": None if not check else report.first_failure is None,
                "first_failure": report.first_failure,
                "golden": None
                if numeric is None or numeric.golden is None
                else numeric.golden.manifest.get("source"),
            },
        }
        if towers is not None:
            manifest["multimodal"] = towers.manifest()
        if draft is not None and draft_report is not None:
            manifest["draft"] = {
                "graph": DRAFT_FILE,
                "kind": "mtp",
                "io": draft_io_signature(spec, draft),
                "passes": [{"name": r.name, "modified": r.modified} for r in draft_report.records],
                "fused_ops": _fused_ops(draft_report),
                "qwen_ops": {k: dict(v) for k, v in qwen_op_counts(draft).items()},
            }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return BuildResult(out_path, target, manifest, report=report)


def _copy_cpu_kernels(target: str, folder: Path) -> list[str]:
    """A target that runs qwen.cpu ops carries the custom-op library, so the artifact runs without the
    sources or a compiler. Returns the files added."""
    if not get_target(target).cpu_kernels:
        return []
    from qwen_export import cpu_kernels

    shutil.copy2(cpu_kernels.library_path(), folder / cpu_kernels.LIBRARY_NAME)
    return [cpu_kernels.LIBRARY_NAME]


def _fused_ops(report) -> dict[str, dict[str, int]]:
    """qwen ops right after the last fusion pass (before any lowering), top-level and nested."""
    counts = [r.stats.extras["qwen_ops"] for r in report.records if "qwen_ops" in r.stats.extras]
    return counts[-1] if counts else {}


def _versions() -> dict[str, str]:
    import onnxscript

    return {**tool_versions(), "onnxscript": onnxscript.__version__}
