"""The collective ops a rank graph carries, declared once.

A sharded build (`build --tp N [--ep M]`) writes one graph per rank. The ranks meet at `DistCollective`
nodes: in TensorRT 11's form for the engine targets (an IDistCollectiveLayer over NCCL), and, on the CPU,
in the loopback form our ONNX Runtime kernel library runs (plugins/ort_cpu/dist_collective): the N rank
sessions run in one process and meet at every collective.

Semantics (NCCL's, which TensorRT follows):
- all_reduce: every rank's input has the same shape; every rank gets the elementwise reduction (sum).
- all_gather: every rank's input has the same shape [d0, ...]; every rank gets the inputs concatenated
  along axis 0 in rank order: [nb_rank * d0, ...].

The loopback form adds what a communicator would otherwise carry: `rank` (this graph's rank), `tag` (the
collective's index in the graph, the same on every rank: ranks meet by tag) and a second input, the
int64[1] graph input `LOOPBACK_GROUP_INPUT`, that the runtime feeds with one id per set of rank sessions
(two sharded sessions in one process never meet each other's collectives).
"""

from __future__ import annotations

from dataclasses import dataclass

ALL_REDUCE = "all_reduce"
ALL_GATHER = "all_gather"
COLLECTIVES = (ALL_REDUCE, ALL_GATHER)
REDUCE_SUM = "sum"
REDUCE_NONE = "none"

LOOPBACK_DOMAIN = "qwen.cpu"
LOOPBACK_OP = "DistCollective"
LOOPBACK_VERSION = 1
LOOPBACK_GROUP_INPUT = "collective_group"


@dataclass(frozen=True)
class Loopback:
    """The loopback node's attributes (inputs: x, group; output: y)."""

    collective_operation: str  # ALL_REDUCE | ALL_GATHER
    reduce_op: str  # REDUCE_SUM for all_reduce, REDUCE_NONE for all_gather
    nb_rank: int
    rank: int
    tag: int

    def problems(self) -> list[str]:
        out = []
        if self.collective_operation not in COLLECTIVES:
            out.append(f"collective_operation {self.collective_operation!r} is not one of {COLLECTIVES}")
        expected = REDUCE_SUM if self.collective_operation == ALL_REDUCE else REDUCE_NONE
        if self.reduce_op != expected:
            out.append(f"{self.collective_operation} takes reduce_op {expected!r}, got {self.reduce_op!r}")
        if not 0 <= self.rank < self.nb_rank:
            out.append(f"rank {self.rank} is outside 0..{self.nb_rank - 1}")
        return out
