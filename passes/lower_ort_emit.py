"""Helpers of the ONNX Runtime lowering: emitting nodes before a qwen call, weights in contrib-op layouts,
and the per-graph tensors several lowered ops share (token mask, GQA lengths and bias, rotary caches).

Nothing here knows the qwen op set; the per-op modules (`lower_ort_<op>.py`) use these pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from qwen_export.passes.names import UniqueNames

MS_DOMAIN = "com.microsoft"
FLOAT = ir.DataType.FLOAT
FLOAT_MIN = float(np.finfo(np.float32).min)
INT64_MAX = int(np.iinfo(np.int64).max)


class NotLowered(Exception):
    """The node does not fit the contrib ops (or its weights are not constants); leave it as a qwen op."""


def attribute(node: ir.Node, name: str) -> Any:
    """A plain (non-reference) attribute's value; NotLowered if missing."""
    attr = node.attributes.get(name)
    if attr is None or attr.is_ref():
        raise NotLowered(f"attribute {name} missing")
    return attr.value


def const_shape(value: ir.Value | None, what: str) -> tuple[int, ...]:
    """The shape of a constant input (its data is not read); NotLowered if it is not a constant."""
    if value is None or value.const_value is None:
        raise NotLowered(f"{what} is not a constant")
    return tuple(value.const_value.shape)


class GraphContext:
    """Per-graph state of one lowering run: unique names, shared small constants, shared prepared tensors."""

    def __init__(self, graph: ir.Graph, attention: str = "gqa"):
        self.graph = graph
        self.attention = attention  # "gqa": GroupQueryAttention; "onnx": opset-23 Attention
        self.unique = UniqueNames.of_graph(graph)
        self._consts: dict[tuple[str, tuple[int, ...], bytes], ir.Value] = {}
        self.shared: dict[tuple[Any, ...], Any] = {}
        self.shared_nodes = 0

    def const(self, data: Any, dtype: Any = np.int64) -> ir.Value:
        """A small constant initializer, shared by value within the graph."""
        array = np.asarray(data, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = self.unique(f"ort_const_{array.dtype.name}_{len(self._consts)}")
            self._consts[key] = self._register(name, ir.tensor(array, name=name))
        return self._consts[key]

    def derived(
        self,
        name: str,
        sources: Sequence[ir.Value],
        transform: Callable[..., np.ndarray],
        shape: Sequence[int],
        dtype: ir.DataType = FLOAT,
    ) -> ir.Value:
        """A new initializer `transform(*source arrays)`, computed lazily (when saved or read).

        The sources must be constants; the result must have `shape`. The old initializers stay until
        dead-code removal drops them.
        """
        for i, source in enumerate(sources):
            const_shape(source, f"{name} source {i}")
        tensors = [s.const_value for s in sources]
        unique = self.unique(name)

        def compute() -> ir.TensorProtocol:
            # A source that can give its layout transform as a view (an exporter initializer) is composed
            # with `transform`: one copy instead of two.
            arrays = [t.array_view() if hasattr(t, "array_view") else t.numpy() for t in tensors]
            array = np.ascontiguousarray(transform(*arrays), dtype=dtype.numpy())
            if array.shape != tuple(shape):
                raise ValueError(f"{unique}: transform gave shape {array.shape}, expected {tuple(shape)}")
            return ir.tensor(array, name=unique)

        lazy = ir.LazyTensor(compute, dtype, ir.Shape(list(shape)), name=unique)
        return self._register(unique, lazy)

    def _register(self, name: str, tensor: ir.TensorProtocol) -> ir.Value:
        value = ir.Value(name=name, shape=ir.Shape(list(tensor.shape)), type=ir.TensorType(tensor.dtype))
        value.const_value = tensor
        self.graph.register_initializer(value)
        return value


class Emitter:
    """Appends nodes just before `anchor` (so they precede the call they replace), named under `prefix`."""

    def __init__(self, ctx: GraphContext, anchor: ir.Node, prefix: str):
        self.ctx = ctx
        self.anchor = anchor
        self.prefix = prefix.rstrip("/")
        self.count = 0
        self._ops: dict[str, int] = {}

    def op(self, op_type: str, *inputs: ir.Value | None, domain: str = "", **attrs: Any) -> ir.Value:
        return self.op_multi(op_type, inputs, 1, domain=domain, **attrs)[0]

    def op_multi(
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        num_outputs: int,
        domain: str = "",
        **attrs: Any,
    ) -> Sequence[ir.Value]:
        index = self._ops.get(op_type, 0)
        self._ops[op_type] = index + 1
        name = f"{self.prefix}/{op_type}_{index}"
        node = ir.Node(
            domain,
            op_type,
            list(inputs),
            attributes=ir.convenience.convert_attributes({k: v for k, v in attrs.items() if v is not None}),
            num_outputs=num_outputs,
            name=name,
        )
        for i, out in enumerate(node.outputs):
            out.name = self.ctx.unique(f"{name}/output_{i}")
        self.ctx.graph.insert_before(self.anchor, node)
        self.count += 1
        return node.outputs

    def const(self, data: Any, dtype: Any = np.int64) -> ir.Value:
        return self.ctx.const(data, dtype)

    def shape(self, x: ir.Value, start: int, end: int | None = None) -> ir.Value:
        return self.op("Shape", x, start=start, end=end)

    def reshape(self, x: ir.Value, shape: Sequence[int]) -> ir.Value:
        return self.op("Reshape", x, self.const(list(shape)))

    def split(self, x: ir.Value, sizes: Sequence[int], axis: int = -1) -> Sequence[ir.Value]:
        return self.op_multi("Split", [x, self.const(list(sizes))], len(sizes), axis=axis)

    def transpose(self, x: ir.Value, perm: Sequence[int]) -> ir.Value:
        return self.op("Transpose", x, perm=list(perm))

    def rms_norm(self, x: ir.Value, scale: ir.Value, epsilon: float) -> ir.Value:
        """RMS norm over the last axis (`scale` broadcasts against the trailing axes).

        RMSNormalization from opset 23; before that ORT's SimplifiedLayerNormalization (same math, but
        the ONNX checker does not know it).
        """
        if self.ctx.graph.opset_imports.get("", 0) >= 23:
            return self.op("RMSNormalization", x, scale, axis=-1, epsilon=epsilon)
        return self.op("SimplifiedLayerNormalization", x, scale, axis=-1, epsilon=epsilon, stash_type=1)


class SharedInputs:
    """Tensors several lowered ops read, built once per graph before the first op that needs them.

    All qwen ops of one graph see the same batch and sequence: the sequence length is taken from the first
    op's `X` (the exporter's graph and the fusion passes rely on the same fact).
    """

    def __init__(self, ctx: GraphContext):
        self.ctx = ctx

    def _cached(self, key: tuple[Any, ...], anchor: ir.Node, build: Callable[[Emitter], Any]) -> Any:
        if key not in self.ctx.shared:
            emitter = Emitter(self.ctx, anchor, f"/ort_shared/{key[0]}")
            self.ctx.shared[key] = build(emitter)
            self.ctx.shared_nodes += emitter.count
        return self.ctx.shared[key]

    def sequence_length(self, x: ir.Value, anchor: ir.Node) -> ir.Value:
        """int64 [1]: T, the number of new tokens (dimension 1 of `x`)."""
        return self._cached(("sequence_length",), anchor, lambda e: e.shape(x, 1, 2))

    def token_mask(self, attention_mask: ir.Value, x: ir.Value, anchor: ir.Node) -> ir.Value:
        """float [B, T, 1]: `attention_mask[:, -T:]`, the new tokens' padding mask."""
        seq = self.sequence_length(x, anchor)

        def build(e: Emitter) -> ir.Value:
            current = e.op("Slice", attention_mask, e.op("Neg", seq), e.const([INT64_MAX]), e.const([1]))
            return e.op("Unsqueeze", e.op("Cast", current, to=FLOAT), e.const([2]))

        return self._cached(("token_mask", attention_mask), anchor, build)

    def gqa_lengths(self, attention_mask: ir.Value, anchor: ir.Node) -> tuple[ir.Value, ir.Value]:
        """(seqlens_k int32 [B] = S-1 for every row, total_sequence_length int32 [1] = S).

        Every row is treated as holding all S positions (the cache layout is concat(past, new)); padding
        is masked by `gqa_bias` instead.
        """

        def build(e: Emitter) -> tuple[ir.Value, ir.Value]:
            total = e.op("Cast", e.shape(attention_mask, 1, 2), to=ir.DataType.INT32)
            last = e.op("Sub", total, e.const([1], np.int32))
            return e.op("Expand", last, e.shape(attention_mask, 0, 1)), total

        return self._cached(("gqa_lengths", attention_mask), anchor, build)

    def gqa_bias(self, attention_mask: ir.Value, x: ir.Value, anchor: ir.Node) -> ir.Value:
        """float [B, 1, T, S]: 0 where the key is a real token, float32.min where it is padding.

        Full T: neither GroupQueryAttention nor Attention (CPU) broadcasts the mask over the query axis.
        """
        seq = self.sequence_length(x, anchor)

        def build(e: Emitter) -> ir.Value:
            keys = e.op("Cast", e.op("Unsqueeze", attention_mask, e.const([1, 2])), to=ir.DataType.BOOL)
            bias = e.op("Where", keys, e.const(0.0, np.float32), e.const(FLOAT_MIN, np.float32))
            return e.op("Expand", bias, e.op("Concat", seq, e.const([1]), axis=0))

        return self._cached(("gqa_bias", attention_mask), anchor, build)

    def rotary_caches(
        self, cos: ir.Value, sin: ir.Value, rotary_dim: int, x: ir.Value, anchor: ir.Node
    ) -> tuple[ir.Value, ir.Value, ir.Value]:
        """(position_ids int64 [B, T], cos_cache, sin_cache [2*B*T, rotary_dim/2]) for RotaryEmbedding.

        The op's cos/sin tables are per token `[B, T, rotary_dim]` (a `[B, 1, T, rotary_dim]` table reads
        the same) with both halves equal; reshaped to rows of `rotary_dim/2`, token (b, t) owns rows
        2*(b*T+t) and 2*(b*T+t)+1, so position 2*(b*T+t) reads exactly that token's table, whatever
        position ids produced it (left padding, mRoPE). `x` `[B, T, ...]` gives the positions' shape.
        """
        half = rotary_dim // 2

        def build(e: Emitter) -> tuple[ir.Value, ir.Value, ir.Value]:
            cos_cache, sin_cache = e.reshape(cos, [-1, half]), e.reshape(sin, [-1, half])
            rows = e.op("Div", e.op("Size", cos), e.const(half))
            flat = e.op("Range", e.const(0), rows, e.const(2))
            return e.op("Reshape", flat, e.shape(x, 0, 2)), cos_cache, sin_cache

        return self._cached(("rotary", cos, sin, rotary_dim), anchor, build)
