"""The harness that proves Triton kernels on the CPU, before they reach a GPU.

- The interpreter: `TRITON_INTERPRET=1` must be set before a kernel module is imported (`triton.jit`
  decides at decoration time). `interpreter()` sets it and returns whether it is on.
- bf16 dots: triton 3.9's interpreter keeps bf16 as uint16 bits and `create_dot` multiplies the raw bits,
  so a bf16 `tl.dot` is garbage under the interpreter (loads, converts and elementwise math are right).
  Kernels are not changed for this: `upcast_bf16_dots()` makes the interpreter widen bf16 dot operands to
  fp32 first, which is what bf16 MMA with fp32 accumulation computes. `interpreter_bf16_dot_is_broken()`
  says whether upstream still needs it; a test fails once it does not, so the patch can go.
- Guarded buffers: the interpreter does no bounds checks. `Guarded` places a tensor inside a larger
  buffer whose margins are NaN (floats) or a sentinel (integers); after a kernel ran, `problems()` says
  whether anything outside the tensor changed, and NaN inputs read out of bounds show in the outputs.
- `KernelSpec`: what the ahead-of-time build needs to compile a kernel for each SM (its signature,
  constexprs and launch configuration, frozen per SM: no autotuning at run time).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

GUARD_ELEMENTS = 256  # margin before and after every guarded tensor
INT_SENTINEL = -0x5A5A5A5A
SMS = ("sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a", "sm_120a")


def interpreter() -> bool:
    """Turn Triton's interpreter on for kernels imported from now on; True if it is on.

    It must come before triton itself is imported (torch and transformers may import it): triton.language's
    own helpers (`tl.sum`, ...) are decorated when triton is imported, and compiled-mode helpers cannot be
    called from an interpreted kernel."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    on = os.environ["TRITON_INTERPRET"] == "1"
    language = sys.modules.get("triton.language")
    if on and language is not None and type(language.sum).__name__ != "InterpretedFunction":
        raise RuntimeError(
            "triton was imported before TRITON_INTERPRET=1 was set (torch or transformers import it): set "
            "TRITON_INTERPRET=1 in the environment, or call triton_support.interpreter() before those imports"
        )
    return on


def _bits_to_fp32(data: np.ndarray) -> np.ndarray:
    return (data.astype(np.uint32) << 16).view(np.float32)


_PATCHED = False


def upcast_bf16_dots() -> None:
    """Make the interpreter's dot widen bf16 operands to fp32 (once per process)."""
    global _PATCHED
    if _PATCHED:
        return
    import triton.language as tl
    from triton.runtime import interpreter as interp

    original = interp.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype == tl.bfloat16 or b.dtype == tl.bfloat16:
            wide_a = _bits_to_fp32(a.data) if a.dtype == tl.bfloat16 else a.data.astype(np.float32)
            wide_b = _bits_to_fp32(b.data) if b.dtype == tl.bfloat16 else b.data.astype(np.float32)
            out = np.matmul(wide_a, wide_b, dtype=np.float32).astype(d.data.dtype) + d.data
            return interp.TensorHandle(out, d.dtype.scalar)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    interp.InterpreterBuilder.create_dot = create_dot
    interp.InterpreterBuilder._qwen_original_create_dot = original
    _PATCHED = True


def interpreter_bf16_dot_is_broken() -> bool:
    """Run one bf16 `tl.dot` through the unpatched interpreter: True while upstream multiplies raw bits."""
    import torch
    import triton
    import triton.language as tl
    from triton.runtime import interpreter as interp

    @triton.jit
    def _dot(a_ptr, b_ptr, c_ptr):
        r = tl.arange(0, 16)
        a = tl.load(a_ptr + r[:, None] * 16 + r[None, :])
        b = tl.load(b_ptr + r[:, None] * 16 + r[None, :])
        tl.store(c_ptr + r[:, None] * 16 + r[None, :], tl.dot(a, b))

    a = torch.full((16, 16), 0.5, dtype=torch.bfloat16)
    c = torch.zeros((16, 16), dtype=torch.float32)
    patched = interp.InterpreterBuilder.create_dot
    original = getattr(interp.InterpreterBuilder, "_qwen_original_create_dot", patched)
    interp.InterpreterBuilder.create_dot = original
    try:
        _dot[(1,)](a, a, c)
    finally:
        interp.InterpreterBuilder.create_dot = patched
    return not torch.allclose(c, torch.full_like(c, 4.0))


class Guarded:
    """A tensor of `shape` and `dtype` inside a buffer with GUARD_ELEMENTS of poison on each side."""

    def __init__(self, values: Any, dtype: Any = None, guard: int = GUARD_ELEMENTS):
        import torch

        values = torch.as_tensor(values)
        dtype = dtype or values.dtype
        self.numel, self.guard = values.numel(), guard
        poison = float("nan") if dtype.is_floating_point else INT_SENTINEL
        self.buffer = torch.full((self.numel + 2 * guard,), poison, dtype=dtype)
        self.tensor = self.buffer[guard : guard + self.numel].view(values.shape)
        self.tensor.copy_(values.to(dtype))
        self._margins = self._margin_copy()

    def _margin_copy(self):
        return self.buffer[: self.guard].clone(), self.buffer[self.guard + self.numel :].clone()

    def problems(self, name: str) -> list[str]:
        """One line per margin that changed (a write outside the tensor)."""
        import torch

        out = []
        for side, before, now in zip(("before", "after"), self._margins, self._margin_copy(), strict=True):
            same = torch.equal(before.isnan(), now.isnan()) if before.is_floating_point() else True
            same = same and torch.equal(torch.nan_to_num(before), torch.nan_to_num(now))
            if not same:
                out.append(f"{name}: the kernel wrote outside the tensor ({side} it)")
        return out


def guard_problems(**tensors: Guarded) -> list[str]:
    return [p for name, g in tensors.items() for p in g.problems(name)]


@dataclass(frozen=True)
class KernelSpec:
    """One kernel as the ahead-of-time build compiles it.

    signature: argument name -> Triton type ("*fp16", "*fp32", "i32", "fp32", ...; pointers start with *)
               or "constexpr" for compile-time arguments, in the kernel's argument order; "{act}" in a
               type stands for the variant's activation type (its "act" entry: "fp16" or "bf16"), "{out}"
               for its output type (its "out" entry, else the activation type); a
               ":16" suffix ("*fp16:16", "i32:16") promises the argument is a multiple of 16 (pointers:
               16-byte aligned), which the AOT build compiles in and the loader checks at launch.
    constexprs: the compile-time values (block sizes, head dims, dtype switches); `per_sm` overrides
               them per SM ("sm_90a": {...}); num_warps and num_stages likewise.
    variants:  named constexpr sets compiled as separate cubins (for example fp16 / bf16 activations).
    """

    name: str
    kernel: Any  # the @triton.jit function
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2
    per_sm: dict[str, dict[str, Any]] = field(default_factory=dict)
    variants: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"fp16": {"act": "fp16"}, "bf16": {"act": "bf16"}}
    )

    def config(self, sm: str, variant: str) -> tuple[dict[str, str], dict[str, Any], int, int]:
        """(signature, constexprs, num_warps, num_stages) of this kernel's `variant` on `sm`."""
        values = {**self.constexprs, **self.variants[variant], **self.per_sm.get(sm, {})}
        act = values.pop("act", "fp16")
        out = values.pop("out", act)
        warps = values.pop("num_warps", self.num_warps)
        stages = values.pop("num_stages", self.num_stages)
        signature = {k: v.replace("{act}", act).replace("{out}", out) for k, v in self.signature.items()}
        return signature, values, warps, stages


@dataclass(frozen=True)
class CheckRow:
    """One kernel checked on one case: its largest deviation from the reference and the bound it is held to
    (fp32: absolute 1e-4; fp16/bf16: relative to the reference's largest magnitude, tolerances.py's
    `layer_rel` for that precision)."""

    kernel: str  # "<op folder>.<kernel>", e.g. "gated_deltanet.chunk_delta_rule"
    case: str  # what ran, e.g. "prefill 65 tokens from carried state, bf16"
    max_abs: float
    tolerance: float
    relative: bool = False  # max_abs is divided by the reference's largest magnitude
    guards_ok: bool = True

    @property
    def passed(self) -> bool:
        return self.guards_ok and self.max_abs <= self.tolerance

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "passed": self.passed}


def compare(
    kernel: str, case: str, ours: Any, reference: Any, dtype: Any, guards_ok: bool = True
) -> CheckRow:
    """A CheckRow for `ours` against `reference` at the precision `dtype` (torch dtype) was computed in."""
    import torch

    from qwen_export.tolerances import tolerance_for

    ours, reference = ours.detach().double(), reference.detach().double()
    diff = float((ours - reference).abs().max()) if ours.numel() else 0.0
    if not torch.isfinite(ours).all():
        diff = float("inf")
    if dtype == torch.float32:
        return CheckRow(kernel, case, diff, 1e-4, False, guards_ok)
    scale = float(reference.abs().max()) or 1.0
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    return CheckRow(kernel, case, diff / scale, tolerance_for(precision)["layer_rel"], True, guards_ok)


# A GPU's compute capability -> the SM name its cubins and frozen launch configurations are built for.
CAPABILITY_SM = {(8, 0): "sm_80", (8, 6): "sm_86", (8, 9): "sm_89", (9, 0): "sm_90a", (10, 0): "sm_100a"}
DEFAULT_SM = "sm_90a"  # the configuration a launch on the CPU (the interpreter) uses: the H100/H200 build


def device_sm(tensor: Any, sm: str | None = None) -> str:
    """The SM whose frozen launch configuration a launch on `tensor`'s device uses (`sm` overrides)."""
    if sm is not None:
        return sm
    if tensor.device.type != "cuda":
        return DEFAULT_SM
    import torch

    cap = torch.cuda.get_device_capability(tensor.device)
    if cap in CAPABILITY_SM:
        return CAPABILITY_SM[cap]
    return "sm_120a" if cap[0] >= 12 else "sm_100a" if cap[0] >= 10 else "sm_80"


def variant_of(dtype: Any) -> str:
    """The variant a launch with activations of `dtype` uses (fp32, for checks, runs as fp16's)."""
    import torch

    return "bf16" if dtype == torch.bfloat16 else "fp16"


def aligned16(signature: dict[str, str], names: tuple[str, ...]) -> dict[str, str]:
    """`signature` with the ":16" divisibility promise on `names` (the launcher must guarantee it)."""
    missing = set(names) - set(signature)
    if missing:
        raise ValueError(f"not in the signature: {sorted(missing)}")
    return {k: f"{v}:16" if k in names else v for k, v in signature.items()}
