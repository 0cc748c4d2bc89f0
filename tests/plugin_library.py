"""The plugin library as the tests build and drive it: CMake (plugins/CMakeLists.txt) with the Triton
kernels compiled ahead of time for all six SMs (what a user ships; the recording driver reports an sm_90
device, so replays use the sm_90a cubins), the recording CUDA driver beside it, and scripts/gpu_check.py
loaded as a module for its ctypes mirrors and PyTorch references.

The build lives in <repo>/build/test-plugins so that reruns are incremental, under a file lock so that
concurrent test processes share it."""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen_export.plugins.triton_support import SMS

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
GPU_CHECK = ROOT / "scripts" / "gpu_check.py"
BUILD_DIR = ROOT / "build" / "test-plugins"
TRT_INCLUDE = ROOT.parent / "shared" / "third_party" / "TensorRT-11.1" / "include"


# What the launcher tests share: activation dtypes by variant, the QWEN_STATUS_* codes (common/qwen_launch.h).
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
QWEN_STATUS_BAD_PARAM, QWEN_STATUS_UNSUPPORTED, QWEN_STATUS_LAUNCH = 10001, 10002, 10003


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def config(kernel: str, variant: str) -> dict:
    """The constexprs of kernel/variant's cubin for the SM the recording driver reports."""
    from qwen_export.plugins.launch_replay import kernel_specs
    from qwen_export.plugins.triton_support import DEFAULT_SM

    return kernel_specs()[kernel].config(DEFAULT_SM, variant)[1]


@dataclass(frozen=True)
class BuiltLibrary:
    library: Path  # libqwen_trt_plugins.so
    driver: Path  # libqwen_recording_driver.so
    kernels_json: Path


def why_not_buildable() -> str | None:
    """Why the library cannot be built here (None: it can)."""
    if not shutil.which("cmake"):
        return "needs cmake"
    if not (Path("/usr/local/cuda/include/cuda.h").exists() or shutil.which("nvcc")):
        return "needs the CUDA toolkit's cuda.h (/usr/local/cuda)"
    return None


def build_library(build_dir: Path = BUILD_DIR) -> BuiltLibrary:
    """Configure and build (incrementally) the plugin library with its kernels for every SM."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir.parent / f"{build_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        configure = [
            "cmake", "-S", str(PLUGINS), "-B", str(build_dir), f"-DQWEN_TRITON_SMS={';'.join(SMS)}",
            f"-DQWEN_PYTHON={sys.executable}", "-DCMAKE_BUILD_TYPE=Release",
        ]  # fmt: skip
        if TRT_INCLUDE.is_dir() and not os.environ.get("TENSORRT_ROOT"):  # else CMake reads TENSORRT_ROOT
            configure.append(f"-DTENSORRT_ROOT={TRT_INCLUDE.parent}")
        for step in (configure, ["cmake", "--build", str(build_dir), "-j2"]):
            r = subprocess.run(step, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                raise RuntimeError(f"{' '.join(step)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return BuiltLibrary(
        build_dir / "libqwen_trt_plugins.so",
        build_dir / "libqwen_recording_driver.so",
        build_dir / "triton_kernels" / "kernels.json",
    )


def load_gpu_check(name: str = "gpu_check_under_test"):
    """scripts/gpu_check.py as a module, the way nothing from qwen_export is on its path (it imports only
    the standard library at module level, and loads the op table by file path)."""
    spec = importlib.util.spec_from_file_location(name, GPU_CHECK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module
