"""`qwen-export profile`: where time goes per decoder layer and op type (runtime) and per pass (build)."""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qwen_export.golden.store import make_prompt

if TYPE_CHECKING:
    from rich.console import Console

LAYER = re.compile(r"^/layers\.(\d+)/")


@dataclass
class PhaseProfile:
    """Per-run timings of one phase (prefill or decode), in milliseconds."""

    runs: int
    step_ms_mean: float  # wall clock around each run, as the caller sees it
    step_ms_p50: float
    step_ms_p90: float
    ort_run_ms_mean: float  # ONNX Runtime's own measure of each run
    attributed_ms_mean: float  # sum of per-node times (kernel + dispatch gap) per run
    per_layer_ms: dict[str, float] = field(default_factory=dict)  # mean per run; "other" = outside layers
    per_op_type_ms: dict[str, float] = field(default_factory=dict)  # kernel time per op type

    @property
    def coverage(self) -> float:
        """Attributed kernel time over ONNX Runtime's run time (1.0 = every microsecond attributed)."""
        return self.attributed_ms_mean / self.ort_run_ms_mean if self.ort_run_ms_mean else 0.0


@dataclass
class ProfileReport:
    artifact: str
    runtime: str
    prompt_tokens: int
    decode_steps: int
    phases: dict[str, PhaseProfile] = field(default_factory=dict)
    passes: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for name, phase in self.phases.items():
            data["phases"][name]["coverage"] = phase.coverage
        return data

    def render(self, console: Console) -> None:
        from rich.table import Table

        for name, phase in self.phases.items():
            console.print(
                f"[bold]{name}[/bold]: step p50 {phase.step_ms_p50:.2f} ms, p90 {phase.step_ms_p90:.2f} ms "
                f"({self.runtime})"
            )
            table = Table("part", "ms / step", "share")
            for part, ms in phase.per_layer_ms.items():
                table.add_row(part, f"{ms:.3f}", f"{ms / phase.attributed_ms_mean:.0%}")
            console.print(table)
            top = ", ".join(f"{op} {ms:.2f}" for op, ms in list(phase.per_op_type_ms.items())[:6])
            console.print(f"[dim]by op type (ms): {top}[/dim]")
        if self.passes:
            table = Table("pass", "wall s", "peak RSS rise (MiB)", "top-level nodes", title="build passes")
            for rec in self.passes:
                before, after = rec.get("nodes_before", {}), rec.get("nodes_after", {})
                table.add_row(
                    str(rec.get("name")),
                    f"{rec.get('wall_s', 0):.3f}",
                    f"{rec.get('peak_rss_rise_mib', 0):.1f}",
                    f"{before.get('graph', '?')} → {after.get('graph', '?')}",
                )
            console.print(table)


def _summarise(events: list[dict], top_level: set[str], wall_ms: list[float]) -> PhaseProfile:
    """Attribute each run's time to top-level nodes: for per-layer times a node owns its kernel time plus
    the dispatch gap before it, so layers add up to the run; per-op-type times are kernel time only.
    Nodes inside Scan bodies are timed by their Scan."""
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    nodes = sorted(
        (
            e
            for e in events
            if e.get("cat") == "Node"
            and e["name"].endswith("_kernel_time")
            and e["name"].removesuffix("_kernel_time") in top_level
        ),
        key=lambda e: e["ts"],
    )
    per_layer: dict[str, float] = defaultdict(float)
    per_op: dict[str, float] = defaultdict(float)
    attributed = 0.0
    for run in runs:
        cursor, end = run["ts"], run["ts"] + run["dur"]
        for e in (e for e in nodes if run["ts"] <= e["ts"] <= end):
            node = e["name"].removesuffix("_kernel_time")
            ms = (e["ts"] + e["dur"] - cursor) / 1e3
            cursor = e["ts"] + e["dur"]
            m = LAYER.match(node)
            per_layer[f"layer {int(m.group(1))}" if m else "other"] += ms
            per_op[e["args"].get("op_name", "?")] += e["dur"] / 1e3  # kernel time only: gaps are not an op's
            attributed += ms
        per_layer["other"] += (end - cursor) / 1e3  # feeding inputs and fetching outputs after the last node
        attributed += (end - cursor) / 1e3
    n = max(len(runs), 1)

    def mean(d: dict[str, float]) -> dict[str, float]:
        return {k: round(v / n, 4) for k, v in d.items()}

    layers = sorted(
        mean(per_layer).items(),
        key=lambda kv: (kv[0] == "other", int(kv[0].split()[-1]) if kv[0] != "other" else 0),
    )
    return PhaseProfile(
        runs=len(runs),
        step_ms_mean=float(np.mean(wall_ms)),
        step_ms_p50=float(np.percentile(wall_ms, 50)),
        step_ms_p90=float(np.percentile(wall_ms, 90)),
        ort_run_ms_mean=float(np.mean([r["dur"] for r in runs]) / 1e3) if runs else 0.0,
        attributed_ms_mean=attributed / n,
        per_layer_ms=dict(layers),
        per_op_type_ms=dict(sorted(mean(per_op).items(), key=lambda kv: -kv[1])),
    )


def _profiled_phase(model_path: Path, top_level: set[str], run_steps) -> tuple[list[dict], list[float]]:
    import onnxruntime as ort

    from qwen_export.runtime.ort_decoder import OrtDecoder, session_options

    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(optimize=False, model_path=model_path)
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "qwen")
        decoder = OrtDecoder.__new__(OrtDecoder)
        OrtDecoder.__init__(decoder, model_path)  # resolve I/O names once
        decoder.session = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        wall = run_steps(decoder)
        events = json.loads(Path(decoder.session.end_profiling()).read_text())
    return events, wall


def profile_artifact(
    artifact: str | os.PathLike, prompt_tokens: int = 65, decode_steps: int = 16, repeats: int = 5
) -> ProfileReport:
    """Profile prefill and decode on ONNX Runtime CPU (graph optimizations off, so nodes keep their names)."""
    import onnx

    from qwen_export.diff import _artifact_model

    model_path, _ = _artifact_model(Path(artifact))
    top_level = {n.name for n in onnx.load(str(model_path), load_external_data=False).graph.node}
    report = ProfileReport(
        str(artifact), "onnxruntime-cpu (graph optimizations off)", prompt_tokens, decode_steps
    )

    def prefill_runs(decoder) -> list[float]:
        ids = make_prompt(decoder.vocab_size, prompt_tokens)
        decoder.prefill(ids)  # warm-up, not measured separately: profiles include it, so it is dropped below
        wall = []
        for _ in range(repeats):
            start = time.perf_counter()
            decoder.prefill(ids)
            wall.append((time.perf_counter() - start) * 1e3)
        return wall

    def decode_runs(decoder) -> list[float]:
        ids = make_prompt(decoder.vocab_size, prompt_tokens)
        state = decoder.prefill(ids).states
        mask = np.ones((1, prompt_tokens), np.int64)
        token = np.array([[1]], np.int64)
        wall = []
        for step in range(decode_steps):
            mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
            start = time.perf_counter()
            out = decoder.step(token, mask, np.array([[prompt_tokens + step]]), state)
            wall.append((time.perf_counter() - start) * 1e3)
            state = out.states
        return wall

    for phase, runner, skip in (("prefill", prefill_runs, 1), ("decode", decode_runs, 1)):
        events, wall = _profiled_phase(model_path, top_level, runner)
        runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][skip:]
        first = runs[0]["ts"] if runs else 0
        kept = [
            e for e in events if e.get("ts", 0) >= first
        ]  # drop the warm-up run (and prefill before decode)
        report.phases[phase] = _summarise(kept, top_level, wall)

    passes_file = Path(artifact) / "passes.json"
    if passes_file.is_file():
        data = json.loads(passes_file.read_text())
        report.passes = data.get("passes", data) if isinstance(data, dict) else data
    return report


def render_chart(report: ProfileReport, path: str | os.PathLike) -> Path:
    """A PNG bar chart of mean time per decoder layer, prefill and decode side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report.phases["prefill"].per_layer_ms)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.8), 4))
    for offset, phase in ((-0.2, "prefill"), (0.2, "decode")):
        values = [report.phases[phase].per_layer_ms.get(n, 0.0) for n in names]
        ax.bar(
            x + offset,
            values,
            width=0.4,
            label=f"{phase} (p50 step {report.phases[phase].step_ms_p50:.2f} ms)",
        )
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_ylabel("ms per step")
    ax.set_title(f"{Path(report.artifact).name}: time per decoder layer\n{report.runtime}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
