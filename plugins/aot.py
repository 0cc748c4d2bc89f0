"""Ahead-of-time build of the plugins' Triton kernels: one cubin per kernel x variant x SM, no GPU needed.

    python -m qwen_export.plugins.aot --out build/kernels [--sm sm_89 ...] [--jobs N] [--line-info]

- `compile_kernels(specs, sms, out_dir=...)` compiles every `KernelSpec` (plugins/triton_support.py) for
  every variant and SM with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))` and writes,
  atomically (a temporary folder renamed into place), `<out>/<kernel>.<variant>.<sm>.cubin`,
  `<out>/kernels.json` (one record per cubin, `RECORD_FIELDS`) and `<out>/qwen_triton_cubins.cpp` (every
  cubin as a byte array plus the table plugins/common/triton_loader.h declares, `write_embedded_cpp`).
- SM names: triton 3.9 appends the architecture-specific "a" itself from 90 up
  (`backends/nvidia/compiler.py: sm_arch_from_capability`), so sm_90a / sm_100a / sm_120a compile as
  capability 90 / 100 / 120; the build checks the PTX's `.target` against the SM it asked for.
- Registers, spills and static shared memory come from the cubin (`cuobjdump -res-usage`, the copy triton
  ships): triton itself reads them from the driver at load time, which needs a GPU. `spills` follows
  triton's `n_spills` (the function's per-thread local memory, stack frame included, in 32-bit words).
- The build fails, naming kernel, variant, SM, needed and available bytes, when a kernel's shared memory
  (dynamic, as launched, plus any static) exceeds what one thread block may opt in to on that SM
  (`SHARED_MEMORY_LIMIT`).
- A signature type may carry triton.tools.compile's divisibility hint, `"*fp16:16"` / `"i32:16"`: the
  argument is compiled as a multiple of 16 (bytes for pointers) and the C++ loader refuses a launch whose
  value is not.
- Cubins ship without line information (TRITON_DISABLE_LINE_INFO, which triton keys its cache on): with it
  (`--line-info`, for profilers) they carry their PTX as well and are about twice as large.
- Compilation must run in a process whose kernel modules were imported without TRITON_INTERPRET
  (`triton.jit` picks interpreted or compiled at decoration time); `main()` drops it before importing any.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_export.plugins.triton_support import SMS, KernelSpec

PLUGINS_DIR = Path(__file__).resolve().parent
CPP_NAME = "qwen_triton_cubins.cpp"
JSON_NAME = "kernels.json"
_LINE_INFO_ENV = "TRITON_DISABLE_LINE_INFO"

# The capability each SM compiles as (triton adds the "a" suffix from 90 up).
SM_CAPABILITY = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90a": 90, "sm_100a": 100, "sm_120a": 120}

# Most shared memory one thread block may use, per SM (cudaDevAttrMaxSharedMemoryPerBlockOptin).
# The SM's capacity less the 1 KB CUDA reserves per block:
# - sm_80 (A100): 164 KB per SM -> 163 KB = 166912 (NVIDIA Ampere Tuning Guide, "Unified Shared
#   Memory/L1/Texture Cache": A100 carve-outs up to 164 KB, compute capability 8.6 up to 100 KB;
#   docs.nvidia.com/cuda/ampere-tuning-guide).
# - sm_86, sm_89: 100 KB per SM -> 99 KB = 101376 (CUDA C++ Programming Guide, compute capability 8.x:
#   "allows a single thread block to address up to 99 KB of shared memory" on 8.6/8.9).
# - sm_90a (H100/H200): 228 KB per SM -> 227 KB = 232448 (NVIDIA Hopper Tuning Guide; CUTLASS
#   include/cutlass/gemm/collective/builders/sm90_common.inl: sm90_smem_capacity_bytes = 232448).
# - sm_100a (B200): as Hopper, 227 KB = 232448 (NVIDIA Blackwell Tuning Guide; CUTLASS
#   include/cutlass/arch/arch.h: sm100_smem_capacity_bytes = 232448).
# - sm_120a (RTX 50xx / RTX PRO): 99 KB = 101376 (CUTLASS include/cutlass/arch/arch.h:
#   sm120_smem_capacity_bytes = 101376).
SHARED_MEMORY_LIMIT = {
    "sm_80": 166912,
    "sm_86": 101376,
    "sm_89": 101376,
    "sm_90a": 232448,
    "sm_100a": 232448,
    "sm_120a": 101376,
}

# Scalar argument types a cubin can take, and the bytes of their kernel parameter (i1/u1 are .u8 in PTX).
SCALAR_BYTES = {
    "i1": 1, "u1": 1, "i8": 1, "u8": 1, "i16": 2, "u16": 2, "fp16": 2, "bf16": 2,
    "i32": 4, "u32": 4, "fp32": 4, "i64": 8, "u64": 8, "fp64": 8,
}  # fmt: skip

# Every key of a kernels.json record, in order.
RECORD_FIELDS = (
    "kernel",  # KernelSpec.name
    "variant",  # KernelSpec.variants key ("fp16", "bf16", ...)
    "sm",  # "sm_80" .. "sm_120a"
    "capability",  # 80 .. 120: the cubin runs on exactly this capability ("a" targets) or one of its major
    "entry",  # the cubin's kernel symbol (triton's metadata.name) for cuModuleGetFunction
    "cubin",  # file name beside kernels.json
    "sha256",  # of the cubin
    "cubin_bytes",
    "registers",  # per thread
    "spills",  # triton's n_spills: per-thread local memory / 4
    "stack_bytes",  # per-thread stack frame (where ptxas spills)
    "local_bytes",  # per-thread .local besides the stack
    "shared",  # dynamic shared memory bytes to launch with (triton's metadata.shared)
    "static_shared",  # shared memory the cubin declares itself
    "shared_limit",  # SHARED_MEMORY_LIMIT[sm]; shared + static_shared never exceeds it
    "num_warps",  # block = 32 * num_warps threads
    "num_stages",
    "num_ctas",  # grid x is multiplied by it, with a cluster of num_ctas when > 1
    "global_scratch_size",  # bytes per program of the trailing global-scratch argument (0: pass null)
    "global_scratch_align",
    "launch_pdl",  # launch with programmatic stream serialization
    "launch_cooperative_grid",
    "args",  # [{name, type, bytes, div16}]: the kernel parameters after constexpr removal, in order
    "constexprs",  # the compile-time values
    "module",  # the Python module that defines the kernel
    "ptx_target",  # the PTX .target the cubin was assembled for
    "line_info",  # whether the cubin carries source line information (and its PTX) for profilers
    "triton_version",
)


class AotError(RuntimeError):
    """The ahead-of-time build failed; the message says which kernel, variant and SM, and why."""


class SharedMemoryError(AotError):
    """A kernel needs more shared memory than one thread block may have on an SM."""


@dataclass(frozen=True)
class CompiledKernel:
    """One cubin the build wrote: a kernels.json record (`record()`) and its file (`path`)."""

    kernel: str
    variant: str
    sm: str
    capability: int
    entry: str
    cubin: str
    sha256: str
    cubin_bytes: int
    registers: int
    spills: int
    stack_bytes: int
    local_bytes: int
    shared: int
    static_shared: int
    shared_limit: int
    num_warps: int
    num_stages: int
    num_ctas: int
    global_scratch_size: int
    global_scratch_align: int
    launch_pdl: bool
    launch_cooperative_grid: bool
    args: list[dict[str, Any]]
    constexprs: dict[str, Any]
    module: str
    ptx_target: str
    line_info: bool
    triton_version: str
    path: Path = field(default=Path(), compare=False)

    def record(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in RECORD_FIELDS}


@dataclass(frozen=True)
class _Job:
    """One kernel x variant x SM to compile (picklable: worker processes re-import the kernel)."""

    kernel: str
    variant: str
    sm: str
    module: str
    function: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    attrs: dict[tuple[int, ...], list[list[Any]]]
    num_warps: int
    num_stages: int
    args: list[dict[str, Any]]

    @property
    def label(self) -> str:
        return f"{self.kernel} {self.variant} {self.sm}"


def _jit_function(spec: KernelSpec):
    from triton.runtime.jit import JITFunction

    if not isinstance(spec.kernel, JITFunction):
        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        why = (
            "its module was imported with TRITON_INTERPRET=1, which makes triton.jit interpret it; "
            "compile in a process without it (python -m qwen_export.plugins.aot)"
            if interpreted or type(spec.kernel).__name__ == "InterpretedFunction"
            else f"it is a {type(spec.kernel).__name__}, not a @triton.jit function"
        )
        raise AotError(f"kernel {spec.name}: cannot compile ahead of time: {why}")
    return spec.kernel


def _split_type(name: str, arg: str, spec_type: str) -> tuple[str, bool]:
    base, _, hint = spec_type.partition(":")
    if hint not in ("", "16"):
        raise AotError(f"kernel {name}: argument {arg}: hint {hint!r} in {spec_type!r} (only ':16' exists)")
    if base != "constexpr" and not base.startswith("*") and base not in SCALAR_BYTES:
        raise AotError(
            f"kernel {name}: argument {arg} has type {base!r}: the AOT loader passes pointers ('*fp16', ...) "
            f"and scalars {sorted(SCALAR_BYTES)} only"
        )
    if hint and (base == "constexpr" or base in ("fp16", "bf16", "fp32", "fp64")):
        raise AotError(f"kernel {name}: argument {arg}: a ':16' hint needs a pointer or an integer")
    return base, bool(hint)


def _jobs(spec: KernelSpec, sms: Sequence[str]) -> list[_Job]:
    fn = _jit_function(spec)
    names = list(fn.arg_names)
    jobs = []
    for variant in spec.variants:
        for sm in sms:
            signature, constexprs, num_warps, num_stages = spec.config(sm, variant)
            unknown = sorted(set(signature) - set(names)) + sorted(set(constexprs) - set(names))
            missing = [a for a in names if a not in signature]
            if unknown or missing:
                raise AotError(
                    f"kernel {spec.name}: signature does not match {fn.__name__}'s arguments {names}: "
                    f"unknown {unknown}, missing {missing}"
                )
            ordered, attrs, args = {}, {}, []
            for index, arg in enumerate(names):
                base, div16 = _split_type(spec.name, arg, signature[arg])
                ordered[arg] = base
                if base == "constexpr":
                    if arg not in constexprs:
                        raise AotError(f"kernel {spec.name} ({variant}, {sm}): constexpr {arg} has no value")
                    continue
                if arg in constexprs:
                    raise AotError(f"kernel {spec.name}: {arg} has a constexpr value but type {base!r}")
                if div16:
                    attrs[(index,)] = [["tt.divisibility", 16]]
                size = 8 if base.startswith("*") else SCALAR_BYTES[base]
                args.append({"name": arg, "type": base, "bytes": size, "div16": div16})
            jobs.append(
                _Job(
                    kernel=spec.name,
                    variant=variant,
                    sm=sm,
                    module=fn.__module__,
                    function=fn.__name__,
                    signature=ordered,
                    constexprs=dict(constexprs),
                    attrs=attrs,
                    num_warps=num_warps,
                    num_stages=num_stages,
                    args=args,
                )
            )
    return jobs


def _compile(job: _Job, fn=None) -> dict[str, Any]:
    """triton.compile one job; its cubin and the launch metadata the C++ side needs."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if fn is None:
        fn = getattr(importlib.import_module(job.module), job.function)
    source = ASTSource(fn=fn, signature=job.signature, constexprs=job.constexprs, attrs=job.attrs)
    options = {"num_warps": job.num_warps, "num_stages": job.num_stages, "enable_fp_fusion": True}
    compiled = triton.compile(source, target=GPUTarget("cuda", SM_CAPABILITY[job.sm], 32), options=options)
    md = compiled.metadata
    target = re.search(r"^\.target\s+(\S+)", compiled.asm["ptx"], re.M)
    return {
        "cubin": compiled.asm["cubin"],
        "entry": md.name,
        "shared": int(md.shared),
        "num_ctas": int(getattr(md, "num_ctas", 1)),
        "global_scratch_size": int(getattr(md, "global_scratch_size", 0) or 0),
        "global_scratch_align": int(getattr(md, "global_scratch_align", 1) or 1),
        "profile_scratch_size": int(getattr(md, "profile_scratch_size", 0) or 0),
        "launch_pdl": bool(getattr(md, "launch_pdl", False)),
        "launch_cooperative_grid": bool(getattr(md, "launch_cooperative_grid", False)),
        "tensordesc": bool(getattr(md, "tensordesc_meta", None)),
        "ptx_target": target.group(1).rstrip(",") if target else "",
        "line_info": not knobs.compilation.disable_line_info,
        "triton_version": triton.__version__,
    }


def _compile_in_worker(job: _Job) -> dict[str, Any]:
    try:
        return _compile(job)
    except Exception as exc:  # the worker's exception may not pickle; its text does
        return {"error": f"{type(exc).__name__}: {exc}"}


def _worker_init(path: list[str]) -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path[:] = path


_RESOURCE = re.compile(r"Function\s+(\S+?):\s*\n\s*(.*)")


def cubin_resources(cubin: Path, entry: str) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of `entry` in a cubin, read by the cuobjdump triton ships."""
    from triton import knobs

    tool = knobs.nvidia.cuobjdump.path
    run = subprocess.run([tool, "-res-usage", str(cubin)], capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise AotError(f"{tool} -res-usage {cubin.name} failed: {run.stderr.strip() or run.stdout.strip()}")
    for name, line in _RESOURCE.findall(run.stdout):
        if name == entry:
            values = dict(re.findall(r"([A-Z]+):(\d+)", line))
            return {k: int(values.get(k, 0)) for k in ("REG", "STACK", "SHARED", "LOCAL")}
    raise AotError(f"{cubin.name}: cuobjdump lists no function {entry!r}:\n{run.stdout}")


def _finish(job: _Job, result: dict[str, Any], out: Path) -> CompiledKernel:
    if result["ptx_target"] != job.sm:
        raise AotError(f"{job.label}: triton assembled for {result['ptx_target']!r}, not {job.sm!r}")
    if result["profile_scratch_size"]:
        raise AotError(f"{job.label}: needs profile scratch (instrumentation is on): not for shipping")
    if result["tensordesc"]:
        raise AotError(f"{job.label}: takes tensor descriptors, which the AOT loader does not build")
    name = f"{job.kernel}.{job.variant}.{job.sm}.cubin"
    path = out / name
    path.write_bytes(result["cubin"])
    res = cubin_resources(path, result["entry"])
    return CompiledKernel(
        kernel=job.kernel,
        variant=job.variant,
        sm=job.sm,
        capability=SM_CAPABILITY[job.sm],
        entry=result["entry"],
        cubin=name,
        sha256=hashlib.sha256(result["cubin"]).hexdigest(),
        cubin_bytes=len(result["cubin"]),
        registers=res["REG"],
        spills=(res["STACK"] + res["LOCAL"]) // 4,
        stack_bytes=res["STACK"],
        local_bytes=res["LOCAL"],
        shared=result["shared"],
        static_shared=res["SHARED"],
        shared_limit=SHARED_MEMORY_LIMIT[job.sm],
        num_warps=job.num_warps,
        num_stages=job.num_stages,
        num_ctas=result["num_ctas"],
        global_scratch_size=result["global_scratch_size"],
        global_scratch_align=result["global_scratch_align"],
        launch_pdl=result["launch_pdl"],
        launch_cooperative_grid=result["launch_cooperative_grid"],
        args=job.args,
        constexprs={k: _json_value(v) for k, v in job.constexprs.items()},
        module=job.module,
        ptx_target=result["ptx_target"],
        line_info=result["line_info"],
        triton_version=result["triton_version"],
        path=path,
    )


def _json_value(value: Any) -> Any:
    value = getattr(value, "value", value)  # tl.constexpr
    return value if isinstance(value, (bool, int, float, str)) or value is None else repr(value)


def shared_memory_problem(k: CompiledKernel) -> str | None:
    """Why `k` cannot launch on its SM for want of shared memory, or None."""
    needed = k.shared + k.static_shared
    if needed <= k.shared_limit:
        return None
    static = f" ({k.shared} dynamic + {k.static_shared} static)" if k.static_shared else ""
    return (
        f"kernel {k.kernel} ({k.variant}) on {k.sm} needs {needed} bytes of shared memory{static}; "
        f"{k.sm} allows {k.shared_limit} bytes per thread block (constexprs {k.constexprs}, "
        f"num_stages {k.num_stages}): shrink its blocks or stages for {k.sm} (KernelSpec.per_sm)"
    )


def _check_sms(sms: Iterable[str]) -> list[str]:
    sms = list(sms)
    unknown = [sm for sm in sms if sm not in SM_CAPABILITY]
    if unknown:
        raise AotError(f"unknown SM {unknown}: the build targets {list(SM_CAPABILITY)}")
    return sorted(set(sms), key=list(SM_CAPABILITY).index)


def _replace_dir(tmp: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def compile_kernels(
    specs: Sequence[KernelSpec],
    sms: Sequence[str] = SMS,
    *,
    out_dir: str | os.PathLike,
    jobs: int = 1,
    progress: Callable[[str], None] | None = None,
    embed: bool = True,
    line_info: bool = False,
) -> list[CompiledKernel]:
    """Compile every spec x variant x SM into `out_dir` (replaced atomically, only if all succeed).

    `jobs` > 1 compiles in that many worker processes (spawned, without TRITON_INTERPRET); `progress` is
    called with each finished "<kernel> <variant> <sm>". Writes kernels.json and, with `embed`, the C++
    source embedding the cubins. `line_info` keeps source lines (and the PTX) in the cubins for profilers,
    about doubling their size. Raises AotError (SharedMemoryError for shared memory) listing every
    failure."""
    sms = _check_sms(sms)
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise AotError(f"kernel names must be unique across the plugins: {duplicates} appear twice")
    work = [(job, spec.kernel) for spec in specs for job in _jobs(spec, sms)]
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
    # triton reads it at compile time and keys its cache on it; spawned workers inherit it.
    saved_line_info = os.environ.get(_LINE_INFO_ENV)
    os.environ[_LINE_INFO_ENV] = "0" if line_info else "1"
    try:
        compiled: list[CompiledKernel] = []
        failures: dict[int, tuple[str, str]] = {}  # job index -> (label, why)

        def finish(index: int, result: dict[str, Any]) -> None:
            job = work[index][0]
            try:
                if "error" in result:
                    raise AotError(result["error"])
                compiled.append(_finish(job, result, tmp))
            except AotError as exc:
                failures[index] = (job.label, str(exc).removeprefix(f"{job.label}: "))
            if progress:
                progress(job.label)

        # Workers re-import each kernel by module; a kernel defined in __main__ compiles here.
        parallel = jobs > 1 and len(work) > 1
        remote = [i for i, (job, _) in enumerate(work) if parallel and job.module != "__main__"]
        if remote:
            with ProcessPoolExecutor(
                max_workers=min(jobs, len(remote)),
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init,
                initargs=(list(sys.path),),
            ) as pool:
                futures = {pool.submit(_compile_in_worker, work[i][0]): i for i in remote}
                for future in as_completed(futures):
                    finish(futures[future], future.result())
        for index in sorted(set(range(len(work))) - set(remote)):
            job, fn = work[index]
            try:
                result = _compile(job, fn)
            except Exception as exc:
                result = {"error": f"{type(exc).__name__}: {exc}"}
            finish(index, result)
        order = {sm: i for i, sm in enumerate(SM_CAPABILITY)}
        variants = {s.name: list(s.variants) for s in specs}
        compiled.sort(key=lambda k: (names.index(k.kernel), variants[k.kernel].index(k.variant), order[k.sm]))
        too_big = [p for p in map(shared_memory_problem, compiled) if p]
        report = []
        if failures:
            grouped: dict[str, list[str]] = {}  # one line per distinct error, naming every build it hit
            for index in sorted(failures):
                label, why = failures[index]
                grouped.setdefault(why, []).append(label)
            report.append(f"{len(failures)} of {len(work)} kernel builds failed:")
            report += [f"  {', '.join(labels)}: {why}" for why, labels in grouped.items()]
        if too_big:
            report.append("shared memory exceeds the SM's limit:")
            report += [f"  {line}" for line in too_big]
        if report:
            raise (AotError if failures else SharedMemoryError)("\n".join(report))
        (tmp / JSON_NAME).write_text(json.dumps([k.record() for k in compiled], indent=1) + "\n")
        if embed:
            write_embedded_cpp(compiled, tmp / CPP_NAME)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if saved_line_info is None:
            os.environ.pop(_LINE_INFO_ENV, None)
        else:
            os.environ[_LINE_INFO_ENV] = saved_line_info
    return [dataclasses.replace(k, path=out / k.cubin) for k in compiled]


def all_kernel_specs(notes: list[str] | None = None) -> list[KernelSpec]:
    """Every op's `KERNELS` (plugins/<folder>/kernels.py, folders from OP_TABLE) and the shared ones
    (plugins/common/kernels.py: the projections' GEMM); a folder without a kernels.py yet is skipped with a
    line in `notes`."""
    from qwen_export.passes.op_table import OP_TABLE

    specs: list[KernelSpec] = []
    for folder in dict.fromkeys(["common", *(op.folder for op in OP_TABLE.values())]):
        if not (PLUGINS_DIR / folder / "kernels.py").exists():
            if notes is not None:
                notes.append(f"plugins/{folder}/kernels.py does not exist yet: no Triton kernels from it")
            continue
        module = importlib.import_module(f"qwen_export.plugins.{folder}.kernels")
        kernels = getattr(module, "KERNELS", None)
        if not isinstance(kernels, (list, tuple)):
            raise AotError(f"plugins/{folder}/kernels.py defines no KERNELS list")
        specs.extend(kernels)
    return specs


# ---- the C++ source embedding the cubins (plugins/common/triton_loader.h declares its table) ----

_ARG_KIND = {
    "i1": "kI1", "i8": "kI8", "i16": "kI16", "i32": "kI32", "i64": "kI64",
    "u1": "kU1", "u8": "kU8", "u16": "kU16", "u32": "kU32", "u64": "kU64",
    "fp16": "kFp16", "bf16": "kBf16", "fp32": "kFp32", "fp64": "kFp64",
}  # fmt: skip


def _c_string(text: str) -> str:
    return json.dumps(text)  # ASCII names: JSON escaping is valid C++


def _c_bytes(data: bytes, width: int = 32) -> str:
    """`data` as adjacent string literals of \\xHH escapes (compiles far faster than a brace list)."""
    lines = []
    for i in range(0, len(data), width):
        lines.append('    "' + "".join(f"\\x{b:02x}" for b in data[i : i + width]) + '"')
    return "\n".join(lines) or '    ""'


def constexpr_text(constexprs: dict[str, Any]) -> str:
    """The integer constexprs as the loader reads them (`constexprValue`): "BLOCK_M=4;HAS_RESIDUAL=1"."""
    ints = {k: int(v) for k, v in sorted(constexprs.items()) if isinstance(v, (bool, int))}
    return ";".join(f"{k}={v}" for k, v in ints.items())


def write_embedded_cpp(kernels: Sequence[CompiledKernel], path: str | os.PathLike) -> Path:
    """The C++ source holding every cubin and the qwen::triton::embeddedKernels() table."""
    out = [
        "// Generated by python -m qwen_export.plugins.aot: the plugins' Triton kernels. Do not edit.",
        '#include "common/triton_loader.h"',
        "",
        "namespace qwen {",
        "namespace triton {",
        "namespace {",
        "",
    ]
    for i, k in enumerate(kernels):
        data = k.path.read_bytes()
        if hashlib.sha256(data).hexdigest() != k.sha256:
            raise AotError(f"{k.path}: sha256 differs from its kernels.json record")
        out.append(f"// {k.kernel} {k.variant} {k.sm}: {len(data)} bytes, sha256 {k.sha256}")
        out.append(f"alignas(64) const unsigned char kCubin{i}[{len(data) + 1}] =")
        out.append(_c_bytes(data) + ";")
        args = ",\n".join(
            f"    {{{_c_string(a['name'])}, {_c_string(a['type'])}, "
            f"ArgType::{'kPtr' if a['type'].startswith('*') else _ARG_KIND[a['type']]}, "
            f"{'true' if a['div16'] else 'false'}}}"
            for a in k.args
        )
        out.append(
            f"const ArgSpec kArgs{i}[] = {{\n{args or '    {nullptr, nullptr, ArgType::kPtr, false}'}}};"
        )
        out.append("")
    out.append("const KernelImage kImages[] = {")
    for i, k in enumerate(kernels):
        fields = [
            _c_string(k.kernel), _c_string(k.variant), _c_string(k.sm), str(k.capability),
            "true" if k.sm.endswith("a") else "false", _c_string(k.entry), f"kCubin{i}",
            f"{k.cubin_bytes}u", _c_string(k.sha256), str(k.num_warps), str(k.num_ctas), str(k.num_stages),
            str(k.shared), str(k.static_shared), str(k.global_scratch_size), str(k.global_scratch_align),
            "true" if k.launch_pdl else "false", "true" if k.launch_cooperative_grid else "false",
            str(k.registers), str(k.spills), f"kArgs{i}", str(len(k.args)),
            _c_string(constexpr_text(k.constexprs)),
        ]  # fmt: skip
        out.append("    {" + ", ".join(fields) + "},")
    if not kernels:
        out.append("    {}  // no kernels were built")
    out += [
        "};",
        "",
        "}  // namespace",
        "",
        f"KernelTable embeddedKernels() {{ return KernelTable{{kImages, {len(kernels)}u}}; }}",
        "",
        "}  // namespace triton",
        "}  // namespace qwen",
        "",
    ]
    path = Path(path)
    path.write_text("\n".join(out))
    return path


# ---- command line ----


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qwen_export.plugins.aot",
        description="Compile every plugin's Triton kernels to cubins for each SM (no GPU needed).",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (replaced atomically)")
    parser.add_argument("--sm", action="append", choices=list(SM_CAPABILITY), help="SM to build (repeat)")
    parser.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 8), help="worker processes")
    parser.add_argument(
        "--line-info", action="store_true", help="keep source lines in the cubins (profiling; ~2x larger)"
    )
    args = parser.parse_args(argv)

    # Kernel modules imported from here on compile; none is imported yet in this process.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.text import Text

    console = Console(stderr=True)
    notes: list[str] = []
    specs = all_kernel_specs(notes)
    for note in notes:
        console.print(Text("note: ", style="yellow") + Text(note), soft_wrap=True)
    sms = _check_sms(args.sm or SMS)
    total = sum(len(s.variants) for s in specs) * len(sms)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console, transient=False) as bar:
            task = bar.add_task("compiling Triton kernels", total=total)
            built = compile_kernels(
                specs, sms, out_dir=args.out, jobs=args.jobs, line_info=args.line_info,
                progress=lambda label: bar.update(task, advance=1, description=label),
            )  # fmt: skip
            bar.update(task, description="compiled Triton kernels")
    except AotError as exc:  # its text may hold brackets: never parsed as markup
        console.print(Text("error: ", style="red") + Text(str(exc)), soft_wrap=True)
        return 1
    done = f"{len(built)} cubins for {', '.join(sms)} in {args.out} ({JSON_NAME}, {CPP_NAME})"
    console.print(Text(done), soft_wrap=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
