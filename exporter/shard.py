"""One rank of a tensor/expert-parallel export: the rank's model shape, its slice of every checkpoint tensor,
and the collectives where the ranks meet.

The cuts are qwen_export.layout's (the one statement of the sharding rules, which `plan` reads too): this
module only applies them. A rank's graph is the exporter's graph of a narrower model: the same builder code
runs on `rank_spec` (fewer heads, a slice of every intermediate dimension and of the vocabulary) and reads
through `RankCheckpoint`, which hands out each tensor's shard. What a narrower model cannot express is added
where the exporter calls this module:

- after o_proj, out_proj, the MoE and the dense MLP (row-parallel: each rank holds a partial sum): all_reduce;
- the embedding (vocabulary-parallel): each rank gathers the rows it holds, zeros for the others, all_reduce;
- the logits (vocabulary-parallel): all_gather along the vocabulary;
- the MoE: the router is replicated and routes over every expert; a rank runs only its expert group's
  experts (their routing columns), on its slice of their intermediate dimension.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from qwen_export.collectives import ALL_GATHER, ALL_REDUCE
from qwen_export.collectives_trt import trt_collective
from qwen_export.errors import QwenExportError
from qwen_export.exporter.builder import GraphBuilder
from qwen_export.exporter.checkpoint import Checkpoint, Source, _name
from qwen_export.exporter.spec import ModelSpec
from qwen_export.layout import Layout, Split, WeightTensor, make_layout

_PER_EXPERT = re.compile(
    r"^(?P<mlp>.*\.mlp\.)experts\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$"
)


def rank_spec(spec: ModelSpec, layout: Layout) -> ModelSpec:
    """The model shape one rank computes: its heads, its slices of the intermediate dimensions and of the
    vocabulary. num_experts stays whole: the router is replicated and routes over every expert."""
    tp = layout.tp
    return dataclasses.replace(
        spec,
        num_attention_heads=spec.num_attention_heads // tp,
        num_key_value_heads=layout.kv_heads_per_rank(),
        linear_num_key_heads=spec.linear_num_key_heads // tp,
        linear_num_value_heads=spec.linear_num_value_heads // tp,
        intermediate_size=spec.intermediate_size // tp,
        moe_intermediate_size=spec.moe_intermediate_size // layout.moe_tp,
        shared_expert_intermediate_size=spec.shared_expert_intermediate_size // tp,
        vocab_size=spec.vocab_size // tp,
    )


class RankCheckpoint(Checkpoint):
    """A checkpoint seen by one rank: every tensor the layout cuts reads as this rank's shard (a whole
    tensor, one expert of a stacked tensor, one per-expert matrix, or a block of vocabulary rows)."""

    def __init__(self, ckpt: Checkpoint, layout: Layout, rank: int, text_prefix: str) -> None:
        self.__dict__.update(ckpt.__dict__)  # shares the open files, the used-set and the FP8 facts
        self.layout, self.rank = layout, rank
        layout_prefix = "model.language_model." if layout.spec.multimodal else "model."
        self._by_name: dict[str, WeightTensor] = {}
        for tensor in layout.weights:
            local = tensor.name.removeprefix(layout_prefix)
            self._by_name[text_prefix + local if local != tensor.name else tensor.name] = tensor

    def require(self, name: str, shape: Sequence[int]) -> None:
        tensor = self._by_name.get(name)
        if tensor is None:
            match = _PER_EXPERT.match(name)
            if match and len(shape) == 2:  # one expert's matrix: its intermediate dimension is cut
                dim = 1 if match["proj"] == "down_proj" else 0
                shape = tuple(n * self.layout.moe_tp if d == dim else n for d, n in enumerate(shape))
            super().require(name, shape)
            return
        super().require(name, tensor.shape)
        if tuple(shape) != tensor.shard_shape(self.rank):
            raise QwenExportError(
                f"{name}: rank {self.rank} expects a shard of {tuple(shape)}, the layout gives "
                f"{tensor.shard_shape(self.rank)} (an exporter and layout disagreement: please report it)"
            )

    def _raw(self, source: Source) -> np.ndarray:
        name = _name(source)
        tensor = self._by_name.get(name)
        if tensor is not None:
            if isinstance(source, str):
                return _cut(super()._raw(source), tensor.splits, self.rank)
            part = source[1]
            if isinstance(part, tuple):  # a block of this rank's rows: the same rows of the full tensor
                ((start, _),) = _single_run(tensor, 0, self.rank)
                return _cut(super()._raw((name, (start + part[0], start + part[1]))),
                            [s for s in tensor.splits if s.dim != 0], self.rank)  # fmt: skip
            # one expert (a global index) of a stacked tensor: cut its remaining dimensions
            inner = [dataclasses.replace(s, dim=s.dim - 1) for s in tensor.splits if s.dim != 0]
            return _cut(super()._raw(source), inner, self.rank)
        match = _PER_EXPERT.match(name) if isinstance(source, str) else None
        if match and self.layout.moe_tp > 1:
            inter = self.layout.spec.moe_intermediate_size
            dim = 1 if match["proj"] == "down_proj" else 0
            return _cut(super()._raw(source), [Split(dim, self.layout.moe_tp, (inter,))], self.rank)
        return super()._raw(source)


def _single_run(tensor: WeightTensor, dim: int, rank: int) -> tuple[tuple[int, int], ...]:
    split = next(s for s in tensor.splits if s.dim == dim)
    runs = split.ranges(rank)
    assert len(runs) == 1, (tensor.name, runs)
    return runs


def _cut(array: np.ndarray, splits: Sequence[Split], rank: int) -> np.ndarray:
    for split in splits:
        index = np.concatenate([np.arange(a, b) for a, b in split.ranges(rank)])
        array = np.take(array, index, axis=split.dim)
    return array


@dataclass
class RankContext:
    """What the graph builder needs to know about the rank it builds, and the collectives it has placed."""

    layout: Layout
    rank: int
    collectives: list[str] = field(default_factory=list)

    @classmethod
    def make(cls, spec: ModelSpec, tp: int, ep: int, rank: int) -> RankContext:
        return cls(make_layout(spec, tp, ep), rank)

    @property
    def nb_rank(self) -> int:
        return self.layout.tp

    def experts(self) -> range:
        """The global indices of the experts this rank runs (its expert group)."""
        per = self.layout.experts_per_rank()
        group = self.rank // self.layout.moe_tp
        return range(group * per, (group + 1) * per)

    def vocab_range(self) -> tuple[int, int]:
        size = self.layout.spec.vocab_size // self.layout.tp
        return self.rank * size, (self.rank + 1) * size

    def _collective(self, gb: GraphBuilder, x: ir.Value, operation: str) -> ir.Value:
        name = gb.node_name("DistCollective")
        node = trt_collective(x, operation, self.nb_rank, name)
        gb.graph.append(node)
        self.collectives.append(name)
        out = node.outputs[0]
        out.name, out.type = f"{name}/output", x.type
        out.shape = x.shape if operation == ALL_REDUCE else None
        return out

    def all_reduce(self, gb: GraphBuilder, x: ir.Value) -> ir.Value:
        """The sum of every rank's partial `x` (after a row-parallel projection)."""
        return self._collective(gb, x, ALL_REDUCE)

    def embed(self, gb: GraphBuilder, table: ir.Value, ids: ir.Value) -> ir.Value:
        """Vocabulary-parallel embedding: rows outside this rank's slice read as zero, then all_reduce."""
        start, stop = self.vocab_range()
        local = gb.op("Sub", ids, gb.const(np.array(start, np.int64)))
        inside = gb.op(
            "And",
            gb.op("GreaterOrEqual", ids, gb.const(np.array(start, np.int64))),
            gb.op("Less", ids, gb.const(np.array(stop, np.int64))),
        )
        safe = gb.op("Where", inside, local, gb.const(np.array(0, np.int64)))
        rows = gb.op("Gather", table, safe, axis=0)  # [B, T, H]
        rows = gb.op("Mul", rows, gb.unsqueeze(gb.op("Cast", inside, to=ir.DataType.FLOAT), [2]))
        return self.all_reduce(gb, rows)

    def gather_logits(self, gb: GraphBuilder, logits: ir.Value) -> ir.Value:
        """[B, T, V/tp] on each rank -> [B, T, V]: all_gather concatenates along axis 0, so the vocabulary
        goes first and comes back."""
        vocab_first = gb.transpose(logits, [2, 0, 1])
        gathered = self._collective(gb, vocab_first, ALL_GATHER)
        return gb.transpose(gathered, [1, 2, 0])

    def routing_columns(self, gb: GraphBuilder, routing: ir.Value) -> ir.Value:
        """This rank's experts' columns of the [N, E] routing weights."""
        experts = self.experts()
        return gb.slice(routing, experts.start, experts.stop, 1)


def check_shardable(spec: ModelSpec, fp8_checkpoint: bool) -> None:
    """Refusals the layout cannot state: what the rank graphs do not build (yet)."""
    if spec.attention_bias:
        raise QwenExportError(
            "attention_bias: sharded builds do not support attention biases yet (o_proj's bias would be "
            "added on every rank before the all_reduce); build with --tp 1"
        )
    if fp8_checkpoint:
        raise QwenExportError(
            "sharded builds of an FP8 checkpoint are not supported yet (its 128x128 scale grids are not cut "
            "per rank): dequantize it first (qwen_export.fp8_checkpoint.dequantize_checkpoint) or build "
            "with --tp 1"
        )
