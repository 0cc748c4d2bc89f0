"""Sharded builds: `build --tp N [--ep M]` writes one graph per rank, OUT/ranks/<r>/, and a manifest of the
layout (qwen_export.layout, which `plan` reads too).

Each rank's graph is exported from the rank's slice of the checkpoint (exporter/shard.py), runs the
target's pass pipeline like any export, and meets the other ranks at DistCollective nodes. For the ONNX
Runtime targets those are lowered to our CPU kernel library's loopback collective, so the N rank graphs run
together in one process (runtime/ranks.py) and `run`, `validate` and `diff` work on the artifact unchanged.

OUT/manifest.json (format RANKS_FORMAT) names every rank's files with their sha256 and a build id that each
rank's rank.json repeats: a rank folder missing, or taken from another build, is refused when opened.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx_ir as ir

from qwen_export.artifact import (
    DATA_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    RANKS_FORMAT,
    BuildResult,
    file_entries,
)
from qwen_export.collectives import LOOPBACK_DOMAIN, LOOPBACK_GROUP_INPUT, LOOPBACK_VERSION
from qwen_export.collectives_trt import TRT_DOMAIN, TRT_OP, to_loopback
from qwen_export.errors import QwenExportError
from qwen_export.exporter.checkpoint import find_text_prefix
from qwen_export.exporter.export import load_model_source, resolve_source, save_model, source_fields
from qwen_export.exporter.model import build_decoder
from qwen_export.exporter.shard import RankCheckpoint, RankContext, check_shardable, rank_spec
from qwen_export.fsutil import atomic_output_dir, check_writable_parent
from qwen_export.layout import make_layout
from qwen_export.targets import PipelineOptions, get_target

RANKS_DIR = "ranks"
RANK_INFO_FILE = "rank.json"
# The targets whose rank graphs run here: ONNX Runtime with the loopback collective.
CPU_KINDS = ("onnx", "ort")
# The targets whose rank graphs keep TensorRT's DistCollective: TensorRT parses them on the target machine,
# one engine per rank (runtime/trt_ranks runs them, one process per rank over NCCL).
TENSORRT_TARGETS = ("trt-plugins", "trt")


def rank_folder(root: Path, rank: int) -> Path:
    return root / RANKS_DIR / str(rank)


def build_ranks(
    out: str | os.PathLike,
    tp: int,
    ep: int = 1,
    preset: str | None = None,
    model_dir: str | os.PathLike | None = None,
    target: str = "onnx",
    log: Callable[[str], None] | None = None,
    precision: str = "bf16",
) -> BuildResult:
    """Export and build every rank of a `tp`-way split with `ep` expert groups into OUT/ranks/<r>/.
    `precision` is the TensorRT targets' (their pipelines narrow the graph); ONNX Runtime targets are fp32."""
    from qwen_export.passes.manager import PassManager

    out_path = check_writable_parent(Path(out))
    kind = get_target(target).kind
    if kind not in CPU_KINDS and target not in TENSORRT_TARGETS:
        raise QwenExportError(
            f"--tp/--ep build rank graphs for the {', '.join([*_cpu_targets(), *TENSORRT_TARGETS])} "
            f"targets; target {target} does not take them"
        )
    start = time.perf_counter()
    source_dir, source = resolve_source(preset, model_dir)
    config, spec, ckpt = load_model_source(source_dir)
    layout = make_layout(spec, tp, ep)  # a LayoutError names the field and the tp values that work
    check_shardable(spec, fp8_checkpoint=ckpt.fp8_block is not None)
    passes = get_target(target).passes(PipelineOptions(precision=precision))
    build_id = uuid.uuid4().hex
    ranks_info: list[dict[str, Any]] = []
    with atomic_output_dir(out_path) as tmp:
        for rank in layout.ranks:
            if log:
                log(f"rank {rank} of {tp}: export and passes")
            context = RankContext(layout, rank)
            view = RankCheckpoint(ckpt, layout, rank, find_text_prefix(ckpt))
            model = build_decoder(rank_spec(spec, layout), view, rank=context)
            model, report = PassManager(passes).run(model)
            if kind in CPU_KINDS:
                collectives = lower_collectives_to_loopback(model, rank)
            else:
                collectives = sum(1 for n in model.graph if n.domain == TRT_DOMAIN and n.op_type == TRT_OP)
            folder = rank_folder(tmp, rank)
            folder.mkdir(parents=True)
            save_model(model, folder / MODEL_FILE, DATA_FILE)
            (folder / RANK_INFO_FILE).write_text(json.dumps({"rank": rank, "tp": tp, "build_id": build_id}))
            files = file_entries(folder, [MODEL_FILE, DATA_FILE, RANK_INFO_FILE])
            ranks_info.append(
                {
                    "rank": rank,
                    "files": {f"{RANKS_DIR}/{rank}/{name}": entry for name, entry in files.items()},
                    "collectives": collectives,
                    "passes": [r.name for r in report.records if r.modified],
                }
            )
        kernels = _copy_cpu_kernels(tmp) if kind in CPU_KINDS else []  # one copy: see cpu_kernels.library_for
        left_out = ckpt.account()
        manifest = {
            "format": RANKS_FORMAT,
            "build_id": build_id,
            **source_fields(source, source_dir, spec, config),
            "target": target,
            "tp": tp,
            "ep": ep,
            "collectives": "loopback (ONNX Runtime CPU, one process)"
            if kind in CPU_KINDS
            else (
                f"TensorRT DistCollective over NCCL: build one engine per rank on the target GPUs "
                f"({precision}), run them with runtime/trt_ranks"
            ),
            "layout": layout.to_json(),
            "ranks": ranks_info,
            "files": {
                **{name: entry for info in ranks_info for name, entry in info["files"].items()},
                **file_entries(tmp, kernels),
            },
            "checkpoint": {"tensors": len(ckpt.tensors), "used": len(ckpt.used), "left_out": left_out},
            "timings_s": {"total": round(time.perf_counter() - start, 3)},
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return BuildResult(out_path, target, manifest, report=None)


def lower_collectives_to_loopback(model: ir.Model, rank: int) -> int:
    """Turn the graph's TensorRT-form DistCollective nodes into the loopback form (qwen_export.collectives):
    tags number them in graph order, the same on every rank, and they all read the `collective_group`
    input. Returns how many there were."""
    graph = model.graph
    group = ir.Value(name=LOOPBACK_GROUP_INPUT, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1]))
    tag = 0
    for node in list(graph):
        if node.domain != TRT_DOMAIN or node.op_type != TRT_OP:
            continue
        loopback = to_loopback(node, rank, tag, group)
        graph.insert_after(node, loopback)
        node.outputs[0].replace_all_uses_with(loopback.outputs[0])
        loopback.outputs[0].name, node.outputs[0].name = node.outputs[0].name, f"{node.name}/replaced"
        graph.remove(node, safe=True)
        tag += 1
    if tag:
        graph.inputs.append(group)
        model.opset_imports[LOOPBACK_DOMAIN] = LOOPBACK_VERSION
    return tag


def _copy_cpu_kernels(folder: Path) -> list[str]:
    from qwen_export import cpu_kernels

    shutil.copy2(cpu_kernels.library_path(), folder / cpu_kernels.LIBRARY_NAME)
    return [cpu_kernels.LIBRARY_NAME]


def _cpu_targets() -> list[str]:
    from qwen_export.targets import TARGETS

    return [t.name for t in TARGETS.values() if t.kind in CPU_KINDS]
