"""Shared by the qwen.cpu kernel tests: a snippet run once per instruction set the library can take."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

KERNEL_MODES = ("portable", "avx2", "default")  # QWEN_CPU_KERNELS values; "default" = what CPUID picks


def cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo; empty elsewhere than Linux)."""
    if not os.path.isfile("/proc/cpuinfo"):
        return set()
    with open("/proc/cpuinfo") as f:
        return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())


def json_per_kernel_mode(code: str) -> dict[str, Any]:
    """`code` (Python that prints one JSON line last) run in a child process per QWEN_CPU_KERNELS mode (the
    library picks its loops once per process); mode -> the decoded line. The tests' folder is importable."""
    prelude = f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
    outputs = {}
    for mode in KERNEL_MODES:
        env = {**os.environ, "QWEN_CPU_KERNELS": mode}
        proc = subprocess.run(
            [sys.executable, "-c", prelude + code], env=env, capture_output=True, text=True, check=True
        )
        outputs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    return outputs
