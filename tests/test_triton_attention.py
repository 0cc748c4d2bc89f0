"""GatedAttention's Triton kernels (plugins/gated_attention/*_triton.py) under Triton's interpreter, against
transformers' Qwen3_5MoeAttention (eager, fp32): qk_norm_rope, flash_prefill, split_kv_decode + combine.

bf16: the interpreter's bf16 tl.dot multiplies raw bits, so `upcast_bf16_dots()` widens bf16 dot operands
to fp32 (what bf16 MMA with fp32 accumulation computes); the kernels are unchanged.
"""

from __future__ import annotations

import inspect

from qwen_export.plugins.triton_support import SMS, interpreter, upcast_bf16_dots

assert interpreter(), "TRITON_INTERPRET must be 1 (or unset) before the kernel modules are imported"

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import (  # noqa: E402
    Qwen3_5MoeAttention,
    Qwen3_5MoeTextRotaryEmbedding,
)

from qwen_export.plugins.gated_attention import kernels  # noqa: E402
from qwen_export.plugins.gated_attention.kernels import (  # noqa: E402
    FLASH_PREFILL,
    SPLIT_KV_DECODE,
    cache_layer,
    check_rows,
    reference_gated_attention,
    rotary,
    run_gated_attention,
)

upcast_bf16_dots()

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16


def make_attention(
    hidden: int, heads: int, kv_heads: int, head_dim: int, partial: float = 0.25, seed: int = 0
):
    """A transformers Qwen3_5MoeAttention (layer 0 of a one-layer config) with weights that give O(1)
    outputs and non-trivial q/k norms, and its rotary embedding."""
    config = transformers.Qwen3_5MoeTextConfig(
        vocab_size=64, hidden_size=hidden, num_hidden_layers=1, layer_types=["full_attention"],
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": partial},
        num_experts=2, num_experts_per_tok=1, moe_intermediate_size=8, shared_expert_intermediate_size=8,
    )  # fmt: skip
    config._attn_implementation = "eager"
    with torch.device("meta"):
        attn = Qwen3_5MoeAttention(config, layer_idx=0)
    gen = torch.Generator().manual_seed(seed)
    params = {}
    for name, p in attn.named_parameters():
        if name.endswith("norm.weight"):
            params[name] = 0.3 * torch.randn(p.shape, generator=gen)
        else:
            params[name] = torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5
    attn.load_state_dict(params, assign=True)
    return attn.eval(), Qwen3_5MoeTextRotaryEmbedding(config)


def run_case(attn, rope, T: int, past: int = 0, dtype=FP32, batch: int = 1, pads=(), decode=None,
             num_splits=None, sm=None, seed: int = 0):  # fmt: skip
    """A step of T tokens on `past` cached ones (made by the reference's own prefill), ours against the
    module. `pads`: left-padding length per batch row (of the whole past + T sequence). Returns the rows and
    our run."""
    gen = torch.Generator().manual_seed(seed)
    S = past + T
    hidden = torch.randn(batch, S, attn.config.hidden_size, generator=gen)
    mask = torch.ones(batch, S, dtype=torch.long)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    cos, sin = rotary(rope, hidden, torch.arange(S).expand(batch, -1))
    cache = past_key = past_value = None
    if past:
        _, cache, _ = reference_gated_attention(
            attn, hidden[:, :past], cos[:, :past], sin[:, :past], mask[:, :past]
        )
        past_key, past_value = (t.clone() for t in cache_layer(cache, 0))
    step = slice(past, S)
    ref_out, cache, ref_q = reference_gated_attention(
        attn, hidden[:, step], cos[:, step], sin[:, step], mask, cache
    )
    ours = run_gated_attention(
        attn, hidden[:, step], cos[:, step], sin[:, step], mask, past_key, past_value, dtype=dtype,
        decode=decode, num_splits=num_splits, sm=sm,
    )  # fmt: skip
    kernel = SPLIT_KV_DECODE if ours.num_splits is not None else FLASH_PREFILL
    rows = check_rows(ours, ref_out, cache, ref_q, 0, kernel, f"T={T} past={past} {dtype}", dtype)
    return rows, ours


def assert_rows(rows):
    assert rows and all(r.guards_ok for r in rows), [r for r in rows if not r.guards_ok]
    failed = [f"{r.kernel} {r.case}: {r.max_abs:.3e} > {r.tolerance:.0e}" for r in rows if not r.passed]
    assert not failed, failed


@pytest.fixture(scope="module")
def gqa_3_1():
    return make_attention(hidden=96, heads=3, kv_heads=1, head_dim=64, seed=1)


@pytest.fixture(scope="module")
def tiny_4_2():
    return make_attention(hidden=64, heads=4, kv_heads=2, head_dim=32, seed=2)


@pytest.mark.parametrize("past", [0, 37])
@pytest.mark.parametrize("T", [1, 63, 64, 65, 130])
def test_prefill_lengths_gqa_3_q_heads_1_kv(gqa_3_1, T, past):
    rows, ours = run_case(*gqa_3_1, T=T, past=past, decode=False)
    assert ours.num_splits is None
    assert_rows(rows)


@pytest.mark.parametrize("dtype", [FP16, BF16])
@pytest.mark.parametrize(("T", "past"), [(65, 0), (64, 37)])
def test_prefill_half_precision(gqa_3_1, T, past, dtype):
    assert_rows(run_case(*gqa_3_1, T=T, past=past, dtype=dtype)[0])


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16])
@pytest.mark.parametrize("partial", [0.25, 0.5])
def test_head_dim_256_partial_rotary(partial, dtype):
    attn, rope = make_attention(hidden=128, heads=4, kv_heads=2, head_dim=256, partial=partial, seed=3)
    assert rope.inv_freq.numel() * 2 == int(256 * partial)
    assert_rows(run_case(attn, rope, T=65, past=3, dtype=dtype)[0])
    rows, ours = run_case(attn, rope, T=1, past=100, dtype=dtype)
    assert ours.num_splits == 2
    assert_rows(rows)


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_left_padded_batch_prefill_then_decode(tiny_4_2, dtype):
    """Row 0 unpadded, row 1 padded by 5, row 2 by 64 (one real token), row 3 by 30 of a 37-token past."""
    pads = (0, 5, 64, 30)
    assert_rows(run_case(*tiny_4_2, T=65, dtype=dtype, batch=3, pads=pads[:3])[0])
    assert_rows(run_case(*tiny_4_2, T=28, past=37, dtype=dtype, batch=4, pads=pads)[0])
    rows, ours = run_case(*tiny_4_2, T=1, past=70, dtype=dtype, batch=4, pads=pads)
    assert ours.num_splits == 2
    assert_rows(rows)


def test_fully_masked_row_is_mean_of_v_as_reference(tiny_4_2):
    """A sequence whose mask is all zeros: the reference's float32.min scores average V over every key."""
    assert_rows(run_case(*tiny_4_2, T=1, past=80, batch=2, pads=(0, 81))[0])
    assert_rows(run_case(*tiny_4_2, T=20, past=0, batch=2, pads=(0, 20))[0])


@pytest.mark.parametrize(
    ("dtype", "num_splits"), [(FP32, None), (FP32, 1), (FP32, 3), (FP16, None), (BF16, None)]
)
def test_decode_long_cache_split_across_programs(gqa_3_1, dtype, num_splits):
    rows, ours = run_case(*gqa_3_1, T=1, past=700, dtype=dtype, num_splits=num_splits)
    assert ours.num_splits == (num_splits or 11)  # 701 keys in 64-key tiles
    assert_rows(rows)


@pytest.mark.parametrize("sm", ["sm_80", "sm_86", "sm_90a"])
def test_frozen_tiles_of_each_sm_class(sm):
    """Each class of frozen tiles: prefill at head_dim 128 takes 128 x 64 tiles on sm_80/90a/100a and 64 x 32
    on the ~100 KiB shared-memory sm_86/89/120a; decode at head_dim 256 takes 64-key tiles and at most 32
    (sm_80) or 64 (sm_90a/100a) splits, 32-key tiles and 32 splits on sm_86/89/120a."""
    attn, rope = make_attention(hidden=64, heads=2, kv_heads=1, head_dim=128, seed=4)
    assert_rows(run_case(attn, rope, T=70, past=5, sm=sm)[0])
    attn, rope = make_attention(hidden=64, heads=2, kv_heads=1, head_dim=256, seed=4)
    rows, ours = run_case(attn, rope, T=1, past=2100, sm=sm)
    assert ours.num_splits == {"sm_80": 17, "sm_86": 22, "sm_90a": 33}[sm]  # 2101 keys
    assert_rows(rows)


@pytest.fixture(scope="module")
def attention_397b():
    """Qwen3.5-397B-A17B's attention: hidden 4096, 32 q heads, 2 kv heads of dim 256 (a GQA group of 16)."""
    return make_attention(hidden=4096, heads=32, kv_heads=2, head_dim=256, seed=5)


@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_397b_widths(attention_397b, dtype):
    assert_rows(run_case(*attention_397b, T=3, past=2, dtype=dtype, batch=2, pads=(0, 2))[0])
    rows, ours = run_case(*attention_397b, T=1, past=70, dtype=dtype)
    assert ours.num_splits == 2
    assert_rows(rows)


def test_check_layer_on_tiny_preset():
    from qwen_export.golden.reference import load_reference
    from qwen_export.presets import materialize

    model = load_reference(materialize("tiny-qwen3.5-moe", quiet=True))
    layer_types = model.config.layer_types
    full = layer_types.index("full_attention")
    assert kernels.check_layer(model, layer_types.index("linear_attention"), FP32) == []
    for dtype in (FP32, FP16, BF16):
        rows = kernels.check_layer(model, full, dtype)
        assert {r.kernel for r in rows} == {kernels.QK_NORM_ROPE, FLASH_PREFILL, SPLIT_KV_DECODE}
        assert_rows(rows)


def test_kernel_specs_match_their_kernels():
    """What the AOT build reads: every spec's signature names its kernel's arguments in order, "constexpr"
    exactly for the tl.constexpr ones, and every SM/variant config gives a value to each of those."""
    names = [s.name for s in kernels.KERNELS]
    assert len(names) == len(set(names))
    for spec in kernels.KERNELS:
        params = inspect.signature(spec.kernel.fn).parameters
        assert list(spec.signature) == list(params), spec.name
        constexpr = {n for n, p in params.items() if "constexpr" in str(p.annotation)}
        assert {n for n, t in spec.signature.items() if t == "constexpr"} == constexpr, spec.name
        for sm in SMS:
            for variant in spec.variants:
                signature, values, warps, stages = spec.config(sm, variant)
                assert set(values) == constexpr, (spec.name, sm, variant)
                assert all("{act}" not in t for t in signature.values())
                assert warps in (1, 2, 4, 8) and stages >= 1
                head_dim = values["HEAD_DIM"]
                assert spec.name.endswith(f"_hd{head_dim}")


_COMPILE = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from qwen_export.plugins.gated_attention.kernels import KERNELS
out = []
for sm, cc, variant in (("sm_90a", 90, "bf16"), ("sm_86", 86, "fp16")):
    for spec in KERNELS:
        if spec.name.endswith("_hd256"):
            sig, consts, warps, stages = spec.config(sm, variant)
            src = ASTSource(spec.kernel, sig, constexprs=consts)
            options = {"num_warps": warps, "num_stages": stages}
            k = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
            out.append([spec.name, sm, k.metadata.shared, len(k.asm["cubin"])])
print(json.dumps(out))
"""


def test_head_dim_256_kernels_compile_to_cubins(tmp_path):
    """The interpreter accepts code the compiler rejects (an `if` whose branches give one name two types, for
    one): compile every head_dim-256 kernel ahead of time, as the AOT build does, for sm_90a (bf16) and sm_86
    (fp16), outside the interpreter, and check its shared memory fits the SM (227 / 99 KiB)."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(built) == 2 * sum(s.name.endswith("_hd256") for s in kernels.KERNELS) == 8
    for name, sm, shared, cubin_bytes in built:
        assert cubin_bytes > 0 and shared <= {"sm_90a": 227, "sm_86": 99}[sm] * 1024, (name, sm, shared)
