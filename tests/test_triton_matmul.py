"""The projections' dense GEMM (plugins/common/matmul_triton.py) under Triton's interpreter, against torch's
fp32 matmul of the same (rounded) operands: fp32 within 1e-4 absolute, fp16/bf16 within tolerances.py's
`layer_rel` (`compare`), fp32 outputs of half inputs within fp32's bound too (the same fp32 products and
sums). Every buffer is Guarded (NaN margins, outputs start as NaN) and checked unchanged outside the tensor;
strided views keep their gap columns unwritten. A read outside the inputs would only show where it reaches
a stored output, so `loads_within` also records every address the interpreter loads (mask on) and the
tests require each to lie inside x or w. bf16 dots run through triton_support.upcast_bf16_dots() (the
interpreter multiplies raw bf16 bits).
"""

from __future__ import annotations

import contextlib

from qwen_export.plugins.triton_support import SMS, interpreter

INTERPRETED = interpreter()  # before any kernel module is imported: triton.jit decides at decoration

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from qwen_export.plugins.common import kernels as common_kernels  # noqa: E402
from qwen_export.plugins.common import matmul_triton as mm  # noqa: E402
from qwen_export.plugins.common.matmul_triton import matmul  # noqa: E402
from qwen_export.plugins.triton_support import Guarded, compare, guard_problems  # noqa: E402

pytestmark = [
    pytest.mark.skipif(
        not INTERPRETED,
        reason="runs under Triton's interpreter (CI's default); TRITON_INTERPRET is not 1 here",
    ),
    pytest.mark.usefixtures("interpreted_kernels"),
]

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16


def randn(shape, dtype, seed: int, scale: float = 1.0) -> Guarded:
    gen = torch.Generator().manual_seed(seed)
    return Guarded(scale * torch.randn(shape, generator=gen), dtype)


def nan(shape, dtype) -> Guarded:
    return Guarded(torch.full(shape, float("nan")), dtype)


@contextlib.contextmanager
def loads_within(*tensors):
    """Yield a list that collects (up to 8) addresses the kernels load, mask on, outside every tensor's
    extent (first to last element) while the block runs."""
    from triton.runtime import interpreter as interp

    def span(t):
        last = sum((n - 1) * s for n, s in zip(t.shape, t.stride(), strict=True))
        return t.data_ptr(), t.data_ptr() + (last + 1) * t.itemsize

    spans = [span(t) for t in tensors]
    stray: list[int] = []
    original = interp.InterpreterBuilder.create_masked_load

    def create_masked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        addresses = ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)]
        inside = np.zeros(addresses.shape, dtype=bool)
        for lo, hi in spans:
            inside |= (addresses >= lo) & (addresses < hi)
        stray.extend(addresses[~inside][: 8 - len(stray)].tolist())
        return original(self, ptrs, mask, other, cache_policy, is_volatile)

    interp.InterpreterBuilder.create_masked_load = create_masked_load
    try:
        yield stray
    finally:
        interp.InterpreterBuilder.create_masked_load = original


def assert_close(case: str, ours, reference, dtype, guards: list[str]) -> None:
    assert not guards, guards
    assert torch.isfinite(ours).all(), f"{case}: an output element is non-finite (unwritten or read OOB)"
    row = compare("common.matmul", case, ours, reference, dtype, not guards)
    assert row.passed, row


def run_case(M: int, K: int, N: int, dtype, out_dtype=None, tile=None, seed: int = 0):
    """x [M, K] @ w [K, N] through the launcher on guarded buffers; (y, reference, guard problems)."""
    out_dtype = out_dtype or dtype
    x = randn((M, K), dtype, seed)
    w = randn((K, N), dtype, seed + 1, scale=K**-0.5)
    y = nan((M, N), out_dtype)
    with loads_within(x.tensor, w.tensor) as stray:
        assert matmul(x.tensor, w.tensor, out=y.tensor, tile=tile) is y.tensor
    problems = guard_problems(x=x, w=w, y=y) + [f"loaded outside x and w at {hex(a)}" for a in stray]
    return y.tensor, x.tensor.float() @ w.tensor.float(), problems


SHAPE_CASES = [
    pytest.param(dtype, M, 72, 100, id=f"{str(dtype)[6:]}-m{M}-k72-n100")
    for dtype in (FP32, FP16, BF16)
    for M in (1, 7, 16, 17, 130)
] + [
    pytest.param(FP16, 130, 64, 96, id="float16-m130-k64-n96-aligned"),
    pytest.param(BF16, 7, 64, 96, id="bfloat16-m7-k64-n96-aligned"),
    pytest.param(FP32, 17, 5, 3, id="float32-m17-k5-n3"),
]  # fmt: skip


@pytest.mark.parametrize(("dtype", "M", "K", "N"), SHAPE_CASES)
def test_matmul_matches_torch(dtype, M, K, N):
    """K and N that no tile divides (K=72: a partial last K step in both classes; N=100: a partial N tile),
    M on both sides of the decode / prefill boundary (16 / 17) and past one prefill tile (130)."""
    y, reference, guards = run_case(M, K, N, dtype, seed=M)
    assert y.dtype == dtype
    assert_close(f"{M}x{K}@{K}x{N} {dtype}", y, reference, dtype, guards)


@pytest.mark.parametrize("dtype", [FP16, BF16])
@pytest.mark.parametrize(("M", "K", "N"), [(1, 72, 100), (130, 72, 100), (7, 64, 96), (130, 64, 96)])
def test_fp32_output_variants(dtype, M, K, N):
    """The "*_f32out" variants (the router's fp32 logits): fp32 y from half x and w. The products of half
    values are exact in fp32, so y meets fp32's bound against the fp32 reference, not only the half one."""
    y, reference, guards = run_case(M, K, N, dtype, out_dtype=FP32, seed=M + 3)
    assert y.dtype == FP32
    assert_close(f"{M}x{K}@{K}x{N} {dtype} fp32 out", y, reference, FP32, guards)
    assert mm.matmul_variant(dtype, FP32) == f"{mm.variant_of(dtype)}_f32out"
    # out_dtype without an out tensor allocates fp32
    x = torch.randn(M, K).to(dtype)
    w = (torch.randn(K, N) * K**-0.5).to(dtype)
    alloc = matmul(x, w, out_dtype=FP32)
    assert alloc.dtype == FP32 and alloc.shape == (M, N) and alloc.is_contiguous()
    assert torch.equal(alloc, matmul(x, w, out=torch.empty(M, N)))


@pytest.mark.parametrize(
    ("dtype", "M", "K", "N", "x_stride", "y_stride"),
    [
        (FP16, 7, 72, 100, 75, 129),  # decode class, unaligned strides: the generic cubin
        (BF16, 130, 72, 100, 75, 129),  # prefill class, generic
        (FP32, 17, 64, 96, 128, 112),  # aligned strides: the `_a16` cubin
        (FP16, 5, 64, 96, 128, 112),
    ],
)
def test_strided_rows(dtype, M, K, N, x_stride, y_stride):
    """x and y as views with wider rows (a slice of a fused projection): the kernel reads only x's first K
    columns and writes only y's first N; the gap columns of y stay as they were (NaN)."""
    x_wide = randn((M, x_stride), dtype, seed=11)
    x_wide.tensor[:, K:] = float("nan")  # any read of the gap poisons y
    w = randn((K, N), dtype, seed=12, scale=K**-0.5)
    y_wide = nan((M, y_stride), dtype)
    x, y = x_wide.tensor[:, :K], y_wide.tensor[:, :N]
    assert x.stride(0) == x_stride and y.stride(0) == y_stride
    aligned = x_stride % 16 == 0 and y_stride % 16 == 0
    assert mm.is_aligned(x, w.tensor, y) == aligned
    with loads_within(x, w.tensor) as stray:
        matmul(x, w.tensor, out=y)
    assert not stray, f"loaded outside x and w at {[hex(a) for a in stray]}"
    guards = guard_problems(x=x_wide, w=w, y=y_wide)
    assert y_wide.tensor[:, N:].isnan().all(), "the kernel wrote into y's gap columns"
    assert_close(f"strided {M}x{K}@{K}x{N}", y, x.float() @ w.tensor.float(), dtype, guards)


def test_leading_axes_and_empty():
    """x [..., K] keeps its leading axes; no rows (or no columns) launches nothing."""
    x = torch.randn(2, 3, 40)
    w = torch.randn(40, 24)
    y = matmul(x, w)
    assert y.shape == (2, 3, 24)
    assert (y - x @ w).abs().max() <= 1e-4
    assert matmul(torch.empty(0, 40), w).shape == (0, 24)
    assert matmul(x, torch.empty(40, 0)).shape == (2, 3, 0)


@pytest.mark.parametrize(
    ("M", "K", "N", "dtype", "tile"),
    [
        pytest.param(3, 4096, 512, FP16, None, id="decode-m3-k4096-n512"),
        pytest.param(65, 1024, 512, BF16, None, id="prefill-m65-k1024-n512"),
    ],
)
def test_large_widths(M, K, N, dtype, tile):
    """Model widths: a 4096-deep decode GEMV (16 K steps of the `_a16` decode tile over 16 programs) and a
    65-row prefill through the 128 x 128 tiles."""
    assert mm.select_spec(M, True).name == f"common.matmul_{mm.tile_class(M)}_a16"
    y, reference, guards = run_case(M, K, N, dtype, tile=tile, seed=21)
    assert_close(f"{M}x{K}@{K}x{N}", y, reference, dtype, guards)


@pytest.mark.parametrize(("M", "tile"), [(1, "prefill"), (40, "decode"), (7, "prefill")])
def test_forced_tile_classes(M, tile):
    """Either class is correct at any M: prefill on a single row, decode over three 16-row tiles."""
    y, reference, guards = run_case(M, 72, 100, FP32, tile=tile, seed=31)
    assert_close(f"{M} rows, {tile} tiles", y, reference, FP32, guards)


@pytest.mark.parametrize(("K", "N"), [(16, 200), (16, 208)])
def test_grouped_order_covers_every_tile(K, N):
    """1100 rows x 2 column tiles: the generic prefill tile (BLOCK_M 64) makes 18 tile rows, in groups of
    8, 8 and 2; the aligned one (BLOCK_M 128) 9, in groups of 8 and 1. Every output element is written
    exactly by its own tile (the outputs start as NaN)."""
    aligned = N % 16 == 0
    c = mm.select_spec(1100, aligned).config("sm_90a", "fp16")[1]
    tiles_m = -(-1100 // c["BLOCK_M"])
    assert tiles_m % c["GROUP_M"] != 0 and tiles_m > c["GROUP_M"]
    y, reference, guards = run_case(1100, K, N, FP32, seed=41)
    assert_close(f"1100x{K}@{K}x{N}", y, reference, FP32, guards)


def test_launcher_rejects_bad_operands():
    x, w = torch.randn(4, 32, dtype=FP16), torch.randn(32, 48, dtype=FP16)
    with pytest.raises(ValueError, match="N contiguous"):
        matmul(x, torch.randn(48, 32, dtype=FP16).t())  # an nn.Linear weight's .T view
    with pytest.raises(ValueError, match="share"):
        matmul(x, w.float())
    with pytest.raises(ValueError, match="output must be"):
        matmul(x, w, out_dtype=BF16)
    with pytest.raises(ValueError, match="shape"):
        matmul(x, w, out=torch.empty(4, 47, dtype=FP16))
    with pytest.raises(ValueError, match="last axis"):
        matmul(torch.randn(4, 31, dtype=FP16), w)
    with pytest.raises(ValueError, match="contiguous along"):
        matmul(torch.randn(32, 4, dtype=FP16).t(), w)
    with pytest.raises(ValueError, match="tile class"):
        matmul(x, w, tile="huge")


def test_select_spec_grid_and_alignment():
    assert [mm.select_spec(m).name for m in (1, 16, 17, 4096)] == [
        "common.matmul_decode", "common.matmul_decode", "common.matmul_prefill", "common.matmul_prefill",
    ]  # fmt: skip
    assert mm.select_spec(7, True, tile="prefill").name == "common.matmul_prefill_a16"
    decode = mm.select_spec(1, True).config("sm_90a", "bf16")[1]
    prefill = mm.select_spec(300, True).config("sm_90a", "bf16")[1]
    assert mm.matmul_grid(1, 4096, decode) == (128,)  # one token over a 4096-wide projection: ~1 per SM
    assert mm.matmul_grid(300, 1000, prefill) == (3 * 8,)
    assert mm.matmul_grid(16, 33, decode) == (2,)
    x, w, y = torch.zeros(3, 64, dtype=FP16), torch.zeros(64, 96, dtype=FP16), torch.zeros(3, 96)
    assert mm.is_aligned(x, w, y)
    assert not mm.is_aligned(x, torch.zeros(64, 100, dtype=FP16), torch.zeros(3, 100))  # N
    assert not mm.is_aligned(torch.zeros(3, 72, dtype=FP16)[:, :64], w, y)  # x's row stride 72
    assert not mm.is_aligned(torch.zeros(3 * 64 + 1, dtype=FP16)[1:].view(3, 64), w, y)  # x's pointer


def test_kernel_specs_resolve_for_every_sm():
    """Every spec names its kernel's arguments in order, resolves "{act}" and "{out}" for every variant and
    SM (y fp32 exactly in the "*_f32out" variants), hints only in the `_a16` specs, and the C++ launcher's
    constexprs (BLOCK_M / BLOCK_N for the grid) are there."""
    specs = common_kernels.KERNELS
    names = [s.name for s in specs]
    assert sorted(names) == sorted(
        f"common.matmul_{t}{a}" for t in ("prefill", "decode") for a in ("", "_a16")
    )
    for spec in specs:
        assert list(spec.signature) == spec.kernel.arg_names, spec.name
        assert set(spec.variants) == {"fp16", "bf16", "fp16_f32out", "bf16_f32out"}
        for sm in SMS:
            for variant in spec.variants:
                signature, constexprs, warps, stages = spec.config(sm, variant)
                assert not any("{" in v for v in signature.values()), (spec.name, variant, signature)
                act = variant.split("_")[0]
                assert signature["x_ptr"].split(":")[0] == signature["w_ptr"].split(":")[0] == f"*{act}"
                out = "fp32" if variant.endswith("_f32out") else act
                assert signature["y_ptr"].split(":")[0] == f"*{out}"
                assert {k for k, v in signature.items() if v == "constexpr"} == set(constexprs)
                assert set(constexprs) == {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"}
                assert warps in (1, 2, 4, 8, 16) and stages >= 1
                hinted = {k for k, v in signature.items() if v.endswith(":16")}
                assert hinted == (set(mm.ALIGNED) if spec.name.endswith("_a16") else set()), spec.name
                assert all(
                    v.split(":")[0] in ("i32", "constexpr") or v.startswith("*") for v in signature.values()
                )
                if spec.name.startswith("common.matmul_decode"):
                    assert constexprs["BLOCK_M"] == mm.DECODE_MAX_ROWS


@pytest.fixture(scope="module")
def tiny_model():
    from qwen_export.golden.reference import load_reference
    from qwen_export.presets import materialize

    return load_reference(materialize("tiny-qwen3.5-moe", quiet=True))


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
def test_check_layer_on_tiny_preset(tiny_model, dtype):
    """`kernels check` on every layer of the tiny preset: the linear-attention layers' in_proj_qkv and the
    full-attention layer's q_proj, prefill (7 tokens) and decode (1 token), fp32 outputs for half inputs."""
    rows = []
    for i, kind in enumerate(tiny_model.config.layer_types):
        layer_rows = common_kernels.check_layer(tiny_model, i, dtype)
        assert len(layer_rows) == (2 if dtype == FP32 else 4)
        projection = "self_attn.q_proj" if kind == "full_attention" else "linear_attn.in_proj_qkv"
        assert all(projection in r.case for r in layer_rows)
        rows += layer_rows
    failed = [r for r in rows if not r.passed]
    assert not failed, failed
    assert {r.kernel for r in rows} == {"common.matmul_prefill_a16", "common.matmul_decode_a16"}
    assert any("7 x 64" in r.case and r.kernel.startswith("common.matmul_prefill") for r in rows)
    assert any("1 x 64" in r.case and r.kernel.startswith("common.matmul_decode") for r in rows)
