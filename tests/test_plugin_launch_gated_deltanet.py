"""Kernel tier, C++ side: qwenLaunchGatedDeltaNet (plugins/gated_deltanet/gated_deltanet_launch.cpp) driven
with CPU buffers, its launches (projections, conv with the activation-typed state, the recurrent or chunked
delta rule, the gated norm, out_proj) recorded and replayed under Triton's interpreter, against
scripts/gpu_check.py's token-by-token reference: prefill lengths around the 64-token chunk from zero and
from carried state, one prefill split in two launches, the two rule kernels forced on one input, states
updated in place, a left-padded batch, T = 0, batch segments past the grid's y limit (recorded launches
only), and the refusals. Head dims are 128, what the kernels are compiled for."""

from __future__ import annotations

import ctypes

import pytest
import torch
from plugin_library import DTYPES, QWEN_STATUS_BAD_PARAM, QWEN_STATUS_UNSUPPORTED, cdiv, config

from qwen_export.plugins.launch_replay import LAUNCH
from qwen_export.plugins.triton_support import Guarded, guard_problems
from qwen_export.tolerances import tolerance_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SHAPES = dict(hidden=64, k_heads=1, v_heads=2, kdim=128, vdim=128, conv=4)
CHANNELS = 2 * SHAPES["k_heads"] * SHAPES["kdim"] + SHAPES["v_heads"] * SHAPES["vdim"]
CONV = "gated_deltanet.causal_conv_act_state"
RULES = {1: "gated_deltanet.recurrent_delta_rule", 2: "gated_deltanet.chunk_delta_rule"}
OUTPUTS = ("Y", "present_conv", "present_recurrent")


def make_inputs(gpu_check, dtype, batch, tokens, *, seed, zero_state=False, pad=0):
    """(inputs in the op's order, attributes), from gpu_check.deltanet_inputs."""
    gen = torch.Generator().manual_seed(seed)
    ins, attrs = gpu_check.deltanet_inputs(SHAPES, batch, tokens, DTYPES[dtype], "cpu", pad, gen)
    if zero_state:
        ins[2].zero_()
        ins[3].zero_()
    return ins, attrs


def launch(replay, gpu_check, ins, attrs, dtype, *, mode=0, in_place=False):
    """(launches, [Y, present_conv, present_recurrent], guard problems) of one qwenLaunchGatedDeltaNet on
    guarded copies of `ins`, outputs NaN-initialised (or, in place, the past states themselves)."""
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
    batch, tokens, hidden = ins[0].shape
    sizes = dict(batch=batch, tokens=tokens, maskLen=ins[1].shape[1], hidden=hidden)
    p = gpu_check.make_params(
        "GatedDeltaNet", args, [o.tensor for o in outs], sizes, attrs, dtype, ruleMode=mode
    )
    size = replay.lib.qwenGatedDeltaNetWorkspaceSize(ctypes.byref(p))
    ws = Guarded(torch.zeros(max(cdiv(size, 4), 1), dtype=torch.float32))  # fp32 words: NaN guards
    p.workspace = ws.tensor.data_ptr()
    status = replay.lib.qwenLaunchGatedDeltaNet(ctypes.byref(p), None)
    assert status == 0, replay.last_error()
    launches = replay.replay([g.buffer for g in (*guarded, *outs, ws)])
    named = dict(zip("x mask past_conv past_rec".split(), guarded, strict=False))
    problems = guard_problems(**named, y=outs[0], conv=outs[1], rec=outs[2], workspace=ws)
    return launches, [o.tensor for o in outs], problems


def errors(gpu_check, outs, reference) -> dict[str, float]:
    return {name: gpu_check.rel_error(o, r) for name, o, r in zip(OUTPUTS, outs, reference, strict=True)}


def assert_close(gpu_check, outs, reference, dtype):
    bound = tolerance_for(dtype)["layer_rel"]
    found = errors(gpu_check, outs, reference)
    assert max(found.values()) <= bound, found


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("zero_state", [True, False], ids=["zero_state", "carried_state"])
@pytest.mark.parametrize("tokens", [1, 63, 64, 65, 130])
def test_prefill_and_decode_match_the_reference(plugin_replay, gpu_check, dtype, tokens, zero_state):
    seed = tokens * 10 + zero_state
    ins, attrs = make_inputs(gpu_check, dtype, 1, tokens, seed=seed, zero_state=zero_state)
    launches, outs, problems = launch(plugin_replay, gpu_check, ins, attrs, dtype)
    assert not problems
    rule = RULES[1] if tokens <= 16 else RULES[2]
    conv_variant = dtype + ("_decode" if tokens == 1 else "")
    kernels = [la.kernel for la in launches]
    assert all(k.startswith("common.matmul_") for k in kernels[:4])  # qkv, z, b, a
    assert kernels[4:6] == [CONV, rule]
    assert kernels[6].startswith("gated_rms_norm.") and kernels[7].startswith("common.matmul_")
    assert len(kernels) == 8
    # grids from the cubins' own block sizes: (channel blocks, batch), (state column blocks, batch x nv)
    conv, rule_launch = launches[4], launches[5]
    assert conv.variant == conv_variant and rule_launch.variant == dtype
    assert conv.grid == (cdiv(CHANNELS, config(CONV, conv_variant)["BLOCK_C"]), 1, 1)
    assert rule_launch.grid == (SHAPES["vdim"] // config(rule, dtype)["BV"], SHAPES["v_heads"], 1)
    assert_close(gpu_check, outs, gpu_check.ref_gated_deltanet(ins, attrs, DTYPES[dtype]), dtype)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_a_prefill_split_in_two_launches_matches_one_launch(plugin_replay, gpu_check, dtype):
    """130 tokens as 65 + 65, the second launch from the first's present states, against one launch (and
    the reference): the states carry everything."""
    ins, attrs = make_inputs(gpu_check, dtype, 1, 130, seed=7)
    _, whole, problems = launch(plugin_replay, gpu_check, ins, attrs, dtype)
    assert not problems
    first = [ins[0][:, :65].contiguous(), ins[1][:, : 3 + 65].contiguous(), *ins[2:]]
    _, head, problems = launch(plugin_replay, gpu_check, first, attrs, dtype)
    assert not problems
    second = [ins[0][:, 65:].contiguous(), ins[1], head[1], head[2], *ins[4:]]
    _, tail, problems = launch(plugin_replay, gpu_check, second, attrs, dtype)
    assert not problems
    split = [torch.cat([head[0], tail[0]], 1), tail[1], tail[2]]
    bound = tolerance_for(dtype)["layer_rel"]
    # The conv state is the last K-1 projected inputs: within one unit in the last place of the activation
    # dtype. (Under the interpreter tl.dot is NumPy's matmul, whose BLAS may round a row differently at
    # another row position in its tile: seen on an AVX2 CPU, one bf16 element of 1536 one ulp apart.)
    eps = torch.finfo(DTYPES[dtype]).eps
    torch.testing.assert_close(split[1].float(), whole[1].float(), rtol=eps, atol=0)
    assert max(errors(gpu_check, split, whole).values()) <= bound
    assert_close(gpu_check, split, gpu_check.ref_gated_deltanet(ins, attrs, DTYPES[dtype]), dtype)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("tokens", [3, 20])
def test_both_rule_kernels_agree_on_one_input(plugin_replay, gpu_check, dtype, tokens):
    ins, attrs = make_inputs(gpu_check, dtype, 1, tokens, seed=100 + tokens)
    reference = gpu_check.ref_gated_deltanet(ins, attrs, DTYPES[dtype])
    results = {}
    for mode in (1, 2):
        launches, results[mode], problems = launch(plugin_replay, gpu_check, ins, attrs, dtype, mode=mode)
        assert not problems
        assert [la.kernel for la in launches][5] == RULES[mode]
        assert_close(gpu_check, results[mode], reference, dtype)
    assert torch.equal(results[1][1], results[2][1])  # same conv, same state
    assert max(errors(gpu_check, results[1], results[2]).values()) <= tolerance_for(dtype)["layer_rel"]


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_states_in_place_and_a_left_padded_batch(plugin_replay, gpu_check, dtype):
    pad = 9
    ins, attrs = make_inputs(gpu_check, dtype, 2, 65, seed=11, pad=pad)
    _, outs, problems = launch(plugin_replay, gpu_check, ins, attrs, dtype, in_place=True)
    assert not problems
    assert_close(gpu_check, outs, gpu_check.ref_gated_deltanet(ins, attrs, DTYPES[dtype]), dtype)
    assert not outs[0][-1, :pad].any()  # padding tokens output 0
    ins, attrs = make_inputs(gpu_check, dtype, 2, 1, seed=12)  # decode, states in place
    _, outs, problems = launch(plugin_replay, gpu_check, ins, attrs, dtype, in_place=True)
    assert not problems
    assert_close(gpu_check, outs, gpu_check.ref_gated_deltanet(ins, attrs, DTYPES[dtype]), dtype)


@pytest.mark.parametrize("in_place", [False, True])
def test_no_new_tokens_carries_the_states(plugin_replay, gpu_check, in_place):
    ins, attrs = make_inputs(gpu_check, "fp16", 2, 0, seed=3)
    launches, outs, problems = launch(plugin_replay, gpu_check, ins, attrs, "fp16", in_place=in_place)
    assert not problems and launches == []
    assert torch.equal(outs[1], ins[2]) and torch.equal(outs[2], ins[3])


def test_batch_segments_past_the_grid_limit(plugin_replay, gpu_check):
    """batch x nv programs along grid y may pass 65535: the conv and the rule run over batch segments (a
    multiple of 8 rows each, so the pointers stay 16-byte aligned). Recorded launches only (the launcher
    reads no buffer; the sizes are too large to replay)."""
    batch, nv, c = 70_000, SHAPES["v_heads"], CHANNELS
    ins, attrs = make_inputs(gpu_check, "fp16", 1, 1, seed=5)
    sizes = dict(batch=batch, tokens=1, maskLen=ins[1].shape[1], hidden=SHAPES["hidden"])
    p = gpu_check.make_params("GatedDeltaNet", ins, [ins[0], ins[2], ins[3]], sizes, attrs, "fp16")
    workspace = 1 << 40  # never dereferenced
    p.workspace = workspace
    plugin_replay.reset()
    assert plugin_replay.lib.qwenLaunchGatedDeltaNet(ctypes.byref(p), None) == 0, plugin_replay.last_error()
    records = [r for r in plugin_replay.records() if r.kind == LAUNCH]
    plugin_replay.reset()
    named = [(plugin_replay.images[r.cubin][0], r) for r in records]
    conv = [r for k, r in named if k == CONV]
    rule = [r for k, r in named if k == RULES[1]]
    conv_rows = 65535 // 8 * 8
    assert [r.grid[1] for r in conv] == [conv_rows, batch - conv_rows]
    rule_rows = 65535 // nv // 8 * 8
    assert [r.grid[1] for r in rule] == [rule_rows * nv, rule_rows * nv, (batch - 2 * rule_rows) * nv]
    # each segment starts at its first row: mask (argument 2) and the past conv/recurrent states (3)
    mask_row, conv_row, state_row = ins[1].shape[1] * 4, c * 3 * 2, nv * 128 * 128 * 4
    assert conv[1].params[2] - conv[0].params[2] == conv_rows * mask_row
    assert conv[1].params[3] - conv[0].params[3] == conv_rows * conv_row
    assert rule[2].params[6] - rule[1].params[6] == rule_rows * state_row
    assert rule[2].params[1] - rule[1].params[1] == rule_rows * nv * 2  # a: [B, T=1, nv] fp16
    pointers = [(r, 6) for r in conv] + [(r, 9) for r in rule]  # the leading pointer arguments
    assert all(r.params[i] % 16 == 0 for r, n in pointers for i in range(n))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("headKDim", 64, "must be 128, the head dims the delta-rule kernels are compiled for"),
        ("convKernel", 5, "conv_kernel 5 is not supported"),
        ("convKernel", 0, "conv_kernel 0 is not supported"),
        ("numVHeads", 3, "num_v_heads (3) must be a positive multiple of num_k_heads (2)"),
        ("dtype", 7, "dtype must be fp16 or bf16"),
    ],
)
def test_unsupported_layers_are_refused_with_the_field_named(plugin_replay, gpu_check, field, value, message):
    p = refusal_params(gpu_check, numKHeads=2) if field == "numVHeads" else refusal_params(gpu_check)
    setattr(p, field, value)
    assert plugin_replay.lib.qwenLaunchGatedDeltaNet(ctypes.byref(p), None) == QWEN_STATUS_UNSUPPORTED
    assert message in plugin_replay.last_error()
    assert plugin_replay.count() == 0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("x", None, "x is null"),
        ("workspace", None, "workspace is null"),
        ("mask", 4, "mask is not 16-byte aligned"),
        ("maskLen", 1, "maskLen >= tokens"),
        ("ruleMode", 3, "ruleMode must be 0, 1 or 2"),
        ("batch", 1 << 31, "must fit int32"),
    ],
)
def test_bad_parameters_are_refused_before_any_launch(plugin_replay, gpu_check, field, value, message):
    p = refusal_params(gpu_check)
    if field == "mask":  # an address off the 16-byte alignment the kernels are compiled for
        value += p.mask
    setattr(p, field, value)
    assert plugin_replay.lib.qwenLaunchGatedDeltaNet(ctypes.byref(p), None) == QWEN_STATUS_BAD_PARAM
    assert message in plugin_replay.last_error()
    assert plugin_replay.count() == 0


def refusal_params(gpu_check, **overrides):
    """A valid 2-token fp16 launch's params (the workspace a stand-in: a refused launch reads nothing)."""
    ins, attrs = gpu_check.deltanet_inputs(SHAPES, 1, 2, torch.float16, "cpu", 0, None)
    dims = dict(batch=1, tokens=2, maskLen=5, hidden=SHAPES["hidden"])
    p = gpu_check.make_params("GatedDeltaNet", ins, ins[:1] + ins[2:4], dims, attrs, "fp16")
    p.workspace = 1 << 40
    for name, value in overrides.items():
        setattr(p, name, value)
    refusal_params.keep = ins  # the pointers stay valid for the test's duration
    return p


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
    # qkv, z, b, a, conv output, rule output, normed: activation-typed, 256-byte aligned slices
    rows, nv_dv = 2 * 64, SHAPES["v_heads"] * SHAPES["vdim"]
    widths = (CHANNELS, nv_dv, SHAPES["v_heads"], SHAPES["v_heads"], CHANNELS, nv_dv, nv_dv)
    assert sizes[2] == sum(cdiv(rows * w * 2, 256) * 256 for w in widths)
