"""Kernel tier, C++ side: the plugin library's MoE launcher (plugins/moe/moe_launch.cpp) driven through its
plain-C entry point with CPU buffers, its launches recorded by the recording CUDA driver and replayed under
Triton's interpreter (plugins/launch_replay.py), against scripts/gpu_check.py's ref_moe (near-tie tokens
excluded). Every input, the output (NaN-initialised) and the workspace (filled with NaN bits) are Guarded.

Which kernels run, their variants and grids are checked against the Python launchers' choices
(grouped_gemm_triton / align_triton / combine_triton), computed here from the same KernelSpecs. Small
widths (H 64, I 32, Is 48) keep the interpreter cheap; 512 experts keep the routing realistic."""

from __future__ import annotations

import ctypes

import pytest
import torch
from plugin_library import DTYPES, QWEN_STATUS_BAD_PARAM, QWEN_STATUS_UNSUPPORTED, cdiv, config

from qwen_export.plugins.moe.align_triton import sorted_length
from qwen_export.plugins.moe.grouped_gemm_triton import DECODE_MAX_PAIRS, SMALL_BLOCK_ROWS
from qwen_export.plugins.triton_support import Guarded, guard_problems
from qwen_export.tolerances import tolerance_for

SEGMENT_TOKENS = 4096  # moe_workspace.h kSegmentTokens
SHAPES = dict(hidden=64, experts=512, inter=32, shared_inter=48)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def inputs(gpu_check, dtype: str, tokens: int, top_k: int, normalize: int, seed: int, **shapes):
    s = {**SHAPES, **shapes, "top_k": top_k}
    gen = torch.Generator().manual_seed(seed)
    ins, attrs, _ = gpu_check.moe_inputs(s, tokens, DTYPES[dtype], "cpu", gen)
    return ins, {**attrs, "normalize": normalize}


def params(gpu_check, ins, outs, attrs, dtype: str, force_tiled: int = 0):
    x, gate_up, shared_gate = ins[0], ins[2], ins[4]
    sizes = dict(
        tokens=x.shape[0],
        hidden=x.shape[1],
        experts=gate_up.shape[0],
        inter=gate_up.shape[2] // 2,
        sharedInter=shared_gate.shape[1],
    )
    return gpu_check.make_params("MoE", ins, outs, sizes, attrs, dtype, forceTiled=force_tiled)


def workspace_size(replay, p) -> int:
    replay.lib.qwenMoEWorkspaceSize.restype = ctypes.c_int64
    return int(replay.lib.qwenMoEWorkspaceSize(ctypes.byref(p)))


def run_moe(replay, gpu_check, ins, attrs, dtype: str, force_tiled: int = 0):
    """qwenLaunchMoE on guarded copies of `ins`, replayed: (y, launches)."""
    guarded = [Guarded(t) for t in ins]
    tensors = [g.tensor for g in guarded]
    y = Guarded(torch.full(tuple(ins[0].shape), float("nan")), DTYPES[dtype])
    p = params(gpu_check, tensors, (y.tensor,), attrs, dtype, force_tiled)
    size = workspace_size(replay, p)
    assert size > 0 and size % 256 == 0
    ws = Guarded(torch.full((size // 4,), -1, dtype=torch.int32))  # NaN bits in fp16, bf16 and fp32
    p.workspace = ws.tensor.data_ptr()
    status = replay.lib.qwenLaunchMoE(ctypes.byref(p), None)
    assert status == 0, f"qwenLaunchMoE returned {status}: {replay.last_error()}"
    launches = replay.replay([*(g.buffer for g in guarded), y.buffer, ws.buffer])
    names = ("x", "router", "gate_up", "down", "shared_gate", "shared_up", "shared_down", "seg")
    assert not guard_problems(**dict(zip(names, guarded, strict=True)), y=y, workspace=ws)
    return y.tensor, launches


def expected_launches(dtype: str, tokens: int, top_k: int, experts: int, force_tiled: int = 0) -> list:
    """(kernel, variant, grid) of every launch, as the Python launchers choose them for each segment."""
    hidden, inter, shared_inter = SHAPES["hidden"], SHAPES["inter"], SHAPES["shared_inter"]
    shared = f"{dtype}_shared"
    out = []

    def launch(kernel: str, variant: str, grid: tuple[int, ...]) -> None:
        out.append((kernel, variant, (*grid, *(1,) * (3 - len(grid)))))

    for start in range(0, tokens, SEGMENT_TOKENS):
        T = min(SEGMENT_TOKENS, tokens - start)
        pairs = T * top_k
        a16 = "_a16" if experts % 16 == 0 else ""  # N = E (the other widths are multiples of 16)
        matmul = f"common.matmul_decode{a16}"
        if T > config(matmul, f"{dtype}_f32out")["BLOCK_M"]:
            matmul = f"common.matmul_prefill{a16}"
        c = config(matmul, f"{dtype}_f32out")
        launch(matmul, f"{dtype}_f32out", (cdiv(T, c["BLOCK_M"]) * cdiv(experts, c["BLOCK_N"]),))
        launch("moe.router_topk", "fp32", (cdiv(T, config("moe.router_topk", "fp32")["BLOCK_T"]),))
        if not force_tiled and pairs <= DECODE_MAX_PAIRS:
            for kernel, variant, n, rows in (
                ("moe.gate_up_swiglu_decode_kn", dtype, inter, pairs),
                ("moe.down_decode_kn", dtype, hidden, pairs),
                ("moe.gate_up_swiglu_decode_kn", shared, shared_inter, T),
                ("moe.down_decode_kn", shared, hidden, T),
            ):
                launch(kernel, variant, (cdiv(n, config(kernel, variant)["BLOCK_N"]), rows))
        else:
            routed = dtype + ("_m16" if pairs / min(experts, pairs) < SMALL_BLOCK_ROWS else "")
            block_m = config("moe.gate_up_swiglu_kn", routed)["BLOCK_M"]
            n_sorted = sorted_length(pairs, experts, block_m)
            blocks = n_sorted // block_m
            count, scatter = config("moe.align_count", "i32"), config("moe.align_scatter", "i32")
            launch("moe.align_count", "i32", (cdiv(n_sorted, count["CHUNK"]),))
            launch("moe.align_scan", "i32", (1,))
            launch(
                "moe.align_scatter",
                "i32",
                (max(cdiv(pairs, scatter["CHUNK"]), cdiv(blocks, scatter["BLOCK_B"])),),
            )
            for kernel, variant, n, rows in (
                ("moe.gate_up_swiglu_kn", routed, inter, None),
                ("moe.down_kn", routed, hidden, None),
                ("moe.gate_up_swiglu_kn", shared, shared_inter, T),
                ("moe.down_kn", shared, hidden, T),
            ):
                c = config(kernel, variant)
                row_blocks = blocks if rows is None else cdiv(rows, c["BLOCK_M"])
                launch(kernel, variant, (row_blocks * cdiv(n, c["BLOCK_N"]),))
        c = config("moe.combine", dtype)
        span = c["BLOCK_H"] if T <= c["BLOCK_T"] else cdiv(hidden, c["BLOCK_H"]) * c["BLOCK_H"]
        launch("moe.combine", dtype, (cdiv(T, c["BLOCK_T"]), cdiv(hidden, span)))
    return out


def check(gpu_check, y, ins, attrs, dtype: str, bound: float | None = None) -> float:
    reference, near_tie = gpu_check.ref_moe(ins, attrs, DTYPES[dtype])
    assert near_tie.float().mean() < 0.1  # the comparison covers most tokens
    error = gpu_check.rel_error(y, reference, near_tie)
    assert error <= (bound or tolerance_for(dtype)["layer_rel"]), error
    return error


@pytest.mark.parametrize(
    ("dtype", "top_k", "tokens", "normalize"),
    [
        ("fp16", 10, 200, 1),  # grouped, BLOCK_M 16 tiles (4 rows per active expert)
        ("bf16", 10, 200, 0),
        ("fp16", 1, 200, 0),
        ("bf16", 1, 200, 1),
        ("fp16", 10, 1, 0),  # decode GEMVs
        ("bf16", 10, 1, 1),
        ("fp16", 1, 1, 1),
        ("bf16", 1, 1, 0),
    ],
)
def test_moe_launcher(plugin_replay, gpu_check, dtype, top_k, tokens, normalize):
    ins, attrs = inputs(gpu_check, dtype, tokens, top_k, normalize, seed=tokens * 100 + top_k + normalize)
    y, launches = run_moe(plugin_replay, gpu_check, ins, attrs, dtype)
    got = [(la.kernel, la.variant, la.grid) for la in launches]
    assert got == expected_launches(dtype, tokens, top_k, SHAPES["experts"])
    check(gpu_check, y, ins, attrs, dtype)


@pytest.mark.parametrize(("dtype", "tokens"), [("fp16", 1), ("bf16", 6)])
def test_force_tiled_agrees_with_the_decode_path(plugin_replay, gpu_check, dtype, tokens):
    """forceTiled = 1 sends a handful of tokens (the decode path's) through align and the grouped GEMMs
    (one padded block per active expert); both outputs match the reference and each other."""
    ins, attrs = inputs(gpu_check, dtype, tokens, 10, 1, seed=7 + tokens)
    assert tokens * 10 <= DECODE_MAX_PAIRS
    outputs = {}
    for tiled in (0, 1):
        outputs[tiled], launches = run_moe(plugin_replay, gpu_check, ins, attrs, dtype, force_tiled=tiled)
        got = [(la.kernel, la.variant, la.grid) for la in launches]
        assert got == expected_launches(dtype, tokens, 10, SHAPES["experts"], force_tiled=tiled)
        assert any(k == "moe.align_scan" for k, _, _ in got) == bool(tiled)
        check(gpu_check, outputs[tiled], ins, attrs, dtype)
    assert gpu_check.rel_error(outputs[1], outputs[0]) <= tolerance_for(dtype)["layer_rel"]


def test_decode_path_up_to_its_pair_limit(plugin_replay, gpu_check):
    """DECODE_MAX_PAIRS token-expert pairs take the GEMVs, one more the grouped path."""
    for tokens in (DECODE_MAX_PAIRS, DECODE_MAX_PAIRS + 1):
        ins, attrs = inputs(gpu_check, "fp16", tokens, 1, 1, seed=tokens)
        y, launches = run_moe(plugin_replay, gpu_check, ins, attrs, "fp16")
        kernels = [la.kernel for la in launches]
        assert ("moe.gate_up_swiglu_decode_kn" in kernels) == (tokens <= DECODE_MAX_PAIRS)
        assert [(la.kernel, la.variant, la.grid) for la in launches] == expected_launches(
            "fp16", tokens, 1, SHAPES["experts"]
        )
        check(gpu_check, y, ins, attrs, "fp16")


def test_few_experts_take_the_wide_tiles(plugin_replay, gpu_check):
    """8 experts top-2 over 100 tokens: 25 rows per expert, the BLOCK_M 64 tiles (partly filled blocks)."""
    ins, attrs = inputs(gpu_check, "bf16", 100, 2, 1, seed=11, experts=8)
    y, launches = run_moe(plugin_replay, gpu_check, ins, attrs, "bf16")
    assert [(la.kernel, la.variant, la.grid) for la in launches] == expected_launches("bf16", 100, 2, 8)
    assert ("moe.gate_up_swiglu_kn", "bf16") in [(la.kernel, la.variant) for la in launches]
    check(gpu_check, y, ins, attrs, "bf16")


def test_segments_bound_the_workspace(plugin_replay, gpu_check):
    """4136 tokens run as a 4096-token segment (grouped) and a 40-token one (40 pairs: the decode path),
    in a workspace sized for one segment."""
    tokens = SEGMENT_TOKENS + 40
    ins, attrs = inputs(gpu_check, "fp16", tokens, 1, 1, seed=13, experts=8)
    sizes = {}
    for n in (SEGMENT_TOKENS - 100, SEGMENT_TOKENS, tokens, 4 * SEGMENT_TOKENS):
        x = torch.zeros(n, SHAPES["hidden"], dtype=torch.float16)
        sizes[n] = workspace_size(plugin_replay, params(gpu_check, [x, *ins[1:]], (x,), attrs, "fp16"))
    assert sizes[SEGMENT_TOKENS - 100] < sizes[SEGMENT_TOKENS] == sizes[tokens] == sizes[4 * SEGMENT_TOKENS]
    y, launches = run_moe(plugin_replay, gpu_check, ins, attrs, "fp16")
    expected = expected_launches("fp16", tokens, 1, 8)
    assert [(la.kernel, la.variant, la.grid) for la in launches] == expected
    assert [la.kernel for la in launches].count("moe.combine") == 2
    check(gpu_check, y, ins, attrs, "fp16")


def refused(replay, gpu_check, change, **knobs):
    ins, attrs = inputs(gpu_check, "fp16", 3, 2, 1, seed=1, experts=8)
    y = torch.empty_like(ins[0])
    ws = torch.empty(1 << 20, dtype=torch.uint8)
    p = params(gpu_check, ins, (y,), attrs, "fp16", **knobs)
    p.workspace = ws.data_ptr()
    change(p)
    status = replay.lib.qwenLaunchMoE(ctypes.byref(p), None)
    assert replay.count() == 0  # nothing launched
    return status, replay.last_error()


@pytest.mark.parametrize(
    ("field", "value", "status", "message"),
    [
        ("dtype", 7, QWEN_STATUS_UNSUPPORTED, "qwenLaunchMoE: dtype must be fp16 or bf16"),
        ("topK", 9, QWEN_STATUS_BAD_PARAM, "qwenLaunchMoE: topK must be within 1..min(experts, 32)"),
        ("topK", 0, QWEN_STATUS_BAD_PARAM, "qwenLaunchMoE: topK must be within 1..min(experts, 32)"),
        ("normalize", 2, QWEN_STATUS_BAD_PARAM, "qwenLaunchMoE: normalize must be 0 or 1"),
        ("experts", 5000, QWEN_STATUS_BAD_PARAM, "qwenLaunchMoE: experts above 4096"),
        (
            "inter",
            24,
            QWEN_STATUS_BAD_PARAM,
            "qwenLaunchMoE: hidden, inter and sharedInter must be multiples of 16",
        ),
        ("workspace", None, QWEN_STATUS_BAD_PARAM, "qwenLaunchMoE: null tensor or workspace pointer"),
        ("hidden", -64, QWEN_STATUS_BAD_PARAM, "qwenLaunchMoE: tokens must be >= 0 and hidden, experts, "),
    ],
)
def test_bad_params_are_refused_with_their_reason(plugin_replay, gpu_check, field, value, status, message):
    got, why = refused(plugin_replay, gpu_check, lambda p: setattr(p, field, value))
    assert got == status
    assert why.startswith(message), why


def test_misaligned_tensors_are_refused(plugin_replay, gpu_check):
    got, why = refused(plugin_replay, gpu_check, lambda p: setattr(p, "y", p.y + 2))
    assert got == QWEN_STATUS_BAD_PARAM
    assert why == "qwenLaunchMoE: tensors and the workspace must be 16-byte aligned"


def test_no_tokens_launch_nothing(plugin_replay, gpu_check):
    got, why = refused(plugin_replay, gpu_check, lambda p: setattr(p, "tokens", 0))
    assert got == 0
