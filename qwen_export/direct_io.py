"""Unbuffered (O_DIRECT) reads and writes for the exporter's gigabytes of weights.

Through the page cache, an export of a full-width checkpoint spent more CPU in the kernel than anywhere
else: copying every byte from the page cache into numpy (`_copy_to_iter`, a quarter of all samples), and
from numpy into the page cache on the way out. On this project's 2-core machines that CPU is the export's
bottleneck, not the disk. Direct I/O moves the bytes between the disk and our own buffers instead: an
11 GB bf16 slice of the 397B went from 24.7 s (22.8 s of it in the kernel) to 17.7 s (9.4 s) with direct
reads alone, and to 14.4 s (6.2 s) with direct writes too, byte for byte the same export (measured 2026-12-05,
scripts/bench_scale.py --experts 128; benchmarks/scale.md has the full-width run).

Direct I/O needs offsets, lengths and buffer addresses aligned to the device's block. Reads therefore fetch
the aligned range around the bytes asked for into a page-aligned buffer and return a view of it; writes go
direct for a tensor that starts on an aligned offset (the exporter saves with `ALIGN`), and write its last
partial block through the page cache. A filesystem without O_DIRECT (tmpfs) takes the buffered path.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np

from qwen_export.fsutil import PacedWriter

ALIGN = 4096  # offsets, lengths and addresses of direct I/O: the largest logical block size in use
MIN_DIRECT_BYTES = 1 << 20  # smaller transfers take the page cache (norms, biases, headers)
_UNSUPPORTED = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP)


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 buffer of `nbytes` whose first byte is page-aligned (as direct I/O needs)."""
    raw = np.empty(nbytes + ALIGN, np.uint8)
    skip = (-raw.ctypes.data) % ALIGN
    return raw[skip : skip + nbytes]


def is_aligned(array: np.ndarray) -> bool:
    return array.ctypes.data % ALIGN == 0


def _open_direct(path: str | Path, flags: int) -> int | None:
    """A descriptor opened with O_DIRECT, or None where the filesystem or platform has no direct I/O."""
    direct = getattr(os, "O_DIRECT", 0)
    if not direct:
        return None
    try:
        return os.open(path, flags | direct)
    except OSError as e:
        if e.errno in _UNSUPPORTED:
            return None
        raise


def read_range(path: str | Path, offset: int, nbytes: int) -> np.ndarray | None:
    """Bytes [offset, offset + nbytes) of `path` as a writable uint8 array, read with direct I/O; None where
    direct I/O does not apply (a small range, or no O_DIRECT here): the caller reads through the page
    cache. A short file gives a short array."""
    if nbytes < MIN_DIRECT_BYTES:
        return None
    fd = _open_direct(path, os.O_RDONLY)
    if fd is None:
        return None
    start = offset // ALIGN * ALIGN
    stop = -(-(offset + nbytes) // ALIGN) * ALIGN
    buffer = aligned_empty(stop - start)
    view, got = memoryview(buffer), 0
    try:
        while got < len(buffer):
            n = os.preadv(fd, [view[got:]], start + got)
            if n == 0:
                break
            got += n
    finally:
        os.close(fd)
    head = offset - start
    return buffer[head : max(head, min(got, head + nbytes))]


class DirectWriter:
    """Sequential writes of one tensor of `nbytes` at the file's current position, straight to disk: whole
    aligned blocks through an O_DIRECT descriptor, the partial last block through the file. Falls back to
    PacedWriter for a small tensor, an unaligned position or a filesystem without direct I/O. `close()`
    leaves the file positioned after the bytes written."""

    def __init__(self, file: BinaryIO, nbytes: int) -> None:
        self._file = file
        file.flush()
        self._offset = file.tell()
        direct = self._offset % ALIGN == 0 and nbytes >= MIN_DIRECT_BYTES
        self._fd = _open_direct(file.name, os.O_WRONLY) if direct else None
        self._paced = PacedWriter(file) if self._fd is None else None
        self._staging: np.ndarray | None = None
        self._tail = bytearray()  # bytes past the last whole block (only the tensor's last chunk has any)

    def write(self, data: np.ndarray) -> None:
        """Write a C-contiguous array's bytes."""
        data = data.reshape(-1).view(np.uint8)
        if self._paced is not None:
            self._paced.write(memoryview(data))
            return
        if self._tail:  # a chunk that ended off a block boundary: its last bytes lead the next one
            data = np.concatenate([np.frombuffer(self._tail, np.uint8), data])
        whole = len(data) // ALIGN * ALIGN
        if whole:
            block = data[:whole] if is_aligned(data) else self._staged(data[:whole])
            view, done = memoryview(block), 0
            while done < whole:
                done += os.pwritev(self._fd, [view[done:]], self._offset + done)
            self._offset += whole
        self._tail = bytearray(data[whole:])

    def _staged(self, data: np.ndarray) -> np.ndarray:
        """`data` copied into a reused page-aligned buffer (a chunk that does not start on a page)."""
        if self._staging is None or len(self._staging) < len(data):
            self._staging = aligned_empty(len(data))
        staged = self._staging[: len(data)]
        staged[:] = data
        return staged

    def close(self) -> None:
        if self._paced is not None:
            self._paced.close()
            return
        os.close(self._fd)
        self._file.seek(self._offset)
        if self._tail:
            self._file.write(self._tail)
            self._file.flush()
