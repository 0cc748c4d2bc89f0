"""Output files and folders: atomic output folders (work happens in a temporary sibling that is renamed
into place at the end), and paced writeback for the exporter's gigabytes of weights."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from qwen_export.errors import QwenExportError


def check_writable_parent(out: Path) -> Path:
    """Resolve `out` and fail early, before any work, if a folder cannot be created there."""
    out = Path(out).expanduser().resolve()
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise QwenExportError(f"output folder {out} is not writable ({ancestor} is a file, not a folder)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise QwenExportError(f"output folder {out} is not writable (no write permission on {ancestor})")
    if out.exists() and not out.is_dir():
        raise QwenExportError(f"output path {out} exists and is not a folder")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `out`, on any error it is removed.

    An existing `out` is replaced only after the new content is complete, so a failed run never leaves a
    half-written artifact behind (and never destroys the previous good one).
    """
    out = check_writable_parent(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise QwenExportError(f"output folder {out} is not writable ({e.strerror})") from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the artifact should look like any folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, out)


def _publish(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`, replacing what is there. Another writer of the same folder (two builds filling
    one cache entry) may publish between our moving the old folder aside and our rename: then try again,
    last writer wins, and neither sees a half-written folder."""
    for _ in range(16):
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:12]}")
        try:
            out.rename(old)
        except FileNotFoundError:
            old = None
        try:
            tmp.rename(out)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            continue
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        return
    shutil.rmtree(tmp, ignore_errors=True)
    raise QwenExportError(f"could not publish {out}: other writers kept replacing it")


# --- paced writeback --------------------------------------------------------------------------------------
# Linux lets a writer pile up dirty pages until the kernel throttles it; on this project's virtual disks a
# 12 GB buffered write then ran at 0.39-0.50 GB/s, and at 1.94-2.02 GB/s when each 256 MiB was handed to
# writeback as soon as written and dropped from the page cache once on disk (measured 2026-12-05).
_SYNC_WRITE, _SYNC_WAIT_BEFORE, _SYNC_WAIT_AFTER = 2, 1, 4
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_sync_file_range = getattr(_libc, "sync_file_range", None)
if _sync_file_range is not None:
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing [offset, offset + length) of `fd` to disk without waiting (a no-op off Linux)."""
    if _sync_file_range is not None and length > 0:
        _sync_file_range(fd, offset, length, _SYNC_WRITE)


def finish_writeback(fd: int, offset: int, length: int) -> None:
    """Wait until [offset, offset + length) of `fd` is on disk, then drop it from the page cache (nothing
    reads it back during an export; the pages only crowd out the checkpoint being read)."""
    if _sync_file_range is None or length <= 0:
        return
    _sync_file_range(fd, offset, length, _SYNC_WAIT_BEFORE | _SYNC_WRITE | _SYNC_WAIT_AFTER)
    os.posix_fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


class PacedWriter:
    """Sequential writes to an open binary file at its current position, each chunk's writeback started
    as soon as it is written and the chunk before it waited for: this writer never holds more than two
    chunks of dirty pages. `close()` waits for the last one."""

    def __init__(self, file: BinaryIO) -> None:
        self._file, self._fd = file, file.fileno()
        self._pending: tuple[int, int] | None = None

    CHUNK = 64 << 20  # bytes handed to writeback at once

    def write(self, data: memoryview) -> None:
        data = data.cast("B")
        for begin in range(0, data.nbytes, self.CHUNK):
            piece = data[begin : begin + self.CHUNK]
            start = self._file.tell()
            self._file.write(piece)
            self._file.flush()
            start_writeback(self._fd, start, piece.nbytes)
            self._finish_pending()
            self._pending = (start, piece.nbytes)

    def _finish_pending(self) -> None:
        if self._pending is not None:
            finish_writeback(self._fd, *self._pending)
            self._pending = None

    def close(self) -> None:
        self._finish_pending()
