"""What `qwen-export build --target trt-rtx|trt` calls: a deployment spec from flags or a file, then engines.

spec = deploy_spec(gpu="sm89,sm120", precision="bf16", max_context=8192)
result = build_engine_artifact("out/tiny", spec, "out/tiny-engines", console=Console(stderr=True))
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import onnx_ir as ir
from rich.console import Console

from qwen_export.artifact import MODEL_FILE, BuildResult
from qwen_export.engines.builder import BuildPlan, build_engines
from qwen_export.engines.spec import DeploySpec, DeploySpecError
from qwen_export.errors import QwenExportError
from qwen_export.exporter.export import save_model


def deploy_spec(
    gpu: str | None = None,
    precision: str | None = None,
    max_batch: int | None = None,
    max_prompt: int | None = None,
    max_context: int | None = None,
    target: str = "trt-rtx",
    workspace_mib: int | None = None,
    logits_fp32: bool | None = None,
    spec_file: str | os.PathLike | None = None,
    weights: str | None = None,
    max_image_pixels: int | None = None,
    max_video_frames: int | None = None,
) -> DeploySpec:
    """A validated spec from a file (JSON/TOML) and/or flags; a flag given overrides the file's value."""
    data: dict[str, Any] = {}
    if spec_file is not None:
        data = DeploySpec.from_file(spec_file).to_json()
        data["gpus"] = data.pop("requested") or data["gpus"]
    flags = {
        "gpus": gpu, "precision": precision, "max_batch": max_batch, "max_prompt": max_prompt,
        "max_context": max_context, "workspace_mib": workspace_mib, "logits_fp32": logits_fp32,
        "weights": weights, "max_image_pixels": max_image_pixels, "max_video_frames": max_video_frames,
    }  # fmt: skip
    data.update({k: v for k, v in flags.items() if v is not None})
    data["target"] = target
    if not data.get("gpus"):
        raise DeploySpecError(
            f"the {target} target needs GPU targets: pass --gpu (for example --gpu sm89,sm120)"
        )
    return DeploySpec.from_mapping(data)


def resolve_model(model: str | os.PathLike) -> Path:
    """An export folder (holding model.onnx) or a .onnx file."""
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise QwenExportError(f"{model}: no exported model there (pass an export folder or a .onnx file)")
    return path.resolve()


def build_engine_artifact(
    model: str | os.PathLike | ir.Model,
    spec: DeploySpec,
    out: str | os.PathLike,
    *,
    dry_run: bool = False,
    console: Console | None = None,
    **options: Any,
) -> BuildResult | BuildPlan:
    """Engines for every GPU in `spec` from an exported standard-ONNX model (path, folder or onnx_ir model).

    `options` go to `build_engines`: timing_cache, opt_level, version_compatible, hardware_compatibility,
    cache_dir, use_cache, plugin_library, moe, keep_graph. Bad input raises QwenExportError before any
    work; a failed build leaves nothing at `out`.
    """
    if isinstance(model, ir.Model):
        with tempfile.TemporaryDirectory(prefix="qwen-model-") as folder:
            path = Path(folder) / MODEL_FILE
            save_model(model, path)
            return build_engines(path, spec, out, dry_run=dry_run, console=console, **options)
    return build_engines(resolve_model(model), spec, out, dry_run=dry_run, console=console, **options)
