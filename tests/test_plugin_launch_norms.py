"""Kernel tier, C++ side: the plugin library's RMSNorm and gated RMSNorm launchers
(plugins/<op>/<op>_launch.cpp) driven through their plain-C entry points with CPU buffers, their launches
recorded by the recording CUDA driver and replayed under Triton's interpreter (plugins/launch_replay.py),
against scripts/gpu_check.py's PyTorch references. Also the launchers' failure paths: a one-line reason
and a QWEN_STATUS_* code."""

from __future__ import annotations

import ctypes

import pytest
import torch
from plugin_library import DTYPES, QWEN_STATUS_LAUNCH, QWEN_STATUS_UNSUPPORTED

from qwen_export.plugins.launch_replay import ReplayError
from qwen_export.plugins.triton_support import Guarded, guard_problems
from qwen_export.tolerances import tolerance_for


def nan_guarded(shape, dtype) -> Guarded:
    return Guarded(torch.full(shape, float("nan")), dtype)


def launch(replay, name: str, params) -> None:
    status = getattr(replay.lib, f"qwenLaunch{name}")(ctypes.byref(params), None)
    assert status == 0, f"qwenLaunch{name} returned {status}: {replay.last_error()}"


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize(
    ("rows", "dim", "kernel"),
    [
        (5, 64, "rms_norm.rms_norm_n256_a16"),  # narrowest class, 16-byte vectors
        (3, 72, "rms_norm.rms_norm_n256"),  # D not a multiple of 16: the generic cubin
        (2, 4096 + 16, "rms_norm.rms_norm_n4096_a16"),  # wider than the widest class: it loops
    ],
)
def test_rms_norm_launcher(plugin_replay, gpu_check, dtype, rows, dim, kernel):
    gen = torch.Generator().manual_seed(rows * dim)
    x = Guarded(torch.randn(rows, dim, generator=gen), DTYPES[dtype])
    scale = Guarded(torch.rand(dim, generator=gen) + 0.5)
    y = nan_guarded((rows, dim), DTYPES[dtype])
    sizes = dict(rows=rows, dim=dim)
    p = gpu_check.make_params(
        "RMSNorm", (x.tensor, scale.tensor), (y.tensor,), sizes, {"epsilon": 1e-6}, dtype
    )
    launch(plugin_replay, "RMSNorm", p)
    launches = plugin_replay.replay([x.buffer, scale.buffer, y.buffer])
    assert [(la.kernel, la.variant) for la in launches] == [(kernel, dtype)]
    assert not guard_problems(x=x, scale=scale, y=y)
    reference = gpu_check.ref_rms_norm(x.tensor, scale.tensor, 1e-6)
    assert gpu_check.rel_error(y.tensor, reference) <= tolerance_for(dtype)["layer_rel"]


def test_a_replay_without_running_checks_the_launch_and_leaves_the_outputs(plugin_replay, gpu_check):
    """`replay(run=False)` (gpu_check's dry run, timing-only cases): the launch is resolved and its
    pointers checked against the buffers, and no kernel writes anything."""
    x = Guarded(torch.randn(4, 64), DTYPES["fp16"])
    scale = Guarded(torch.rand(64) + 0.5)
    y = nan_guarded((4, 64), DTYPES["fp16"])
    p = gpu_check.make_params("RMSNorm", (x.tensor, scale.tensor), (y.tensor,), dict(rows=4, dim=64),
                              {"epsilon": 1e-6}, "fp16")  # fmt: skip
    launch(plugin_replay, "RMSNorm", p)
    launches = plugin_replay.replay([x.buffer, scale.buffer, y.buffer], run=False)
    assert [la.kernel for la in launches] == ["rms_norm.rms_norm_n256_a16"]
    assert torch.isnan(y.tensor.float()).all()
    launch(plugin_replay, "RMSNorm", p)
    with pytest.raises(ReplayError, match="outside every buffer"):  # y left out of the buffers
        plugin_replay.replay([x.buffer, scale.buffer], run=False)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize(("rows", "dim"), [(6, 128), (3, 40)])
def test_gated_rms_norm_launcher(plugin_replay, gpu_check, dtype, rows, dim):
    gen = torch.Generator().manual_seed(rows + dim)
    x = Guarded(torch.randn(rows, dim, generator=gen), DTYPES[dtype])
    z = Guarded(torch.randn(rows, dim, generator=gen), DTYPES[dtype])
    scale = Guarded(torch.rand(dim, generator=gen) + 0.5)
    y = nan_guarded((rows, dim), DTYPES[dtype])
    ins = (x.tensor, z.tensor, scale.tensor)
    p = gpu_check.make_params(
        "GatedRMSNorm", ins, (y.tensor,), dict(rows=rows, dim=dim), {"epsilon": 1e-6}, dtype
    )
    launch(plugin_replay, "GatedRMSNorm", p)
    launches = plugin_replay.replay([x.buffer, z.buffer, scale.buffer, y.buffer])
    assert [la.kernel.startswith("gated_rms_norm.gated_rms_norm_n") for la in launches] == [True]
    assert not guard_problems(x=x, z=z, scale=scale, y=y)
    reference = gpu_check.ref_gated_rms_norm(*ins, 1e-6)
    assert gpu_check.rel_error(y.tensor, reference) <= tolerance_for(dtype)["layer_rel"]


def test_a_dtype_outside_fp16_bf16_is_refused_with_its_reason(plugin_replay, gpu_check):
    x, scale, y = (
        torch.zeros(2, 8, dtype=torch.float16),
        torch.ones(8),
        torch.zeros(2, 8, dtype=torch.float16),
    )
    p = gpu_check.make_params("RMSNorm", (x, scale), (y,), dict(rows=2, dim=8), {"epsilon": 1e-6}, "fp16")
    p.dtype = 7
    assert plugin_replay.lib.qwenLaunchRMSNorm(ctypes.byref(p), None) == QWEN_STATUS_UNSUPPORTED
    assert plugin_replay.last_error() == "qwenLaunchRMSNorm: dtype must be fp16 or bf16"
    assert plugin_replay.count() == 0


def test_a_driver_failure_comes_back_as_a_status_with_the_call_named(plugin_replay, gpu_check):
    x, scale, y = (
        torch.zeros(2, 8, dtype=torch.float16),
        torch.ones(8),
        torch.zeros(2, 8, dtype=torch.float16),
    )
    p = gpu_check.make_params("RMSNorm", (x, scale), (y,), dict(rows=2, dim=8), {"epsilon": 1e-6}, "fp16")
    plugin_replay.fail_call("cuLaunchKernel")
    try:
        status = plugin_replay.lib.qwenLaunchRMSNorm(ctypes.byref(p), None)
    finally:
        plugin_replay.fail_call(None)
    assert status == QWEN_STATUS_LAUNCH
    assert "cuLaunchKernel failed: CUDA_ERROR_LAUNCH_FAILED" in plugin_replay.last_error()
    assert "rms_norm.rms_norm_n256" in plugin_replay.last_error()
    assert plugin_replay.count() == 0
