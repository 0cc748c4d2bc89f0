"""Peak resident memory of this process, for export reports and benchmarks, and the memory the kernel can
hand out now."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def available_memory() -> int:
    """Bytes the kernel can hand out now: MemAvailable (free pages plus the page cache it can drop), else
    the free pages alone."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
