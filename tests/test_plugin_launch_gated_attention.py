"""Kernel tier, C++ side: the plugin library's gated attention launcher (plugins/gated_attention/
gated_attention_launch.cpp) driven through its plain-C entry point with CPU buffers, its launches recorded by
the recording CUDA driver and replayed under Triton's interpreter (plugins/launch_replay.py), against
scripts/gpu_check.py's ref_gated_attention (Y, present_key, present_value). Every input, the outputs
(NaN-initialised) and the workspace (filled with NaN bits) are Guarded.

Which kernels run, their variants and grids are checked against the Python launchers' choices
(qk_norm_rope_triton, flash_prefill_triton, split_kv_decode_triton.decode_plan), computed here from the same
KernelSpecs. GQA of 3 query heads on 1 kv head at small widths (H 64) keeps the interpreter cheap."""

from __future__ import annotations

import ctypes

import pytest
import torch
from plugin_library import DTYPES, QWEN_STATUS_BAD_PARAM, QWEN_STATUS_UNSUPPORTED, cdiv, config

from qwen_export.plugins.gated_attention.split_kv_decode_triton import decode_plan
from qwen_export.plugins.triton_support import DEFAULT_SM, Guarded, guard_problems
from qwen_export.tolerances import tolerance_for

SHAPES = dict(hidden=64, heads=3, kv_heads=1, head_dim=64, rotary=16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def params(gpu_check, ins, outs, attrs, dtype: str, kv_splits: int = 0):
    x, past_key = ins[0], ins[4]
    b, t, h = x.shape
    sizes = dict(batch=b, tokens=t, past=past_key.shape[2], hidden=h)
    return gpu_check.make_params("GatedAttention", ins, outs, sizes, attrs, dtype, kvSplits=kv_splits)


def workspace_size(replay, p) -> int:
    replay.lib.qwenGatedAttentionWorkspaceSize.restype = ctypes.c_int64
    return int(replay.lib.qwenGatedAttentionWorkspaceSize(ctypes.byref(p)))


def run_attention(replay, gpu_check, ins, attrs, dtype: str, kv_splits: int = 0):
    """qwenLaunchGatedAttention on guarded copies of `ins`, replayed: (y, present_key, present_value,
    launches)."""
    guarded = [Guarded(t) for t in ins]
    x, past_key = ins[0], ins[4]
    b, t, _ = x.shape
    kv, past, hd = past_key.shape[1], past_key.shape[2], past_key.shape[3]
    nan = float("nan")
    y = Guarded(torch.full(tuple(x.shape), nan), DTYPES[dtype])
    present = [Guarded(torch.full((b, kv, past + t, hd), nan), DTYPES[dtype]) for _ in range(2)]
    outs = (y.tensor, present[0].tensor, present[1].tensor)
    p = params(gpu_check, [g.tensor for g in guarded], outs, attrs, dtype, kv_splits)
    size = workspace_size(replay, p)
    assert size > 0 and size % 256 == 0
    ws = Guarded(torch.full((size // 4,), -1, dtype=torch.int32))  # NaN bits in fp16, bf16 and fp32
    p.workspace = ws.tensor.data_ptr()
    status = replay.lib.qwenLaunchGatedAttention(ctypes.byref(p), None)
    assert status == 0, f"qwenLaunchGatedAttention returned {status}: {replay.last_error()}"
    launches = replay.replay([g.buffer for g in (*guarded, y, *present, ws)])
    named = {f"in{i}": g for i, g in enumerate(guarded)}
    assert not guard_problems(**named, y=y, present_key=present[0], present_value=present[1], workspace=ws)
    return y.tensor, present[0].tensor, present[1].tensor, launches


def inputs(gpu_check, dtype: str, batch: int, tokens: int, past: int, pad: int = 0, seed: int = 0, **shapes):
    gen = torch.Generator().manual_seed(seed)
    s = {**SHAPES, **shapes}
    return gpu_check.attention_inputs(s, batch, tokens, past, DTYPES[dtype], "cpu", pad, gen)


def expected_attention(ins, attrs, dtype: str, kv_splits: int) -> list[tuple[str, str, tuple[int, int, int]]]:
    """(kernel, variant, grid) of the attention kernels, as the Python launchers choose them."""
    x, past_key = ins[0], ins[4]
    b, t, _ = x.shape
    past, hd = past_key.shape[2], attrs["head_dim"]
    nh, kv = attrs["num_heads"], attrs["num_kv_heads"]
    group = nh // kv
    norm = f"gated_attention.qk_norm_rope_hd{hd}"
    rows = [(norm, f"{dtype}_scale", (cdiv(b * t, config(norm, f"{dtype}_scale")["BLOCK_T"]), nh + kv, 1))]
    if t > 1:
        prefill = f"gated_attention.flash_prefill_hd{hd}"
        grid = (cdiv(t * group, config(prefill, dtype)["BLOCK_M"]), b * kv, 1)
        return [*rows, (prefill, dtype, grid)]
    constexprs, _, _, splits, _ = decode_plan(
        past + 1, hd, DTYPES[dtype], "cpu", DEFAULT_SM, kv_splits or None
    )
    decode_grid = (splits, b * kv * cdiv(group, constexprs["BLOCK_H"]), 1)
    return [
        *rows,
        (f"gated_attention.split_kv_decode_hd{hd}", dtype, decode_grid),
        (f"gated_attention.split_kv_combine_hd{hd}", dtype, (b * nh, 1, 1)),
    ]


def check_case(replay, gpu_check, dtype, batch, tokens, past, pad=0, kv_splits=0, scale=None, **shapes):
    """One launch against the reference; returns the launches."""
    ins, attrs = inputs(
        gpu_check, dtype, batch, tokens, past, pad, seed=batch * 1000 + tokens + past, **shapes
    )
    launch_attrs = attrs if scale is None else {**attrs, "scale": scale}
    y, present_key, present_value, launches = run_attention(
        replay, gpu_check, ins, launch_attrs, dtype, kv_splits
    )
    kernels = [(la.kernel, la.variant, la.grid) for la in launches]
    matmuls, attention = kernels[:3] + kernels[-1:], kernels[3:-1]
    assert [k for k, _, _ in matmuls] and all(k.startswith("common.matmul_") for k, _, _ in matmuls), kernels
    assert all(v == dtype for _, v, _ in matmuls), kernels
    assert attention == expected_attention(ins, attrs, dtype, kv_splits)
    ref_y, ref_key, ref_value = gpu_check.ref_gated_attention(ins, attrs, DTYPES[dtype])
    bound = tolerance_for(dtype)["layer_rel"]
    errors = {
        "y": gpu_check.rel_error(y, ref_y),
        "present_key": gpu_check.rel_error(present_key, ref_key),
        "present_value": gpu_check.rel_error(present_value, ref_value),
    }
    assert all(e <= bound for e in errors.values()), (errors, bound)
    return launches


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize(
    ("tokens", "past"),
    [(5, 0), (5, 7), (65, 0), (65, 3), (1, 0)],
    ids=["T5", "T5-past7", "T65", "T65-past3", "T1-decode-path"],
)
def test_prefill_lengths_with_and_without_past(plugin_replay, gpu_check, dtype, tokens, past):
    check_case(plugin_replay, gpu_check, dtype, 1, tokens, past)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("kv_splits", [0, 3], ids=["auto-splits", "forced-3-splits"])
def test_decode_split_kv(plugin_replay, gpu_check, dtype, kv_splits):
    """301 keys in 64-key tiles: decode_plan cuts them into 5 splits, or 3 when asked."""
    launches = check_case(plugin_replay, gpu_check, dtype, 1, 1, 300, kv_splits=kv_splits)
    assert launches[4].grid[0] == (kv_splits or 5)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_left_padded_batch(plugin_replay, gpu_check, dtype):
    """The second sequence is padded by 6 of its 4 + 9 positions: its first two new tokens see no key at all
    (the reference averages V over every key), the rest only the real ones. Then a decode step on a sequence
    padded by 70 of 151 keys: its first split (keys 0-63) sees none of them."""
    check_case(plugin_replay, gpu_check, dtype, 2, 9, 4, pad=6)
    launches = check_case(plugin_replay, gpu_check, dtype, 2, 1, 150, pad=70)
    assert launches[4].grid[0] == 3


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize(("rotary", "tokens", "past"), [(64, 5, 3), (128, 1, 40)], ids=["rot64", "rot128"])
def test_head_dim_256_partial_rotary(plugin_replay, gpu_check, dtype, rotary, tokens, past):
    check_case(plugin_replay, gpu_check, dtype, 1, tokens, past, head_dim=256, rotary=rotary)


def test_scale_zero_means_one_over_sqrt_head_dim(plugin_replay, gpu_check):
    """The C API's scale 0 is 1/sqrt(head_dim) (the reference is given that value explicitly)."""
    check_case(plugin_replay, gpu_check, "bf16", 1, 5, 2, scale=0.0)


def test_workspace_grows_with_the_shapes_and_holds_the_decode_partials(plugin_replay, gpu_check):
    """What TensorRT reserves for the largest shapes serves every smaller one, decode included."""
    sizes = {}
    for b, t in ((1, 1), (1, 64), (2, 1), (2, 64)):
        ins, attrs = inputs(gpu_check, "fp16", b, t, 0)
        sizes[b, t] = workspace_size(
            plugin_replay, params(gpu_check, ins, (ins[0], ins[4], ins[5]), attrs, "fp16")
        )
    assert sizes[1, 1] <= sizes[1, 64] <= sizes[2, 64] and sizes[2, 1] <= sizes[2, 64]
    act, nh, kv, hd = 2, 3, 1, 64
    partials = 1 * nh * 64 * (hd + 2) * 4  # [B, nh, kMaxDecodeSplits, hd] and two [B, nh, kMaxDecodeSplits]
    assert sizes[1, 64] >= 64 * (nh * 2 * hd + 2 * kv * hd + 2 * nh * hd) * act + partials


def refused(replay, gpu_check, expected_status: int, **changes) -> str:
    ins, attrs = inputs(gpu_check, "fp16", 1, 2, 1)
    outs = (torch.empty_like(ins[0]), torch.empty(1, 1, 3, 64, dtype=torch.float16), torch.empty(1, 1, 3, 64))
    p = params(gpu_check, ins, outs, attrs, "fp16")
    ws = torch.empty(workspace_size(replay, p), dtype=torch.uint8)
    p.workspace = ws.data_ptr()
    for field, value in changes.items():
        setattr(p, field, value)
    assert replay.lib.qwenLaunchGatedAttention(ctypes.byref(p), None) == expected_status
    assert replay.count() == 0  # nothing launched, copied or set
    return replay.last_error()


def test_bad_parameters_are_refused_with_their_reason(plugin_replay, gpu_check):
    why = refused(plugin_replay, gpu_check, QWEN_STATUS_UNSUPPORTED, dtype=7)
    assert why == "qwenLaunchGatedAttention: dtype must be fp16 or bf16"
    why = refused(plugin_replay, gpu_check, QWEN_STATUS_BAD_PARAM, headDim=96)
    assert why.startswith("qwenLaunchGatedAttention: head_dim 96 is not supported")
    why = refused(plugin_replay, gpu_check, QWEN_STATUS_BAD_PARAM, headDim=512, rotaryDim=64)
    assert "head_dim 512 is over 256" in why
    why = refused(plugin_replay, gpu_check, QWEN_STATUS_BAD_PARAM, rotaryDim=15)
    assert "rotary_dim 15 must be even" in why
    why = refused(plugin_replay, gpu_check, QWEN_STATUS_BAD_PARAM, numKvHeads=2)
    assert "multiple of num_kv_heads" in why
    assert refused(plugin_replay, gpu_check, QWEN_STATUS_BAD_PARAM, kNorm=None).endswith("null kNorm")
    why = refused(plugin_replay, gpu_check, QWEN_STATUS_BAD_PARAM, pastKey=None)
    assert why.endswith("null pastKey or pastValue with past > 0")
    why = refused(plugin_replay, gpu_check, QWEN_STATUS_UNSUPPORTED, past=2**31 // 64)
    assert "must fit int32" in why
    assert "kvSplits" in refused(plugin_replay, gpu_check, QWEN_STATUS_BAD_PARAM, kvSplits=-1)


def test_no_new_tokens_copies_the_past_only(plugin_replay, gpu_check):
    """T = 0 (not a TensorRT shape, but a valid call): present is the past, nothing is launched."""
    ins, attrs = inputs(gpu_check, "bf16", 2, 0, 5)
    present = [Guarded(torch.full((2, 1, 5, 64), float("nan")), torch.bfloat16) for _ in range(2)]
    p = params(gpu_check, ins, (ins[0], present[0].tensor, present[1].tensor), attrs, "bf16")
    assert plugin_replay.lib.qwenLaunchGatedAttention(ctypes.byref(p), None) == 0, plugin_replay.last_error()
    assert plugin_replay.replay([*ins, *(g.buffer for g in present)]) == []
    assert not guard_problems(present_key=present[0], present_value=present[1])
    assert torch.equal(present[0].tensor, ins[4]) and torch.equal(present[1].tensor, ins[5])
