"""Prepare the graph an engine is built from: the target's pipeline (qwen_export/targets.py), run by the
one pass manager, each pass a progress stage."""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx_ir as ir

from qwen_export.artifact import DATA_FILE, MODEL_FILE
from qwen_export.engines.progress import Stages
from qwen_export.engines.spec import DeploySpec
from qwen_export.exporter.export import save_model
from qwen_export.passes.base import PassStats, QwenPass, pass_name
from qwen_export.passes.manager import PassManager, PassRecord
from qwen_export.targets import PipelineOptions, get_target

TOWERS = ("text", "vision", "embed")  # the graphs of a multimodal export an engine is built from


def engine_passes(spec: DeploySpec, moe: str = "auto", tower: str = "text") -> list[QwenPass]:
    """The passes between the exporter's standard graph and the graph handed to the engine builder; for a
    multimodal build's vision tower or token embedding, the target's passes for that graph."""
    options = PipelineOptions(
        precision=spec.precision,
        logits_fp32=spec.logits_fp32,
        max_tokens=spec.max_batch * spec.max_prompt,
        moe=moe,
        weights=spec.weights,
    )
    if tower == "text":
        return get_target(spec.target).passes(options)
    return getattr(get_target(spec.target).vision_passes(options), tower)


def pass_modules(passes: Sequence[ir.passes.PassBase]) -> list[ModuleType]:
    """Modules whose code shapes the prepared graph (their source goes into the engine fingerprint)."""
    names = {type(p).__module__ for p in passes} | {__name__}
    return [importlib.import_module(n) for n in sorted(names)]


def run_passes(
    model: ir.Model, passes: Sequence[QwenPass], stages: Stages
) -> tuple[ir.Model, list[dict[str, Any]]]:
    """Run `passes` through the pass manager, each as a stage; returns the model and one manifest record
    per pass (name, options, whether it changed the graph, wall time, stats)."""

    @contextmanager
    def stage(p: QwenPass) -> Iterator[None]:
        with stages.stage(f"pass {pass_name(p)}", repr(p)) as record:
            yield
            record.detail = stats_line(p.stats)  # the pass's record of the run that just ended

    model, report = PassManager(passes, around=stage).run(model)
    return model, [manifest_record(r) for r in report.records]


def manifest_record(record: PassRecord) -> dict[str, Any]:
    return {
        "name": record.name,
        "repr": record.options,
        "modified": bool(record.modified),
        "wall_s": round(record.wall_s, 4),
        "stats": record.stats.to_json(),
    }


def stats_line(stats: PassStats) -> str:
    """One line for the progress display: what fired, and the precision pass's counts."""
    fired = [f"{kind} {n}" for kind, n in stats.fired.items()]
    keys = ("gather_max_tokens", "casts", "fp32_nodes", "low_nodes")
    return ", ".join(fired + [f"{k} {stats.extras[k]}" for k in keys if k in stats.extras])


def save_graph(model: ir.Model, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MODEL_FILE
    save_model(model, path, DATA_FILE)
    return path


def op_counts(model: ir.Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items()))
