"""The build command's progress bar over the passes of an ONNX target (engine builds show their stages)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qwen_export.passes.base import pass_name
from qwen_export.targets import get_target

if TYPE_CHECKING:
    from rich.console import Console

    from qwen_export.build import BuildRequest


@dataclass
class PassHooks:
    """Callbacks for the pass manager; no-ops where nothing is shown."""

    progress: Any = None
    task: Any = None
    check: bool = False

    def on_start(self, i: int, p: Any) -> None:
        if self.progress is not None:
            label = pass_name(p) + (" (+ check)" if self.check else "")
            self.progress.update(self.task, description=label)

    def on_end(self, i: int, record: Any) -> None:
        if self.progress is not None:
            self.progress.advance(self.task)


@contextmanager
def pass_progress(request: BuildRequest, console: Console) -> Iterator[PassHooks]:
    target = get_target(request.target)
    if target.kind == "engine":
        yield PassHooks()
        return
    from rich import progress as rp

    columns = (
        rp.SpinnerColumn(),
        rp.TextColumn("{task.description}"),
        rp.BarColumn(),
        rp.MofNCompleteColumn(),
        rp.TimeElapsedColumn(),
    )
    with rp.Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("exporting", total=len(target.passes()))
        yield PassHooks(progress, task, request.check)
