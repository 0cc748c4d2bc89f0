"""Builds of plugins/ that need no GPU: every kernel compiled with nvcc for every target architecture, the
library linked with its plain-C launchers exported, the header-free cores' unit tests, and the TensorRT
wrappers compiled against the plugin API (real headers where present, else declarations-only stand-in)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

PLUGINS = Path(__file__).resolve().parents[1] / "plugins"
NVCC = shutil.which("nvcc") or (
    "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None
)
CXX = shutil.which("g++") or shutil.which("c++")
ARCHS = ["80", "86", "89", "90", "100", "120"]
# SASS for each architecture plus PTX of the newest (as plugins/CMakeLists.txt builds).
GENCODE = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS] + [
    "-gencode=arch=compute_120,code=compute_120"
]
KERNELS = sorted(str(p.relative_to(PLUGINS)) for p in PLUGINS.rglob("*.cu"))
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
]
COMPILE_BUDGET_S = 240
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="needs nvcc (CUDA toolkit)")
needs_cxx = pytest.mark.skipif(CXX is None, reason="needs a C++ compiler (g++)")


def _run(cmd: list[str], cwd: Path = PLUGINS) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def kernel_objects(tmp_path_factory):
    """Every .cu compiled once with all -gencode targets, two files at a time (this machine has 2 cores)."""
    out = tmp_path_factory.mktemp("kernels")

    def compile_one(source: str) -> tuple[str, subprocess.CompletedProcess, float]:
        start = time.monotonic()
        obj = out / (source.replace("/", "_") + ".o")
        cmd = [
            NVCC,
            "-std=c++17",
            "-O3",
            "--expt-relaxed-constexpr",
            "-Xcompiler=-fPIC,-fvisibility=hidden",
            "-Werror=all-warnings",
            *GENCODE,
            "-c",
            source,
            "-o",
            str(obj),
        ]
        return source, _run(cmd), time.monotonic() - start

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(compile_one, KERNELS))
    return out, results, time.monotonic() - start


@needs_nvcc
def test_every_kernel_compiles_for_every_architecture(kernel_objects):
    _, results, total = kernel_objects
    failed = {src: r.stderr[-3000:] for src, r, _ in results if r.returncode != 0}
    assert not failed, failed
    timings = ", ".join(f"{src} {secs:.0f}s" for src, _, secs in results)
    print(f"\nnvcc, sm_{'/'.join(ARCHS)} + compute_120 PTX: {total:.0f}s wall ({timings})")
    if total > COMPILE_BUDGET_S:  # a loaded machine is slower: say so rather than fail
        warnings.warn(
            f"kernel compile took {total:.0f}s, over the {COMPILE_BUDGET_S}s budget ({timings})", stacklevel=1
        )


@needs_nvcc
@needs_cxx
def test_library_links_and_exports_the_launchers(kernel_objects, tmp_path):
    objects, results, _ = kernel_objects
    if any(r.returncode != 0 for _, r, _ in results):
        pytest.skip("kernels did not compile (see the compile test)")
    cores = []
    for src in CORES:
        obj = tmp_path / (src.replace("/", "_") + ".o")
        r = _run([CXX, "-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-c", src, "-o", str(obj)])
        assert r.returncode == 0, r.stderr
        cores.append(str(obj))
    lib = tmp_path / "libqwen_trt_plugins.so"
    r = _run(
        [
            NVCC,
            "-shared",
            "-cudart=static",
            *GENCODE[:1],
            *map(str, sorted(objects.glob("*.o"))),
            *cores,
            "-o",
            str(lib),
        ]
    )
    assert r.returncode == 0, r.stderr
    symbols = _run(["nm", "-D", "--defined-only", str(lib)]).stdout
    exported = {line.split()[-1] for line in symbols.splitlines() if " T " in line}
    assert set(LAUNCHERS) <= exported, sorted(exported)
    assert not any("qwen::" in s or s.startswith("_ZN4qwen") for s in exported), "internals leak"
    # scripts/gpu_check.py drives the launchers through ctypes mirrors of their parameter structs.
    r = _run([sys.executable, str(PLUGINS.parent / "scripts" / "gpu_check.py"), "--check-abi", str(lib)])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def test_core_unit_tests_pass(tmp_path):
    build = tmp_path / "build"
    if shutil.which("cmake"):
        steps = [
            ["cmake", "-S", str(PLUGINS), "-B", str(build), "-DQWEN_PLUGINS_BUILD_KERNELS=OFF"],
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
