"""Gated DeltaNet's Triton kernels (plugins/gated_deltanet/*_triton.py) under Triton's interpreter, against
transformers' own Qwen3.5-MoE reference functions (causal_conv1d_update, torch_chunk_gated_delta_rule,
torch_recurrent_gated_delta_rule, reached through a real Qwen3_5MoeGatedDeltaNet module).

Every input and every buffer a kernel writes is Guarded (NaN / sentinel margins): a row passes only with
finite outputs and untouched margins. fp32: absolute 1e-4; fp16 / bf16: relative to max |ref| (layer_rel).
bf16 dots run through triton_support.upcast_bf16_dots() (the interpreter multiplies raw bf16 bits).
"""

from __future__ import annotations

import pytest

from qwen_export.plugins.triton_support import SMS, interpreter

INTERPRETED = interpreter()  # before any kernel module is imported: triton.jit decides at decoration

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import Qwen3_5MoeGatedDeltaNet  # noqa: E402

from qwen_export.plugins.gated_deltanet import kernels  # noqa: E402
from qwen_export.plugins.gated_deltanet.causal_conv_triton import causal_conv  # noqa: E402
from qwen_export.plugins.gated_deltanet.chunk_delta_rule_triton import chunk_delta_rule  # noqa: E402
from qwen_export.plugins.gated_deltanet.kernels import DeltaNetLayer  # noqa: E402
from qwen_export.plugins.gated_deltanet.recurrent_delta_rule_triton import recurrent_delta_rule  # noqa: E402
from qwen_export.plugins.triton_support import CheckRow, Guarded, compare  # noqa: E402

pytestmark = [
    pytest.mark.skipif(
        not INTERPRETED,
        reason="runs under Triton's interpreter (CI's default); TRITON_INTERPRET is not 1 here",
    ),
    pytest.mark.usefixtures("interpreted_kernels"),
]

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16
NAMES = {FP32: "fp32", FP16: "fp16", BF16: "bf16"}


def make_layer(nk: int, nv: int, dk: int, dv: int, seed: int = 0) -> DeltaNetLayer:
    """A transformers Qwen3_5MoeGatedDeltaNet of these widths with seeded conv weights, A_log and dt_bias."""
    config = transformers.Qwen3_5MoeTextConfig(
        hidden_size=32, linear_num_key_heads=nk, linear_num_value_heads=nv, linear_key_head_dim=dk,
        linear_value_head_dim=dv, linear_conv_kernel_dim=4, layer_types=["linear_attention"],
        num_hidden_layers=1,
    )  # fmt: skip
    attn = Qwen3_5MoeGatedDeltaNet(config, 0)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        attn.conv1d.weight.copy_(torch.randn(attn.conv1d.weight.shape, generator=gen) * 0.5)
        attn.A_log.copy_(torch.rand(nv, generator=gen) * 3.0 - 2.0)  # decay rates over e^-2 .. e^1
        attn.dt_bias.copy_(torch.randn(nv, generator=gen))
    return DeltaNetLayer(attn.eval())


def inputs(layer: DeltaNetLayer, batch: int, tokens: int, seed: int):
    """(pre-conv mixed qkv [B, T, C], a, b [B, T, nv]), seeded."""
    gen = torch.Generator().manual_seed(seed)
    channels = 2 * layer.nk * layer.dk + layer.nv * layer.dv
    mixed = torch.randn(batch, tokens, channels, generator=gen)
    return mixed, *torch.randn(2, batch, tokens, layer.nv, generator=gen)


def states(layer: DeltaNetLayer, batch: int, seed: int):
    """Carried (conv state [B, C, K-1], recurrent state [B, nv, dk, dv]) of plausible magnitude, seeded."""
    gen = torch.Generator().manual_seed(seed)
    channels = 2 * layer.nk * layer.dk + layer.nv * layer.dv
    conv = torch.randn(batch, channels, layer.conv_weight.shape[1] - 1, generator=gen)
    return conv, torch.randn(batch, layer.nv, layer.dk, layer.dv, generator=gen) * 0.5


def assert_rows(rows: list[CheckRow]) -> None:
    bad = [
        f"{r.kernel} {r.case}: {r.max_abs:.2e} > {r.tolerance:.0e}, guards {'ok' if r.guards_ok else 'bad'}"
        for r in rows
        if not r.passed
    ]
    assert not bad, "\n".join(bad)


def spec_module(spec):
    import sys

    return sys.modules[spec.kernel.fn.__module__ if hasattr(spec.kernel, "fn") else spec.kernel.__module__]


def test_specs_cover_every_sm_and_variant():
    """The AOT view of each kernel: signature in the kernel's argument order, every constexpr given a value
    for every SM and variant, activations typed by the variant, states fp32 (the activation type in the
    plugin's conv)."""
    assert [k.name for k in kernels.KERNELS] == [
        "gated_deltanet.causal_conv",
        "gated_deltanet.causal_conv_act_state",
        "gated_deltanet.chunk_delta_rule",
        "gated_deltanet.recurrent_delta_rule",
    ]
    for spec in kernels.KERNELS:
        assert list(spec.signature) == spec.kernel.arg_names, spec.name
        for sm in SMS:
            for variant in spec.variants:
                signature, constexprs, warps, stages = spec.config(sm, variant)
                act = "bf16" if variant.startswith("bf16") else "fp16"
                wanted = {name for name, kind in signature.items() if kind == "constexpr"}
                assert set(constexprs) == wanted, (spec.name, sm, variant)
                assert warps in (1, 2, 4, 8) and stages >= 1
                for name, kind in signature.items():
                    assert "{act}" not in kind
                    kind, _, hint = kind.partition(":")
                    assert hint == ("16" if name in spec_module(spec).ALIGNED_16 else ""), (spec.name, name)
                    if name.startswith("state"):  # fp32, or the activation type for the plugin's conv
                        state = f"*{act}" if spec.name.endswith("_act_state") else "*fp32"
                        assert kind == state, (spec.name, name)
                    if name in ("qkv_ptr", "x_ptr", "out_ptr"):
                        assert kind == f"*{act}", (spec.name, variant, name)
        for name in ("DK", "DV"):
            assert spec.constexprs.get(name, 128) == 128  # Qwen3.5's head dims, frozen


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16], ids=NAMES.get)
@pytest.mark.parametrize("carried", [False, True], ids=["zero", "carried"])
def test_conv(dtype, carried):
    """Causal conv + SiLU over 1, 63, 64, 65 and 130 tokens (batch 2), output and new conv state."""
    layer = make_layer(1, 2, 32, 32)
    rows = []
    for tokens in (1, 63, 64, 65, 130):
        mixed, _, _ = inputs(layer, 2, tokens, seed=tokens)
        state = states(layer, 2, seed=tokens)[0] if carried else None
        rows += layer.check_conv(mixed, state, dtype, f"{tokens} tokens")[0]
    assert_rows(rows)


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16], ids=NAMES.get)
@pytest.mark.parametrize("carried", [False, True], ids=["zero", "carried"])
def test_chunk_delta_rule(dtype, carried):
    """Chunked prefill of 1, 63, 64, 65 and 130 tokens, 2 value heads reading 1 key head (d_k 32, d_v 16)."""
    layer = make_layer(1, 2, 32, 16, seed=1)
    rows = []
    for tokens in (1, 63, 64, 65, 130):
        qkv, a, b = inputs(layer, 1, tokens, seed=100 + tokens)
        state = states(layer, 1, seed=tokens)[1] if carried else None
        rows += layer.check_rule(qkv, a, b, state, dtype, f"{tokens} tokens", recurrent=False)[0]
    assert_rows(rows)


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16], ids=NAMES.get)
def test_prefill_then_decode_steps(dtype):
    """A 40-token prefill (conv, then the chunked rule on the conv's output) and three decode steps (conv
    decode, recurrent rule), each step from the reference's carried states; 4 value heads on 2 key heads, d_v
    64 (two state column blocks)."""
    layer = make_layer(2, 4, 16, 64, seed=2)
    conv_state = rule_state = None
    rows = []
    for step, tokens in enumerate((40, 1, 1, 1)):
        mixed, a, b = inputs(layer, 2, tokens, seed=200 + step)
        conv_rows, qkv, conv_state = layer.check_conv(mixed, conv_state, dtype, f"step {step}")
        rule_rows, rule_state = layer.check_rule(qkv, a, b, rule_state, dtype, f"step {step}", tokens == 1)
        rows += conv_rows + rule_rows
    assert_rows(rows)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=NAMES.get)
def test_left_padded_batch(dtype):
    """Rows with 0, 7 and all 20 tokens of left padding, from carried states. Each row must give what its
    real tokens alone give the reference (outputs at those tokens, final states), 0 at padding, and the
    all-padding row must leave both states exactly as they were (prefill and a masked decode step)."""
    layer = make_layer(1, 2, 16, 16, seed=3)
    tokens, pads = 20, (0, 7, 20)
    mixed, a, b = inputs(layer, 3, tokens, seed=300)
    conv_state, rule_state = states(layer, 3, seed=301)
    mask = torch.ones(3, tokens + 5, dtype=torch.int32)  # 5 earlier columns (past tokens), then these T
    for row, pad in enumerate(pads):
        mask[row, 5 : 5 + pad] = 0
    conv_out, conv_new, conv_problems = layer.run_conv(mixed, conv_state, dtype, mask)
    qkv = conv_out.float()
    rule_out, rule_new, rule_problems = layer.run_rule(qkv, a, b, rule_state, dtype, False, mask)
    step_mask = torch.tensor([[1], [1], [0]], dtype=torch.int32)
    step = inputs(layer, 3, 1, seed=302)
    step_out, step_conv, step_problems = layer.run_conv(step[0], conv_new, dtype, step_mask)
    _, step_rule, rule_step_problems = layer.run_rule(
        step_out.float(), step[1], step[2], rule_new, dtype, True, step_mask
    )
    assert not (conv_problems or rule_problems or step_problems or rule_step_problems)

    rows = []
    for row, pad in enumerate(pads[:2]):
        real = slice(pad, tokens)
        ref_conv, ref_conv_state = layer.ref_conv(mixed[row : row + 1, real], conv_state[row : row + 1])
        ref_out, ref_state = layer.ref_rule(
            ref_conv, a[row : row + 1, real], b[row : row + 1, real], rule_state[row : row + 1], False
        )
        case = f"row {row} ({pad} padding)"
        rows += [
            compare("causal_conv", case, conv_out[row, real], ref_conv[0], dtype),
            compare("causal_conv", case + " state", conv_new[row], ref_conv_state[0], dtype),
            compare("chunk_delta_rule", case, rule_out[row, real], ref_out[0], dtype),
            compare("chunk_delta_rule", case + " state", rule_new[row], ref_state[0], dtype),
        ]
        assert not conv_out[row, :pad].any() and not rule_out[row, :pad].any()
    assert_rows(rows)
    assert not conv_out[2].any() and not rule_out[2].any() and not step_out[2].any()
    assert torch.equal(conv_new[2], conv_state[2]) and torch.equal(step_conv[2], conv_state[2])
    assert torch.equal(rule_new[2], rule_state[2]) and torch.equal(step_rule[2], rule_state[2])


def test_states_update_in_place():
    """state_out may be state_in (TensorRT aliases present and past states): same results as separate
    buffers, for the conv, the chunked rule (two chunks) and the recurrent rule (two tokens)."""
    layer = make_layer(2, 4, 16, 32, seed=5)
    mixed, a, b = inputs(layer, 2, 70, seed=500)
    conv_state, rule_state = states(layer, 2, seed=501)
    conv_out, conv_new, _ = layer.run_conv(mixed, conv_state, FP32)
    in_place = Guarded(conv_state)
    out, _ = causal_conv(Guarded(mixed).tensor, Guarded(layer.conv_weight).tensor, in_place.tensor,
                         state_out=in_place.tensor)  # fmt: skip
    assert torch.equal(out, conv_out) and torch.equal(in_place.tensor, conv_new)
    assert not in_place.problems("conv state")
    for recurrent, tokens in ((False, 70), (True, 2)):
        qkv = conv_out[:, :tokens].contiguous()
        ref_out, ref_new, _ = layer.run_rule(qkv, a[:, :tokens], b[:, :tokens], rule_state, FP32, recurrent)
        in_place = Guarded(rule_state)
        run = recurrent_delta_rule if recurrent else chunk_delta_rule
        out, _ = run(qkv, a[:, :tokens].contiguous(), b[:, :tokens].contiguous(), layer.neg_exp_a,
                     layer.dt_bias, layer.nk, layer.dk, layer.dv, state=in_place.tensor,
                     state_out=in_place.tensor)  # fmt: skip
        assert torch.equal(out, ref_out) and torch.equal(in_place.tensor, ref_new)
        assert not in_place.problems("state")


def test_qwen35_397b_widths():
    """The 397B's linear attention (16 key heads, 64 value heads, head dims 128: the frozen constexprs) in
    bf16, batch 1: a 2-token prefill from zero state, then one decode step from the carried states."""
    layer = make_layer(16, 64, 128, 128, seed=4)
    conv_state = rule_state = None
    rows = []
    for step, tokens in enumerate((2, 1)):
        mixed, a, b = inputs(layer, 1, tokens, seed=400 + step)
        conv_rows, qkv, conv_state = layer.check_conv(mixed, conv_state, BF16, f"step {step}")
        rule_rows, rule_state = layer.check_rule(qkv, a, b, rule_state, BF16, f"step {step}", tokens == 1)
        rows += conv_rows + rule_rows
    assert_rows(rows)


def test_check_layer_on_tiny_preset():
    """`kernels check`'s view of this op on the tiny preset: every kernel, every precision, all passing; no
    rows for a full-attention layer."""
    from qwen_export.golden.reference import load_reference
    from qwen_export.presets import materialize

    model = load_reference(materialize("tiny-qwen3.5-moe", quiet=True))
    rows = [row for dtype in (FP32, FP16, BF16) for row in kernels.check_layer(model, 0, dtype)]
    assert {r.kernel for r in rows} == {spec.name for spec in kernels.KERNELS}
    assert len(rows) == 48  # 3 steps x (conv, act-state conv in fp16/bf16, rule) x 2 rows x 3 dtypes
    assert_rows(rows)
    assert kernels.check_layer(model, 3, FP32) == []
