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

import os
import shutil
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from qwen_export.errors import QwenExportError
from qwen_export.presets import cache_root

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
        freed += entry.bytes
    return freed
