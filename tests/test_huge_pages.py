"""runtime/huge_pages.py (QWEN_EXPORT_HUGE_PAGES=1): after a session loads, the anonymous memory it filled
(ONNX Runtime's prepacked MatMul weights) is backed by 2 MiB pages, and nothing else is."""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qwen_export.runtime import huge_pages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _why_not() -> str | None:
    if not huge_pages.SMAPS.is_file():
        return "needs Linux's /proc/self/smaps: runs on Linux with transparent huge pages (this project's CI)"
    if not THP.is_file() or "[never]" in THP.read_text():
        return "transparent huge pages are off on this kernel: runs where THP is `madvise` or `always` (CI)"
    return None


WHY_NOT = _why_not()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")


def huge_bytes_in(start: int, end: int) -> int:
    """AnonHugePages of the mappings that overlap [start, end)."""
    total, inside = 0, False
    for line in huge_pages.SMAPS.read_text().splitlines():
        fields = line.split()
        if not fields[0].endswith(":") and "-" in fields[0]:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            inside = lo < end and start < hi
        elif inside and fields[0] == "AnonHugePages:":
            total += int(fields[1]) << 10
    return total


def private_anonymous(size: int) -> tuple[mmap.mmap, int]:
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return region, ctypes.addressof(ctypes.c_char.from_buffer(region))


@pytest.fixture(autouse=True)
def turned_on(monkeypatch):
    monkeypatch.setenv(huge_pages.ENV, "1")


def test_a_filled_new_region_is_collapsed_and_a_sparse_one_is_not():
    size = 16 << 20
    before = huge_pages.snapshot()
    filled, start = private_anonymous(size)
    filled.write(b"\1" * size)
    collapsed = huge_pages.collapse_new_regions(before)
    assert collapsed >= size - 2 * huge_pages.HUGE_PAGE
    assert huge_bytes_in(start, start + size) >= size - 2 * huge_pages.HUGE_PAGE
    assert filled[: 1 << 20] == b"\1" * (1 << 20)  # the contents move with the pages

    before = huge_pages.snapshot()
    sparse, start = private_anonymous(4 * size)
    sparse[0] = 1  # one page resident of 16384: committing the rest would waste memory
    huge_pages.collapse_new_regions(before)
    assert huge_bytes_in(start, start + 4 * size) == 0
    filled.close()
    sparse.close()


# A session loaded in a process of its own: in a process that had run other test modules first (a
# pytest-xdist worker, under both cores' load) the session's prepacked weights once collapsed 0 bytes.
_LOAD = """
import json, sys
import numpy as np, onnxruntime as ort
from qwen_export.runtime import huge_pages
options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # as the runtime loads
before = huge_pages.snapshot()
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
collapsed = huge_pages.collapse_new_regions(before)
np.save(sys.argv[3], session.run(None, {"x": np.load(sys.argv[2])})[0])
print(json.dumps(collapsed))
"""


def test_a_sessions_prepacked_weights_get_huge_pages_and_the_same_results(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    # 48 MiB, prepacked by the MatMul kernel: above malloc's largest mmap threshold (32 MiB), so it is a
    # new mapping
    weight = rng.standard_normal((1024, 12288), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 12288])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    x = rng.standard_normal((1, 1024), dtype=np.float32)
    onnx.save(model, tmp_path / "model.onnx", save_as_external_data=True, location="model.onnx.data")
    np.save(tmp_path / "x.npy", x)

    def load() -> tuple[int, np.ndarray]:
        """(bytes collapsed, y) of a session loaded in a new process."""
        args = [str(tmp_path / n) for n in ("model.onnx", "x.npy", "y.npy")]
        run = subprocess.run([sys.executable, "-c", _LOAD, *args], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        return json.loads(run.stdout), np.load(tmp_path / "y.npy")

    collapsed, y = load()
    assert collapsed >= 40 << 20
    np.testing.assert_allclose(y, x @ weight, rtol=1e-4, atol=1e-4)
    monkeypatch.delenv(huge_pages.ENV)  # off by default
    assert load()[0] == 0


class _BusyThenFreeLibc:
    """madvise as the kernel answers it when the pages to move are busy for a moment: EAGAIN `busy` times,
    then success (or `errno_then` for good)."""

    def __init__(self, busy: int, errno_then: int | None = None) -> None:
        self.busy, self.errno_then, self.calls = busy, errno_then, 0

    def madvise(self, start: int, length: int, advice: int) -> int:
        self.calls += 1
        if self.calls <= self.busy:
            ctypes.set_errno(errno.EAGAIN)
            return -1
        if self.errno_then is not None:
            ctypes.set_errno(self.errno_then)
            return -1
        return 0


def test_collapse_is_tried_again_on_eagain_only():
    busy_once = _BusyThenFreeLibc(busy=1)
    assert huge_pages._collapse(busy_once, 0, huge_pages.HUGE_PAGE) and busy_once.calls == 2
    always_busy = _BusyThenFreeLibc(busy=100)
    assert not huge_pages._collapse(always_busy, 0, huge_pages.HUGE_PAGE)
    assert always_busy.calls == huge_pages.COLLAPSE_TRIES
    no_memory = _BusyThenFreeLibc(busy=0, errno_then=errno.ENOMEM)
    assert not huge_pages._collapse(no_memory, 0, huge_pages.HUGE_PAGE) and no_memory.calls == 1
