"""Direct (O_DIRECT) reads and writes of the exporter (qwen_export/direct_io.py): the bytes that reach the
file and come back are exactly the ones asked for, at unaligned offsets and lengths, and the buffered
fallback writes the same bytes."""

from __future__ import annotations

import numpy as np
import pytest

from qwen_export import direct_io
from qwen_export.direct_io import ALIGN, MIN_DIRECT_BYTES, DirectWriter, aligned_empty, read_range


@pytest.fixture(scope="module")
def payload() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, 3 * MIN_DIRECT_BYTES + 777, dtype=np.uint8)


def test_aligned_empty_is_page_aligned():
    for size in (1, ALIGN - 1, 5 * ALIGN + 3):
        buffer = aligned_empty(size)
        assert buffer.ctypes.data % ALIGN == 0 and buffer.nbytes == size


@pytest.mark.parametrize("offset", [0, 1, ALIGN - 2, ALIGN + 3])
def test_read_range_returns_exactly_the_bytes(tmp_path, payload, offset):
    path = tmp_path / "blob.bin"
    path.write_bytes(payload.tobytes())
    nbytes = MIN_DIRECT_BYTES + 5
    got = read_range(path, offset, nbytes)
    if got is None:
        pytest.skip(
            f"{tmp_path}'s filesystem has no O_DIRECT (tmpfs): runs where the temp folder is on a disk "
            "filesystem (ext4, xfs), as in CI; the buffered fallback is tested below"
        )
    np.testing.assert_array_equal(got, payload[offset : offset + nbytes])
    got[:] = 0  # writable, and a copy: the file is untouched
    assert path.read_bytes() == payload.tobytes()


def test_read_range_small_or_past_the_end(tmp_path, payload):
    path = tmp_path / "blob.bin"
    path.write_bytes(payload.tobytes())
    assert read_range(path, 0, MIN_DIRECT_BYTES - 1) is None  # small reads take the page cache
    tail = read_range(path, len(payload) - 100, MIN_DIRECT_BYTES)
    if tail is not None:  # a short file gives a short array
        np.testing.assert_array_equal(tail, payload[-100:])


def _write(path, payload, start, cuts) -> None:
    with open(path, "wb") as f:
        f.write(b"\x07" * start)
        writer = DirectWriter(f, len(payload))
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            writer.write(payload[a:b])
        writer.close()
        f.write(b"END")


@pytest.mark.parametrize(
    ("start", "cuts"),
    [
        (0, [0, 2 * MIN_DIRECT_BYTES, None]),  # aligned chunks, partial last block
        (ALIGN, [0, 1000, MIN_DIRECT_BYTES + 17, None]),  # chunks ending off a block carry their tail
        (3, [0, MIN_DIRECT_BYTES, None]),  # an unaligned start: the paced, buffered path
    ],
)
def test_direct_writer_writes_every_byte_in_place(tmp_path, payload, start, cuts):
    cuts = [len(payload) if c is None else c for c in cuts]
    path = tmp_path / "out.bin"
    _write(path, payload, start, cuts)
    data = path.read_bytes()
    assert data[:start] == b"\x07" * start
    assert data[start : start + len(payload)] == payload.tobytes()
    assert data[start + len(payload) :] == b"END"  # the file is left positioned after the tensor


def test_direct_writer_without_o_direct_writes_the_same(tmp_path, payload, monkeypatch):
    monkeypatch.setattr(direct_io, "_open_direct", lambda path, flags: None)  # as on tmpfs
    path = tmp_path / "out.bin"
    _write(path, payload, ALIGN, [0, MIN_DIRECT_BYTES + 1, len(payload)])
    assert path.read_bytes() == b"\x07" * ALIGN + payload.tobytes() + b"END"
