"""Builds of plugins/ that need no GPU: the plugin library (CMake: the Triton kernels compiled ahead of time
and embedded, the loader, the launchers, the TensorRT wrappers against TensorRT 11.1's headers) with its
plain-C launchers exported and no link to libcuda, the header-free cores' unit tests, and the TensorRT
wrappers compiled against the plugin API (real headers where present, else a declarations-only stand-in)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"
NVCC = shutil.which("nvcc") or (
    "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None
)
CXX = shutil.which("g++") or shutil.which("c++")
OPS = ["rms_norm", "gated_rms_norm", "gated_attention", "gated_deltanet", "moe"]
CORES = ["common/qwen_core.cpp", *[f"{op}/{op}_core.cpp" for op in OPS]]
WRAPPERS = ["common/trt_plugin_library.cpp", *[f"{op}/{op}_plugin.cpp" for op in OPS]]
LAUNCHERS = [
    "qwenLaunchRMSNorm",
    "qwenLaunchGatedRMSNorm",
    "qwenLaunchGatedAttention",
    "qwenLaunchGatedDeltaNet",
    "qwenLaunchMoE",
    "qwenMoEWorkspaceSize",
    "qwenGatedAttentionWorkspaceSize",
    "qwenGatedDeltaNetWorkspaceSize",
    "qwenLastError",
    "qwenSetCudaDriverLibrary",
    "qwenKernelCount",
    "qwenKernelAt",
]
TRT_ENTRY_POINTS = ["getCreators", "setLoggerFinder"]
needs_cxx = pytest.mark.skipif(CXX is None, reason="needs a C++ compiler (g++)")


def _run(cmd: list[str], cwd: Path = PLUGINS) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def test_no_cuda_kernel_sources_remain():
    """One kernel source per op: the Triton one. The CUDA C++ kernels they replaced are gone."""
    assert sorted(str(p.relative_to(PLUGINS)) for p in PLUGINS.rglob("*.cu*")) == []


def test_library_exports_the_launchers_and_links_no_cuda_library(plugin_library):
    lib = plugin_library.library
    symbols = _run(["nm", "-D", "--defined-only", str(lib)]).stdout
    exported = {line.split()[-1] for line in symbols.splitlines() if " T " in line}
    assert set(LAUNCHERS) <= exported, sorted(exported)
    assert not any("qwen::" in s or s.startswith("_ZN4qwen") for s in exported), "internals leak"
    needed = [line for line in _run(["readelf", "-d", str(lib)]).stdout.splitlines() if "NEEDED" in line]
    assert not any("libcuda" in line or "libnvinfer" in line for line in needed), needed
    # scripts/gpu_check.py drives the launchers through ctypes mirrors of their parameter structs.
    r = _run([sys.executable, str(PLUGINS.parent / "scripts" / "gpu_check.py"), "--check-abi", str(lib)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_core_unit_tests_pass(tmp_path):
    build = tmp_path / "build"
    if shutil.which("cmake"):
        steps = [
            ["cmake", "-S", str(PLUGINS), "-B", str(build), "-DQWEN_PLUGINS_BUILD_LIBRARY=OFF"],
            ["cmake", "--build", str(build), "-j2"],
        ]
        for step in steps:
            r = _run(step)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        exe = build / "qwen_plugin_core_tests"
    elif CXX:
        exe = tmp_path / "qwen_plugin_core_tests"
        r = _run(
            [
                CXX,
                "-std=c++17",
                "-O1",
                "-Wall",
                "-Wextra",
                "-Werror",
                "tests/test_cores.cpp",
                *CORES,
                "-o",
                str(exe),
            ]
        )
        assert r.returncode == 0, r.stderr
    else:
        pytest.skip("needs cmake or a C++ compiler")
    r = _run([str(exe)])
    assert r.returncode == 0, r.stdout[-3000:]
    assert " 0 failed" in r.stdout


@needs_cxx
@pytest.mark.parametrize("source", WRAPPERS)
def test_trt_wrappers_compile_against_the_plugin_api_declarations(source):
    """The stand-in declares TensorRT 10's plugin interfaces; every `override` must match one of them."""
    r = _run(
        [
            CXX,
            "-std=c++17",
            "-fsyntax-only",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-isystem",
            "tests/trt_api_stub",
            source,
        ]
    )
    assert r.returncode == 0, r.stderr[-4000:]


# TensorRT 11.1's public headers, laid beside the repository for CI (../shared/third_party).
SHARED_TENSORRT = Path(__file__).resolve().parents[2] / "shared" / "third_party" / "TensorRT-11.1"


def _tensorrt_include() -> Path | None:
    roots = [
        os.environ.get("TENSORRT_ROOT"),
        SHARED_TENSORRT,
        "/usr/include/x86_64-linux-gnu",
        "/usr/local/tensorrt",
    ]
    for root in roots:
        if root:
            for candidate in [Path(root), Path(root) / "include"]:
                if (candidate / "NvInferRuntime.h").exists():
                    return candidate
    return None


@needs_cxx
@pytest.mark.skipif(
    _tensorrt_include() is None, reason="needs TensorRT headers (NvInferRuntime.h; set TENSORRT_ROOT)"
)
@pytest.mark.parametrize("source", WRAPPERS)
def test_trt_wrappers_compile_against_real_tensorrt_headers(source):
    cuda_roots = [Path(NVCC).resolve().parents[1]] if NVCC else []  # nvcc may be a wrapper outside CUDA
    cuda_roots += [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))]
    cuda_include = next(
        (r / "include" for r in cuda_roots if (r / "include" / "cuda_runtime_api.h").exists()), None
    )
    assert cuda_include is not None, f"no cuda_runtime_api.h under {cuda_roots} (set CUDA_HOME)"
    r = _run(
        [
            CXX,
            "-std=c++17",
            "-fsyntax-only",
            "-Wall",
            "-Werror",
            "-isystem",
            str(_tensorrt_include()),
            "-isystem",
            str(cuda_include),
            source,
        ]
    )
    assert r.returncode == 0, r.stderr[-4000:]


def test_kernels_json_lists_every_kernel_for_all_six_sms(plugin_library):
    """The library's AOT build: every KernelSpec x variant x SM, within its SM's shared memory, its cubin
    the bytes kernels.json hashes (the build itself fails on a shared-memory overflow)."""
    import hashlib
    import json

    from qwen_export.plugins.aot import SHARED_MEMORY_LIMIT, all_kernel_specs
    from qwen_export.plugins.triton_support import SMS

    records = json.loads(plugin_library.kernels_json.read_text())
    expected = {(s.name, v, sm) for s in all_kernel_specs() for v in s.variants for sm in SMS}
    assert {(r["kernel"], r["variant"], r["sm"]) for r in records} == expected
    folder = plugin_library.kernels_json.parent
    for r in records:
        assert r["shared"] + r["static_shared"] <= SHARED_MEMORY_LIMIT[r["sm"]], r
        assert r["sha256"] == hashlib.sha256((folder / r["cubin"]).read_bytes()).hexdigest()
        assert r["registers"] > 0 and r["spills"] >= 0


@pytest.mark.skipif(
    _tensorrt_include() is None,
    reason="needs TensorRT headers (NvInferRuntime.h: TENSORRT_ROOT, or ../shared/third_party as in CI)",
)
def test_library_carries_the_tensorrt_wrappers(plugin_library):
    symbols = _run(["nm", "-D", "--defined-only", str(plugin_library.library)]).stdout
    exported = {line.split()[-1] for line in symbols.splitlines() if " T " in line}
    assert set(TRT_ENTRY_POINTS) <= exported, sorted(exported)
