"""The MoE op's Triton kernels (plugins/moe/*_triton.py) under Triton's interpreter, against transformers'
own sparse MoE blocks (Qwen3.5-MoE: always renormalised; Qwen3-Next with norm_topk_prob off: not).

Every case runs the whole launch sequence (router -> align -> grouped or decode GEMMs -> shared expert ->
combine) with every input and every buffer the kernels write Guarded (NaN / sentinel margins), and checks
each kernel group against the module: router weights and ids, the alignment, per-pair expert outputs, the
shared expert, the block output. fp32: absolute 1e-4; fp16 / bf16: relative to max |ref| (layer_rel).
bf16 dots run through triton_support.upcast_bf16_dots() (the interpreter multiplies raw bf16 bits).
"""

from __future__ import annotations

import pytest

from qwen_export.plugins.triton_support import SMS, interpreter

INTERPRETED = interpreter()  # before any kernel module is imported: triton.jit decides at decoration

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeSparseMoeBlock  # noqa: E402
from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextSparseMoeBlock  # noqa: E402

from qwen_export.plugins.moe import kernels as moe  # noqa: E402
from qwen_export.plugins.moe.grouped_gemm_triton import DECODE_MAX_PAIRS  # noqa: E402

pytestmark = [
    pytest.mark.skipif(
        not INTERPRETED,
        reason="runs under Triton's interpreter (CI's default); TRITON_INTERPRET is not 1 here",
    ),
    pytest.mark.usefixtures("interpreted_kernels"),
]

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16


def make_block(
    top_k: int, normalize: bool, experts: int = 512, hidden: int = 64, inter: int = 32, seed: int = 0
):
    """A transformers sparse MoE block with seeded random weights (routers with unit-spread logits)."""
    sizes = dict(
        hidden_size=hidden, num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=inter,
        shared_expert_intermediate_size=inter,
    )  # fmt: skip
    if normalize:
        block = Qwen3_5MoeSparseMoeBlock(transformers.Qwen3_5MoeTextConfig(**sizes))
    else:
        block = Qwen3NextSparseMoeBlock(transformers.Qwen3NextConfig(**sizes, norm_topk_prob=False))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in block.named_parameters():
            scale = (2.0 if name == "gate.weight" else 1.0) / param.shape[-1] ** 0.5
            param.copy_(torch.randn(param.shape, generator=gen) * scale)
    return block.eval()


def tokens(n: int, hidden: int = 64, seed: int = 1):
    return torch.randn(n, hidden, generator=torch.Generator().manual_seed(seed))


def assert_rows(rows, expect_path: str | None = None):
    assert rows
    for row in rows:
        assert row.guards_ok, f"{row.kernel} ({row.case}): a kernel wrote outside its buffers"
        assert row.passed, f"{row.kernel} ({row.case}): max |Δ| {row.max_abs:.3e} > {row.tolerance:.0e}"
        if expect_path:
            assert f"{expect_path} path" in row.case
    kernels = {r.kernel for r in rows}
    assert {"moe.router_topk", "moe.grouped_gemm", "moe.combine"} <= kernels
    assert ("moe.align" in kernels) == ("grouped path" in rows[0].case)


@pytest.mark.parametrize("normalize", [True, False], ids=["renormalised", "unnormalised"])
@pytest.mark.parametrize("n_tokens", [1, 200])
@pytest.mark.parametrize("top_k", [1, 10])
def test_block_fp32(top_k, n_tokens, normalize):
    """top-1 / top-10 of 512 experts, 1 token (decode path) and 200 tokens (grouped path)."""
    rows = moe.check_block(make_block(top_k, normalize), tokens(n_tokens), FP32)
    assert_rows(rows, "decode" if n_tokens * top_k <= DECODE_MAX_PAIRS else "grouped")


@pytest.mark.parametrize(
    "dtype, top_k, n_tokens, normalize",
    [
        (FP16, 10, 200, True),
        (BF16, 10, 200, False),
        (FP16, 1, 200, False),
        (BF16, 1, 200, True),
        (FP16, 10, 1, False),
        (BF16, 10, 1, True),
    ],
)
def test_block_half(dtype, top_k, n_tokens, normalize):
    assert_rows(moe.check_block(make_block(top_k, normalize, seed=2), tokens(n_tokens, seed=3), dtype))


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_block_few_experts_prefill(dtype):
    """8 experts top-2 over 200 tokens: 50 rows per expert, the BLOCK_M 64 tiles (partly filled blocks)."""
    block = make_block(2, True, experts=8, hidden=96, inter=48, seed=4)
    assert_rows(moe.check_block(block, tokens(200, hidden=96, seed=5), dtype), "grouped")


@pytest.mark.parametrize("path, n_tokens", [("grouped", 1), ("decode", 6)])
def test_paths_forced(path, n_tokens):
    """The grouped path on one token (one block per expert, 15 padding rows each) and the decode GEMVs on
    6 tokens x top-10 (60 pairs, the most the auto choice sends there)."""
    assert n_tokens * 10 <= DECODE_MAX_PAIRS
    rows = moe.check_block(make_block(10, True, seed=6), tokens(n_tokens, seed=7), FP32, path=path)
    assert_rows(rows, path)


@pytest.mark.parametrize("n_tokens", [1, 30])
def test_block_ampere_tiles(n_tokens):
    """sm_86's frozen tiles (4-token top-k programs, 64-wide down tiles) instead of the CPU's sm_90a ones."""
    rows = moe.check_block(make_block(10, True, seed=9), tokens(n_tokens, seed=10), BF16, sm="sm_86")
    assert_rows(rows, "decode" if n_tokens == 1 else "grouped")


def test_397b_widths_one_token():
    """Qwen3.5-397B-A17B's MoE widths: hidden 4096, expert intermediate 1024 (shared expert too), 512
    experts, top-10, one token, fp16.

    The full expert weights would be ~13 GB (fp16; twice that in the fp32 reference module), so both are
    allocated with torch.empty (pages are only committed where touched) and only the experts the token
    routes to are filled; the reference reads only those, and a kernel reading any other expert would read
    zeros and miss. The router is tilted so that expert 511 is the top choice: its weights sit 4.3 G
    elements into the stacked tensor, past any 32-bit offset. Then the same block top-1 through the grouped
    path (align + tiled GEMMs at these widths). fp16 rather than bf16: the interpreter converts bf16 in
    Python, which doubles this test's time; bf16 is covered on both paths at small widths above.
    """
    H, inter, E = 4096, 1024, 512
    config = transformers.Qwen3_5MoeTextConfig(
        hidden_size=H, num_experts=E, num_experts_per_tok=10, moe_intermediate_size=inter,
        shared_expert_intermediate_size=inter,
    )  # fmt: skip
    block = Qwen3_5MoeSparseMoeBlock(config).eval()  # experts: torch.empty, nothing committed yet
    gen = torch.Generator().manual_seed(8)

    def rounded(shape, scale):
        return (torch.randn(shape, generator=gen) * scale).to(FP16)

    with torch.no_grad():
        x = rounded((1, H), 1.0).float()
        router = rounded((E, H), 2.0 / H**0.5).float()
        router[E - 1] = (x[0] * (4.0 / x.norm())).to(FP16).float()  # expert 511 first
        block.gate.weight.copy_(router)
        for lin in (
            block.shared_expert.gate_proj,
            block.shared_expert.up_proj,
            block.shared_expert.down_proj,
        ):
            lin.weight.copy_(rounded(lin.weight.shape, 1.0 / lin.weight.shape[1] ** 0.5).float())
        block.shared_expert_gate.weight.copy_(rounded((1, H), 1.0 / H**0.5).float())
        _, _, chosen = block.gate(x)
        assert int(chosen[0, 0]) == E - 1
        gate_up = torch.empty(E, 2 * inter, H, dtype=FP16)
        down = torch.empty(E, H, inter, dtype=FP16)
        for e in chosen[0].tolist():
            gate_up[e] = rounded((2 * inter, H), 1.0 / H**0.5)
            down[e] = rounded((H, inter), 1.0 / inter**0.5)
            block.experts.gate_up_proj[e] = gate_up[e].float()
            block.experts.down_proj[e] = down[e].float()
    assert_rows(moe.check_block(block, x, FP16, experts=(gate_up, down)), "decode")
    block.gate.top_k = 1
    assert_rows(moe.check_block(block, x, FP16, path="grouped", experts=(gate_up, down)), "grouped")


@pytest.fixture(scope="module")
def tiny_moe_model():
    from qwen_export.golden.reference import load_reference
    from qwen_export.presets import materialize

    return load_reference(materialize("tiny-qwen3.5-moe", quiet=True))


def test_check_layer_tiny_preset(tiny_moe_model):
    """`kernels check` on the tiny preset's MoE layer 0: 7 tokens (grouped) and 1 token (decode) in each
    precision against the layer's own module."""
    rows = [r for dtype in (FP32, FP16, BF16) for r in moe.check_layer(tiny_moe_model, 0, dtype)]
    assert len(rows) == 3 * (5 + 4)
    for row in rows:
        assert row.passed and row.guards_ok, row
    assert {r.kernel for r in rows} == {"moe.router_topk", "moe.align", "moe.grouped_gemm", "moe.combine"}
    assert any("7 tokens" in r.case and "grouped path" in r.case for r in rows)
    assert any("1 token," in r.case and "decode path" in r.case for r in rows)


def test_check_layer_dense_mlp_is_skipped():
    """tiny-qwen3-next keeps a dense SwiGLU MLP in layer 1 (mlp_only_layers): no rows there; its MoE layers
    (Qwen3-Next's router, norm_topk_prob on) check like Qwen3.5's."""
    from qwen_export.golden.reference import load_reference
    from qwen_export.presets import materialize

    model = load_reference(materialize("tiny-qwen3-next", quiet=True))
    assert not hasattr(model.model.layers[1].mlp, "experts")
    assert moe.check_layer(model, 1, FP32) == []
    rows = moe.check_layer(model, 0, FP32)
    assert len(rows) == 9 and all(r.passed for r in rows)


def test_kernel_specs_resolve_for_every_sm():
    """Every spec's signature names its kernel's arguments in order, every constexpr has a value for every
    SM and variant, activation pointers resolve, and the grouped GEMMs pad to one BLOCK_M per variant."""
    import inspect

    names = [s.name for s in moe.KERNELS]
    assert len(names) == len(set(names)) and all(n.startswith("moe.") for n in names)
    for spec in moe.KERNELS:
        params = list(inspect.signature(spec.kernel.fn).parameters)
        assert list(spec.signature) == params, spec.name
        for sm in SMS:
            for variant in spec.variants:
                signature, constexprs, warps, stages = spec.config(sm, variant)
                missing = [k for k, v in signature.items() if v == "constexpr" and k not in constexprs]
                assert not missing, (spec.name, sm, variant, missing)
                assert not any("{act}" in v for v in signature.values())
                assert warps in (1, 2, 4, 8, 16) and stages >= 1
    by_name = {s.name: s for s in moe.KERNELS}
    for sm in SMS:
        for variant in by_name["moe.gate_up_swiglu"].variants:
            pair = [by_name[n].config(sm, variant)[1]["BLOCK_M"] for n in ("moe.gate_up_swiglu", "moe.down")]
            assert pair[0] == pair[1]
