"""Graph initializers drawn from checkpoint tensors, checked against the shapes config.json implies."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from qwen_export.direct_io import aligned_empty
from qwen_export.exporter.builder import GraphBuilder
from qwen_export.exporter.checkpoint import Checkpoint, Source, Transform, expand_scale_grid

FP8 = ir.DataType.FLOAT8E4M3FN
Pieces = Sequence[tuple[Sequence[Source], Transform | None]]


class Weights:
    """Turns checkpoint tensors under `prefix` into graph initializers named without the prefix.

    With `keep_fp8`, an FP8 checkpoint's quantized weights enter the graph as e4m3 initializers behind a
    blocked DequantizeLinear (exporter/fp8.py); otherwise they are dequantized when the model is saved.
    """

    def __init__(self, gb: GraphBuilder, ckpt: Checkpoint, prefix: str, keep_fp8: bool = False):
        self.gb = gb
        self.ckpt = ckpt
        self.prefix = prefix
        self.keep_fp8 = keep_fp8 and ckpt.fp8_block is not None

    def full_name(self, name: str) -> str:
        return name if name.startswith("lm_head") else self.prefix + name

    def derived(
        self,
        graph_name: str,
        sources: Sequence[tuple[str, Sequence[int]]],
        shape: Sequence[int],
        transform: Transform | None = None,
        layout_only: bool = False,
        pieces: Pieces | None = None,
        dtype: ir.DataType = ir.DataType.FLOAT,
        piece_axis: int = 0,
    ) -> ir.Value:
        """An initializer `transform(source arrays)`; `layout_only` when the transform only moves elements
        (it then runs on the stored dtype), `pieces` to write it slice by slice (see Checkpoint.lazy)."""
        full = [self.full_name(s) for s, _ in sources]
        for f, (_, s_shape) in zip(full, sources, strict=True):
            self.ckpt.require(f, s_shape)
        tensor = self.ckpt.lazy(full, shape, transform, graph_name, layout_only, pieces, dtype, piece_axis)
        return self.gb.initializer(graph_name, tensor)

    def is_fp8(self, name: str) -> bool:
        full = self.full_name(name)
        return self.keep_fp8 and self.ckpt.has(full) and self.ckpt.is_fp8(full)

    def linear_t(self, name: str, out_features: int, in_features: int) -> ir.Value:
        """nn.Linear weight [out, in] stored transposed [in, out] for MatMul (kept FP8: dequantized in the
        graph)."""
        source = [(name, (out_features, in_features))]
        if not self.is_fp8(name):
            return self.derived(
                name + ".T", source, (in_features, out_features), lambda a: transpose_2d(a[0]), True
            )
        weight = self.derived(
            name + ".T", source, (in_features, out_features), lambda a: transpose_2d(a[0]), True, dtype=FP8
        )
        return self.dequantize(weight, self.fp8_scale_t(name, out_features, in_features), axis=0)

    def fp8_scale_t(
        self,
        name: str,
        out_features: int,
        in_features: int,
        experts: int | None = None,
        parts: Sequence[str] = ("",),
    ) -> ir.Value:
        """The blocked-DequantizeLinear scale of a transposed FP8 weight: [ceil(in/b), out], or per expert
        [E, ceil(in/b), len(parts) * out] when `name` is a template with {e} (and {part}, filled from
        `parts`, when several weights are concatenated along out, as gate and up are)."""
        from qwen_export.exporter import fp8

        block = self.ckpt.fp8_block or fp8.BLOCK
        cols = fp8.scale_grid((out_features, in_features), block)[1]

        def expand(grid: np.ndarray) -> np.ndarray:
            return expand_scale_grid(grid, out_features, block[0])

        if experts is None:
            scale = fp8.scale_name(self.full_name(name))
            tensor = self.ckpt.lazy([scale], (cols, out_features), lambda a: expand(a[0]))
            return self.gb.initializer(name + ".T.scale", tensor)
        count = len(parts)
        names = [
            fp8.scale_name(self.full_name(name.format(e=e, part=k))) for e in range(experts) for k in parts
        ]

        def stacked(grids: list[np.ndarray]) -> np.ndarray:
            per_expert = [grids[e * count : (e + 1) * count] for e in range(experts)]
            return np.stack([np.concatenate([expand(g) for g in gs], axis=-1) for gs in per_expert])

        graph_name = name.format(e="*", part="*") + ".T.scale"
        tensor = self.ckpt.lazy(names, (experts, cols, count * out_features), stacked)
        return self.gb.initializer(graph_name, tensor)

    def dequantize(self, weight: ir.Value, scale: ir.Value, axis: int) -> ir.Value:
        """fp32 weights from e4m3 ones, blocked along `axis` (the input dimension)."""
        from qwen_export.exporter import fp8

        block = (self.ckpt.fp8_block or fp8.BLOCK)[1]
        return self.gb.op("DequantizeLinear", weight, scale, axis=axis, block_size=block)

    def vector(self, name: str, size: int) -> ir.Value:
        return self.derived(name, [(name, (size,))], (size,), layout_only=True)

    def optional_vector(self, name: str, size: int) -> ir.Value | None:
        return self.vector(name, size) if self.ckpt.has(self.full_name(name)) else None

    def zero_centred_scale(self, name: str, size: int) -> ir.Value:
        """Qwen3.5 RMSNorm weights are stored centred at zero; the graph multiplies by (1 + w)."""
        return self.derived(name + ".plus_one", [(name, (size,))], (size,), lambda a: 1.0 + a[0])


def row_blocks(
    name: str, rows: int, cols: int, transform: Transform | None = None, block_bytes: int = 64 << 20
) -> list[tuple[list[Source], Transform | None]]:
    """`name` [rows, cols] as pieces of whole rows, each at most `block_bytes` in fp32 (a multiple of 128
    rows, FP8's block): a vocabulary-sized embedding or head is written a block at a time."""
    step = max(128, (block_bytes // (4 * cols)) // 128 * 128)
    return [([(name, (r, min(r + step, rows)))], transform) for r in range(0, rows, step)]


def transpose_2d(array: np.ndarray) -> np.ndarray:
    """`array.T` as a contiguous copy. Large ones go through torch's blocked copy (4x numpy's for a
    4096 x 4096 bf16 weight) into a page-aligned buffer, which direct I/O writes as it is; bf16 and e4m3
    travel as their bit patterns."""
    if array.size < (1 << 20):
        return np.ascontiguousarray(array.T)
    import torch

    bits = {1: np.uint8, 2: np.int16, 4: np.int32}[array.dtype.itemsize]
    rows, cols = array.shape
    moved = aligned_empty(array.nbytes).view(bits).reshape(cols, rows)
    torch.from_numpy(moved).copy_(torch.from_numpy(np.ascontiguousarray(array).view(bits)).t())
    return moved.view(array.dtype)


def stack_experts(arrays: list[np.ndarray]) -> np.ndarray:
    return np.stack(arrays, axis=0)


def stack_gate_up(gates: list[np.ndarray], ups: list[np.ndarray]) -> np.ndarray:
    """Per-expert gate/up [I, H] -> [E, H, 2I] (gate columns, then up columns), as a view over one
    [E, 2, I, H] buffer: one copy, and a later re-layout composes with the view."""
    i, h = gates[0].shape
    buf = np.empty((len(gates), 2, i, h), gates[0].dtype)
    for k, (gate, up) in enumerate(zip(gates, ups, strict=True)):
        buf[k, 0], buf[k, 1] = gate, up
    return buf.reshape(len(gates), 2 * i, h).transpose(0, 2, 1)
