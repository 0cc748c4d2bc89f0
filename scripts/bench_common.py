"""What every benchmark results file records beside its numbers, and how it is written: the command that
produced it, when, at which commit, on which machine (CPU and vector ISA), as JSON and as Markdown."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
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
