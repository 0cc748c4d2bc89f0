"""Kernel tier, C++ side: qwenLaunchGatedDeltaNet (plugins/gated_deltanet/gated_deltanet_launch.cpp) driven
with CPU buffers, its launches (projections, conv with the activation-typed state, the recurrent or chunked
delta rule, the gated norm, out_proj) recorded and replayed under Triton's interpreter, against
scripts/gpu_check.py's token-by-token reference: prefill lengths around the 64-token chunk from zero and
from carried state, the two rule kernels forced on one input, states updated in place, a left-padded batch,
and the refusals. Head dims are 128, what the kernels are compiled for."""

from __future__ import annotations

import ctypes

import pytest
import torch
from plugin_library import DTYPES, QWEN_STATUS_UNSUPPORTED

from qwen_export.plugins.triton_support import Guarded, guard_problems
from qwen_export.tolerances import tolerance_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SHAPES = dict(hidden=64, k_heads=1, v_heads=2, kdim=128, vdim=128, conv=4)
RULES = {1: "gated_deltanet.recurrent_delta_rule", 2: "gated_deltanet.chunk_delta_rule"}


def run_case(replay, gpu_check, dtype, batch, tokens, *, zero_state=False, pad=0, mode=0, in_place=False):
    """(launches, outputs, reference, guards problems) of one launch."""
    gen = torch.Generator().manual_seed(batch * 1000 + tokens * 10 + mode + pad)
    ins, attrs = gpu_check.deltanet_inputs(SHAPES, batch, tokens, DTYPES[dtype], "cpu", pad, gen)
    if zero_state:
        ins[2].zero_()
        ins[3].zero_()
    reference = gpu_check.ref_gated_deltanet(ins, attrs, DTYPES[dtype])
    guarded = [Guarded(t) for t in ins]
    outs = [
        Guarded(torch.full(ins[0].shape, float("nan")), DTYPES[dtype]),
        Guarded(ins[2].clone())
        if in_place
        else Guarded(torch.full(ins[2].shape, float("nan")), DTYPES[dtype]),
        Guarded(ins[3].clone()) if in_place else Guarded(torch.full(ins[3].shape, float("nan"))),
    ]
    args = [g.tensor for g in guarded]
    if in_place:  # present over past, as TensorRT's aliased plugin I/O runs it
        args[2], args[3] = outs[1].tensor, outs[2].tensor
    sizes = dict(batch=batch, tokens=tokens, maskLen=ins[1].shape[1], hidden=SHAPES["hidden"])
    p = gpu_check.make_params(
        "GatedDeltaNet", args, [o.tensor for o in outs], sizes, attrs, dtype, ruleMode=mode
    )
    size = replay.lib.qwenGatedDeltaNetWorkspaceSize(ctypes.byref(p))
    ws = Guarded(torch.zeros(-(-size // 4), dtype=torch.float32))  # fp32 words: NaN guards around it
    p.workspace = ws.tensor.data_ptr()
    status = replay.lib.qwenLaunchGatedDeltaNet(ctypes.byref(p), None)
    assert status == 0, replay.last_error()
    launches = replay.replay([g.buffer for g in (*guarded, *outs, ws)])
    named = dict(zip("x mask past_conv past_rec".split(), guarded, strict=False))
    problems = guard_problems(**named, y=outs[0], conv=outs[1], rec=outs[2], workspace=ws)
    return launches, [o.tensor for o in outs], reference, problems


def assert_close(gpu_check, outs, reference, dtype):
    bound = tolerance_for(dtype)["layer_rel"]
    for name, ours, ref in zip(("Y", "present_conv", "present_recurrent"), outs, reference, strict=True):
        assert gpu_check.rel_error(ours, ref) <= bound, (name, gpu_check.rel_error(ours, ref))


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize(
    ("tokens", "zero_state"), [(1, False), (63, True), (64, False), (65, True), (130, False)]
)
def test_prefill_and_decode_match_the_reference(plugin_replay, gpu_check, dtype, tokens, zero_state):
    launches, outs, reference, problems = run_case(
        plugin_replay, gpu_check, dtype, 1, tokens, zero_state=zero_state
    )
    assert not problems
    kernels = [la.kernel for la in launches]
    rule = RULES[1] if tokens <= 16 else RULES[2]
    conv = "gated_deltanet.causal_conv_act_state"
    assert [k for k in kernels if k.startswith("gated_deltanet.")] == [conv, rule]
    assert all(k.startswith("common.matmul_") for k in kernels[:4])  # qkv, z, b, a
    assert kernels[-2].startswith("gated_rms_norm.") and kernels[-1].startswith("common.matmul_")
    variants = {la.kernel: la.variant for la in launches}
    assert variants[conv] == dtype + ("_decode" if tokens == 1 else "")
    assert_close(gpu_check, outs, reference, dtype)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_both_rule_kernels_agree_with_the_reference_on_one_input(plugin_replay, gpu_check, dtype):
    for mode, tokens in ((1, 20), (2, 20), (2, 3)):
        launches, outs, reference, problems = run_case(plugin_replay, gpu_check, dtype, 1, tokens, mode=mode)
        assert not problems
        assert RULES[mode] in [la.kernel for la in launches]
        assert_close(gpu_check, outs, reference, dtype)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_states_in_place_and_a_left_padded_batch(plugin_replay, gpu_check, dtype):
    _, outs, reference, problems = run_case(plugin_replay, gpu_check, dtype, 2, 65, pad=9, in_place=True)
    assert not problems
    assert_close(gpu_check, outs, reference, dtype)
    _, outs, reference, problems = run_case(plugin_replay, gpu_check, dtype, 2, 1, in_place=True)
    assert not problems
    assert_close(gpu_check, outs, reference, dtype)


def test_workspace_grows_with_batch_x_tokens_only(plugin_replay, gpu_check):
    sizes = []
    for batch, tokens, mode in ((1, 1, 0), (1, 1, 2), (2, 64, 0), (1, 128, 1)):
        ins, attrs = gpu_check.deltanet_inputs(SHAPES, batch, tokens, torch.float16, "cpu", 0, None)
        dims = dict(batch=batch, tokens=tokens, maskLen=tokens + 3, hidden=SHAPES["hidden"])
        p = gpu_check.make_params(
            "GatedDeltaNet", ins, ins[:1] + ins[2:4], dims, attrs, "fp16", ruleMode=mode
        )
        sizes.append(plugin_replay.lib.qwenGatedDeltaNetWorkspaceSize(ctypes.byref(p)))
    assert sizes[0] == sizes[1] and sizes[2] == sizes[3] > sizes[0]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("headKDim", 64, "must be 128, the head dims the delta-rule kernels are compiled for"),
        ("convKernel", 5, "conv_kernel 5 is not supported"),
        ("dtype", 7, "dtype must be fp16 or bf16"),
    ],
)
def test_unsupported_layers_are_refused_with_the_field_named(plugin_replay, gpu_check, field, value, message):
    ins, attrs = gpu_check.deltanet_inputs(SHAPES, 1, 2, torch.float16, "cpu", 0, None)
    dims = dict(batch=1, tokens=2, maskLen=5, hidden=SHAPES["hidden"])
    p = gpu_check.make_params("GatedDeltaNet", ins, ins[:1] + ins[2:4], dims, attrs, "fp16")
    setattr(p, field, value)
    assert plugin_replay.lib.qwenLaunchGatedDeltaNet(ctypes.byref(p), None) == QWEN_STATUS_UNSUPPORTED
    assert message in plugin_replay.last_error()
    assert plugin_replay.count() == 0
