"""The Triton check harness itself: the interpreter's bf16 dot (and our upcast for it), and guarded buffers
that catch a kernel writing outside its tensor."""

from __future__ import annotations

from qwen_export.plugins.triton_support import interpreter

interpreter()  # before any kernel is defined: triton.jit decides at decoration time

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from qwen_export.plugins.triton_support import (  # noqa: E402
    Guarded,
    guard_problems,
    interpreter_bf16_dot_is_broken,
    upcast_bf16_dots,
)


@triton.jit
def _dot16(a_ptr, b_ptr, c_ptr):
    r = tl.arange(0, 16)
    a = tl.load(a_ptr + r[:, None] * 16 + r[None, :])
    b = tl.load(b_ptr + r[:, None] * 16 + r[None, :])
    tl.store(c_ptr + r[:, None] * 16 + r[None, :], tl.dot(a, b))


@triton.jit
def _copy(x_ptr, y_ptr, n, OVERRUN: tl.constexpr):
    i = tl.arange(0, 64)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n), mask=i < n + OVERRUN)


def test_the_interpreter_still_multiplies_bf16_bits():
    """Fails once upstream triton's interpreter computes bf16 dots right: then drop upcast_bf16_dots."""
    assert interpreter_bf16_dot_is_broken(), "triton's interpreter now does bf16 dots: remove the upcast"


def test_upcast_makes_a_bf16_dot_what_bf16_mma_with_fp32_accumulation_computes():
    upcast_bf16_dots()
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 16, generator=gen).to(torch.bfloat16)
    b = torch.randn(16, 16, generator=gen).to(torch.bfloat16)
    c = torch.zeros(16, 16)
    _dot16[(1,)](a, b, c)
    torch.testing.assert_close(c, a.float() @ b.float(), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("overrun, caught", [(0, False), (1, True)])
def test_guards_catch_a_write_past_the_end(overrun, caught):
    x = Guarded(torch.arange(40, dtype=torch.float32))
    y = Guarded(torch.zeros(40))
    _copy[(1,)](x.tensor, y.tensor, 40, OVERRUN=overrun)
    problems = guard_problems(x=x, y=y)
    assert bool(problems) == caught, problems
    if caught:
        assert problems == ["y: the kernel wrote outside the tensor (after it)"]
    torch.testing.assert_close(y.tensor, x.tensor)
