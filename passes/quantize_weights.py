"""Weight-only block quantization for ONNX Runtime: constant-weight MatMuls to MatMulNBits, MoE to QMoE.

For bits b (4 or 8), block size B and a weight read as rows `w [R, K]` (K = the input-feature axis the
product sums over), each row is cut into blocks of B along K (the last one zero-padded); for block j

    s[r, j]  = w[r, k*] / -2^(b-1)      k* = argmax |w[r, k]| in block j (signed: the extreme is exact)
    q[r, k]  = clip(round(w[r, k] / s[r, j]), -2^(b-1), 2^(b-1) - 1) + 2^(b-1)    stored unsigned
    w'[r, k] = (q[r, k] - 2^(b-1)) * s[r, j]                                   what the kernels multiply by

Symmetric, no zero-point input (the kernels' default zero point is 2^(b-1)), the same grid as MLAS's own
quantizer; |w - w'| <= |s|/2 = max|block| / 2^b. 4-bit values are packed two to a byte along K, even k in
the low nibble.

    MatMul(X, W [K, N])         -> MatMulNBits(X, q [N, ceil(K/B), B*b/8], s [N, ceil(K/B)]; K, N, bits=b)
    MoE(X, logits, fc1, -, fc2) -> QMoE(X, logits, q(fc1), s(fc1), -, q(fc2), s(fc2); expert_weight_bits=b)

The rows are W's columns for a MatMul, and each expert's output rows for MoE (fc1 `[E, 2I, H]` and fc2
`[E, H, I]` are already [N, K] per expert: R = E*N, scales `[E, N, K/B]`). Quantizing per output row along
K commutes with the lowering's column concatenations and row interleaving, so the quantized graph holds
exactly dequant(quant(W)) of every checkpoint weight. QMoE keeps every MoE attribute (k, normalisation,
SwiGLU layout) and takes `weights_prepacked=0` (the raw layout above). `accuracy_level=4` lets the CPU
kernels quantize the activations to int8 per block as well (int8 dot products; 8-bit QMoE does so at every
level). The quantized tensors are lazy: computed when the model is saved or run, one weight at a time.

Block 32 by default (onnxruntime-genai's default too). Larger blocks are faster: on small-qwen3.5-moe a
batch-1 int4 decode is 18% faster at block 64 and 22% faster at block 128 (median of 5 alternating runs),
but on the tiny presets (hidden 64) a 64- or 128-wide block is a whole row and top-1 agreement with the
golden drops below the int4 tolerance, so the coarser grid is opt-in (`QuantizeWeights(block_size=128)`).
QMoE needs whole blocks, so its block is the largest power of two <= block_size that divides the hidden and
expert sizes.

Why not onnxruntime.quantization's MatMulNBitsQuantizer: it rewrites an in-memory ModelProto with every
weight loaded, and it knows MatMul only (not QMoE); here each weight stays a lazy onnx-ir tensor until the
parallel saver writes it, so a 2 GB model quantizes in well under 1 GB of memory.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from qwen_export.passes.base import PassStats, QwenPass
from qwen_export.passes.names import UniqueNames

MS_DOMAIN = "com.microsoft"
_CHUNK_ELEMENTS = 1 << 24  # rows quantized per step: bounds the temporaries (~64 MiB of fp32 per chunk)


def quantize_blockwise(
    w: np.ndarray, bits: int, block_size: int, fp16_scales: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Rows `w [R, K]` -> (q uint8 [R, ceil(K/B), B*bits/8] packed along K, scales float32 [R, ceil(K/B)]).
    `fp16_scales`: each scale rounded to the nearest float16 before the codes are computed (the scales stay
    float32 arrays, every value exactly a float16, so a float16 copy loses nothing)."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    rows, k = w.shape
    blocks = -(-k // block_size)
    q = np.empty((rows, blocks, block_size * bits // 8), np.uint8)
    scales = np.empty((rows, blocks), np.float32)
    step = max(1, _CHUNK_ELEMENTS // max(k, 1))
    for start in range(0, rows, step):
        chunk = slice(start, min(rows, start + step))
        q[chunk], scales[chunk] = _quantize_rows(w[chunk], bits, block_size, blocks, fp16_scales)
    return q, scales


def _quantize_rows(
    w: np.ndarray, bits: int, block_size: int, blocks: int, fp16_scales: bool
) -> tuple[np.ndarray, np.ndarray]:
    rows, k = w.shape
    padded = np.zeros((rows, blocks * block_size), np.float32)
    padded[:, :k] = w
    x = padded.reshape(rows, blocks, block_size)
    extreme = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)[..., 0]
    qmin = -(1 << (bits - 1))
    scales = (extreme / qmin).astype(np.float32)
    if fp16_scales:  # the extreme may then land a hair outside the grid: the clip below takes it
        scales = scales.astype(np.float16).astype(np.float32)
    inverse = np.divide(1.0, scales, out=np.zeros_like(scales), where=scales != 0)
    q = np.clip(np.rint(x * inverse[..., None]), qmin, -qmin - 1) - qmin
    q = q.astype(np.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return q, scales


def dequantize_blockwise(q: np.ndarray, scales: np.ndarray, bits: int, k: int) -> np.ndarray:
    """The inverse map: (q [R, blocks, B*bits/8], scales [R, blocks]) -> w' float32 [R, K]."""
    if bits == 4:
        q = np.stack([q & 0x0F, q >> 4], axis=-1).reshape(*q.shape[:-1], -1)
    w = (q.astype(np.float32) - (1 << (bits - 1))) * scales[..., None]
    return w.reshape(w.shape[0], -1)[:, :k]


class _LazyQuantized:
    """Quantizes one source tensor on first read of either result and keeps the other until it is read
    (two lazy initializers, one computation). Thread-safe: the saver materialises tensors on threads."""

    def __init__(
        self,
        source: ir.TensorProtocol,
        as_rows: Callable[[np.ndarray], np.ndarray],
        bits: int,
        block_size: int,
        shapes: tuple[tuple[int, ...], tuple[int, ...]],
        fp16_scales: bool,
    ):
        self.source, self.as_rows, self.bits, self.block_size, self.shapes = (
            source,
            as_rows,
            bits,
            block_size,
            shapes,
        )
        self.fp16_scales = fp16_scales
        self._lock = threading.Lock()
        self._pending: dict[int, np.ndarray] = {}

    def read(self, index: int) -> np.ndarray:
        with self._lock:
            if index in self._pending:
                return self._pending.pop(index)
            rows = self.as_rows(self.source.numpy())
            results = quantize_blockwise(rows, self.bits, self.block_size, self.fp16_scales)
            results = tuple(r.reshape(s) for r, s in zip(results, self.shapes, strict=True))
            self._pending[1 - index] = results[1 - index]
            return results[index]


class QuantizeWeights(QwenPass):
    """Weight-only int4/int8 block quantization for ONNX Runtime: MatMuls with a constant float weight become
    com.microsoft MatMulNBits, com.microsoft MoE nodes become QMoE.

    Runs on the `ort` graph (after the lowering and its cleanup); the inputs and outputs of the model do
    not change. A MoE whose hidden or expert size is not a multiple of 16 stays fp32
    (`stats.kept` says why). Only the top graph is walked: after the ORT lowering no weight MatMul lives
    in a subgraph.
    """

    name = "quantize-weights"
    BITS: ClassVar[tuple[int, ...]] = (4, 8)

    def __init__(
        self,
        bits: int = 4,
        block_size: int = 32,
        accuracy_level: int = 4,
        exclude: Sequence[str] = (),
        fp16_scales: bool = False,
    ) -> None:
        """`exclude`: regular expressions; a node whose name matches one (re.search) stays fp32.
        `fp16_scales`: round every scale to a float16 value (still stored float32 for MatMulNBits/QMoE), so
        a later pass can keep the scales in half the bytes without changing a number (ort-cpu-int4)."""
        super().__init__()
        self.exclude = tuple(exclude)
        if bits not in self.BITS:
            raise ValueError(f"bits must be one of {self.BITS}, got {bits}")
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
        self.bits, self.block_size, self.accuracy_level = bits, block_size, accuracy_level
        self.fp16_scales = fp16_scales
        self.precision = f"int{bits}"

    def __repr__(self) -> str:
        return (
            f"QuantizeWeights(bits={self.bits}, block_size={self.block_size}, "
            f"accuracy_level={self.accuracy_level}, exclude={self.exclude!r}, fp16_scales={self.fp16_scales})"
        )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = self._graph = model.graph
        self._unique = UniqueNames.of_graph(graph)
        self._done: dict[int, tuple[ir.Value, ir.Value]] = {}
        fired = {"MatMulNBits": 0, "QMoE": 0}  # nodes emitted, by op
        self.stats = PassStats(fired=fired, extras={"fp32_bytes": 0, "quantized_bytes": 0})
        for node in list(graph):
            if node.op_type == "MatMul" and node.domain in ("", "ai.onnx"):
                quantize = self._matmul
            elif node.op_type == "MoE" and node.domain == MS_DOMAIN:
                quantize = self._moe
            else:
                continue
            if any(re.search(p, node.name or "") for p in self.exclude):
                self._keep("excluded by name")
                continue
            new = quantize(node)
            if new is not None:
                ir.convenience.replace_nodes_and_values(
                    graph, node, [node], [new], list(node.outputs), list(new.outputs)
                )
                fired[new.op_type] += 1
        modified = any(fired.values())
        if modified:
            model.opset_imports.setdefault(MS_DOMAIN, 1)
        return ir.passes.PassResult(model, modified)

    # --- per node --------------------------------------------------------------------------------------
    def _keep(self, reason: str) -> None:
        self.stats.keep(reason)

    def _matmul(self, node: ir.Node) -> ir.Node | None:
        x, w = node.inputs
        if w is None or w.const_value is None:
            return None  # activations on both sides (attention-style products): nothing to quantize
        if w.const_value.dtype != ir.DataType.FLOAT or len(w.const_value.shape) != 2:
            self._keep("MatMul weight not a 2-D float32 constant")
            return None
        k, n = (int(d) for d in w.const_value.shape)
        blocks = -(-k // self.block_size)
        shapes = ((n, blocks, self.block_size * self.bits // 8), (n, blocks))
        q, s = self._quantized(w, lambda a: a.T, shapes, self.block_size)
        return self._node(
            node,
            "MatMulNBits",
            [x, q, s],
            K=k,
            N=n,
            bits=self.bits,
            block_size=self.block_size,
            accuracy_level=self.accuracy_level,
        )

    def _moe(self, node: ir.Node) -> ir.Node | None:
        inputs = list(node.inputs) + [None] * (8 - len(node.inputs))
        x, router, fc1, fc1_bias, fc2, fc2_bias, fc3, fc3_bias = inputs[:8]
        if fc3 is not None or len(node.inputs) > 8:
            self._keep("MoE with fc3 (unfused SwiGLU)")
            return None
        if any(v is None or v.const_value is None for v in (fc1, fc2)):
            self._keep("MoE expert weights not constant")
            return None
        if any(v.const_value.dtype != ir.DataType.FLOAT for v in (fc1, fc2)):
            self._keep("MoE expert weights not float32")
            return None
        normalize = node.attributes.get("normalize_routing_weights")
        if normalize is None or int(normalize.value) != 1:
            # measured: ORT 1.31.1's QMoE CPU kernel renormalises the top-k weights even when asked not to
            self._keep("MoE without top-k renormalisation (QMoE's CPU kernel always renormalises)")
            return None
        e, n1, hidden = (int(d) for d in fc1.const_value.shape)
        _, n2, inter = (int(d) for d in fc2.const_value.shape)
        # QMoE needs whole blocks: the largest power of two <= block_size that divides both sizes
        block = self.block_size
        while block > 16 and (hidden % block or inter % block):
            block //= 2
        if hidden % block or inter % block:
            self._keep("MoE hidden/expert size not a multiple of 16")
            return None

        def rows(a: np.ndarray) -> np.ndarray:
            return a.reshape(-1, a.shape[-1])

        q1, s1 = self._quantized(
            fc1,
            rows,
            ((e, n1, hidden * self.bits // 8), (e, n1, hidden // block)),
            block,
        )
        q2, s2 = self._quantized(
            fc2,
            rows,
            ((e, n2, inter * self.bits // 8), (e, n2, inter // block)),
            block,
        )
        attrs = {name: attr.value for name, attr in node.attributes.items() if not attr.is_ref()}
        attrs.update(
            expert_weight_bits=self.bits,
            block_size=block,
            accuracy_level=self.accuracy_level,
            weights_prepacked=0,
        )
        return self._node(
            node, "QMoE", [x, router, q1, s1, fc1_bias, q2, s2, fc2_bias], domain=MS_DOMAIN, **attrs
        )

    # --- helpers ---------------------------------------------------------------------------------------
    def _node(self, old: ir.Node, op_type: str, inputs: list, domain: str = MS_DOMAIN, **attrs) -> ir.Node:
        while inputs and inputs[-1] is None:
            inputs.pop()
        return ir.Node(
            domain,
            op_type,
            inputs,
            attributes=ir.convenience.convert_attributes(attrs),
            num_outputs=len(old.outputs),
            name=old.name,
        )

    def _quantized(
        self,
        weight: ir.Value,
        as_rows: Callable[[np.ndarray], np.ndarray],
        shapes: tuple[tuple[int, ...], tuple[int, ...]],
        block_size: int,
    ) -> tuple[ir.Value, ir.Value]:
        """(q, scales) initializers for `weight`, shared by every node that reads it."""
        key = id(weight)
        if key not in self._done:
            source = weight.const_value
            lazy = _LazyQuantized(source, as_rows, self.bits, block_size, shapes, self.fp16_scales)
            values = []
            for index, (suffix, dtype) in enumerate(
                ((f"q{self.bits}", ir.DataType.UINT8), (f"q{self.bits}_scales", ir.DataType.FLOAT))
            ):
                name = self._unique(f"{weight.name}.{suffix}")
                tensor = ir.LazyTensor(
                    lambda i=index, nm=name: ir.tensor(lazy.read(i), name=nm),
                    dtype,
                    ir.Shape(list(shapes[index])),
                    name=name,
                )
                value = ir.Value(name=name, shape=ir.Shape(list(shapes[index])), type=ir.TensorType(dtype))
                value.const_value = tensor
                self._graph.register_initializer(value)
                values.append(value)
            self._done[key] = (values[0], values[1])
            self.stats.extras["fp32_bytes"] += int(np.prod(source.shape)) * 4
            self.stats.extras["quantized_bytes"] += int(np.prod(shapes[0])) + 4 * int(np.prod(shapes[1]))
        return self._done[key]
