"""What an artifact folder is: its file names, its manifest formats, how its files are hashed, and the
result of building one. Every writer and reader of an artifact takes these from here (the runtime opens
one with `qwen_export.runtime.session.Artifact.open`).

    OUT/model.onnx (+ model.onnx.data)   the graph (export, ONNX build targets)
    OUT/mtp.onnx (+ mtp.onnx.data)       the MTP draft graph, when the checkpoint has an MTP layer
    OUT/export.json                      an export's record (format EXPORT_FORMAT)
    OUT/manifest.json                    a build's record (format BUILD_FORMAT), ONNX or engine targets
    OUT/passes.json                      a build's per-pass report (format PASSES_FORMAT)
    OUT/engines/<sm>/model.engine        one engine per GPU (engine targets)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from qwen_export.engines.builder import BuildPlan, EngineRecord
    from qwen_export.passes.manager import PipelineReport

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
DRAFT_FILE = "mtp.onnx"  # the MTP draft graph (speculative decoding), beside model.onnx
DRAFT_DATA_FILE = "mtp.onnx.data"
EXPORT_INFO_FILE = "export.json"
MANIFEST_FILE = "manifest.json"
PASSES_FILE = "passes.json"
GRAPH_FOLDER = "graph"  # an engine build's prepared graph, kept on request

EXPORT_FORMAT = "qwen-export/export@1"
BUILD_FORMAT = "qwen-export/build@1"
PASSES_FORMAT = "qwen-export/passes@1"
GOLDEN_FORMAT = "qwen-export/golden@1"
RANKS_FORMAT = "qwen-export/ranks@1"  # a sharded build: one graph per rank (qwen_export/ranks.py)
READABLE_FORMATS = (EXPORT_FORMAT, BUILD_FORMAT, RANKS_FORMAT)  # what the runtime opens


def engine_file(sm: str) -> str:
    """Where an engine for `sm` lives inside an artifact folder."""
    return f"engines/{sm}/model.engine"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entries(folder: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """The manifest's `files`: size and sha256 of every named file that exists in `folder`."""
    return {
        name: {"bytes": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
        for name in names
        if (folder / name).exists()
    }


@dataclass
class BuildResult:
    """What `build` wrote: the folder, its manifest and, per kind of target, the pass report (ONNX
    targets) or the engines and their plan (engine targets)."""

    out_dir: Path
    target: str
    manifest: dict[str, Any]
    report: PipelineReport | None = None
    engines: list[EngineRecord] = field(default_factory=list)
    plan: BuildPlan | None = None
    timings_s: dict[str, float] = field(default_factory=dict)

    @property
    def model_path(self) -> Path:
        return self.out_dir / MODEL_FILE

    @property
    def check_passed(self) -> bool | None:
        """None when no numeric check ran."""
        if self.report is None or not self.report.checked:
            return None
        return self.report.first_failure is None

    @property
    def built(self) -> list[str]:
        return [r.sm for r in self.engines if not r.from_cache]

    @property
    def reused(self) -> list[str]:
        return [r.sm for r in self.engines if r.from_cache]

    def render(self, console: Console) -> None:
        """The build's summary for a person: the pass table and the check verdict, or the engine table."""
        if self.report is not None:
            console.print(self.report.table())
            m = self.manifest
            console.print(
                f"[green]wrote[/green] {self.model_path} (target {self.target}, "
                f"{m['graph']['nodes']['graph']} nodes, {m['timings_s']['total']:.1f} s, "
                f"peak RSS {m['peak_rss_mib']:.0f} MiB)",
                highlight=False,
            )
            if self.check_passed is False:
                console.print(
                    f"[bold red]check failed:[/bold red] first stage out of tolerance: "
                    f"{self.report.first_failure} (see {self.out_dir / PASSES_FILE})",
                    highlight=False,
                )
            elif self.check_passed:
                console.print(
                    "[green]check passed[/green]: every stage within its tolerance "
                    f"({self.report.stage_tolerances()}) of the golden reference and of the previous stage",
                    highlight=False,
                )
            return
        from rich.table import Table

        table = Table("gpu", "engine", "MiB", "sha256", "from", "s", title=f"{self.target} engines")
        for r in self.engines:
            seconds = sum(r.timings_s.values())
            from_cache = "cache" if r.from_cache else "built"
            table.add_row(
                r.label, r.path, f"{r.bytes / 2**20:.1f}", r.sha256[:12], from_cache, f"{seconds:.2f}"
            )
        console.print(table)
        console.print(f"wrote {self.out_dir / MANIFEST_FILE} in {self.timings_s['total']:.2f} s")
