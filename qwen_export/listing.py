"""A listing command's result: rows that render as a rich table or print as JSON."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


@dataclass
class Listing:
    """Rows for a person (a rich table) or a machine (JSON: a list of objects)."""

    title: str
    columns: tuple[str, ...]
    rows: list[dict[str, Any]]
    json_key: str | None = None  # JSON as {row[json_key]: the rest of the row} instead of a list

    def to_json(self) -> list[dict[str, Any]] | dict[str, dict[str, Any]]:
        if self.json_key is None:
            return self.rows
        return {r[self.json_key]: {k: v for k, v in r.items() if k != self.json_key} for r in self.rows}

    def render(self, console: Console) -> None:
        from rich.table import Table

        table = Table(*self.columns, title=self.title)
        for row in self.rows:
            table.add_row(*(_cell(v) for v in row.values()))
        console.print(table)


def _cell(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(map(str, value)) or "(optional)"
    return "" if value is None else str(value)
