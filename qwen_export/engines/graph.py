"""Prepare the graph an engine is built from: the target's lowering, then the precision policy."""

from __future__ import annotations

import importlib
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx_ir as ir

from qwen_export.engines.progress import Stages
from qwen_export.engines.spec import DeploySpec
from qwen_export.errors import QwenExportError
from qwen_export.exporter.export import save_model
from qwen_export.passes.lower_trt_rtx import LowerToTrtRtx
from qwen_export.passes.precision import Precision

GRAPH_FILE = "model.onnx"
GRAPH_DATA = "model.onnx.data"


def engine_passes(spec: DeploySpec, moe: str = "auto") -> list[ir.passes.PassBase]:
    """The passes between the exporter's standard graph and the graph handed to the engine builder."""
    precision = Precision(spec.precision, logits_fp32=spec.logits_fp32)
    if spec.target == "trt-rtx":
        return [LowerToTrtRtx(moe=moe, max_tokens=spec.max_batch * spec.max_prompt), precision]
    if spec.target == "trt":
        # Fused qwen ops become plugin nodes, which TensorRT's parser looks up in the plugin registry; the
        # precision pass runs first (it keeps qwen ops' I/O fp32) and the plugin lowering casts around them.
        from qwen_export.passes.lower_trt_plugins import LowerTrtPlugins
        from qwen_export.passes.pipeline import finish, pipeline

        return [*pipeline("fused"), precision, LowerTrtPlugins(dtype=spec.precision), *finish()]
    raise QwenExportError(f"unknown engine target {spec.target!r}")


def pass_label(p: ir.passes.PassBase) -> str:
    return getattr(p, "name", "") or type(p).__name__


def pass_modules(passes: Sequence[ir.passes.PassBase]) -> list[ModuleType]:
    """Modules whose code shapes the prepared graph (their source goes into the engine fingerprint)."""
    names = {type(p).__module__ for p in passes} | {__name__}
    return [importlib.import_module(n) for n in sorted(names)]


def run_passes(model: ir.Model, passes: Sequence[ir.passes.PassBase], stages: Stages) -> list[dict[str, Any]]:
    """Run `passes` in order, each as a stage; returns one record per pass (time, options, stats)."""
    records = []
    for p in passes:
        label = pass_label(p)
        with stages.stage(f"pass {label}", repr(p)) as stage:
            start = time.perf_counter()
            result = p(model)
            model = result.model
            wall = time.perf_counter() - start
            stage.detail = _stats_line(getattr(p, "stats", {}))
        records.append(
            {
                "name": label,
                "repr": repr(p),
                "modified": bool(result.modified),
                "wall_s": round(wall, 4),
                "stats": dict(getattr(p, "stats", {}) or {}),
            }
        )
    return records


def _stats_line(stats: dict[str, Any]) -> str:
    keys = ("attention", "moe", "gather_max_tokens", "casts", "fp32_nodes", "low_nodes")
    return ", ".join(f"{k} {stats[k]}" for k in keys if k in stats)


def save_graph(model: ir.Model, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / GRAPH_FILE
    save_model(model, path, GRAPH_DATA)
    return path


def op_counts(model: ir.Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))
