"""runtime/trt_ranks (one process per rank of a sharded TensorRT build) compiles against TensorRT 11.1's
headers, CUDA's and NCCL's (the nvidia-nccl-cu13 wheel). Running it needs GPUs, TensorRT 11 and NCCL: it
runs on the target machine, never here."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from plugin_library import TRT_INCLUDE

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "runtime" / "trt_ranks" / "qwen_trt_ranks.cpp"
CXX = shutil.which("g++") or shutil.which("c++")


def _include(candidates: list[Path], header: str) -> Path | None:
    return next((c for c in candidates if (c / header).is_file()), None)


def _nccl_include() -> Path | None:
    try:
        import nvidia.nccl
    except ImportError:
        return None
    return _include([Path(p) / "include" for p in nvidia.nccl.__path__], "nccl.h")


TENSORRT = _include(
    [Path(os.environ.get("TENSORRT_ROOT", "/nonexistent")) / "include", TRT_INCLUDE], "NvInferRuntime.h"
)
CUDA = _include([Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"], "cuda_runtime_api.h")
NCCL = _nccl_include()


@pytest.mark.skipif(CXX is None, reason="needs a C++ compiler (g++)")
@pytest.mark.skipif(
    TENSORRT is None, reason="needs TensorRT 11 headers (TENSORRT_ROOT, or ../shared/third_party)"
)
@pytest.mark.skipif(CUDA is None, reason="needs CUDA's headers (CUDA_HOME, default /usr/local/cuda)")
@pytest.mark.skipif(
    NCCL is None, reason="needs NCCL's headers: pip install nvidia-nccl-cu13 (the [nccl] extra)"
)
def test_rank_runner_compiles_against_the_real_headers(tmp_path):
    command = [
        CXX,
        "-std=c++17",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-c",
        str(SOURCE),
        "-o",
        str(tmp_path / "r.o"),
    ]
    command += [f"-isystem{TENSORRT}", f"-isystem{CUDA}", f"-isystem{NCCL}"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    symbols = subprocess.run(["nm", "-u", str(tmp_path / "r.o")], capture_output=True, text=True).stdout
    # it really calls what running a rank needs
    for name in (
        "ncclCommInitRank",
        "ncclGetUniqueId",
        "createInferRuntime_INTERNAL",
        "cudaStreamSynchronize",
    ):
        assert name in symbols, name
