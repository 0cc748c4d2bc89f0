"""RMSNorm and GatedRMSNorm Triton kernels (plugins/rms_norm/rms_norm_triton.py,
plugins/gated_rms_norm/gated_rms_norm_triton.py) under Triton's interpreter, against transformers'
Qwen3_5MoeRMSNorm / Qwen3_5MoeRMSNormGated run in fp32 on the same (rounded) inputs: fp32 within 1e-4
absolute, fp16/bf16 within tolerances.py's `layer_rel`. Every buffer is Guarded (NaN margins, outputs start
as NaN) and checked unchanged outside the tensor. The kernels have no tl.dot, so no bf16 dot upcast is needed.
"""

from __future__ import annotations

from qwen_export.plugins.triton_support import SMS, interpreter

assert interpreter(), "TRITON_INTERPRET must be 1 (or unset) before the kernel modules are imported"

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import (  # noqa: E402
    Qwen3_5MoeRMSNorm,
    Qwen3_5MoeRMSNormGated,
)

from qwen_export.plugins.gated_rms_norm import gated_rms_norm_triton as gated_src  # noqa: E402
from qwen_export.plugins.gated_rms_norm import kernels as gated_kernels  # noqa: E402
from qwen_export.plugins.gated_rms_norm.gated_rms_norm_triton import gated_rms_norm  # noqa: E402
from qwen_export.plugins.rms_norm import kernels as rms_kernels  # noqa: E402
from qwen_export.plugins.rms_norm import rms_norm_triton as rms_src  # noqa: E402
from qwen_export.plugins.rms_norm.rms_norm_triton import rms_norm  # noqa: E402
from qwen_export.plugins.triton_support import Guarded, compare, guard_problems  # noqa: E402

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
EPS = 1e-6


def transformers_rms_norm(dim: int, seed: int) -> Qwen3_5MoeRMSNorm:
    norm = Qwen3_5MoeRMSNorm(dim, eps=EPS)
    with torch.no_grad():
        norm.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed))  # zero-centred weight
    return norm.eval()


def transformers_gated_norm(dim: int, seed: int) -> Qwen3_5MoeRMSNormGated:
    norm = Qwen3_5MoeRMSNormGated(dim, eps=EPS)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.5, generator=torch.Generator().manual_seed(seed))
    return norm.eval()


def randn(shape, dtype, seed: int) -> Guarded:
    return Guarded(2.0 * torch.randn(shape, generator=torch.Generator().manual_seed(seed)), dtype)


def nan_like(shape, dtype) -> Guarded:
    return Guarded(torch.full(shape, float("nan")), dtype)


def assert_close(kernel: str, ours, reference, dtype, guards: list[str]) -> None:
    assert not guards, guards
    assert torch.isfinite(ours).all(), f"{kernel}: non-finite output"
    row = compare(kernel, "test", ours, reference, dtype, not guards)
    assert row.passed, row


RMS_CASES = [
    pytest.param(dtype, width, rows, residual, id=f"{str(dtype)[6:]}-d{width}-r{rows}{'-res' * residual}")
    for dtype in (FP32, FP16, BF16)
    for width in (64, 100)
    for rows in (1, 130)
    for residual in (False, True)
] + [pytest.param(BF16, 4096, 130, True, id="bfloat16-d4096-r130-res")]  # fmt: skip


@pytest.mark.parametrize(("dtype", "width", "rows", "residual"), RMS_CASES)
def test_rms_norm_matches_transformers(dtype, width, rows, residual):
    norm = transformers_rms_norm(width, seed=width)
    scale = Guarded(1.0 + norm.weight.detach().float())
    x = randn((rows, width), dtype, seed=1)
    y = nan_like((rows, width), dtype)
    buffers = {"x": x, "scale": scale, "y": y}
    if residual:
        res, h = randn((rows, width), dtype, seed=2), nan_like((rows, width), dtype)
        buffers |= {"residual": res, "h": h}
        rms_norm(x.tensor, scale.tensor, EPS, res.tensor, out=y.tensor, residual_out=h.tensor)
    else:
        rms_norm(x.tensor, scale.tensor, EPS, out=y.tensor)
    guards = guard_problems(**buffers)
    with torch.no_grad():
        h_ref = x.tensor.float() + (res.tensor.float() if residual else 0.0)
        y_ref = norm(h_ref)
    assert_close("rms_norm", y.tensor, y_ref, dtype, guards)
    if residual:
        assert_close("rms_norm residual", h.tensor, h_ref, dtype, guards)


@pytest.mark.parametrize(("dtype", "in_place"), [(FP32, False), (FP32, True), (BF16, True)])
def test_rms_norm_wide_rows_loop(dtype, in_place):
    """A 600-wide row through the 256-column class: three chunks, the last partial, so the second pass
    re-reads the h it wrote; in place, the residual stream is updated where it lies (residual_out is it)."""
    rows, width = 9, 600
    norm = transformers_rms_norm(width, seed=3)
    scale = Guarded(1.0 + norm.weight.detach().float())
    x, res = randn((rows, width), dtype, seed=4), randn((rows, width), dtype, seed=5)
    h_ref = x.tensor.float() + res.tensor.float()
    y = nan_like((rows, width), dtype)
    h = res if in_place else nan_like((rows, width), dtype)
    out = rms_norm(x.tensor, scale.tensor, EPS, res.tensor, out=y.tensor, residual_out=h.tensor, block_n=256)
    assert out[0] is y.tensor and out[1] is h.tensor
    guards = guard_problems(x=x, scale=scale, y=y, residual=res, h=h)
    with torch.no_grad():
        assert_close("rms_norm looped", y.tensor, norm(h_ref), dtype, guards)
    assert_close("rms_norm looped residual", h.tensor, h_ref, dtype, guards)


def test_rms_norm_strided_rows_and_leading_axes():
    """[B, T, D] input whose rows are a strided view (every other row of a wider buffer)."""
    norm = transformers_rms_norm(100, seed=6)
    scale = Guarded(1.0 + norm.weight.detach().float())
    wide = randn((2, 3, 200), FP16, seed=7)
    x = wide.tensor[..., :100]
    y = nan_like((2, 3, 100), FP16)
    rms_norm(x, scale.tensor, EPS, out=y.tensor)
    guards = guard_problems(x=wide, y=y, scale=scale)
    with torch.no_grad():
        assert_close("rms_norm strided", y.tensor, norm(x.float()), FP16, guards)


GATED_CASES = [
    pytest.param(dtype, width, rows, id=f"{str(dtype)[6:]}-d{width}-r{rows}")
    for dtype in (FP32, FP16, BF16)
    for width in (64, 100)
    for rows in (1, 130)
] + [pytest.param(BF16, 256, 130, id="bfloat16-d256-r130")]  # fmt: skip


@pytest.mark.parametrize(("dtype", "width", "rows"), GATED_CASES)
def test_gated_rms_norm_matches_transformers(dtype, width, rows):
    norm = transformers_gated_norm(width, seed=width)
    scale = Guarded(norm.weight.detach().float())
    x, z = randn((rows, width), dtype, seed=11), randn((rows, width), dtype, seed=12)
    y = nan_like((rows, width), dtype)
    gated_rms_norm(x.tensor, z.tensor, scale.tensor, EPS, out=y.tensor)
    guards = guard_problems(x=x, z=z, scale=scale, y=y)
    with torch.no_grad():
        assert_close("gated_rms_norm", y.tensor, norm(x.tensor.float(), z.tensor.float()), dtype, guards)


@pytest.mark.parametrize("dtype", [FP32, FP16])
def test_gated_rms_norm_loops_and_takes_a_strided_gate(dtype):
    """head_dim 300 through the 128-column class (three chunks), per head of [T, H, D], with z a view of a
    wider projection (its own row stride)."""
    tokens, heads, width = 3, 2, 300
    norm = transformers_gated_norm(width, seed=13)
    scale = Guarded(norm.weight.detach().float())
    x = randn((tokens, heads, width), dtype, seed=14)
    proj = randn((tokens, heads, 2 * width), dtype, seed=15)
    z = proj.tensor[..., width:]
    y = nan_like((tokens, heads, width), dtype)
    gated_rms_norm(x.tensor, z, scale.tensor, EPS, out=y.tensor, block_n=128)
    guards = guard_problems(x=x, z=proj, scale=scale, y=y)
    with torch.no_grad():
        assert_close("gated_rms_norm looped", y.tensor, norm(x.tensor.float(), z.float()), dtype, guards)


def test_gated_norm_rounds_where_transformers_does():
    """transformers rounds the normalised x to the activation dtype before the weight multiplies it. With
    fp32 weights (the kernel's fp32 scale) and fp16 activations the kernel matches transformers' own fp16
    forward bit for bit on (nearly) every element; leaving out that rounding matches only ~3/4 of them.
    (fp16, not bf16: the interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even.)"""
    width, rows = 128, 64
    norm = transformers_gated_norm(width, seed=16)
    scale = Guarded(norm.weight.detach().float())
    x, z = randn((rows, width), FP16, seed=17), randn((rows, width), FP16, seed=18)
    y = nan_like((rows, width), FP16)
    gated_rms_norm(x.tensor, z.tensor, scale.tensor, EPS, out=y.tensor)
    assert not guard_problems(x=x, z=z, scale=scale, y=y)
    with torch.no_grad():
        hf = norm(x.tensor, z.tensor)  # fp32 weight, fp16 activations: transformers' own cast placement
    assert hf.dtype == FP16
    ulp = torch.finfo(FP16).eps * hf.float().abs().clamp_min(2.0**-14)
    assert ((y.tensor.float() - hf.float()).abs() <= ulp).all()
    assert (y.tensor == hf).float().mean() >= 0.99


def test_width_classes_and_specs():
    assert [rms_src.width_class(d) for d in (64, 100, 256, 257, 2048, 3072, 4096, 5120)] == [
        256, 256, 256, 1024, 2048, 4096, 4096, 4096,
    ]  # fmt: skip
    assert [rms_src.width_class(d, gated_src.WIDTH_CLASSES) for d in (64, 100, 128, 256, 300)] == [
        64, 128, 128, 256, 256,
    ]  # fmt: skip
    names = [s.name for s in rms_kernels.KERNELS + gated_kernels.KERNELS]
    assert len(set(names)) == len(names) == 22
    assert {n.split(".")[0] for n in names} == {"rms_norm", "gated_rms_norm"}
    for spec in rms_kernels.KERNELS + gated_kernels.KERNELS:
        assert list(spec.signature) == spec.kernel.arg_names, spec.name
        hinted = {k for k, v in spec.signature.items() if v.endswith(":16")}
        pointers = {k for k, v in spec.signature.items() if v.startswith("*")}
        ints = {"D"} | {k for k in spec.signature if k.startswith("stride_")}
        assert hinted == ((pointers | ints) if spec.name.endswith("_a16") else set()), spec.name
        for sm in SMS:
            for variant in spec.variants:
                signature, constexprs, warps, _ = spec.config(sm, variant)
                assert signature["x_ptr"].split(":")[0] == f"*{variant}"
                assert signature["scale_ptr"].split(":")[0] == "*fp32"
                assert {k for k, v in signature.items() if v == "constexpr"} == set(constexprs)
                assert constexprs["BLOCK_M"] * constexprs["BLOCK_N"] <= 8 * 32 * warps  # values per thread


def test_aligned_spec_selection():
    """The `_a16` cubin only where every pointer is 16-byte aligned and D and the row strides divide by 16."""
    scale64, scale100 = torch.ones(64), torch.ones(100)
    x = torch.zeros(5, 64, dtype=BF16)
    assert rms_src.select_spec(x, scale64, y2=x).name == "rms_norm.rms_norm_n256_a16"
    assert rms_src.select_spec(x, scale64, x, x, x, block_n=1024).name == "rms_norm.add_rms_norm_n1024_a16"
    assert rms_src.select_spec(torch.zeros(5, 100), scale100, y2=torch.zeros(5, 100)).name == (
        "rms_norm.rms_norm_n256"
    )
    wide = torch.zeros(5, 72, dtype=BF16)
    assert rms_src.select_spec(wide[:, :64], scale64, y2=x).name == "rms_norm.rms_norm_n256"  # stride 72
    assert rms_src.select_spec(wide.view(-1)[4:324].view(5, 64), scale64).name == "rms_norm.rms_norm_n256"
    assert rms_src.select_spec(x, torch.ones(65)[1:]).name == "rms_norm.rms_norm_n256"  # scale misaligned
    assert gated_src.select_spec(x, x, scale64, x).name == "gated_rms_norm.gated_rms_norm_n64_a16"
    assert gated_src.select_spec(x, wide[:, :64], scale64, x).name == "gated_rms_norm.gated_rms_norm_n64"


@pytest.fixture(scope="module")
def tiny_model():
    from qwen_export.golden.reference import load_reference
    from qwen_export.presets import materialize

    return load_reference(materialize("tiny-qwen3.5-moe", quiet=True))


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
def test_check_layer_on_tiny_preset(tiny_model, dtype):
    layer_types = tiny_model.config.layer_types
    linear = [i for i, kind in enumerate(layer_types) if kind == "linear_attention"]
    full = [i for i, kind in enumerate(layer_types) if kind == "full_attention"]
    assert linear and full
    rows = []
    for i in range(len(layer_types)):
        rms_rows = rms_kernels.check_layer(tiny_model, i, dtype)
        gated_rows = gated_kernels.check_layer(tiny_model, i, dtype)
        assert len(rms_rows) == 3 and len(gated_rows) == (1 if i in linear else 0)
        rows += rms_rows + gated_rows
    failed = [row for row in rows if not row.passed]
    assert not failed, failed
    assert {row.kernel.rsplit("_n", 1)[0] for row in rows} == {
        "rms_norm.rms_norm", "rms_norm.add_rms_norm", "gated_rms_norm.gated_rms_norm",
    }  # fmt: skip
