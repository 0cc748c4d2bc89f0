"""2 MiB pages for the memory an ONNX Runtime session fills while it loads (opt-in:
QWEN_EXPORT_HUGE_PAGES=1).

ONNX Runtime prepacks the dense MatMul weights of an fp32 graph into memory of its own: anonymous memory,
which Linux backs with 4 KiB pages unless asked (transparent huge pages in `madvise` mode, the usual
default). Every decode step streams those weights once, and with 4 KiB pages the stream pays a TLB miss
every 4 KiB. Weights ONNX Runtime reads straight from the mapped data file (the experts, the int4 weights)
sit in the page cache's large folios already (smaps: FilePmdMapped).

With QWEN_EXPORT_HUGE_PAGES=1, the anonymous regions a session added and filled while loading are collapsed
into 2 MiB pages after it loads (madvise MADV_HUGEPAGE, then MADV_COLLAPSE: Linux 6.1 or later). On this
project's machine (2 cores, AVX-512, small-qwen3.5-moe `ort-cpu`, 8 alternating pairs of fresh processes):
a 64-token prompt 118 -> 104 ms (medians; faster in every pair), a decode step 14.9 -> 14.1 ms (faster
in 5 pairs of 8: within the shared host's noise). It is off by default because the collapse copies: 280 MiB
took 1.3 s (load 0.35 -> 1.7 s; ort-int8, 570 MiB: 0.7 -> 3.4 s). Started with
GLIBC_TUNABLES=glibc.malloc.hugetlb=1, a process gets the same pages with no copy (malloc asks for them as
it maps: load 0.30 s, 250 MiB in huge pages), and then this step finds nothing left to do.

Regions less than 7/8 resident are left alone (thread stacks, reserved arena space: collapsing them would
commit memory nothing uses). Elsewhere than Linux it does nothing.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
MAPS, SMAPS = Path("/proc/self/maps"), Path("/proc/self/smaps")
ENV = "QWEN_EXPORT_HUGE_PAGES"
COLLAPSE_TRIES = 3

Region = tuple[int, int]  # [start, end) addresses


def enabled() -> bool:
    return os.environ.get(ENV, "0") == "1" and SMAPS.is_file()


def region(address_range: str) -> Region:
    """The region of a maps/smaps header's first field, `start-end` in hex."""
    start, end = (int(x, 16) for x in address_range.split("-"))
    return start, end


def _anonymous(header: list[str]) -> Region | None:
    """The region of a maps/smaps header line if it is a private writable anonymous mapping (malloc's
    [heap] included: where a process's malloc takes large blocks from it, after frees raised its mmap
    threshold, prepacked weights land there)."""
    perms, named = header[1], len(header) > 5 and header[5] != "[heap]"
    if not (perms.startswith("rw") and perms.endswith("p")) or named:
        return None
    return region(header[0])


def anonymous_regions() -> frozenset[Region]:
    """This process's private writable anonymous mappings (from /proc/self/maps: about 0.5 ms)."""
    with MAPS.open() as maps:
        return frozenset(r for line in maps if (r := _anonymous(line.split())) is not None)


def resident_bytes(regions: frozenset[Region]) -> dict[Region, int]:
    """Resident bytes of each of `regions`, mappings of any kind named by their exact address range (from
    /proc/self/smaps: about 12 ms in a process with torch)."""
    resident: dict[Region, int] = {}
    current: Region | None = None
    with SMAPS.open() as smaps:
        for line in smaps:
            fields = line.split()
            if fields[0] == "Rss:":
                if current is not None:
                    resident[current] = int(fields[1]) << 10
            elif not fields[0].endswith(":") and "-" in fields[0]:  # a mapping's header line
                current = region(fields[0])
                current = current if current in regions else None
    return resident


def _interior(region: Region) -> Region:
    """The 2 MiB-aligned part of a region (empty where it holds no whole huge page)."""
    start, end = region
    return -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE


def snapshot() -> frozenset[Region]:
    """The anonymous regions now (call before the session loads)."""
    return anonymous_regions() if enabled() else frozenset()


def collapse_new_regions(before: frozenset[Region]) -> int:
    """Collapse into 2 MiB pages every anonymous region that is not in `before` and is at least 7/8
    resident (its 2 MiB-aligned interior). Returns the bytes collapsed; 0 where the kernel cannot (THP
    `never`, a kernel before 6.1) or QWEN_EXPORT_HUGE_PAGES is not 1."""
    if not enabled():
        return 0
    new = frozenset(r for r in anonymous_regions() - before if _interior(r)[1] > _interior(r)[0])
    if not new:  # a small model: no smaps read
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    collapsed = 0
    for (start, end), resident in resident_bytes(new).items():
        if resident * 8 < (end - start) * 7:
            continue
        first, last = _interior((start, end))
        # a failure (EINVAL: THP off or a kernel without MADV_COLLAPSE, or a region it cannot take;
        # ENOMEM: no huge page to be had) leaves the region as it was
        if libc.madvise(first, last - first, MADV_HUGEPAGE) == 0 and _collapse(libc, first, last - first):
            collapsed += last - first
    return collapsed


def _collapse(libc: ctypes.CDLL, start: int, length: int) -> bool:
    """MADV_COLLAPSE, tried again where the kernel says EAGAIN (a page it had to move was locked or in use
    for a moment; tests/test_huge_pages.py once saw 0 bytes collapsed while the suite loaded both cores)."""
    for _ in range(COLLAPSE_TRIES):
        if libc.madvise(start, length, MADV_COLLAPSE) == 0:
            return True
        if ctypes.get_errno() != errno.EAGAIN:
            return False
    return False
