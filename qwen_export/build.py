"""Library entry point for a deployable artifact: export -> passes -> target lowering -> OUT/.

OUT holds model.onnx (+ model.onnx.data), manifest.json (source, target, passes, versions, file sizes and
hashes, timings, check verdict) and passes.json (one record per pass). OUT is replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen_export.errors import QwenExportError
from qwen_export.exporter.checkpoint import Checkpoint
from qwen_export.exporter.export import (
    DATA_FILE,
    MODEL_FILE,
    SpeculativeSpec,
    io_signature,
    resolve_source,
    save_model,
    tool_versions,
)
from qwen_export.exporter.model import build_decoder
from qwen_export.exporter.spec import ModelSpec, config_hash, read_config_json
from qwen_export.fsutil import atomic_output_dir, check_writable_parent
from qwen_export.memory import peak_rss_mib

MANIFEST_FILE = "manifest.json"
PASSES_FILE = "passes.json"


@dataclass
class BuildResult:
    out_dir: Path
    target: str
    manifest: dict[str, Any]
    report: Any  # qwen_export.passes.manager.PipelineReport

    @property
    def model_path(self) -> Path:
        return self.out_dir / MODEL_FILE

    @property
    def check_passed(self) -> bool | None:
        """None when no numeric check ran."""
        return self.report.first_failure is None if self.report.checked else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


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
) -> BuildResult:
    """Export, run `pipeline(target)` and write the artifact to OUT; nothing is left at OUT on error.

    check: run every stage in ONNX Runtime against the golden reference (the preset's stored golden, or
    `golden_dir`) and the previous stage. A check that fails is not an error: the artifact is written (for
    inspection) with manifest check.passed = false, and `BuildResult.check_passed` is False.
    """
    from qwen_export.passes.pipeline import pipeline

    out_path = check_writable_parent(Path(out))
    pipeline(target)  # an unknown target fails before any work
    start = time.perf_counter()
    source_dir, source = resolve_source(preset, model_dir)
    config = read_config_json(source_dir)
    reading = SpeculativeSpec(config, source_dir / "config.json")
    job = dict(out_path=out_path, source_dir=source_dir, source=source, config=config, start=start)
    job |= dict(preset=preset, target=target, check=check, golden_dir=golden_dir, verify=verify, log=log)
    job |= dict(on_pass_start=on_pass_start, on_pass_end=on_pass_end)
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
) -> BuildResult:
    """One build from `spec`; with `confirm`, the artifact is published only if `confirm()` equals `spec`."""
    from qwen_export.passes.functions import qwen_op_counts
    from qwen_export.passes.graph_stats import node_counts
    from qwen_export.passes.manager import PassManager
    from qwen_export.passes.numerics import NumericCheck
    from qwen_export.passes.pipeline import pipeline

    passes = pipeline(target)
    ckpt = Checkpoint.open(source_dir)
    model = build_decoder(spec, ckpt)
    left_out = ckpt.account()
    export_s = time.perf_counter() - start

    numeric = None
    if check:
        golden = _golden_for(preset, golden_dir, config)
        if golden is None and log:
            log(
                "no golden reference for this model: the check compares each stage with the previous one only"
            )
        numeric = NumericCheck(golden, vocab_size=spec.vocab_size)

    manager = PassManager(passes, check=numeric, verify=verify, on_start=on_pass_start, on_end=on_pass_end)
    passes_start = time.perf_counter()
    model, report = manager.run(model)
    passes_s = time.perf_counter() - passes_start

    with atomic_output_dir(out_path) as tmp:
        save_start = time.perf_counter()
        save_model(model, tmp / MODEL_FILE, DATA_FILE)
        save_s = time.perf_counter() - save_start
        kernels = _copy_cpu_kernels(target, tmp)
        if confirm is not None and confirm() != spec:
            raise _SpecMismatch(f"{source}: config.json's fields read differently through transformers")
        files = {
            name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
            for name in (MODEL_FILE, DATA_FILE, *kernels)
            if (tmp / name).exists()
        }
        (tmp / PASSES_FILE).write_text(json.dumps(report.to_json(), indent=2))
        manifest = {
            "format": "qwen-export/build@1",
            "source": source,
            "source_dir": str(source_dir),
            "architecture": spec.architecture,
            "family": spec.family,
            "config_sha256": config_hash(config),
            "target": target,
            "passes": [
                {"name": r.name, "summary": r.summary, "modified": r.modified} for r in report.records
            ],
            "fused_ops": _fused_ops(report),
            "versions": _versions(),
            "io": io_signature(spec),
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
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return BuildResult(out_path, target, manifest, report)


def _copy_cpu_kernels(target: str, folder: Path) -> list[str]:
    """A target that runs qwen.cpu ops carries the custom-op library, so the artifact runs without the
    sources or a compiler. Returns the files added."""
    from qwen_export.passes.targets import CPU_KERNEL_TARGETS

    if target not in CPU_KERNEL_TARGETS:
        return []
    from qwen_export import cpu_kernels

    shutil.copy2(cpu_kernels.library_path(), folder / cpu_kernels.LIBRARY_NAME)
    return [cpu_kernels.LIBRARY_NAME]


def _fused_ops(report) -> dict[str, dict[str, int]]:
    """qwen ops right after the last fusion pass (before any lowering), top-level and nested."""
    counts = [r.stats["qwen_ops"] for r in report.records if "qwen_ops" in r.stats]
    return counts[-1] if counts else {}


def _versions() -> dict[str, str]:
    import onnxscript

    return {**tool_versions(), "onnxscript": onnxscript.__version__}
