"""What qwen-export keeps under its cache folder, and pruning it.

Three areas, each a set of entries (folders) written atomically by their owners:

| area    | entry                                                        | written by                  |
|---------|--------------------------------------------------------------|-----------------------------|
| presets | `presets/<name>-<fingerprint>/`: a built-in model's checkpoint | `presets.materialize`       |
| exports | `exports/<fingerprint>/`: an export that engine builds reuse   | `exporter.cached_export`    |
| engines | `engines/<k[:2]>/<key>/`: one engine and its entry.json        | `engines.cache.EngineCache` |
| kernels | `kernels/<fingerprint>/`: libqwen_ort_cpu.so                  | `cpu_kernels.library_path`  |

An entry's last use is its folder's modification time: owners touch the folder when they reuse it
(`touch`). Pruning removes whole entries, oldest use first; a removed entry is rebuilt on next use.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qwen_export.errors import QwenExportError

if TYPE_CHECKING:
    from rich.console import Console


def cache_root() -> Path:
    """The cache folder: QWEN_EXPORT_CACHE, default ~/.cache/qwen-export."""
    return Path(os.environ.get("QWEN_EXPORT_CACHE", Path.home() / ".cache" / "qwen-export"))


AREAS = {
    "presets": "built-in models' checkpoints (random weights, rebuilt in seconds)",
    "exports": "exports that engine builds start from",
    "engines": "built engines, keyed by model, passes, build spec, tools and GPU",
    "kernels": "the ONNX Runtime CPU kernel library (plugins/ort_cpu), keyed by sources and compiler",
}


@dataclass(frozen=True)
class CacheItem:
    area: str
    path: Path
    bytes: int
    last_used: float  # seconds since the epoch

    def to_json(self) -> dict:
        return {"area": self.area, "path": str(self.path), "bytes": self.bytes, "last_used": self.last_used}


def _lock_file(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.lock")


@contextlib.contextmanager
def entry_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on one cache entry while it is checked and filled, so two builds of the same
    source (threads or processes) export it once and neither replaces the folder the other is reading."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(_lock_file(folder), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def touch(folder: Path) -> None:
    """Record a reuse of a cache entry (its folder's mtime is its last use)."""
    try:
        os.utime(folder)
    except OSError:
        pass  # a read-only cache still serves; only pruning order suffers


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


def _entry_folders(area: str, root: Path) -> Iterable[Path]:
    base = root / area
    if not base.is_dir():
        return []
    if area == "engines":  # engines/<key[:2]>/<key>/ holding entry.json
        return [f for shard in base.iterdir() if shard.is_dir() for f in shard.iterdir() if f.is_dir()]
    return [f for f in base.iterdir() if f.is_dir() and not f.name.startswith(".")]


def entries(areas: Iterable[str] = AREAS, root: Path | None = None) -> list[CacheItem]:
    """Every entry of `areas`, oldest use first."""
    root = root or cache_root()
    found = []
    for area in areas:
        if area not in AREAS:
            raise QwenExportError(f"unknown cache area {area!r}; choose from: {', '.join(AREAS)}")
        for folder in _entry_folders(area, root):
            if folder.name.startswith("."):  # staging and half-removed folders
                continue
            found.append(CacheItem(area, folder, _folder_bytes(folder), folder.stat().st_mtime))
    return sorted(found, key=lambda e: e.last_used)


def select_for_removal(
    found: list[CacheItem], older_than_days: float | None = None, max_bytes: int | None = None
) -> list[CacheItem]:
    """Entries to remove: those unused for more than `older_than_days`, then the oldest-used ones until
    what is left fits in `max_bytes`. With neither limit, every entry."""
    if older_than_days is None and max_bytes is None:
        return list(found)
    cutoff = time.time() - older_than_days * 86400 if older_than_days is not None else None
    chosen = [e for e in found if cutoff is not None and e.last_used < cutoff]
    if max_bytes is not None:
        kept = [e for e in found if e not in chosen]
        total = sum(e.bytes for e in kept)
        for entry in kept:  # oldest use first
            if total <= max_bytes:
                break
            chosen.append(entry)
            total -= entry.bytes
    return sorted(chosen, key=lambda e: e.last_used)


def remove(chosen: Iterable[CacheItem]) -> int:
    """Remove entries; returns the bytes freed. Each folder is renamed aside first, so a reader never finds
    an entry half removed (its owner treats a missing entry as absent and rebuilds it)."""
    freed = 0
    for entry in chosen:
        aside = entry.path.with_name(f".removing-{entry.path.name}-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(entry.path, aside)
        except OSError:
            continue  # already gone (another prune) or not ours to move
        shutil.rmtree(aside, ignore_errors=True)
        _lock_file(entry.path).unlink(missing_ok=True)
        freed += entry.bytes
    return freed


@dataclass
class CacheReport:
    """What the cache holds in `areas`, and what a prune removed (or, in a dry run, would remove)."""

    root: Path
    areas: list[str]
    found: list[CacheItem]
    chosen: list[CacheItem]
    freed_bytes: int
    dry_run: bool
    pruned: bool

    def to_json(self) -> dict:
        key = "would_remove" if self.dry_run else "removed"
        return {
            "root": str(self.root),
            "entries": [e.to_json() for e in self.found],
            key: [e.to_json() for e in self.chosen],
            "freed_bytes": self.freed_bytes,
        }

    def render(self, console: Console, log: Console) -> None:
        from rich.table import Table

        table = Table("area", "entries", "size", "least recently used", title=str(self.root))
        now = time.time()
        for name in self.areas:
            mine = [e for e in self.found if e.area == name]
            oldest = f"{(now - mine[0].last_used) / 86400:.1f} days ago" if mine else ""
            table.add_row(name, str(len(mine)), f"{sum(e.bytes for e in mine) / 1e9:.2f} GB", oldest)
        console.print(table)
        if self.pruned:
            verb = "would remove" if self.dry_run else "removed"
            size = sum(e.bytes for e in self.chosen) / 1e9
            log.print(f"{verb} {len(self.chosen)} entries ({size:.2f} GB)", highlight=False)


def prune(
    areas: Iterable[str] | None = None,
    older_than_days: float | None = None,
    max_gb: float | None = None,
    clear: bool = False,
    dry_run: bool = False,
) -> CacheReport:
    """Report the cache's areas and, with `clear`, `older_than_days` or `max_gb`, remove entries (oldest
    use first; `dry_run` only says which)."""
    if clear and (older_than_days is not None or max_gb is not None):
        raise QwenExportError("--clear removes everything; drop --prune-older-than/--max-size, or --clear")
    areas = list(areas or AREAS)
    found = entries(areas)
    pruning = clear or older_than_days is not None or max_gb is not None
    chosen: list[CacheItem] = []
    if pruning:
        max_bytes = None if max_gb is None else int(max_gb * 1e9)
        chosen = found if clear else select_for_removal(found, older_than_days, max_bytes)
    freed = 0 if dry_run else remove(chosen)
    return CacheReport(cache_root(), areas, found, chosen, freed, dry_run, pruning)
