"""The parallel layout of a Qwen3.5-family text tower: every weight tensor and every carried state, and how
tensor parallelism (tp) and expert parallelism (ep) cut each one into per-rank shards.

This module is the one statement of the sharding rules. `qwen-export plan` takes its per-rank figures from
it, and the graph sharder (one graph per rank) must slice with it too, so that what a plan promises is what
a rank holds. It knows shapes only, never bytes: the precision is applied by the caller (qwen_export.plan).

Ranks. One model instance runs on `tp` ranks r = 0..tp-1. Everything outside the routed experts is tensor
parallel over all tp ranks. The routed experts are split into `ep` groups (ep divides tp): rank r holds the
experts of group `r // (tp/ep)` and, within its group, slice `r % (tp/ep)` of the expert intermediate
dimension (`moe_tp = tp/ep`). ep = 1 is plain tensor parallelism of the experts (every rank holds a slice of
every expert); ep = tp is plain expert parallelism (each rank holds E/ep whole experts).

Rules (vLLM's Qwen3.5 / Qwen3-Next sharding is the reference: QKVParallelLinear, MergedColumnParallelLinear,
RowParallelLinear, VocabParallelEmbedding, FusedMoE):

- column-parallel (`column`): the output dimension (dim 0 of a [out, in] weight) is cut in tp equal pieces;
  a weight made of concatenated sections (in_proj_qkv = q|k|v, conv1d channels = q|k|v) is cut section by
  section, and rank r holds piece r of every section.
- row-parallel (`row`): the input dimension (dim 1) is cut; the partial products are all-reduced.
- `heads`: a per-head vector (A_log, dt_bias, q/k/v biases) follows its heads.
- `kv`: key/value heads are cut when tp <= num_key_value_heads; when tp exceeds them each rank keeps the one
  kv head its query heads read (head `r * n_kv // tp`), so each kv head is copied on tp/n_kv ranks.
- `vocab`: embedding and lm_head rows are cut by vocabulary.
- `expert`: stacked experts [E, ...] are cut along E over the ep groups, and along the intermediate
  dimension over moe_tp (gate_up_proj [E, 2I, H]: its gate and up halves separately; down_proj [E, H, I]:
  its last dimension).
- `replicated`: norms, the router (`mlp.gate`), `shared_expert_gate`, the DeltaNet gated-norm weight, and the
  attention output bias.

States follow their heads: rank r keeps the KV cache of its kv head(s), the conv state of its q/k/v
channels and the recurrent state of its value heads.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from qwen_export.errors import QwenExportError
from qwen_export.exporter.spec import ModelSpec


class LayoutError(QwenExportError):
    """The requested tp/ep cannot shard this model; the message names the field and what would work."""


@dataclass(frozen=True)
class Split:
    """One cut dimension: `dim` is made of `sections` (consecutive runs; one section when the dimension is
    not concatenated), each cut into `pieces` equal parts; rank r holds part `(r // stride) % pieces` of
    every section."""

    dim: int
    pieces: int
    sections: tuple[int, ...]
    stride: int = 1

    def piece(self, rank: int) -> int:
        return (rank // self.stride) % self.pieces

    def ranges(self, rank: int) -> tuple[tuple[int, int], ...]:
        """The [start, stop) runs of the full dimension that `rank` holds, in order."""
        out, offset, part = [], 0, self.piece(rank)
        for size in self.sections:
            step = size // self.pieces
            out.append((offset + part * step, offset + (part + 1) * step))
            offset += size
        return tuple(out)

    def size(self) -> int:
        return sum(s // self.pieces for s in self.sections)


@dataclass(frozen=True)
class Matrix:
    """A 2-D linear weight [out, in] as a checkpoint stores it (Qwen's FP8 release stores experts one per
    expert with gate and up separate): `count` of them of this shape, `name` an example checkpoint name."""

    name: str
    out_features: int
    in_features: int
    count: int = 1


class _Cut:
    """What a weight and a state share: a `shape` cut by `splits` (fields of the dataclasses below)."""

    shape: tuple[int, ...]
    splits: tuple[Split, ...]

    def shard_shape(self, rank: int = 0) -> tuple[int, ...]:
        shape = list(self.shape)
        for split in self.splits:
            shape[split.dim] = split.size()
        return tuple(shape)

    def shard_ranges(self, rank: int) -> tuple[tuple[tuple[int, int], ...], ...]:
        """Per dimension, the [start, stop) runs of the full tensor that `rank` holds (concatenated in order
        they form the rank's shard)."""
        ranges: list[tuple[tuple[int, int], ...]] = [((0, n),) for n in self.shape]
        for split in self.splits:
            ranges[split.dim] = split.ranges(rank)
        return tuple(ranges)

    def copies(self, tp: int) -> int:
        """On how many of the tp ranks each element is held."""
        return tp // math.prod(s.pieces for s in self.splits)


@dataclass(frozen=True)
class WeightTensor(_Cut):
    """One weight of the text tower, named and shaped as in the Hugging Face checkpoint (transformers'
    in-memory layout: experts stacked)."""

    name: str
    shape: tuple[int, ...]
    # attention | deltanet | router | experts | shared_expert | mlp | norm | embedding | lm_head
    component: str
    rule: str  # column | row | heads | kv | vocab | expert | replicated
    splits: tuple[Split, ...] = ()
    layer: int | None = None
    # a linear layer's weight (stacked experts included): what weight quantization covers
    linear: bool = False

    @property
    def short(self) -> str:
        """The name inside its layer (`self_attn.q_proj.weight`) or the global name."""
        return self.name.split(f"layers.{self.layer}.", 1)[1] if self.layer is not None else self.name

    def matrices(self, shape: tuple[int, ...] | None = None) -> list[Matrix]:
        """The 2-D linear weights this tensor (or a shard of it, `shape`) is made of, one entry per kind.
        Stacked experts are E matrices per projection (gate and up of gate_up_proj separately), named as in
        Qwen's FP8 release (`mlp.experts.{e}.gate_proj.weight`). Empty for a tensor that is not linear."""
        shape = self.shape if shape is None else shape
        if not self.linear:
            return []
        if self.name.endswith("experts.gate_up_proj"):
            experts, rows, cols = shape
            prefix = self.name.removesuffix("gate_up_proj")
            return [
                Matrix(prefix + "0.gate_proj.weight", rows // 2, cols, experts),
                Matrix(prefix + "0.up_proj.weight", rows // 2, cols, experts),
            ]
        if self.name.endswith("experts.down_proj"):
            experts, rows, cols = shape
            return [Matrix(self.name.removesuffix("down_proj") + "0.down_proj.weight", rows, cols, experts)]
        rows, cols = shape
        return [Matrix(self.name, rows, cols)]


@dataclass(frozen=True)
class StateTensor(_Cut):
    """One carried state, named as the exported graph's input (`past_key_values.<layer>.<kind>`). `shape`
    is per sequence; for the KV cache (`kind` key/value) it is per token: [kv_heads, head_dim]."""

    name: str
    shape: tuple[int, ...]
    kind: str  # key | value | conv | recurrent
    layer: int
    splits: tuple[Split, ...] = ()

    @property
    def per_token(self) -> bool:
        return self.kind in ("key", "value")


@dataclass(frozen=True)
class Layout:
    """Every weight and state of `spec`'s text tower with its cut for `tp` ranks and `ep` expert groups."""

    spec: ModelSpec
    tp: int
    ep: int
    weights: tuple[WeightTensor, ...] = field(repr=False)
    states: tuple[StateTensor, ...] = field(repr=False)

    @property
    def moe_tp(self) -> int:
        return self.tp // self.ep

    @property
    def ranks(self) -> range:
        return range(self.tp)

    def kv_heads_per_rank(self) -> int:
        return max(1, self.spec.num_key_value_heads // self.tp)

    def experts_per_rank(self) -> int:
        return self.spec.num_experts // self.ep if self.spec.num_experts else 0

    def rank_weights(self, rank: int) -> Iterator[tuple[WeightTensor, tuple[int, ...]]]:
        for tensor in self.weights:
            yield tensor, tensor.shard_shape(rank)

    def rank_states(self, rank: int) -> Iterator[tuple[StateTensor, tuple[int, ...]]]:
        for state in self.states:
            yield state, state.shard_shape(rank)

    def to_json(self) -> dict:
        return {
            "tp": self.tp,
            "ep": self.ep,
            "moe_tp": self.moe_tp,
            "weights": [
                {
                    "name": t.name,
                    "shape": list(t.shape),
                    "rule": t.rule,
                    "shard_shape": list(t.shard_shape(0)),
                    "copies": t.copies(self.tp),
                }
                for t in self.weights
            ],
            "states": [
                {
                    "name": s.name,
                    "shape": list(s.shape),
                    "shard_shape": list(s.shard_shape(0)),
                    "kind": s.kind,
                    "splits": [dataclasses.asdict(x) for x in s.splits],
                }
                for s in self.states
            ],
        }


def take(tensor: WeightTensor | StateTensor, array, rank: int):
    """Rank `rank`'s shard of `array` (the full tensor, any numpy-indexable array): the runs of each cut
    dimension concatenated in order. This is how a rank's graph must slice a checkpoint tensor."""
    import numpy as np

    index = [np.concatenate([np.arange(a, b) for a, b in runs]) for runs in tensor.shard_ranges(rank)]
    return array[np.ix_(*index)]


def text_prefix(spec: ModelSpec) -> str:
    """Where the text tower's tensors live in the checkpoint: the multimodal wrapper nests them."""
    return "model.language_model." if spec.multimodal else "model."


# --------------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------------


def problems(spec: ModelSpec, tp: int, ep: int = 1) -> list[str]:
    """Every reason `tp`/`ep` cannot shard `spec`, one sentence each naming the field; empty if they can."""
    if not isinstance(tp, int) or tp < 1:
        return [f"tp must be a positive integer, got {tp!r}"]
    if not isinstance(ep, int) or ep < 1:
        return [f"ep must be a positive integer, got {ep!r}"]
    out: list[str] = []

    def divides(field: str, value: int, by: int = tp, name: str = "tp") -> None:
        if value % by:
            out.append(f"{name} {by} does not divide {field} {value}")

    if spec.attention_layers():
        divides("num_attention_heads", spec.num_attention_heads)
        kv = spec.num_key_value_heads
        if tp <= kv:
            divides("num_key_value_heads", kv)
        elif tp % kv:
            out.append(
                f"tp {tp} is above num_key_value_heads {kv} but not a multiple of it (kv heads are copied)"
            )
    if spec.linear_layers():
        divides("linear_num_key_heads", spec.linear_num_key_heads)
    if "dense" in spec.mlp_types:
        divides("intermediate_size", spec.intermediate_size)
    if "moe" in spec.mlp_types:
        if spec.shared_expert_intermediate_size:
            divides("shared_expert_intermediate_size", spec.shared_expert_intermediate_size)
        if tp % ep:
            out.append(f"ep {ep} does not divide tp {tp} (the expert groups are made of the tp ranks)")
        else:
            divides("num_experts", spec.num_experts, ep, "ep")
            moe_tp = tp // ep
            divides("moe_intermediate_size", spec.moe_intermediate_size, moe_tp, "tp" if ep == 1 else "tp/ep")
    elif ep != 1:
        out.append(f"ep {ep} needs a MoE model; {spec.architecture} has dense MLPs (num_experts 0)")
    divides("vocab_size", spec.vocab_size)
    return out


def valid_tp(spec: ModelSpec, ep: int = 1, upto: int = 1024) -> list[int]:
    """The tp values (<= upto) that shard `spec` with `ep` expert groups."""
    return [tp for tp in range(1, upto + 1) if not problems(spec, tp, ep)]


def check(spec: ModelSpec, tp: int, ep: int = 1) -> None:
    """Raise one LayoutError listing every problem, with the tp values that would work."""
    found = problems(spec, tp, ep)
    if found:
        options = valid_tp(spec, ep if ep >= 1 and isinstance(ep, int) else 1, upto=256)
        hint = f"; tp that shards this model with ep {ep}: {', '.join(map(str, options))}" if options else ""
        raise LayoutError("; ".join(found) + hint)


# --------------------------------------------------------------------------------------------------------
# the tensors
# --------------------------------------------------------------------------------------------------------


def make_layout(spec: ModelSpec, tp: int = 1, ep: int = 1) -> Layout:
    """The layout of `spec` over `tp` ranks with `ep` expert groups; a LayoutError if they cannot shard it."""
    check(spec, tp, ep)
    weights: list[WeightTensor] = []
    states: list[StateTensor] = []
    prefix = text_prefix(spec)
    hidden = spec.hidden_size

    def col(size: int, sections: tuple[int, ...] | None = None) -> tuple[Split, ...]:
        return (Split(0, tp, sections or (size,)),)

    def add(name, shape, component, rule, splits=(), layer=None, linear=False):
        splits = tuple(s for s in splits if s.pieces > 1)  # a dimension cut in one piece is not cut
        weights.append(WeightTensor(name, tuple(shape), component, rule, splits, layer, linear))

    add(prefix + "embed_tokens.weight", (spec.vocab_size, hidden), "embedding", "vocab", col(spec.vocab_size))
    for i, kind in enumerate(spec.layer_types):
        p = f"{prefix}layers.{i}."
        if kind == "full_attention":
            _attention(spec, tp, p + "self_attn.", i, add)
            _kv_states(spec, tp, i, states)
        else:
            _deltanet(spec, tp, p + "linear_attn.", i, add)
            _deltanet_states(spec, tp, i, states)
        if spec.mlp_types[i] == "moe":
            _moe(spec, tp, ep, p + "mlp.", i, add)
        else:
            inter = spec.intermediate_size
            for proj in ("gate_proj", "up_proj"):
                add(f"{p}mlp.{proj}.weight", (inter, hidden), "mlp", "column", col(inter), i, True)
            add(f"{p}mlp.down_proj.weight", (hidden, inter), "mlp", "row", (Split(1, tp, (inter,)),), i, True)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            add(f"{p}{norm}.weight", (hidden,), "norm", "replicated", (), i)
    add(prefix + "norm.weight", (hidden,), "norm", "replicated")
    if not spec.tie_word_embeddings:
        add("lm_head.weight", (spec.vocab_size, hidden), "lm_head", "vocab", col(spec.vocab_size), None, True)
    states = [dataclasses.replace(s, splits=tuple(x for x in s.splits if x.pieces > 1)) for s in states]
    return Layout(spec, tp, ep, tuple(weights), tuple(states))


def _kv_split(spec: ModelSpec, tp: int, dim: int, size: int) -> Split:
    """Rows of `size` = n_kv heads x head_dim: cut by head, or one head per rank when tp > n_kv."""
    kv = spec.num_key_value_heads
    if tp <= kv:
        return Split(dim, tp, (size,))
    return Split(dim, kv, (size,), stride=tp // kv)


def _attention(spec: ModelSpec, tp: int, p: str, i: int, add) -> None:
    hidden, d = spec.hidden_size, spec.head_dim
    q_rows = spec.num_attention_heads * d * 2  # query and output gate, interleaved per head
    kv_rows = spec.num_key_value_heads * d
    o_in = spec.num_attention_heads * d

    def put(name, shape, rule, splits, linear=False):
        add(p + name, shape, "attention", rule, splits, i, linear)

    put("q_proj.weight", (q_rows, hidden), "column", (Split(0, tp, (q_rows,)),), True)
    for proj in ("k_proj", "v_proj"):
        put(f"{proj}.weight", (kv_rows, hidden), "kv", (_kv_split(spec, tp, 0, kv_rows),), True)
    put("o_proj.weight", (hidden, o_in), "row", (Split(1, tp, (o_in,)),), True)
    if spec.attention_bias:
        put("q_proj.bias", (q_rows,), "heads", (Split(0, tp, (q_rows,)),))
        for proj in ("k_proj", "v_proj"):
            put(f"{proj}.bias", (kv_rows,), "kv", (_kv_split(spec, tp, 0, kv_rows),))
        put("o_proj.bias", (hidden,), "replicated", ())
    for norm in ("q_norm", "k_norm"):
        put(f"{norm}.weight", (d,), "replicated", ())


def _deltanet(spec: ModelSpec, tp: int, p: str, i: int, add) -> None:
    hidden, vh, value_dim, conv_dim = (
        spec.hidden_size,
        spec.linear_num_value_heads,
        spec.value_dim,
        spec.conv_dim,
    )
    key_dim = spec.linear_num_key_heads * spec.linear_key_head_dim
    qkv = (key_dim, key_dim, value_dim)  # conv channels: q | k | v, each cut by heads

    def put(name, shape, rule, splits, linear=False):
        add(p + name, shape, "deltanet", rule, splits, i, linear)

    def rows(n: int, sections: tuple[int, ...] | None = None) -> tuple[Split, ...]:
        return (Split(0, tp, sections or (n,)),)

    if spec.family == "qwen3_next":
        # Fused, grouped per key head ([q, k, v, z] of each head group; [b, a] of each group): a contiguous
        # cut keeps whole groups together.
        put("in_proj_qkvz.weight", (conv_dim + value_dim, hidden), "column", rows(conv_dim + value_dim), True)
        put("in_proj_ba.weight", (2 * vh, hidden), "column", rows(2 * vh), True)
    else:
        put("in_proj_qkv.weight", (conv_dim, hidden), "column", rows(conv_dim, qkv), True)
        put("in_proj_z.weight", (value_dim, hidden), "column", rows(value_dim), True)
        for proj in ("in_proj_b", "in_proj_a"):
            put(f"{proj}.weight", (vh, hidden), "column", rows(vh), True)
    put("conv1d.weight", (conv_dim, 1, spec.linear_conv_kernel_dim), "column", rows(conv_dim, qkv))
    for vector in ("dt_bias", "A_log"):
        put(vector, (vh,), "heads", rows(vh))
    put("norm.weight", (spec.linear_value_head_dim,), "replicated", ())
    put("out_proj.weight", (hidden, value_dim), "row", (Split(1, tp, (value_dim,)),), True)


def _moe(spec: ModelSpec, tp: int, ep: int, p: str, i: int, add) -> None:
    hidden, e, inter = spec.hidden_size, spec.num_experts, spec.moe_intermediate_size
    moe_tp = tp // ep
    experts = Split(0, ep, (e,), stride=moe_tp)
    add(p + "gate.weight", (e, hidden), "router", "replicated", (), i, True)
    gate_up = (experts, Split(1, moe_tp, (inter, inter)))
    add(p + "experts.gate_up_proj", (e, 2 * inter, hidden), "experts", "expert", gate_up, i, True)
    down = (experts, Split(2, moe_tp, (inter,)))
    add(p + "experts.down_proj", (e, hidden, inter), "experts", "expert", down, i, True)
    shared = spec.shared_expert_intermediate_size
    if shared:
        for proj in ("gate_proj", "up_proj"):
            column = (Split(0, tp, (shared,)),)
            add(
                f"{p}shared_expert.{proj}.weight",
                (shared, hidden),
                "shared_expert",
                "column",
                column,
                i,
                True,
            )
        row = (Split(1, tp, (shared,)),)
        add(p + "shared_expert.down_proj.weight", (hidden, shared), "shared_expert", "row", row, i, True)
        add(p + "shared_expert_gate.weight", (1, hidden), "router", "replicated", (), i, True)


def _kv_states(spec: ModelSpec, tp: int, i: int, states: list[StateTensor]) -> None:
    kv = spec.num_key_value_heads
    for kind in ("key", "value"):
        split = Split(0, tp, (kv,)) if tp <= kv else Split(0, kv, (kv,), stride=tp // kv)
        states.append(StateTensor(f"past_key_values.{i}.{kind}", (kv, spec.head_dim), kind, i, (split,)))


def _deltanet_states(spec: ModelSpec, tp: int, i: int, states: list[StateTensor]) -> None:
    key_dim = spec.linear_num_key_heads * spec.linear_key_head_dim
    qkv = (key_dim, key_dim, spec.value_dim)
    conv = (spec.conv_dim, spec.linear_conv_kernel_dim - 1)
    states.append(StateTensor(f"past_key_values.{i}.conv_state", conv, "conv", i, (Split(0, tp, qkv),)))
    vh = spec.linear_num_value_heads
    recurrent = (vh, spec.linear_key_head_dim, spec.linear_value_head_dim)
    states.append(
        StateTensor(f"past_key_values.{i}.recurrent_state", recurrent, "recurrent", i, (Split(0, tp, (vh,)),))
    )
