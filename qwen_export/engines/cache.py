"""Engine cache: engines stored under a fingerprint of everything that went into them.

The fingerprint covers the model's bytes (graph and external data), the pass list with its options and
the code of the passes and builder, the deployment spec, the GPU target, the builder options, the tool
versions and the plugin library. An unchanged rebuild finds every engine here and builds nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from qwen_export.artifact import sha256_file
from qwen_export.cache import touch

ENGINE_FILE = "model.engine"
ENTRY_FILE = "entry.json"
DIGESTS_FILE = "file-digests.json"
CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    from qwen_export.cache import cache_root

    return cache_root() / "engines"


def model_files(onnx_path: Path) -> list[Path]:
    """The graph file and every external data file it names, in a stable order."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    locations = set()
    for tensor in _all_tensors(proto.graph):
        for entry in tensor.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    return [onnx_path] + [onnx_path.parent / loc for loc in sorted(locations)]


def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


class FileDigests:
    """sha256 of files, remembered by (size, mtime_ns, inode) so that an unchanged file is not read again:
    hashing a multi-GB model would otherwise dominate a rebuild that finds every engine cached."""

    def __init__(self, path: Path | None):
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        if path is not None:
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, ValueError):
                self.entries = {}

    def sha256(self, file: Path) -> str:
        stat = file.stat()
        key = str(file.resolve())
        stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}
        known = self.entries.get(key)
        if known is not None and all(known.get(k) == v for k, v in stamp.items()):
            return known["sha256"]
        digest = sha256_file(file)
        self.entries[key] = {**stamp, "sha256": digest}
        return digest

    def remember(self, file: Path, sha256: str) -> None:
        """Record the digest of a file just written (an engine stored in the cache)."""
        stat = file.stat()
        stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}
        self.entries[str(file.resolve())] = {**stamp, "sha256": sha256}

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.entries))
        os.replace(tmp, self.path)


def model_digest(onnx_path: Path, digests: FileDigests | None = None) -> str:
    """sha256 over the graph and its external data files (names and bytes)."""
    digests = digests or FileDigests(None)
    digest = hashlib.sha256()
    for path in model_files(onnx_path):
        digest.update(path.name.encode() + b"\0")
        digest.update(digests.sha256(path).encode())
    return digest.hexdigest()


def code_digest(modules: list[Any]) -> str:
    """sha256 of the source files of the modules that shape the graph and the build."""
    digest = hashlib.sha256()
    for module in sorted(modules, key=lambda m: m.__name__):
        digest.update(module.__name__.encode() + b"\0")
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def fingerprint(parts: dict[str, Any]) -> str:
    blob = json.dumps({"cache_format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class CacheEntry:
    key: str
    engine: Path
    sha256: str
    bytes: int
    meta: dict[str, Any]


class EngineCache:
    """A folder of `<key[:2]>/<key>/{model.engine, entry.json}`; writes are atomic renames."""

    def __init__(self, root: Path | None = None, enabled: bool = True):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.enabled = enabled

    def digests(self) -> FileDigests:
        return FileDigests(self.root / DIGESTS_FILE if self.enabled else None)

    def _folder(self, key: str) -> Path:
        return self.root / key[:2] / key

    def lookup(self, key: str, verify: bool = False, digests: FileDigests | None = None) -> CacheEntry | None:
        """The stored engine for `key`; with `verify`, its sha256 (remembered in `digests` while the file
        is unchanged) must match the entry's."""
        if not self.enabled:
            return None
        folder = self._folder(key)
        try:
            meta = json.loads((folder / ENTRY_FILE).read_text())
        except (OSError, ValueError):
            return None
        engine = folder / ENGINE_FILE
        if not engine.is_file() or engine.stat().st_size != meta.get("bytes"):
            return None
        if verify and (digests or FileDigests(None)).sha256(engine) != meta.get("sha256"):
            return None
        touch(folder)
        return CacheEntry(key, engine, meta["sha256"], meta["bytes"], meta)

    def staging(self, key: str) -> Path:
        """Where a builder writes a new engine before `store` takes it (same file system as the cache)."""
        folder = self.root / ".staging"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{key}.engine"

    def store(self, key: str, engine: Path, meta: dict[str, Any]) -> CacheEntry:
        """Take the engine file at `engine` (moved in) and record it under `key`."""
        sha, size = sha256_file(engine), engine.stat().st_size
        entry_meta = {**meta, "sha256": sha, "bytes": size, "key": key}
        folder = self._folder(key)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key[:12]}.", dir=folder.parent))
        try:
            shutil.move(engine, tmp / ENGINE_FILE)
            (tmp / ENTRY_FILE).write_text(json.dumps(entry_meta, indent=2))
            if folder.exists():
                shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return CacheEntry(key, folder / ENGINE_FILE, sha, size, entry_meta)


def place(source: Path, destination: Path) -> None:
    """Put a cached engine into an output folder: a hard link where possible (instant), else a copy."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)
