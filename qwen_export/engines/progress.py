"""Stage timing and the progress display: every stage is timed; with a console it is also shown."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from rich.console import Console


@dataclass
class StageRecord:
    name: str
    wall_s: float
    detail: str = ""


@dataclass
class Stages:
    """Times named stages; shows a spinner while one runs and a line when it ends (when given a console)."""

    console: Console | None = None
    records: list[StageRecord] = field(default_factory=list)

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[StageRecord]:
        record = StageRecord(name, 0.0, detail)
        start = time.perf_counter()
        status = self.console.status(f"[bold]{name}[/] {detail}") if self.console is not None else None
        try:
            if status is not None:
                with status:
                    yield record
            else:
                yield record
        except BaseException:
            record.wall_s = time.perf_counter() - start
            if self.console is not None:
                self.console.print(f"[red]✗[/] {name} {record.detail} [dim]({record.wall_s:.2f} s)[/]")
            raise
        record.wall_s = time.perf_counter() - start
        self.records.append(record)
        if self.console is not None:
            self.console.print(f"[green]✓[/] {name} {record.detail} [dim]{record.wall_s:.2f} s[/]")

    def note(self, message: str) -> None:
        if self.console is not None:
            self.console.print(message)

    def timings(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for record in self.records:
            out[record.name] = round(out.get(record.name, 0.0) + record.wall_s, 4)
        return out
