"""Replay of the plugin library's kernel launches under Triton's interpreter: the C++ launchers, checked on
the CPU.

The plugin library (libqwen_trt_plugins.so) launches its AOT-compiled Triton kernels through the CUDA
driver API, which it resolves at run time (plugins/common/cuda_driver.h). On a machine without a GPU,
`LaunchReplay` points it at plugins/tests/recording_driver.cpp instead: a launcher such as
qwenLaunchRMSNorm then runs its whole host-side logic (argument checks, which kernel and cubin variant,
workspace carving, grids, argument order and values) against CPU tensors whose addresses stand in for
device pointers, and the driver records each launch, copy and memset. `replay` runs the record in order:
each launch is the same kernel source (`KernelSpec.kernel`) with the same constexprs (the cubin's SM and
variant) under the interpreter, on views of the given tensors at the recorded addresses; copies and
memsets are done on host memory. Outputs can then be compared with the reference like any kernel's.

What this does not check: anything only a GPU does (the cubin's machine code, timing, races between
programs; see docs/kernels.md).
"""

from __future__ import annotations

import ctypes
import functools
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LAUNCH, COPY_2D, MEMSET = 1, 2, 3
MAX_PARAMS = 64
SCRATCH_PARAMS = 2  # Triton's launch ABI: global and profile scratch follow the kernel's own arguments

_SCALAR_FORMATS = {
    "i1": "<?", "i8": "<b", "i16": "<h", "i32": "<i", "i64": "<q",
    "u1": "<?", "u8": "<B", "u16": "<H", "u32": "<I", "u64": "<Q", "fp32": "<f", "fp64": "<d",
}  # fmt: skip


class Record(ctypes.Structure):
    """Mirror of QwenRecord (plugins/tests/recording_driver.cpp)."""

    _fields_ = [
        ("kind", ctypes.c_int32),
        ("numParams", ctypes.c_int32),
        ("cubin", ctypes.c_uint64),
        ("entry", ctypes.c_char * 128),
        ("grid", ctypes.c_uint32 * 3),
        ("block", ctypes.c_uint32 * 3),
        ("sharedBytes", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
        ("params", ctypes.c_uint64 * MAX_PARAMS),
        ("dst", ctypes.c_uint64),
        ("src", ctypes.c_uint64),
        ("dstPitch", ctypes.c_uint64),
        ("srcPitch", ctypes.c_uint64),
        ("widthBytes", ctypes.c_uint64),
        ("height", ctypes.c_uint64),
    ]


class ReplayError(RuntimeError):
    """A recorded launch that cannot be replayed (unknown kernel, a pointer outside every given buffer)."""


@dataclass(frozen=True)
class Launch:
    """One replayed kernel launch."""

    kernel: str
    variant: str
    sm: str
    grid: tuple[int, int, int]


def _torch_dtype(triton_type: str):
    import torch

    return {
        "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64,
        "i8": torch.int8, "i16": torch.int16, "i32": torch.int32, "i64": torch.int64, "u8": torch.uint8,
        "i1": torch.bool, "u1": torch.bool,
    }[triton_type]  # fmt: skip


def _view(address: int, triton_type: str, buffers: Sequence[Any], what: str):
    """A 1-D tensor of `triton_type` starting at `address`, inside one of `buffers`, to its end."""
    import torch

    dtype = _torch_dtype(triton_type)
    size = torch.empty(0, dtype=dtype).element_size()
    for buffer in buffers:
        storage = buffer.untyped_storage()
        base, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        if base <= address < end or (address == end and address == base):
            if (address - base) % size:
                raise ReplayError(f"{what}: {hex(address)} is not {triton_type}-aligned in its buffer")
            view = torch.empty(0, dtype=dtype)
            return view.set_(storage, (address - base) // size, ((end - address) // size,))
    raise ReplayError(f"{what}: {hex(address)} points outside every buffer the replay was given")


class LaunchReplay:
    """The plugin library at `library`, driven by the recording driver at `driver` (one per process: the
    library loads its driver once)."""

    def __init__(self, library: Path, driver: Path):
        self.driver = ctypes.CDLL(str(driver))
        self.lib = ctypes.CDLL(str(library))
        self.lib.qwenLastError.restype = ctypes.c_char_p
        self.driver.qwenRecordAt.restype = ctypes.POINTER(Record)
        self.driver.qwenRecordAt.argtypes = [ctypes.c_int64]
        self.driver.qwenRecordCount.restype = ctypes.c_int64
        self.driver.qwenRecordSize.restype = ctypes.c_int64
        if self.driver.qwenRecordSize() != ctypes.sizeof(Record):
            raise ReplayError("the Record mirror differs from recording_driver.cpp's QwenRecord")
        if self.lib.qwenSetCudaDriverLibrary(str(driver).encode()) != 0:
            raise ReplayError(f"cannot use {driver}: {self.last_error()}")
        self.images = self._images()

    def _images(self) -> dict[int, tuple[str, str, str]]:
        self.lib.qwenKernelCount.restype = ctypes.c_int64
        kernel, variant, sm = ctypes.c_char_p(), ctypes.c_char_p(), ctypes.c_char_p()
        cubin = ctypes.c_void_p()
        images = {}
        for i in range(self.lib.qwenKernelCount()):
            refs = map(ctypes.byref, (kernel, variant, sm, cubin))
            if self.lib.qwenKernelAt(ctypes.c_int64(i), *refs) != 0:
                raise ReplayError(self.last_error())
            images[cubin.value] = (kernel.value.decode(), variant.value.decode(), sm.value.decode())
        return images

    def last_error(self) -> str:
        return (self.lib.qwenLastError() or b"").decode()

    def fail_call(self, call: str | None) -> None:
        """Make the driver entry point `call` fail from now on (None: none fails)."""
        self.driver.qwenRecordFailCall(call.encode() if call else None)

    def records(self) -> list[Record]:
        return [Record.from_buffer_copy(self.driver.qwenRecordAt(i).contents) for i in range(self.count())]

    def count(self) -> int:
        return int(self.driver.qwenRecordCount())

    def reset(self) -> None:
        self.driver.qwenRecordReset()

    def replay(self, buffers: Sequence[Any], run: bool = True) -> list[Launch]:
        """Run and clear the record on `buffers` (every tensor the launcher was given, workspace included).
        `run=False` checks each launch as a run would (its cubin and kernel spec, its parameter count, every
        pointer argument inside a buffer) and skips the interpreted kernel: for launches whose results
        nothing compares (a timing-only case), where the interpreter would take minutes."""
        from qwen_export.plugins.triton_support import upcast_bf16_dots

        upcast_bf16_dots()
        records = self.records()
        self.reset()
        launches = []
        for record in records:
            if record.kind == LAUNCH:
                launches.append(self._launch(record, buffers, run))
            elif record.kind == COPY_2D:
                for row in range(record.height):
                    dst, src = record.dst + row * record.dstPitch, record.src + row * record.srcPitch
                    for address in (dst, src, dst + record.widthBytes - 1, src + record.widthBytes - 1):
                        _view(address, "u8", buffers, "a 2-D copy")
                    ctypes.memmove(dst, src, record.widthBytes)
            elif record.kind == MEMSET:
                _view(record.dst + record.widthBytes - 1, "u8", buffers, "a memset")
                ctypes.memset(record.dst, record.src, record.widthBytes)
        return launches

    def _launch(self, record: Record, buffers: Sequence[Any], run: bool = True) -> Launch:
        image = self.images.get(record.cubin)
        if image is None:
            raise ReplayError(f"launch of {record.entry.decode()} from a cubin not in the library's table")
        kernel, variant, sm = image
        spec = kernel_specs().get(kernel)
        if spec is None:
            raise ReplayError(f"{kernel} is embedded in the library but no KernelSpec has that name")
        signature, constexprs, warps, stages = spec.config(sm, variant)
        types = [(name, t.split(":")[0]) for name, t in signature.items() if t != "constexpr"]
        if record.numParams != len(types) + SCRATCH_PARAMS:
            expected = len(types) + SCRATCH_PARAMS
            raise ReplayError(f"{kernel}: {record.numParams} parameters recorded, its spec takes {expected}")
        args = []
        for (name, t), bits in zip(types, record.params, strict=False):
            what = f"{kernel} ({variant}) argument {name}"
            if t.startswith("*"):
                args.append(_view(bits, t[1:], buffers, what))
            else:
                raw = struct.pack("<Q", bits)
                fmt = _SCALAR_FORMATS[t]
                args.append(struct.unpack_from(fmt, raw)[0])
        grid = tuple(int(g) for g in record.grid)
        if run:
            spec.kernel[grid](*args, **constexprs, num_warps=warps, num_stages=stages)
        return Launch(kernel, variant, sm, grid)


@functools.cache
def kernel_specs() -> dict[str, Any]:
    """Every KernelSpec of the AOT build, by name."""
    from qwen_export.plugins.aot import all_kernel_specs

    return {spec.name: spec for spec in all_kernel_specs()}


@functools.cache
def launch_replay(library: Path, driver: Path) -> LaunchReplay:
    """The process's LaunchReplay of `library` (the library binds its driver once per process)."""
    return LaunchReplay(library, driver)
