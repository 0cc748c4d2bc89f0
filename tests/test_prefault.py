"""runtime/prefault.py: after a session loads, the pages of the data files it maps are mapped in (their
page tables filled), so the first prompt takes no page faults on the weights; libraries in the folder are
left alone, and nothing is done where the data would not fit in memory or QWEN_EXPORT_PREFAULT=0."""

from __future__ import annotations

import ctypes
import mmap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qwen_export.runtime import prefault
from qwen_export.runtime.huge_pages import SMAPS, Region, resident_bytes

pytestmark = pytest.mark.skipif(
    not SMAPS.is_file(), reason="needs Linux's /proc/self/maps and smaps: runs on Linux (this project's CI)"
)
MIB = 1 << 20


def resident(regions: list[Region]) -> int:
    """Resident bytes (mapped pages) of `regions`."""
    return sum(resident_bytes(frozenset(regions)).values())


def mapped(path: Path, size: int) -> tuple[mmap.mmap, Region]:
    """`path`, `size` random bytes, mapped private and writable as ONNX Runtime maps external data; nothing
    read yet, so no page is mapped in."""
    path.write_bytes(np.random.default_rng(0).integers(0, 255, size, np.uint8).tobytes())
    with path.open("rb") as f:
        region = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    start = ctypes.addressof(ctypes.c_char.from_buffer(region))
    return region, (start, start + size)


@pytest.fixture
def data_and_library(tmp_path):
    (data, data_region), (library, library_region) = (
        mapped(tmp_path / "model.onnx.data", 8 * MIB),
        mapped(tmp_path / "libkernels.so", 4 * MIB),
    )
    yield tmp_path, data_region, library_region
    data.close()
    library.close()


def test_the_data_files_are_mapped_in_and_the_libraries_are_not(data_and_library):
    folder, data, library = data_and_library
    assert resident([data]) == resident([library]) == 0
    assert prefault.data_regions(folder) == [data]
    assert prefault.populate(folder) == 8 * MIB
    assert resident([data]) == 8 * MIB
    assert resident([library]) == 0


def test_nothing_is_done_where_the_data_would_not_fit_or_when_turned_off(data_and_library, monkeypatch):
    folder, data, _ = data_and_library
    assert prefault.populate(folder, available=15 * MIB) == 0  # 8 MiB would take more than half
    monkeypatch.setenv(prefault.ENV, "0")
    assert prefault.populate(folder) == 0
    assert resident([data]) == 0


def test_a_session_maps_in_the_weights_it_reads_from_its_data_file(tmp_path):
    """ONNX Runtime maps an external initializer it reads as it is (here Add's); OrtDecoder fills its page
    tables at load."""
    from qwen_export.runtime.ort_decoder import OrtDecoder

    weight = np.random.default_rng(1).standard_normal((1, 2 * MIB)).astype(np.float32)  # 8 MiB
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["logits"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weight.shape[1]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, weight.shape[1]])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 21)])
    onnx.save(model, tmp_path / "model.onnx", save_as_external_data=True, location="model.onnx.data")
    decoder = OrtDecoder(tmp_path / "model.onnx")
    assert decoder.prefaulted_bytes >= weight.nbytes
    # without prefault.populate: 0 (nothing has read the mapping yet)
    assert resident(prefault.data_regions(tmp_path)) >= weight.nbytes
    x = np.ones_like(weight)
    np.testing.assert_array_equal(decoder.session.run(None, {"x": x})[0], x + weight)
