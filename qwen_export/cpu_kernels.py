"""qwen-export's ONNX Runtime CPU kernels (plugins/ort_cpu): building the custom-op library, finding it.

The library is compiled from the sources in plugins/ort_cpu with the system C++ compiler (g++, or $CXX)
the first time a model needs it, into the cache (`kernels/<fingerprint>/`, fingerprint = sources, flags
and compiler version), and reused after that. `build --target ort-cpu-int4` copies it into the artifact
so a deployed artifact does not need the sources or a compiler.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from qwen_export.errors import QwenExportError

LIBRARY_NAME = "libqwen_ort_cpu.so"
DOMAIN = "qwen.cpu"
# The version of the domain a graph imports. 2: Attention's past caches may be longer than their valid rows
# (a buffer with room to grow) and may be the present caches' buffer (plugins/ort_cpu/attention/README.md).
# 3: GatedDeltaRule's optional per-token states (POSITION_STATES).
# 4: Int4MoE's and FloatMoE's optional gated shared expert (passes/fold_cpu_shared_expert.py).
DOMAIN_VERSION = 4
# Calls narrower than this compute each token as a one-token call would, bit for bit
# (plugins/ort_cpu/common/step_tokens.h, kStepTokens; equal by tests/test_mtp.py).
STEP_TOKENS = 16


@dataclass(frozen=True)
class StateUpdate:
    """How a qwen.cpu op may update a state in place: its past inputs and the present outputs that may be
    bound to the same buffers (IOBinding), since which domain version, and whether the state grows along
    axis 2 (a KV cache: the runtime binds a buffer with spare rows; the op reads the valid count off its
    attention bias)."""

    present_of_past: dict[int, int]  # past input index -> present output index
    since: int
    grows: bool


STATE_UPDATES = {
    "GatedDeltaRule": StateUpdate({2: 1, 3: 2}, since=1, grows=False),
    "Attention": StateUpdate({3: 1, 4: 2}, since=2, grows=True),
    "AttentionKv16": StateUpdate({3: 1, 4: 2}, since=2, grows=True),
}


@dataclass(frozen=True)
class PositionStates:
    """A qwen.cpu op's optional outputs of its states after every token of a call narrower than
    STEP_TOKENS ([B, T, ...], the state's dims after T), along POSITIONS_DIM: `positions(T)` of them, none
    for a wider call (a prompt). A speculative verify step that rejects a draft keeps the states after its
    last accepted token (runtime/speculative.py, rollback "snapshot")."""

    output_of_past: dict[int, int]  # past input index -> output index of its per-token states
    since: int


POSITION_STATES = {"GatedDeltaRule": PositionStates({2: 3, 3: 4}, since=3)}
POSITIONS_DIM = "state_positions"


def positions(tokens: int) -> int:
    """How many per-token states a call of `tokens` tokens outputs (PositionStates)."""
    return tokens if tokens < STEP_TOKENS else 0


SOURCE_DIR = Path(__file__).resolve().parents[1] / "plugins" / "ort_cpu"
# GCC 12's own avx512fintrin.h trips -Wmaybe-uninitialized (_mm512_undefined_ps)
AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vnni", "-Wno-maybe-uninitialized"]
# file -> extra flags; only the *_avx512 / *_avx2 files use those instruction sets (where CPUID says so)
SOURCES = {
    "common/vector_math.cpp": [],
    "common/vector_math_avx512.cpp": AVX512,
    "common/vector_math_avx2.cpp": ["-mavx2", "-mfma"],
    "int4_linear/int4_gemm.cpp": [],
    "int4_linear/int4_gemm_avx512.cpp": AVX512,
    "int4_linear/int4_gemm_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "int4_linear/int4_linear_op.cpp": [],
    "int4_moe/int4_moe.cpp": [],
    "int4_moe/int4_moe_op.cpp": [],
    "float_moe/float_moe.cpp": [],
    "float_moe/float_moe_op.cpp": [],
    "gated_delta_rule/gated_delta_rule.cpp": [],
    "gated_delta_rule/gated_delta_rule_op.cpp": [],
    "dist_collective/loopback.cpp": [],
    "dist_collective/dist_collective_op.cpp": [],
    "attention/attention.cpp": ["-fopenmp-simd"],
    "attention/attention_avx512.cpp": ["-mavx512f", "-Wno-maybe-uninitialized", "-fopenmp-simd"],
    "attention/attention_avx2.cpp": ["-mavx2", "-mfma", "-mf16c", "-fopenmp-simd"],
    "attention/attention_op.cpp": [],
    "register.cpp": [],
}
# No -Werror: a newer compiler's new warning must not stop a user's first run. -fno-trapping-math: nothing
# here reads floating-point exception flags, and with them GCC may not compute exp_nonpositive's polynomial
# ahead of its `x < -87` select, so every loop over it stayed scalar (the attention softmax: 12% of a 64K-key
# decode layer, 8 cycles an element). It changes no value; `omp simd` loops may now sum in vector order.
COMMON_FLAGS = ["-O3", "-std=c++17", "-fno-trapping-math", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra"]


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx:
        raise QwenExportError(
            "the ort-cpu-int4 kernels need a C++ compiler to build once (install g++ or set CXX), "
            "or use --target ort-int4, which runs on ONNX Runtime's own kernels"
        )
    return cxx


def x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def sources(portable_only: bool) -> dict[str, list[str]]:
    """File -> flags. Off x86 (or asked for) the AVX files are left out and the cores build portable."""
    if not portable_only:
        return SOURCES
    return {f: [*flags, "-DQWEN_CPU_PORTABLE_ONLY"] for f, flags in SOURCES.items() if "_avx" not in f}


def fingerprint(cxx: str, portable_only: bool = False) -> str:
    """Sources, headers, flags and compiler version: any change builds a new library."""
    digest = hashlib.sha256()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    digest.update(version.encode())
    digest.update(repr((sources(portable_only), COMMON_FLAGS)).encode())
    for path in sorted(SOURCE_DIR.rglob("*.[ch]*")):
        digest.update(str(path.relative_to(SOURCE_DIR)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def library_path(cache: Path | None = None, portable_only: bool | None = None) -> Path:
    """The custom-op library for this machine, compiled into the cache on first use. `portable_only`
    (default: not x86-64) builds without the x86 tiles."""
    from qwen_export.cache import cache_root

    if not (SOURCE_DIR / "register.cpp").is_file():
        raise QwenExportError(
            f"the CPU kernel sources are not at {SOURCE_DIR}; install qwen-export from its repository "
            "(pip install -e .) or use the library that an ort-cpu-int4 artifact carries"
        )
    cxx = _compiler()
    portable_only = not x86() if portable_only is None else portable_only
    folder = (cache or cache_root()) / "kernels" / fingerprint(cxx, portable_only)
    library = folder / LIBRARY_NAME
    if library.is_file():
        from qwen_export.cache import touch

        touch(folder)
        return library
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".build-") as tmp:
        objects = []
        for source, flags in sources(portable_only).items():
            obj = Path(tmp) / (source.replace("/", "_") + ".o")
            include = f"-I{SOURCE_DIR}"  # includes name their folder: "common/ort_abi.h"
            _run([cxx, *COMMON_FLAGS, include, *flags, "-c", str(SOURCE_DIR / source), "-o", str(obj)])
            objects.append(str(obj))
        staged = Path(tmp) / "out"
        staged.mkdir()
        _run([cxx, "-shared", "-o", str(staged / LIBRARY_NAME), *objects, "-lpthread"])
        try:
            os.rename(staged, folder)  # atomic; a concurrent build that won leaves its own, identical one
        except OSError:
            if not library.is_file():
                raise
    return library


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        detail = result.stderr.strip()[-4000:]
        raise QwenExportError(f"building the CPU kernels failed: {' '.join(command)}\n{detail}")


def _library_says(symbol: str, library: Path | None) -> str:
    """The string a `const char* symbol()` entry point of the library returns (ctypes)."""
    import ctypes

    entry = getattr(ctypes.CDLL(str(library or library_path())), symbol)
    entry.restype = ctypes.c_char_p
    return entry().decode()


def backend(library: Path | None = None) -> str:
    """The int4 tile the library runs on this CPU: "avx512-vnni", else "avx2", else "portable" (or the one
    QWEN_CPU_KERNELS=avx2|portable asks for)."""
    return _library_says("QwenCpuKernelsBackend", library)


def float_moe_loops(library: Path | None = None) -> str:
    """The dot loops FloatMoE runs on this CPU: "x86-64-v4", "avx2" or "baseline" (or the narrower one
    QWEN_CPU_KERNELS=avx2|portable asks for)."""
    return _library_says("QwenCpuFloatMoeLoops", library)


def delta_rule_loops(library: Path | None = None) -> str:
    """The copy of its loops GatedDeltaRule runs on this CPU: "avx512f", "avx2" (x86-64-v3) or "baseline" (or
    the narrower one QWEN_CPU_KERNELS=avx2|portable asks for)."""
    return _library_says("QwenCpuDeltaRuleLoops", library)


def warn_if_portable(library: Path) -> None:
    """Say once per process when the int4 products will run on the portable tile (correct, but several
    times slower than ort-int4 on ONNX Runtime's kernels)."""
    global _warned
    if _warned or backend(library) != "portable":
        return
    _warned = True
    if os.environ.get("QWEN_CPU_KERNELS") == "portable":
        reason = "QWEN_CPU_KERNELS=portable"
    else:
        reason = (
            "this CPU has neither AVX-512 VNNI nor AVX2" if x86() else f"no tile for {platform.machine()}"
        )
    warnings.warn(
        f"qwen.cpu kernels run their portable tile ({reason}): correct but slow; "
        "an ort-int4 artifact runs on ONNX Runtime's own kernels",
        RuntimeWarning,
        stacklevel=3,
    )


_warned = False


def uses_cpu_kernels(model_path: str | os.PathLike) -> bool:
    """Whether an ONNX model imports the qwen.cpu domain (reads the graph, not the weights)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return any(op.domain == DOMAIN for op in model.opset_import)


def library_for(model_path: str | os.PathLike) -> Path:
    """The library a model runs with: the copy beside it (an artifact carries one), else the built one."""
    folder = Path(model_path).parent
    beside = folder / LIBRARY_NAME
    if beside.is_file():
        return beside
    # A ranks artifact (OUT/ranks/<r>/model.onnx) carries one copy for all ranks: they must load the same
    # file, whose memory holds the loopback collective's meeting points.
    shared = folder.parent.parent / LIBRARY_NAME
    return shared if folder.parent.name == "ranks" and shared.is_file() else library_path()
