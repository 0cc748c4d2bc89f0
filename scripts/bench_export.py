"""Export benchmark: qwen-export's exporter next to stock ``torch.onnx.export(..., dynamo=True)``.

For each preset, every measurement runs in its own subprocess with a time limit, so wall time and peak RSS
belong to that measurement alone:

- ``materialize``: create the preset's Hugging Face checkpoint folder once (not part of any export time);
- ``ours``: ``qwen_export.exporter.export.export_model`` (checkpoint folder -> model.onnx + external data);
- ``peer-*``: the same checkpoint folder loaded with ``transformers.<Architecture>.from_pretrained`` and
  exported with ``torch.onnx.export(model, (input_ids,), dynamo=True)``, in these variants:
    - ``peer-plain``: the call as a user would first write it (default experts implementation, cache on);
    - ``peer-default``: default experts implementation, ``use_cache=False``;
    - ``peer-batched_mm-dynamic``: ``experts_implementation="batched_mm"``, batch/sequence declared dynamic;
    - ``peer-batched_mm``: ``experts_implementation="batched_mm"``, no dynamic shapes declared.

Each child reports its own ``ru_maxrss``; the parent also polls the child's RSS with psutil, so a child that
is killed at the time limit still has a (sampled) peak. Graphs are inspected afterwards in the parent:
node counts (top level, and including Scan/Loop/If bodies), input shapes (is the sequence length baked
in?) and state inputs (past KV / conv / recurrent state).

Writes ``benchmarks/export.json`` and ``benchmarks/export.md``. Usage::

    .venv/bin/python scripts/bench_export.py [--presets P ...] [--peer-timeout S] [--skip-peer]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PRESETS = ["tiny-qwen3.5-moe", "small-qwen3.5-moe"]
DEFAULT_PEER_TIMEOUT_S = {"tiny-qwen3.5-moe": 600}
FALLBACK_PEER_TIMEOUT_S = 900
SAMPLE_SHAPE = (2, 16)  # batch, sequence of the peer's sample input (not 0/1, so nothing specialises on it)
MAIN_PEER = "peer-batched_mm"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
STATE_NAME = re.compile(r"past|present|cache|state", re.IGNORECASE)
PLAIN_INPUTS = {"input_ids", "attention_mask", "position_ids"}
DEFAULT_EXPERTS = "grouped_mm"  # what transformers 5 picks when none is requested (falls back to eager)


@dataclass(frozen=True)
class PeerVariant:
    kind: str
    experts: str | None  # None: whatever transformers picks by default
    use_cache: bool
    dynamic: bool
    description: str

    @property
    def label(self) -> str:
        experts = self.experts or f"default ({DEFAULT_EXPERTS})"
        cache = "on" if self.use_cache else "off"
        return f"torch.onnx: experts={experts}, cache {cache}" + (", dynamic_shapes" if self.dynamic else "")


PEER_VARIANTS: dict[str, PeerVariant] = {
    v.kind: v
    for v in [
        PeerVariant(
            "peer-plain",
            None,
            True,
            False,
            "default experts implementation, use_cache left on (the first call a user writes)",
        ),
        PeerVariant("peer-default", None, False, False, "default experts implementation, use_cache=False"),
        PeerVariant(
            "peer-batched_mm",
            "batched_mm",
            False,
            False,
            "experts_implementation='batched_mm', use_cache=False, no dynamic_shapes",
        ),
        PeerVariant(
            "peer-batched_mm-dynamic",
            "batched_mm",
            False,
            True,
            "experts_implementation='batched_mm', use_cache=False, dynamic_shapes on batch and sequence",
        ),
    ]
}


# --------------------------------------------------------------------------------------------------------
# child side: one measurement per process
# --------------------------------------------------------------------------------------------------------


def _self_peak_rss_mib() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _first_line(text: str) -> str:
    for line in ANSI.sub("", text).splitlines():
        if line.strip():
            return line.strip()
    return ""


def _error_info(exc: BaseException) -> dict[str, Any]:
    """First line of the raised error, and of the innermost cause (torch.onnx wraps the real reason)."""
    chain = [exc]
    while True:
        nxt = chain[-1].__cause__ or (None if chain[-1].__suppress_context__ else chain[-1].__context__)
        if nxt is None or nxt in chain:
            break
        chain.append(nxt)
    root = chain[-1]
    summary = ""
    text = ANSI.sub("", str(exc))
    if "## Exception summary" in text:
        after = text.split("## Exception summary", 1)[1]
        summary = _first_line(after)
    return {
        "type": type(exc).__name__,
        "first_line": _first_line(str(exc)),
        "summary": summary,
        "root_type": type(root).__name__,
        "root_first_line": _first_line(str(root)),
        "chain": [f"{type(e).__name__}: {_first_line(str(e))}" for e in chain],
    }


def _child_materialize(preset: str) -> dict[str, Any]:
    from qwen_export.cache import cache_root
    from qwen_export.presets import get_preset

    p = get_preset(preset)
    folder = cache_root() / "presets" / f"{preset}-{p.fingerprint()}"
    cached = (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    from qwen_export.presets import materialize

    start = time.perf_counter()
    path = materialize(preset, quiet=True)
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return {
        "ok": True,
        "folder": str(path),
        "cached": cached,
        "seconds": round(seconds, 3),
        "size_bytes": size,
        "architecture": p.architecture,
    }


def _child_ours(preset: str, out_dir: Path) -> dict[str, Any]:
    from qwen_export.exporter.export import export_model

    start = time.perf_counter()
    try:
        r = export_model(out_dir, preset=preset)
    except Exception as exc:  # report, never fix: the benchmark records what happened
        return {
            "ok": False,
            "seconds": round(time.perf_counter() - start, 3),
            "error": _error_info(exc),
            "traceback": traceback.format_exc()[-4000:],
        }
    total = time.perf_counter() - start
    return {
        "ok": True,
        "seconds": round(total, 3),
        "reported": {k: r.info.get(k) for k in ("graph", "timings_s", "peak_rss_mib")},
    }


def _child_peer(kind: str, preset: str, out_dir: Path) -> dict[str, Any]:
    import torch
    import transformers

    from qwen_export.presets import get_preset, materialize

    variant = PEER_VARIANTS[kind]
    folder = materialize(preset, quiet=True)
    cls = getattr(transformers, get_preset(preset).architecture)
    result: dict[str, Any] = {"variant": variant.description, "class": cls.__name__}

    start = time.perf_counter()
    load_kwargs = {} if variant.experts is None else {"experts_implementation": variant.experts}
    model = cls.from_pretrained(folder, **load_kwargs).eval()
    load_s = time.perf_counter() - start
    result["load_s"] = round(load_s, 3)
    result["experts_implementation"] = model.config._experts_implementation

    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, SAMPLE_SHAPE, generator=gen)
    kwargs: dict[str, Any] = {"attention_mask": torch.ones_like(input_ids)}
    if not variant.use_cache:
        kwargs["use_cache"] = False
    dynamic_shapes = None
    if variant.dynamic:
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        dynamic_shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
        dynamic_shapes.update({k: None for k in kwargs if k not in dynamic_shapes})
    call = (
        f"torch.onnx.export(model, (input_ids,), f, kwargs={{{', '.join(sorted(kwargs))}}}, dynamo=True"
        + (", dynamic_shapes=..." if dynamic_shapes else "")
        + ")"
    )
    result["call"] = call
    result["sample_shape"] = list(SAMPLE_SHAPE)

    out_dir.mkdir(parents=True, exist_ok=True)
    export_start = time.perf_counter()
    try:
        with torch.no_grad():
            torch.onnx.export(
                model,
                (input_ids,),
                str(out_dir / "model.onnx"),
                kwargs=kwargs,
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
            )
    except Exception as exc:
        export_s = time.perf_counter() - export_start
        result.update(
            ok=False, export_s=round(export_s, 3), seconds=round(load_s + export_s, 3), error=_error_info(exc)
        )
        return result
    export_s = time.perf_counter() - export_start
    result.update(ok=True, export_s=round(export_s, 3), seconds=round(load_s + export_s, 3))
    return result


def child_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench_export.py _child")
    ap.add_argument("--kind", required=True)
    ap.add_argument("--preset", required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--result", type=Path, required=True)
    a = ap.parse_args(argv)
    started = time.perf_counter()
    try:
        if a.kind == "materialize":
            res = _child_materialize(a.preset)
        elif a.kind == "ours":
            res = _child_ours(a.preset, a.out)
        else:
            res = _child_peer(a.kind, a.preset, a.out)
    except Exception as exc:
        res = {"ok": False, "error": _error_info(exc), "traceback": traceback.format_exc()[-4000:]}
    res["peak_rss_mib"] = round(_self_peak_rss_mib(), 1)
    res["process_wall_s"] = round(time.perf_counter() - started, 3)
    a.result.write_text(json.dumps(res, indent=2))
    return 0


# --------------------------------------------------------------------------------------------------------
# parent side
# --------------------------------------------------------------------------------------------------------


def run_child(
    kind: str, preset: str, workdir: Path, timeout_s: float, progress: Any, task: Any
) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; kill its process group at the time limit."""
    import psutil

    out_dir = workdir / preset / kind
    shutil.rmtree(out_dir, ignore_errors=True)
    result_file = workdir / f"{preset}.{kind}.result.json"
    log_file = workdir / f"{preset}.{kind}.log"
    result_file.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "_child",
        "--kind",
        kind,
        "--preset",
        preset,
        "--out",
        str(out_dir),
        "--result",
        str(result_file),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    sampled_peak = 0
    timed_out = False
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True
        )
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
                sampled_peak = max(sampled_peak, rss)
            except psutil.Error:
                pass
            elapsed = time.perf_counter() - start
            progress.update(task, description=f"{preset}: {kind} ({elapsed:.0f}s / {timeout_s:.0f}s)")
            if elapsed > timeout_s:
                timed_out = True
                os.killpg(proc.pid, signal.SIGTERM)  # the group this call started, and nothing else
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                break
            time.sleep(0.25)
    wall = time.perf_counter() - start
    if result_file.is_file() and not timed_out:
        res = json.loads(result_file.read_text())
    else:
        res = {"ok": False}
        if timed_out:
            res["error"] = {"first_line": f"did not finish within {timeout_s:.0f} s", "type": "Timeout"}
            res["timed_out"] = True
        else:
            tail = log_file.read_text(errors="replace").splitlines()[-20:] if log_file.is_file() else []
            res["error"] = {
                "first_line": f"child exited with code {proc.returncode} and no result",
                "type": "ChildDied",
                "log_tail": tail,
            }
    res.update(
        kind=kind,
        preset=preset,
        returncode=proc.returncode,
        child_wall_s=round(wall, 3),
        sampled_peak_rss_mib=round(sampled_peak / 2**20, 1),
        timeout_s=timeout_s,
    )
    if res.get("ok") and kind != "materialize":
        res["model"] = inspect_model(out_dir)
    return res


def count_nodes(graph: Any) -> tuple[int, int]:
    """(nodes in this graph, nodes including every subgraph body: Scan, Loop, If)."""
    import onnx

    top = len(graph.node)
    total = 0
    for node in graph.node:
        total += 1
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                total += count_nodes(attr.g)[1]
            elif attr.type == onnx.AttributeProto.GRAPHS:
                total += sum(count_nodes(g)[1] for g in attr.graphs)
    return top, total


def _dims(value_info: Any) -> list[int | str]:
    tt = value_info.type.tensor_type
    if not tt.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]


def inspect_model(out_dir: Path) -> dict[str, Any]:
    import onnx

    path = out_dir / "model.onnx"
    if not path.is_file():
        return {"error": f"{path} missing"}
    m = onnx.load(str(path), load_external_data=False)
    top, total = count_nodes(m.graph)
    fn_nodes = sum(len(f.node) for f in m.functions)
    ops: dict[str, int] = {}
    for n in m.graph.node:
        key = f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        ops[key] = ops.get(key, 0) + 1
    inputs = [{"name": i.name, "shape": _dims(i)} for i in m.graph.input]
    outputs = [{"name": o.name, "shape": _dims(o)} for o in m.graph.output]
    ids = next((i for i in inputs if i["name"] == "input_ids"), inputs[0] if inputs else None)
    state_inputs = [
        i["name"] for i in inputs if i["name"] not in PLAIN_INPUTS and STATE_NAME.search(i["name"])
    ]
    files = {f.name: f.stat().st_size for f in out_dir.iterdir() if f.is_file() and f.name != "export.json"}
    return {
        "nodes_top": top,
        "nodes_total": total,
        "function_nodes": fn_nodes,
        "subgraph_ops": {k: v for k, v in ops.items() if k in ("Scan", "Loop", "If")},
        "top_ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])[:12]),
        "initializers": len(m.graph.initializer),
        "opset": {o.domain or "ai.onnx": o.version for o in m.opset_import},
        "inputs": inputs,
        "outputs": outputs[:4] + ([{"name": f"... {len(outputs) - 4} more"}] if len(outputs) > 4 else []),
        "num_outputs": len(outputs),
        "static_input_shapes": all(isinstance(d, int) for i in inputs for d in i["shape"]),
        "sequence_baked_in": bool(ids and len(ids["shape"]) > 1 and isinstance(ids["shape"][1], int)),
        "input_ids_shape": ids["shape"] if ids else None,
        "state_inputs": len(state_inputs),
        "has_cache_inputs": bool(state_inputs),
        "files": files,
        "size_bytes": sum(files.values()),
    }


def environment() -> dict[str, Any]:
    import psutil

    from qwen_export.exporter.export import tool_versions

    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "versions": tool_versions(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
    }


def _command() -> str:
    exe = Path(sys.executable)
    try:
        exe_s = str(exe.relative_to(REPO))
    except ValueError:
        exe_s = str(exe)
    script = Path(__file__).resolve()
    try:
        script_s = str(script.relative_to(REPO))
    except ValueError:
        script_s = str(script)
    return shlex.join([exe_s, script_s, *sys.argv[1:]])


def ratios(ours: dict[str, Any], peer: dict[str, Any]) -> dict[str, float] | None:
    if not (ours.get("ok") and peer.get("ok") and "model" in ours and "model" in peer):
        return None

    def r(a: float, b: float) -> float:
        return round(a / b, 3) if b else float("nan")

    return {
        "export_s": r(ours["seconds"], peer["seconds"]),
        "nodes_top": r(ours["model"]["nodes_top"], peer["model"]["nodes_top"]),
        "nodes_total": r(ours["model"]["nodes_total"], peer["model"]["nodes_total"]),
        "size_bytes": r(ours["model"]["size_bytes"], peer["model"]["size_bytes"]),
        "peak_rss_mib": r(ours["peak_rss_mib"], peer["peak_rss_mib"]),
    }


# --------------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------------


def _mib(n: float | None) -> str:
    return "–" if n is None else f"{n / 2**20:,.1f}"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def short_error(err: dict[str, Any]) -> str:
    """The innermost reason, without the "<class '...'>: " prefix torch.onnx puts on its summary."""
    msg = err.get("summary") or err.get("root_first_line") or err.get("first_line") or "failed"
    return re.sub(r"^<class '[\w.]+'>:\s*", "", msg)


def _row(res: dict[str, Any], width: int = 160) -> list[str]:
    m = res.get("model", {})
    rss = res.get("peak_rss_mib") or res.get("sampled_peak_rss_mib")
    rss_s = "–" if not rss else f"{rss:,.0f}" + ("" if res.get("peak_rss_mib") else " (sampled)")
    if res.get("ok"):
        status = "ok"
        time_s = f"{res['seconds']:.1f}"
        if "load_s" in res:
            time_s += f" ({res['load_s']:.1f} load + {res['export_s']:.1f} export)"
        nodes = f"{m.get('nodes_top', '–'):,} / {m.get('nodes_total', '–'):,}"
        seq = "baked in" if m.get("sequence_baked_in") else "dynamic"
        shape = " × ".join(str(d) for d in m.get("input_ids_shape") or [])
        state = f"yes ({m['state_inputs']} inputs)" if m.get("has_cache_inputs") else "no"
        return [status, time_s, nodes, _mib(m.get("size_bytes")), rss_s, f"{seq} ({shape})", state]
    err = res.get("error", {})
    msg = _clip(short_error(err), width)
    if res.get("timed_out"):
        return [err.get("first_line", "timeout"), "–", "–", "–", rss_s, "–", "–"]
    fail_t = f"fails after {res['export_s']:.1f}" if "export_s" in res else f"{res.get('seconds', 0):.1f}"
    if "load_s" in res:
        fail_t += f" (+{res['load_s']:.1f} load)"
    return [f"FAILED: {msg}", fail_t, "–", "–", rss_s, "–", "–"]


HEADERS = [
    "status",
    "wall time (s)",
    "nodes (top / incl. subgraphs)",
    "size on disk (MiB)",
    "peak RSS (MiB)",
    "input_ids shape",
    "state I/O",
]


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("`", "'")


def write_markdown(report: dict[str, Any], path: Path) -> None:
    env = report["environment"]
    v = env["versions"]
    lines = [
        "# Export benchmark: qwen-export vs stock `torch.onnx.export(dynamo=True)`",
        "",
        f"Produced by `{report['command']}` on {report['date']} "
        f"({env['cpu_count']} CPUs, {env['cpu_model'] or 'unknown CPU'}, {env['memory_gib']} GiB; "
        f"torch {v['torch']}, transformers {v['transformers']}, onnx {v['onnx']}, onnxscript "
        f"{report.get('onnxscript_version', '?')}, qwen-export {v['qwen_export']}). "
        "Machine-readable numbers: [export.json](export.json).",
        "",
        "Each row is its own subprocess with a time limit. Wall time covers loading the checkpoint folder, "
        "building/tracing and writing the ONNX files (interpreter start-up and imports excluded); "
        "peak RSS is the child's `ru_maxrss` (imports included). Peer rows load the same folder with "
        "`transformers.<Architecture>.from_pretrained` and export a sample `input_ids` of shape "
        f"{SAMPLE_SHAPE[0]}x{SAMPLE_SHAPE[1]} (+ an all-ones `attention_mask`).",
        "",
    ]
    for preset, block in report["presets"].items():
        mat = block.get("materialize", {})
        lines += [f"## {preset}", ""]
        if mat.get("ok"):
            lines.append(
                f"Checkpoint: {_mib(mat['size_bytes'])} MiB safetensors; materialised "
                + ("earlier (cached)" if mat["cached"] else f"in {mat['seconds']:.1f} s (not counted)")
                + "."
            )
            lines.append("")
        lines.append("| exporter | " + " | ".join(HEADERS) + " |")
        lines.append("|---" * (len(HEADERS) + 1) + "|")
        for kind, res in block["runs"].items():
            label = "qwen-export" if kind == "ours" else PEER_VARIANTS[kind].label
            lines.append("| " + " | ".join(_md_escape(c) for c in [label, *_row(res, width=110)]) + " |")
        lines.append("")
        for kind, rat in block.get("ratios", {}).items():
            lines.append(
                f"Ours / {kind}: time x{rat['export_s']}, nodes x{rat['nodes_top']} (top) / "
                f"x{rat['nodes_total']} (total), size x{rat['size_bytes']}, peak RSS x{rat['peak_rss_mib']}."
            )
        lines.append("")
    if report.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in report["notes"]] + [""]
    path.write_text("\n".join(lines))


def notes_for(report: dict[str, Any]) -> list[str]:
    notes = []
    for preset, block in report["presets"].items():
        for kind, res in block["runs"].items():
            if not res.get("ok") and res.get("error"):
                err = res["error"]
                first = err.get("first_line", "")
                cause = err.get("root_first_line", "")
                note = f"{preset} / {kind}: first line: `{_md_escape(_clip(first, 300))}`"
                if cause and cause != first:
                    note += f"; innermost cause ({err.get('root_type')}): `{_md_escape(_clip(cause, 300))}`"
                if "export_s" in res:
                    note += f"; failed {res['export_s']:.1f} s into torch.onnx.export"
                notes.append(note)
            m = res.get("model", {})
            if kind != "ours" and res.get("ok"):
                notes.append(
                    f"{preset} / {kind}: inputs {[i['name'] for i in m.get('inputs', [])]}, "
                    f"{m.get('num_outputs')} output(s), no state I/O: a prefill-only graph"
                    if not m.get("has_cache_inputs")
                    else f"{preset} / {kind}: {m.get('state_inputs')} state inputs"
                )
                if PEER_VARIANTS[kind].dynamic and m.get("sequence_baked_in"):
                    notes.append(
                        f"{preset} / {kind}: batch and sequence were declared dynamic (torch.export.Dim), "
                        f"yet input_ids comes out as {m.get('input_ids_shape')}: the sequence length was "
                        "specialised to the sample's and torch.onnx.export raised nothing"
                    )
    return notes


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        return child_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS, help="presets to benchmark")
    ap.add_argument(
        "--peer-timeout",
        type=float,
        default=None,
        help="seconds per stock torch.onnx measurement (default 600 for tiny presets, 900 otherwise)",
    )
    ap.add_argument(
        "--ours-timeout", type=float, default=900.0, help="seconds for our exporter (default 900)"
    )
    ap.add_argument("--skip-peer", action="store_true", help="only run our exporter")
    ap.add_argument(
        "--peer-variants",
        nargs="+",
        default=list(PEER_VARIANTS),
        choices=list(PEER_VARIANTS),
        help="which stock torch.onnx variants to run (default: all)",
    )
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks", help="where export.json/.md go")
    ap.add_argument(
        "--workdir", type=Path, default=None, help="scratch folder (default: a temp dir, removed)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the exported models in the scratch folder")
    args = ap.parse_args(argv)

    import onnxscript
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qwen-export-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "format": "qwen-export/bench-export@1",
        "command": _command(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "onnxscript_version": onnxscript.__version__,
        "sample_shape": list(SAMPLE_SHAPE),
        "peer_variants": {k: PEER_VARIANTS[k].description for k in args.peer_variants},
        "presets": {},
    }
    kinds = ["ours"] + ([] if args.skip_peer else list(args.peer_variants))
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
    ) as prog:
        overall = prog.add_task("benchmark", total=len(args.presets) * (len(kinds) + 1))
        for preset in args.presets:
            block: dict[str, Any] = {"runs": {}}
            report["presets"][preset] = block
            task = prog.add_task(f"{preset}: materialize")
            mat = run_child("materialize", preset, workdir, 3600, prog, task)
            block["materialize"] = mat
            prog.advance(overall)
            if not mat.get("ok"):
                console.log(f"[red]{preset}: materialize failed: {mat.get('error')}")
                continue
            made = "cached" if mat["cached"] else f"made in {mat['seconds']:.1f}s"
            console.log(f"{preset}: checkpoint {made} at {mat['folder']}")
            for kind in kinds:
                if kind == "ours":
                    limit = args.ours_timeout
                else:
                    limit = args.peer_timeout or DEFAULT_PEER_TIMEOUT_S.get(preset, FALLBACK_PEER_TIMEOUT_S)
                res = run_child(kind, preset, workdir, limit, prog, task)
                block["runs"][kind] = res
                prog.advance(overall)
                console.log(f"{preset}: {kind}: " + " | ".join(_row(res)))
                if not args.keep:
                    shutil.rmtree(workdir / preset / kind, ignore_errors=True)
            ours = block["runs"].get("ours", {})
            block["ratios"] = {k: r for k in kinds if k != "ours" and (r := ratios(ours, block["runs"][k]))}
            prog.update(task, description=f"{preset}: done", completed=1, total=1)
            # write after every preset so a later crash keeps what was measured
            report["notes"] = notes_for(report)
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "export.json").write_text(json.dumps(report, indent=2))
            write_markdown(report, args.out / "export.md")

    for preset, block in report["presets"].items():
        table = Table(title=preset)
        table.add_column("exporter")
        for h in HEADERS:
            table.add_column(h)
        for kind, res in block["runs"].items():
            table.add_row(kind, *_row(res, width=70))
        console.print(table)
        for kind, rat in block.get("ratios", {}).items():
            console.print(f"ours / {kind}: {rat}")
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    console.print(f"wrote {args.out / 'export.json'} and {args.out / 'export.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
