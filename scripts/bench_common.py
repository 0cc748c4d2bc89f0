"""What every benchmark results file records beside its numbers, and how it is written: the command that
produced it, when, at which commit, on which machine (CPU and vector ISA), as JSON and as Markdown; and the
venv a baseline commit runs in, for the benchmarks that measure this tree against one."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_ranks import cpu_model, vector_isa

REPO = Path(__file__).resolve().parents[1]


def provenance() -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    return {
        "command": "python " + " ".join(sys.argv).replace(str(REPO) + "/", ""),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": commit.stdout.strip(),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "vector_isa": vector_isa()},
    }


def produced_by(result: dict[str, Any]) -> str:
    """The results file's first sentence: command, date, commit, machine."""
    m = result["machine"]
    return (
        f"Produced by `{result['command']}` on {result['date']} (commit {result['commit']}). Machine: "
        f"{m['cpu']}, {m['cores']} cores, vector ISA {m['vector_isa']}."
    )


def shown(path: Path) -> str:
    """A path as the results file shows it: relative to the repository when inside it."""
    path = path.resolve()
    return str(path.relative_to(REPO) if path.is_relative_to(REPO) else path)


def write_results(folder: Path, name: str, result: dict[str, Any], render: Callable[[dict], str]) -> None:
    """folder/name.json and folder/name.md, and the Markdown on stdout."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (folder / f"{name}.md").write_text(render(result) + "\n")
    print(render(result))


def baseline_sides(rev: str, folder: Path) -> dict[str, Path]:
    """The Python of each side of a this-tree-against-`rev` benchmark: "before" (a venv at `rev`, in `folder`)
    and "after" (this one)."""
    return {"before": baseline_python(rev, folder / "baseline"), "after": Path(sys.executable)}


def baseline_parser(doc: str, baseline: str) -> argparse.ArgumentParser:
    """The options every this-tree-against-a-commit benchmark takes: --baseline, --rounds and --out."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--baseline", default=baseline, help="the commit to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks")
    return parser


def alternating_rounds(
    sides: dict[str, Path], rounds: int, measure: Callable[[str, Path], dict[str, Any]]
) -> dict[str, list[dict[str, Any]]]:
    """`rounds` rounds in which each side is measured in turn (`measure(name, python)`, a fresh process),
    so the two sides see the same moments of a shared machine; side -> its results, in round order."""
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, python in sides.items():
            results[name].append(measure(name, python))
            print(name, json.dumps(results[name][-1]), file=sys.stderr)
    return results


def baseline_python(rev: str, folder: Path) -> Path:
    """A venv with the code at `rev` installed (editable, no dependencies: it borrows this venv's)."""
    checkout, venv = folder / "checkout", folder / "venv"
    subprocess.run(["git", "clone", "-q", str(REPO), str(checkout)], check=True)
    subprocess.run(["git", "checkout", "-q", rev], check=True, cwd=checkout)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next(venv.glob("lib/python*/site-packages"))
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(checkout)], check=True, cwd=folder
    )
    return python
