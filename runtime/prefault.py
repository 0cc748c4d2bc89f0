"""Map in, while a session loads, the weights ONNX Runtime reads straight from an artifact's data files.

ONNX Runtime maps an artifact's external data and reads the initializers it does not prepack (the routed
experts of FloatMoE and Int4MoE, the int4 weights) from that mapping. Without help, the first step that
reads a page takes a page fault for it: a prompt that reaches most experts faults in most of 1.6 GiB on
the small preset's `ort-cpu` artifact. After the session loads, MADV_POPULATE_READ (Linux 5.14) fills
those page tables in one call per mapping, as llama.cpp's MAP_POPULATE does. On this project's AVX2
machine (2 cores, small-qwen3.5-moe `ort-cpu`, 8 alternating pairs of fresh processes, medians): the first
64-token prompt after loading 183 -> 149 ms (faster in every pair; the second prompt 141 / 140 ms), load
0.39 -> 0.51 s (benchmarks/runtime_llama_avx2_machine.md has the effect beside llama.cpp's).

Skipped where the mapped data would take more than half of the memory the kernel can hand out (populating
would push other pages out, or the model's own: a model larger than memory reads its experts as it needs
them), with QWEN_EXPORT_PREFAULT=0, and off Linux.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from qwen_export.memory import available_memory
from qwen_export.runtime.huge_pages import MAPS, Region, region

MADV_POPULATE_READ = 22
ENV = "QWEN_EXPORT_PREFAULT"


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0" and MAPS.is_file()


def _is_library(path: str) -> bool:
    name = Path(path).name
    return name.endswith(".so") or ".so." in name


def data_regions(folder: Path) -> list[Region]:
    """This process's mappings of files in `folder` other than shared libraries (an artifact's weights)."""
    prefix = str(folder.resolve()) + os.sep
    regions = []
    with MAPS.open() as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6:
                path = fields[5].rstrip("\n")
                if path.startswith(prefix) and os.sep not in path[len(prefix) :] and not _is_library(path):
                    regions.append(region(fields[0]))
    return regions


def populate(folder: str | os.PathLike, available: int | None = None) -> int:
    """Fill the page tables of every mapping of `folder`'s data files; returns the bytes populated (0 when
    skipped, see the module doc, or where the kernel has no MADV_POPULATE_READ)."""
    if not enabled():
        return 0
    regions = data_regions(Path(folder))
    total = sum(end - start for start, end in regions)
    if not total or 2 * total > (available_memory() if available is None else available):
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    done = 0
    for start, end in regions:
        # EINVAL: a kernel before 5.14; the mapping stays as it was and faults its pages in on use
        if libc.madvise(start, end - start, MADV_POPULATE_READ) == 0:
            done += end - start
    return done
