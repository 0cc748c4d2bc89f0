"""`qwen-export profile`: where time goes per decoder layer and op type (runtime) and per pass (build)."""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qwen_export.errors import QwenExportError
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
    vision_grid: list[list[int]] | None = None  # multimodal: the grid_thw the vision phase ran on

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


def _summarise(
    events: list[dict],
    top_level: set[str],
    wall_ms: list[float],
    scope: re.Pattern = LAYER,
    part: str = "layer",
) -> PhaseProfile:
    """Attribute each run's time to top-level nodes: for per-layer times a node owns its kernel time plus
    the dispatch gap before it, so layers add up to the run; per-op-type times are kernel time only.
    Nodes inside Scan bodies are timed by their Scan. `scope` finds a node's layer (a vision block's for
    the vision graph) in its name; the rest is "other"."""
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
            m = scope.match(node)
            per_layer[f"{part} {int(m.group(1))}" if m else "other"] += ms
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


def _profiled_session(model_path: Path, run: Callable[[Any], list[float]]) -> tuple[list[dict], list[float]]:
    """`run` given an ONNX Runtime session with profiling on (optimizations off, so nodes keep their
    names); its wall times per step and the profile's events."""
    import onnxruntime as ort

    from qwen_export.runtime.ort_decoder import session_options

    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(optimize=False, model_path=model_path)
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "qwen")
        session = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        wall = run(session)
        events = json.loads(Path(session.end_profiling()).read_text())
    return events, wall


def _profiled_phase(
    model_path: Path, run_steps: Callable[[Any], list[float]], wrap: Callable[[Any], Any] | None = None
) -> tuple[list[dict], list[float]]:
    """run_steps given a decoder over a profiled session (`wrap`: a multimodal artifact's embed path)."""
    from qwen_export.runtime.ort_decoder import OrtDecoder

    def run(session: Any) -> list[float]:
        decoder = OrtDecoder(model_path)  # resolve I/O names once
        decoder.session = session
        return run_steps(wrap(decoder) if wrap is not None else decoder)

    return _profiled_session(model_path, run)


def _timed(repeats: int, fn: Callable[[], Any]) -> list[float]:
    """Wall milliseconds of `repeats` calls after one warm-up call (which the profile drops)."""
    fn()
    wall = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        wall.append((time.perf_counter() - start) * 1e3)
    return wall


def _after_warmup(events: list[dict], skip: int = 1) -> list[dict]:
    """The events from the first measured run on: drops the warm-up (and a decode phase's prefill)."""
    runs = [e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][skip:]
    first = runs[0]["ts"] if runs else 0
    return [e for e in events if e.get("ts", 0) >= first]


def _node_names(path: Path) -> set[str]:
    import onnx

    return {n.name for n in onnx.load(str(path), load_external_data=False).graph.node}


def profile_artifact(
    artifact: str | os.PathLike,
    prompt_tokens: int = 65,
    decode_steps: int = 16,
    repeats: int = 5,
    image: str | os.PathLike | None = None,
) -> ProfileReport:
    """Profile prefill and decode on ONNX Runtime CPU (graph optimizations off, so nodes keep their names).

    A multimodal artifact also profiles vision.onnx on one image (`image` through the checkpoint's
    processor, else a seeded 8x12-patch grid) per vision block; its text prompts go through embed.onnx
    (not profiled: one Gather)."""
    from qwen_export.diff import _artifact_model

    model_path, info = _artifact_model(Path(artifact))
    top_level = _node_names(model_path)
    report = ProfileReport(
        str(artifact), "onnxruntime-cpu (graph optimizations off)", prompt_tokens, decode_steps
    )
    wrap = None
    if info.get("multimodal"):
        wrap = _profile_vision(report, Path(artifact), info, repeats, image)
    elif image is not None:
        raise QwenExportError(
            f"{artifact}: --image profiles a multimodal artifact's vision graph; this one is text only"
        )

    def prefill_runs(decoder) -> list[float]:
        ids = make_prompt(decoder.vocab_size, prompt_tokens)
        return _timed(repeats, lambda: decoder.prefill(ids))

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

    for phase, runner in (("prefill", prefill_runs), ("decode", decode_runs)):
        events, wall = _profiled_phase(model_path, runner, wrap)
        report.phases[phase] = _summarise(_after_warmup(events), top_level, wall)

    passes_file = Path(artifact) / "passes.json"
    if passes_file.is_file():
        data = json.loads(passes_file.read_text())
        report.passes = data.get("passes", data) if isinstance(data, dict) else data
    return report


def _profile_vision(
    report: ProfileReport, folder: Path, info: dict[str, Any], repeats: int, image: str | os.PathLike | None
) -> Callable[[Any], Any]:
    """Profile vision.onnx on one image into report.phases["vision"] (time per vision block); returns
    what turns a text decoder into the artifact's embed path."""
    from qwen_export.multimodal_build import vision_case_inputs
    from qwen_export.multimodal_tools import VISION_BLOCK, TextEmbedsDecoder, embed_function, vision_spec
    from qwen_export.runtime.multimodal_inputs import vision_graph_feeds

    graphs = info["multimodal"]["graphs"]
    vspec = vision_spec(info)
    if image is not None:
        from qwen_export.runtime.multimodal_inputs import load_image, load_processor, process, prompt_text

        processor = load_processor(info.get("source_dir") or folder)
        arrays = process(processor, prompt_text(processor, "", 1, 0, chat=False), [load_image(image)])
        pixels, grid = arrays["pixel_values"], arrays["image_grid_thw"]
    else:
        pixels, grid = vision_case_inputs(vspec)["image"]
    feeds = vision_graph_feeds(pixels, grid, vspec)
    vision_path = folder / graphs["vision"]
    events, wall = _profiled_session(vision_path, lambda s: _timed(repeats, lambda: s.run(None, feeds)))
    report.phases["vision"] = _summarise(
        _after_warmup(events), _node_names(vision_path), wall, VISION_BLOCK, "block"
    )
    report.vision_grid = np.asarray(grid).astype(int).tolist()

    embed = embed_function(folder, info)
    return lambda decoder: TextEmbedsDecoder.wrap(decoder, embed)


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
