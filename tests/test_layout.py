"""The parallel layout (qwen_export/layout.py): every weight named and shaped as transformers holds it, every
rank's shard covering the full tensor (exactly once, or `copies` times where replicated), kv heads copied
when tp exceeds them, and one-line errors naming the field."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import numpy as np
import pytest

from qwen_export.errors import QwenExportError
from qwen_export.exporter.spec import spec_from_config
from qwen_export.layout import LayoutError, make_layout, take, valid_tp
from qwen_export.presets import get_preset


@functools.cache
def spec_of(preset: str):
    return spec_from_config(get_preset(preset).config_dict())


def transformers_text_tensors(preset: str) -> dict[str, tuple[int, ...]]:
    """The text tower's checkpoint names and shapes as transformers' own model holds them (on the meta
    device: no memory), without the vision tower and MTP layers, and without lm_head when it is tied."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.for_model(**get_preset(preset).config_dict())
    with torch.device("meta"):
        multimodal = hasattr(config, "vision_config")
        model = (AutoModelForImageTextToText if multimodal else AutoModelForCausalLM).from_config(config)
    tensors = {k: tuple(v.shape) for k, v in model.state_dict().items() if ".visual." not in f".{k}"}
    if spec_of(preset).tie_word_embeddings:
        tensors.pop("lm_head.weight")
    return {k: v for k, v in tensors.items() if not k.startswith("mtp.")}


@pytest.mark.parametrize(
    "preset",
    ["tiny-qwen3.5-moe", "tiny-qwen3-next", "tiny-qwen3.5", "qwen3.5-397b-a17b", "qwen3-next-80b-a3b",
     "qwen3.5-4b"],
)  # fmt: skip
def test_every_weight_is_named_and_shaped_as_transformers_holds_it(preset):
    layout = make_layout(spec_of(preset))
    assert {t.name: t.shape for t in layout.weights} == transformers_text_tensors(preset)


# --------------------------------------------------------------------------------------------------------
# shards cover the full tensors
# --------------------------------------------------------------------------------------------------------


def coverage(tensor, tp: int) -> None:
    """Every element of `tensor` is held by exactly tensor.copies(tp) ranks, and each rank's shard shape is
    what its ranges select. Checked on the grid of elementary intervals between all range boundaries, so
    a [512, 2048, 4096] stack costs a few cells, not 4G elements."""
    per_rank = [tensor.shard_ranges(r) for r in range(tp)]
    for r, ranges in enumerate(per_rank):
        assert tuple(sum(b - a for a, b in runs) for runs in ranges) == tensor.shard_shape(r), tensor.name
    cuts = []
    for dim, size in enumerate(tensor.shape):
        points = {0, size} | {p for ranges in per_rank for run in ranges[dim] for p in run}
        cuts.append(sorted(points))
    copies = tensor.copies(tp)
    for cell in itertools.product(*(list(itertools.pairwise(c)) for c in cuts)):
        holders = sum(
            all(any(a <= lo and hi <= b for a, b in ranges[dim]) for dim, (lo, hi) in enumerate(cell))
            for ranges in per_rank
        )
        assert holders == copies, (tensor.name, cell, holders, copies)
    held = sum(math.prod(tensor.shard_shape(r)) for r in range(tp))
    assert held == copies * math.prod(tensor.shape), tensor.name


@pytest.mark.parametrize(
    "preset, tp, ep",
    [
        ("qwen3.5-397b-a17b", 1, 1), ("qwen3.5-397b-a17b", 2, 1), ("qwen3.5-397b-a17b", 4, 2),
        ("qwen3.5-397b-a17b", 8, 1), ("qwen3.5-397b-a17b", 8, 8), ("qwen3.5-397b-a17b", 16, 4),
        ("qwen3-next-80b-a3b", 8, 2), ("qwen3.5-27b", 4, 1), ("tiny-qwen3.5-moe", 2, 2),
        ("tiny-qwen3-next", 2, 1),
    ],
)  # fmt: skip
def test_shards_cover_every_tensor_exactly_copies_times(preset, tp, ep):
    layout = make_layout(spec_of(preset), tp, ep)
    # one layer of each kind is enough for the big models (the others repeat it), plus the global tensors
    layers = {layout.spec.layer_types.index(k) for k in set(layout.spec.layer_types)}
    for tensor in layout.weights:
        if tensor.layer is None or tensor.layer in layers:
            coverage(tensor, tp)
    for state in layout.states:
        if state.layer in layers:
            coverage(state, tp)


@pytest.mark.parametrize(
    "preset, tp, ep",
    [(p, tp, ep) for p in ("tiny-qwen3.5-moe", "tiny-qwen3-next") for tp, ep in ((1, 1), (2, 1), (2, 2))]
    + [("tiny-qwen3.5", 1, 1), ("tiny-qwen3.5", 2, 1)],
)
def test_slicing_real_arrays_reassembles_the_full_tensors(preset, tp, ep):
    """On the tiny presets, slice numbered arrays with each rank's ranges: the shard has the stated shape and
    the ranks together hold every element `copies` times."""
    layout = make_layout(spec_of(preset), tp, ep)
    for tensor in layout.weights:
        full = np.arange(math.prod(tensor.shape)).reshape(tensor.shape)
        counts = np.zeros(full.size, np.int64)
        for r in range(tp):
            shard = take(tensor, full, r)
            assert shard.shape == tensor.shard_shape(r), tensor.name
            np.add.at(counts, shard.ravel(), 1)
        assert (counts == tensor.copies(tp)).all(), tensor.name


def test_section_split_gives_each_rank_its_q_k_v_heads():
    """in_proj_qkv and conv1d are q|k|v: rank r holds the r-th piece of each section (as vLLM's merged
    column-parallel loader cuts them), not the r-th contiguous piece of the whole."""
    layout = make_layout(spec_of("qwen3.5-397b-a17b"), 8)
    qkv = next(t for t in layout.weights if t.name.endswith("layers.0.linear_attn.in_proj_qkv.weight"))
    key_dim, value_dim = 16 * 128, 64 * 128  # 16 key heads and 64 value heads of 128
    assert qkv.shard_ranges(3)[0] == (
        (3 * 256, 4 * 256),  # q: key heads 6, 7
        (key_dim + 3 * 256, key_dim + 4 * 256),  # k: key heads 6, 7
        (2 * key_dim + 3 * 1024, 2 * key_dim + 4 * 1024),  # v: value heads 24..31
    )
    assert qkv.shard_shape(3) == (256 + 256 + 1024, 4096) and value_dim // 8 == 1024


@pytest.mark.parametrize("tp, held", [(1, [(0, 512)]), (2, [(0, 256), (256, 512)])])
def test_kv_heads_are_cut_while_tp_is_at_most_their_count(tp, held):
    layout = make_layout(spec_of("qwen3.5-397b-a17b"), tp)  # 2 kv heads of 256
    k_proj = next(t for t in layout.weights if t.name.endswith("layers.3.self_attn.k_proj.weight"))
    assert [k_proj.shard_ranges(r)[0][0] for r in range(tp)] == held
    assert k_proj.copies(tp) == 1


def test_kv_heads_are_copied_when_tp_exceeds_them():
    layout = make_layout(spec_of("qwen3.5-397b-a17b"), 8)
    assert layout.kv_heads_per_rank() == 1
    for name in ("k_proj", "v_proj"):
        proj = next(t for t in layout.weights if t.name.endswith(f"layers.3.self_attn.{name}.weight"))
        assert proj.shard_shape(0) == (256, 4096) and proj.copies(8) == 4
        # ranks 0-3 read kv head 0 (their q heads 0..15), ranks 4-7 kv head 1 (q heads 16..31)
        assert [proj.shard_ranges(r)[0] for r in range(8)] == [((0, 256),)] * 4 + [((256, 512),)] * 4
    q_proj = next(t for t in layout.weights if t.name.endswith("layers.3.self_attn.q_proj.weight"))
    assert q_proj.shard_shape(0) == (32 * 256 * 2 // 8, 4096) and q_proj.copies(8) == 1
    key = next(s for s in layout.states if s.name == "past_key_values.3.key")
    assert key.shard_shape(0) == (1, 256) and key.copies(8) == 4


def test_expert_parallel_gives_each_group_whole_experts_and_cuts_within_the_group():
    spec = spec_of("qwen3.5-397b-a17b")  # 512 experts, intermediate 1024
    plain_ep = make_layout(spec, 8, 8)
    gate_up = next(t for t in plain_ep.weights if t.name.endswith("layers.0.mlp.experts.gate_up_proj"))
    assert gate_up.shard_shape(5) == (64, 2048, 4096)
    assert gate_up.shard_ranges(5)[0] == ((320, 384),) and gate_up.shard_ranges(5)[1] == ((0, 2048),)
    mixed = make_layout(spec, 8, 2)  # 2 groups of 256 experts, each cut 4 ways along the intermediate
    gate_up = next(t for t in mixed.weights if t.name.endswith("layers.0.mlp.experts.gate_up_proj"))
    down = next(t for t in mixed.weights if t.name.endswith("layers.0.mlp.experts.down_proj"))
    assert gate_up.shard_shape(6) == (256, 512, 4096) and down.shard_shape(6) == (256, 4096, 256)
    assert gate_up.shard_ranges(6)[:2] == (((256, 512),), ((512, 768), (1024 + 512, 1024 + 768)))
    assert down.shard_ranges(6)[2] == ((512, 768),)
    router = next(t for t in mixed.weights if t.name.endswith("layers.0.mlp.gate.weight"))
    assert router.rule == "replicated" and router.copies(8) == 8
    tp_only = make_layout(spec, 8, 1)
    gate_up = next(t for t in tp_only.weights if t.name.endswith("layers.0.mlp.experts.gate_up_proj"))
    assert gate_up.shard_shape(0) == (512, 256, 4096)


def test_deltanet_state_per_rank_holds_its_own_heads():
    layout = make_layout(spec_of("qwen3.5-397b-a17b"), 8)
    conv = next(s for s in layout.states if s.name == "past_key_values.0.conv_state")
    recurrent = next(s for s in layout.states if s.name == "past_key_values.0.recurrent_state")
    assert conv.shape == (2 * 16 * 128 + 64 * 128, 3) and conv.shard_shape(0) == (12288 // 8, 3)
    assert recurrent.shape == (64, 128, 128) and recurrent.shard_shape(0) == (8, 128, 128)
    assert conv.copies(8) == recurrent.copies(8) == 1


def test_layout_does_not_depend_on_precision():
    # shapes only: nothing in a layout says bytes
    fields = {f.name for f in dataclasses.fields(make_layout(spec_of("tiny-qwen3.5-moe")).weights[0])}
    assert not fields & {"dtype", "bytes", "precision"}


# --------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "preset, changes, tp, ep, field",
    [
        ("qwen3.5-397b-a17b", {}, 3, 1, "num_attention_heads"),
        ("qwen3.5-397b-a17b", {}, 32, 1, "linear_num_key_heads"),
        ("qwen3.5-397b-a17b", {"num_attention_heads": 24, "num_key_value_heads": 4}, 6, 1, "key_value_heads"),
        ("qwen3.5-397b-a17b", {"moe_intermediate_size": 1020}, 16, 1, "moe_intermediate_size"),
        ("qwen3.5-397b-a17b", {"moe_intermediate_size": 1020}, 16, 2, "tp/ep 8 does not divide moe_inter"),
        ("qwen3.5-397b-a17b", {"vocab_size": 248321}, 2, 1, "vocab_size"),
        ("qwen3.5-397b-a17b", {"num_experts": 12}, 8, 8, "ep 8 does not divide num_experts 12"),
        ("qwen3.5-397b-a17b", {}, 4, 8, "ep 8 does not divide tp 4"),
        ("qwen3.5-27b", {}, 4, 2, "needs a MoE model"),
        ("qwen3.5-27b", {}, 0, 1, "tp must be a positive integer"),
    ],
)  # fmt: skip
def test_unshardable_requests_are_one_line_errors_naming_the_field(preset, changes, tp, ep, field):
    spec = dataclasses.replace(spec_of(preset), **changes)
    with pytest.raises(LayoutError) as info:
        make_layout(spec, tp, ep)
    message = str(info.value)
    assert isinstance(info.value, QwenExportError) and "\n" not in message
    assert field in message, message


def test_an_error_lists_the_tp_that_would_work():
    with pytest.raises(LayoutError, match=r"tp that shards this model with ep 1: 1, 2, 4, 8, 16$"):
        make_layout(spec_of("qwen3.5-397b-a17b"), 6)
    assert valid_tp(spec_of("qwen3.5-397b-a17b"), ep=1, upto=64) == [1, 2, 4, 8, 16]
    assert valid_tp(spec_of("tiny-qwen3.5-moe"), ep=2, upto=64) == [2]
