"""States updated in place: one buffer bound to a state's past input and its present output (IOBinding).

A decode step otherwise copies every state: the KV caches grow by one row, so each step writes a new
[B, kv, P+1, hd] cache, and at 64K tokens that copy is as large as the read the step has to do
(benchmarks/long_context.md). The qwen.cpu ops named in `cpu_kernels.STATE_UPDATES` may instead write
their present states over their past ones:

- a fixed-size state (GatedDeltaRule's conv and recurrent states) is one OrtValue bound to both;
- a KV cache is a buffer with spare rows ([B, kv, capacity, hd]) bound to both: the Attention op reads the
  valid row count P off its attention bias and writes only the new rows. When a step needs more rows than
  the buffer holds it is regrown by `GROW_ROWS` at a time (one copy per GROW_ROWS steps).

Only graphs whose every consumer of the state is such an op, and whose present output comes from that same
op, take this path; anything else keeps the copying path.

A step may also keep a fixed-size state's past as it was and write its present into a second buffer
(`into`): speculative decoding verifies drafts that it may reject that way. The KV rows a rejected step
wrote past the valid length are harmless: the next step's bias says how many rows are valid.

`StepBinding` keeps one IOBinding across the steps of a loop. On a small model a step's Python-side binding
(a call per input, state and output, and a wrapper per output fetched) cost 60-80 us of a 450 us step;
kept, a step re-binds only the token inputs and what changed, and the logits land in a buffer kept per shape.
A step passed the very state objects of the binding's last step, with room in its KV buffers, binds its
token inputs and outputs alone (`SteadyStep`): it does not walk the states at all.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from qwen_export.cpu_kernels import DOMAIN, POSITIONS_DIM, STATE_UPDATES, positions

GROW_ROWS = 1024  # KV buffers grow in steps of this many rows
_BUFFER_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64}  # outputs kept in numpy buffers


def in_place_states(
    model: str | Path | onnx.ModelProto, past_prefix: str, present_prefix: str
) -> dict[str, bool]:
    """State suffix -> whether it grows (a KV cache), for the states this graph lets its ops update in
    place: read by one qwen.cpu op of STATE_UPDATES only (at a version that allows it), whose matching
    output is the graph's present state."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    version = next((o.version for o in model.opset_import if o.domain == DOMAIN), 0)
    graph_outputs = {o.name for o in model.graph.output}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, index))
    found = {}
    for value in model.graph.input:
        if not value.name.startswith(past_prefix):
            continue
        suffix = value.name.removeprefix(past_prefix)
        uses = readers.get(value.name, [])
        if len(uses) != 1:
            continue
        node, index = uses[0]
        update = STATE_UPDATES.get(node.op_type) if node.domain == DOMAIN else None
        if update is None or version < update.since or index not in update.present_of_past:
            continue
        present = node.output[update.present_of_past[index]]
        if present == present_prefix + suffix and present in graph_outputs:
            found[suffix] = update.grows
    return found


@dataclass
class GrowingCache:
    """A KV cache buffer [B, kv, capacity, hd] with spare rows; the numpy array owns the memory the
    OrtValue wraps."""

    array: np.ndarray
    value: ort.OrtValue

    @classmethod
    def holding(cls, rows: np.ndarray, capacity: int) -> GrowingCache:
        """A buffer of `capacity` rows (rounded up to GROW_ROWS) whose first rows are `rows`."""
        capacity = -(-capacity // GROW_ROWS) * GROW_ROWS
        b, h, p, d = rows.shape
        array = np.zeros((b, h, capacity, d), rows.dtype)
        array[:, :, :p] = rows
        return cls(array, ort.OrtValue.ortvalue_from_numpy(array))

    @property
    def capacity(self) -> int:
        return self.array.shape[2]


def with_room(cache: GrowingCache | ort.OrtValue, valid: int, rows: int) -> GrowingCache:
    """`cache` if it is a buffer of at least `rows` rows, else a larger buffer carrying its first `valid`
    rows (an OrtValue: a cache as a copying step returned it, exactly `valid` rows)."""
    if isinstance(cache, GrowingCache):
        return cache if rows <= cache.capacity else GrowingCache.holding(cache.array[:, :, :valid], rows)
    return GrowingCache.holding(cache.numpy(), rows)


@dataclass
class SteadyStep:
    """What a step bound, for a next step that passes the same state objects (OrtDecoder.run_in_place):
    then every state binding stands as it is, and only the token inputs and the outputs are bound again."""

    states: tuple[Any, ...]  # the states passed in, then the `into` buffers, in order
    room: int  # the fewest rows of any KV cache buffer (a step past it regrows one)
    present: dict[str, Any]

    def holds(self, states: tuple[Any, ...], total: int) -> bool:
        """`states` are the very objects of this step, and `total` rows fit every KV buffer."""
        same = len(states) == len(self.states) and all(map(operator.is_, states, self.states))
        return same and total <= self.room


class StepBinding:
    """One ONNX Runtime IOBinding kept across the steps of a decode loop. A name is re-bound only when the
    value bound to it changes (what is bound is held here, so its memory outlives the binding); outputs
    that are not states land in buffers kept per shape, whose contents the next run overwrites."""

    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session
        self.binding = session.io_binding()
        self.steady: SteadyStep | None = None  # set by OrtDecoder.run_in_place
        self._bound: dict[str, Any] = {}  # name -> the OrtValue or array bound to it (None: allocated)
        self._allocated: set[str] = set()  # outputs bound to memory ONNX Runtime allocates
        self._order: list[str] = []  # outputs in the order first bound: get_outputs() returns them so
        self._buffers: dict[tuple[str, int, int], tuple[np.ndarray, ort.OrtValue] | None] = {}
        self._outputs = {o.name: o for o in session.get_outputs()}
        # buffer_outputs' last answer, while every name it bound has a kept buffer: (batch, sequence), arrays
        self._buffered: tuple[tuple[int, int], dict[str, np.ndarray]] | None = None

    def input(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        self.binding.bind_cpu_input(name, array)
        self._bound[name] = array

    def value_input(self, name: str, value: ort.OrtValue) -> None:
        if self._bound.get(name) is not value:
            self.binding.bind_ortvalue_input(name, value)
            self._bound[name] = value

    def value_output(self, name: str, value: ort.OrtValue) -> None:
        if self._bound.get(name) is not value:
            if name not in self._bound:
                self._order.append(name)
            self.binding.bind_ortvalue_output(name, value)
            self._bound[name] = value
            self._allocated.discard(name)

    def allocated_output(self, name: str) -> None:
        """Bind `name` to memory ONNX Runtime allocates on each run (bound again every time: a filled
        output left bound would be written over by the next run)."""
        if name not in self._bound:
            self._order.append(name)
        self.binding.bind_output(name, "cpu")
        self._bound[name] = None
        self._allocated.add(name)

    def buffer_output(self, name: str, batch: int, sequence: int) -> np.ndarray | None:
        """Bind `name` to a kept float32 or int64 buffer of its shape at this batch and sequence length;
        None where its shape has another symbolic dim or another dtype (then bound to allocated memory)."""
        key = (name, batch, sequence)
        if key not in self._buffers:
            sizes = {"batch": batch, "sequence": sequence, POSITIONS_DIM: positions(sequence)}
            out = self._outputs[name]
            shape = tuple(d if isinstance(d, int) else sizes.get(d, -1) for d in out.shape)
            dtype = _BUFFER_DTYPES.get(out.type)
            array = np.empty(shape, dtype) if -1 not in shape and dtype is not None else None
            self._buffers[key] = None if array is None else (array, ort.OrtValue.ortvalue_from_numpy(array))
        kept = self._buffers[key]
        if kept is None:
            self.allocated_output(name)
            return None
        self.value_output(name, kept[1])
        return kept[0]

    def buffer_outputs(self, names: list[str], batch: int, sequence: int) -> dict[str, np.ndarray]:
        """buffer_output for each of `names` (the same names every call), the kept buffers by name; a call
        at the last call's batch and sequence length, all of whose outputs had buffers, binds nothing (the
        verify graph of speculative decoding has 15 such outputs)."""
        if self._buffered is not None and self._buffered[0] == (batch, sequence):
            return self._buffered[1]
        kept = {}
        for name in names:
            if (array := self.buffer_output(name, batch, sequence)) is not None:
                kept[name] = array
        self._buffered = ((batch, sequence), kept) if len(kept) == len(names) else None
        return kept

    def run(self) -> dict[str, ort.OrtValue]:
        """Run; the outputs ONNX Runtime allocated, by name."""
        self.session.run_with_iobinding(self.binding)
        if not self._allocated:
            return {}
        values = self.binding.get_outputs()
        return {n: v for n, v in zip(self._order, values, strict=True) if n in self._allocated}
