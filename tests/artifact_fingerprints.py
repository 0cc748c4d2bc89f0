"""Fingerprints of every artifact the toolkit writes, to prove a refactor changed no byte.

For every tiny preset: the golden reference, the export, a build per ONNX-writing target, and the graph an
engine target hands to its builder (trt-rtx also builds its engine for one GPU). Each artifact is reduced
to the sha256 of every file it holds, with its manifest's volatile fields (wall times, peak memory, the
cache folder, the pass records' timings) removed first. `passes.json` is a per-pass report of wall times
and pass statistics, not part of the artifact's contract, and is left out.

    python tests/artifact_fingerprints.py --write     # record tests/data/artifact_fingerprints.json
                                                      # (--case: those only; goldens: on the record's ISA)
    python tests/artifact_fingerprints.py             # compare against it; exit 1 on any difference

The recorded file comes from the code before the refactor it guards; it is a regression fence, not a
measure of correctness (the golden tests compare with the Hugging Face reference).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from cpu_kernel_support import cpu_flags

from qwen_export.targets import TARGETS, names

RECORD = Path(__file__).resolve().parent / "data" / "artifact_fingerprints.json"
PRESETS = ("tiny-qwen3.5-moe", "tiny-qwen3-next", "tiny-qwen3.5")
# From the registry: every target that writes ONNX is built; every engine target's prepared graph is
# fingerprinted, and those that build ahead of time on this CPU (trt-rtx) also build their engine.
ONNX_BUILD_TARGETS = tuple(t.name for t in TARGETS.values() if t.kind != "engine")
ENGINE_TARGETS = names("engine")
AOT_ENGINE_TARGETS = tuple(t.name for t in TARGETS.values() if t.engine and t.engine.aot_sms)
ENGINE_LIMITS = ("--gpu", "sm89", "--max-batch", "1", "--max-prompt", "64", "--max-context", "128")
VOLATILE = {"timings_s", "wall_s", "peak_rss_mib", "cache_dir", "rss_before_mib", "rss_after_mib"}
# Pass records in an engine manifest carry per-pass statistics whose layout is a report format.
ENGINE_VOLATILE = VOLATILE | {"passes", "sha256", "fingerprint", "bytes", "path"}
SKIP_FILES = {"passes.json"}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _strip(data: Any, drop: set[str]) -> Any:
    if isinstance(data, dict):
        return {k: _strip(v, drop) for k, v in data.items() if k not in drop}
    if isinstance(data, list):
        return [_strip(v, drop) for v in data]
    return data


def folder_fingerprint(
    folder: Path, drop: set[str] = VOLATILE, scratch: Path | None = None
) -> dict[str, str]:
    """sha256 per file (relative path); JSON manifests hashed after removing the volatile fields and
    naming the scratch folder `<scratch>`. Engines are left out: TensorRT-RTX writes different bytes for
    the same network each build, so an engine target is held to its prepared graph and its manifest."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = str(path.relative_to(folder))
        if path.name in SKIP_FILES or path.suffix == ".engine":
            continue
        if path.suffix == ".json":
            text = path.read_text().replace(str(scratch), "<scratch>") if scratch else path.read_text()
            stable = json.dumps(_strip(json.loads(text), drop), sort_keys=True)
            out[name] = hashlib.sha256(stable.encode()).hexdigest()
        else:
            out[name] = _sha256(path)
    return out


def _cli(*args: str) -> None:
    """`qwen-export ARGS` in this process, as the console script runs it (its output kept for the error)."""
    import contextlib
    import io

    import click

    from qwen_export.cli import app

    out = io.StringIO()
    code: int | None = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            app(args=list(args), prog_name="qwen-export", standalone_mode=False)
        except click.exceptions.Exit as done:
            code = done.exit_code
        except (click.ClickException, click.exceptions.Abort) as failed:
            code = getattr(failed, "exit_code", 1)
            out.write(str(failed))
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else 1
    if code:
        raise RuntimeError(f"{' '.join(args)} failed ({code}): {out.getvalue().strip()[-2000:]}")


def _worker_start(cache: str) -> None:
    # Each worker imports the toolkit once for all its cases (a process per case spent about 4 s of its
    # CPU on imports alone, 42 times).
    os.environ["QWEN_EXPORT_CACHE"] = cache


def _run_case(kind: str, args: tuple[str, ...]) -> None:
    if kind == "cli":
        _cli(*args)
    else:
        preset, target, out = args
        _engine_graph(preset, target, Path(out))


def _engine_graph(preset: str, target: str, out: Path) -> None:
    """The graph `target`'s engines are built from (ONNX files only; runs where the builder cannot)."""
    import onnx_ir as ir

    from qwen_export.engines.graph import engine_passes, run_passes, save_graph
    from qwen_export.engines.progress import Stages
    from qwen_export.engines.spec import DeploySpec
    from qwen_export.exporter.export import cached_export

    spec = DeploySpec.create("sm89", max_batch=1, max_prompt=64, max_context=128, target=target)
    model = ir.load(cached_export(preset=preset) / "model.onnx")
    run_passes(model, engine_passes(spec), Stages(None))
    save_graph(model, out)


def fingerprints(cases: list[str] | None = None, jobs: int = 2) -> dict[str, dict[str, str]]:
    """Every case's fingerprint, built in a fresh cache folder. The in-process builds read the cache from
    the environment, so it points there for the duration and back after (left pointing at the removed
    folder, every later test in the process rebuilt its cache there: 2.1 GB left in /tmp per run)."""
    previous = os.environ.get("QWEN_EXPORT_CACHE")
    try:
        return _fingerprints(cases, jobs)
    finally:
        if previous is None:
            os.environ.pop("QWEN_EXPORT_CACHE", None)
        else:
            os.environ["QWEN_EXPORT_CACHE"] = previous


def _fingerprints(cases: list[str] | None, jobs: int) -> dict[str, dict[str, str]]:
    with tempfile.TemporaryDirectory(prefix="qwen-fingerprints-") as scratch:
        root = Path(scratch)
        cache = str(root / "cache")
        os.environ["QWEN_EXPORT_CACHE"] = cache
        work: dict[str, tuple[str, tuple[str, ...]]] = {}
        for p in PRESETS:
            work[f"{p}/golden"] = ("cli", ("golden", "-p", p, "-o", f"{root}/{p}-golden"))
            work[f"{p}/export"] = ("cli", ("export", "-p", p, "-o", f"{root}/{p}-export"))
            for t in ONNX_BUILD_TARGETS:
                work[f"{p}/build-{t}"] = ("cli", ("build", "-p", p, "-t", t, "-o", f"{root}/{p}-build-{t}"))
            for t in AOT_ENGINE_TARGETS:
                out = f"{root}/{p}-engine-{t}"
                work[f"{p}/engine-{t}"] = ("cli", ("build", "-p", p, "-t", t, *ENGINE_LIMITS, "-o", out))
            for t in ENGINE_TARGETS:
                work[f"{p}/graph-{t}"] = ("graph", (p, t, f"{root}/{p}-graph-{t}"))
        chosen = [c for c in work if cases is None or c in cases]
        from qwen_export.presets import materialize

        for preset in PRESETS:  # materialise each preset once, before the parallel builds share the cache
            if any(c.startswith(preset) for c in chosen):
                materialize(preset, quiet=True)
        # `jobs` fresh processes (spawn: none of this one's torch or ONNX Runtime state inherited), each
        # importing the toolkit once and running cases until none is left
        spawn = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(jobs, mp_context=spawn, initializer=_worker_start, initargs=(cache,))
        with pool:
            list(pool.map(_run_case, [work[c][0] for c in chosen], [work[c][1] for c in chosen]))
        result = {}
        for case in chosen:
            folder = root / case.replace("/", "-")
            drop = ENGINE_VOLATILE if "/engine-" in case else VOLATILE
            result[case] = folder_fingerprint(folder, drop, root)
        return result


def machine() -> dict[str, str]:
    """What the reference's float results depend on: the CPU's widest vector ISA. A golden regenerated on
    another ISA differs in the last bits (about 1e-6 on logits), so goldens compare only on the same one."""
    flags = cpu_flags()
    isa = next((name for name in ("avx512_vnni", "avx512f", "avx2") if name in flags), "other")
    return {"isa": isa}


def compare(recorded: dict[str, dict[str, str]], now: dict[str, dict[str, str]]) -> list[str]:
    """One line per file that differs, appeared or disappeared."""
    problems = []
    for case, files in now.items():
        before = recorded.get(case)
        if before is None:
            problems.append(f"{case}: not recorded")
            continue
        for name in sorted(set(before) | set(files)):
            if before.get(name) != files.get(name):
                state = "missing now" if name not in files else "new" if name not in before else "differs"
                problems.append(f"{case}/{name}: {state}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="record the fingerprints instead of comparing")
    parser.add_argument(
        "--case", action="append", help="only this case (repeatable), e.g. tiny-qwen3.5/export"
    )
    args = parser.parse_args()
    now = fingerprints(args.case)
    if args.write:
        RECORD.parent.mkdir(parents=True, exist_ok=True)
        empty = {"machine": machine(), "artifacts": {}}
        record = json.loads(RECORD.read_text()) if RECORD.exists() else empty
        if record["machine"] != machine():  # the goldens, and the record's machine, stay the recording ISA's
            now = {case: files for case, files in now.items() if not case.endswith("/golden")}
            print(f"goldens not written: recorded on {record['machine']}, this is {machine()}")
        elif not args.case:  # everything anew (a case no longer made leaves the record)
            record["artifacts"] = {}
        record["artifacts"].update(now)
        RECORD.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        print(f"wrote {RECORD} ({len(now)} artifacts)")
        return 0
    recorded = json.loads(RECORD.read_text())
    if recorded["machine"] != machine():
        now = {case: files for case, files in now.items() if not case.endswith("/golden")}
        print(f"goldens not compared: recorded on {recorded['machine']}, this is {machine()}")
    problems = compare(recorded["artifacts"], now)
    print("\n".join(problems) or f"{len(now)} artifacts byte-identical to the record")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
