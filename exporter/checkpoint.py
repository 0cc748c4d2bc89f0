"""Tensor-by-tensor access to a safetensors checkpoint, with strict accounting of every tensor.

The exporter never materialises the whole checkpoint: each graph initializer is a `CheckpointTensor` whose
loader reads its checkpoint tensors (one expert at a time where it stacks experts) and applies a small
layout transform when the model is saved. Every tensor in the checkpoint must be used by the text tower or
belong to a part the export leaves out on purpose (vision tower, MTP layers), which is reported with a
count. Weights keep their stored dtype unless the graph asks for another: a bf16 checkpoint exported in
bf16 is copied, not widened and narrowed again. FP8 checkpoints (exporter/fp8.py) are read either raw
(e4m3 plus block scales, for a graph that keeps them) or dequantized.
"""

from __future__ import annotations

import collections
import itertools
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qwen_export.direct_io import DirectWriter
from qwen_export.errors import CheckpointError
from qwen_export.exporter import fp8
from qwen_export.exporter.safetensors_io import SourceTensor, read_checkpoint_index
from qwen_export.exporter.spec import ModelSpec
from qwen_export.fsutil import finish_writeback

PIECES_AHEAD = 2  # pieces of one tensor read and re-laid ahead of the write (64 MiB at most each)

Transform = Callable[[list[np.ndarray]], np.ndarray]
# One checkpoint tensor, one expert (index along axis 0) of a stacked one, or a block of rows [r0, r1).
Source = str | tuple[str, int] | tuple[str, tuple[int, int]]
TensorInfo = SourceTensor  # what the index knows of one tensor: file, dtype, shape, byte offset

# Tensors outside the text tower that an export may leave out on purpose: (regex, human name). The MTP
# layer is left out only by a graph that does not take it (a multimodal export, sharded ranks, engines).
VISION_PART = (r"^(model\.)?visual\.", "vision tower")
MTP_PART = (r"^mtp\.", "MTP (multi-token prediction) layers")
LEFT_OUT_PARTS: tuple[tuple[str, str], ...] = (VISION_PART, MTP_PART)

# safetensors dtype -> (ONNX dtype, numpy dtype) of the floating types a checkpoint may store.
FLOAT_DTYPES: dict[str, tuple[ir.DataType, Any]] = {
    "F32": (ir.DataType.FLOAT, np.float32),
    "F16": (ir.DataType.FLOAT16, np.float16),
    "BF16": (ir.DataType.BFLOAT16, ml_dtypes.bfloat16),
    fp8.FP8_DTYPE: (ir.DataType.FLOAT8E4M3FN, ml_dtypes.float8_e4m3fn),
}
FP16_MAX = float(np.finfo(np.float16).max)


def cast_array(array: np.ndarray, dtype: ir.DataType) -> np.ndarray:
    """`array` stored as `dtype` (a no-op when it already is): fp16 saturates at its finite range instead of
    becoming inf, as a low-precision copy of an fp32 weight must. fp32 -> bf16 goes through torch (round to
    nearest even, as ml_dtypes does, several times faster on large weights)."""
    target = np.dtype(dtype.numpy())
    if array.dtype == target:
        return array
    if dtype == ir.DataType.FLOAT16:
        array = np.clip(array.astype(np.float32, copy=False), -FP16_MAX, FP16_MAX)
    if dtype == ir.DataType.BFLOAT16 and array.size >= (1 << 16):
        import torch

        source = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        return source.to(torch.bfloat16).view(torch.int16).numpy().view(target)
    return array.astype(target)


@dataclass
class Checkpoint:
    """Index of a Hugging Face safetensors checkpoint folder (one file or sharded with an index).

    `fp8_block` is the block size of an FP8 checkpoint's scales (None: not quantized); its quantized
    weights are read dequantized to fp32 by `read_many`, or raw by `read_many(..., native=True)`.
    """

    model_dir: Path
    tensors: dict[str, TensorInfo]
    used: set[str] = field(default_factory=set)
    fp8_block: tuple[int, int] | None = None

    @classmethod
    def open(cls, model_dir: Path, config: dict[str, Any] | None = None) -> Checkpoint:
        """Index the folder; `config` (its config.json) says whether it is an FP8 checkpoint, whose
        weights and scales are then checked against each other before anything is exported."""
        model_dir = Path(model_dir)
        if not any(model_dir.glob("*.safetensors")):
            raise CheckpointError(
                f"{model_dir}: no *.safetensors files (pickled .bin checkpoints are not loaded)"
            )
        tensors = read_checkpoint_index(model_dir)
        block = fp8.fp8_block(config, str(model_dir / "config.json")) if config is not None else None
        ckpt = cls(model_dir, tensors, fp8_block=block)
        ckpt._check_fp8()
        return ckpt

    def _check_fp8(self) -> None:
        """Every e4m3 weight has its scale on the right grid, and e4m3 appears only in an FP8 checkpoint."""
        for name, info in self.tensors.items():
            if info.dtype != fp8.FP8_DTYPE:
                continue
            if self.fp8_block is None:
                raise CheckpointError(
                    f"{info.file}: tensor {name} is {fp8.FP8_DTYPE} but config.json has no "
                    "quantization_config (an FP8 checkpoint states quant_method 'fp8')"
                )
            scale = self.tensors.get(fp8.scale_name(name))
            if scale is None:
                raise CheckpointError(
                    f"{info.file}: FP8 weight {name} has no scale {fp8.scale_name(name)} in the checkpoint"
                )
            grid = fp8.scale_grid(info.shape, self.fp8_block) if len(info.shape) == 2 else None
            if grid is None or tuple(scale.shape) != grid:
                raise CheckpointError(
                    f"{scale.file}: scale {fp8.scale_name(name)} has shape {scale.shape}, expected {grid} "
                    f"for weight {name} {info.shape} in blocks of {list(self.fp8_block)}"
                )
            if scale.dtype not in fp8.SCALE_DTYPES:
                raise CheckpointError(
                    f"{scale.file}: scale {fp8.scale_name(name)} is {scale.dtype}, expected "
                    f"{' or '.join(fp8.SCALE_DTYPES)}"
                )

    # --- validation ---------------------------------------------------------------------------------
    def require(self, name: str, shape: Sequence[int]) -> None:
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.model_dir}: missing tensor {name} (expected shape {tuple(shape)})")
        if tuple(info.shape) != tuple(shape):
            raise CheckpointError(
                f"{info.file}: tensor {name} has shape {info.shape}, expected {tuple(shape)} from config.json"
            )

    def has(self, name: str) -> bool:
        return name in self.tensors

    def is_fp8(self, name: str) -> bool:
        return self.tensors[name].dtype == fp8.FP8_DTYPE

    def stored_dtype(self, source: Source) -> ir.DataType | None:
        """The ONNX dtype a source is stored in (None: not a floating tensor)."""
        info = self.tensors[_name(source)]
        return FLOAT_DTYPES[info.dtype][0] if info.dtype in FLOAT_DTYPES else None

    def floating_dtypes(self) -> Counter[str]:
        """Bytes per stored floating dtype over the text tower's candidates (scales excluded)."""
        sizes: Counter[str] = Counter()
        for name, info in self.tensors.items():
            if info.dtype in FLOAT_DTYPES and not name.endswith(fp8.SCALE_SUFFIX):
                sizes[info.dtype] += int(np.prod(info.shape, dtype=np.int64))
        return sizes

    def account(self) -> dict[str, int]:
        """Check that every tensor was used or deliberately left out; return left-out counts by part."""
        left_out: Counter[str] = Counter()
        for name, info in self.tensors.items():
            if name in self.used:
                continue
            part = next((label for pattern, label in LEFT_OUT_PARTS if re.search(pattern, name)), None)
            if part is None:
                raise CheckpointError(
                    f"{info.file}: unexpected tensor {name} (shape {info.shape}) is not part of the "
                    "model described by config.json"
                )
            left_out[part] += 1
        return dict(left_out)

    def mark_used(self, sources: Sequence[Source]) -> None:
        for source in sources:
            name = _name(source)
            self.used.add(name)
            if self.is_fp8(name):
                self.used.add(fp8.scale_name(name))

    # --- loading --------------------------------------------------------------------------------------
    def read(self, name: str) -> np.ndarray:
        """One tensor as numpy, floats widened to float32 (FP8 dequantized)."""
        return self.read_many([name])[0]

    def read_many(self, sources: Sequence[Source], native: bool = False) -> list[np.ndarray]:
        """Tensors (or single experts of stacked ones, or blocks of rows) as numpy, by positioned reads.

        Floats are widened to float32 with FP8 weights dequantized by their block scales, or, with
        `native`, returned as stored (bf16 and e4m3 as ml_dtypes arrays)."""
        arrays = []
        for source in sources:
            array = self._raw(source)
            dtype = self.tensors[_name(source)].dtype
            if not native and dtype == fp8.FP8_DTYPE:
                block = self.fp8_block or fp8.BLOCK
                array = fp8.dequantize(array, self._raw(_scale_source(source, block)), block)
            elif not native and dtype in FLOAT_DTYPES:
                array = array.astype(np.float32, copy=False)
            arrays.append(array)
        return arrays

    def _raw(self, source: Source) -> np.ndarray:
        info = self.tensors[_name(source)]
        if isinstance(source, str):
            return info.read()
        part = source[1]
        return info.read_rows((), part) if isinstance(part, tuple) else info.read_rows((part,))

    def lazy(
        self,
        sources: Sequence[Source],
        shape: Sequence[int],
        transform: Transform | None = None,
        name: str | None = None,
        layout_only: bool = False,
        pieces: Sequence[tuple[Sequence[Source], Transform | None]] | None = None,
        dtype: ir.DataType = ir.DataType.FLOAT,
        piece_axis: int = 0,
    ) -> CheckpointTensor:
        """A graph initializer (float32 unless `dtype` says otherwise; FLOAT8E4M3FN reads an FP8 weight
        raw) computed from checkpoint tensors only when the model is written.

        layout_only: the transform only moves elements (transpose, stack, split), so it may run on the
            stored dtype when the graph stores that dtype too.
        pieces: the same tensor as consecutive slices along axis 0, each from its own sources (one
            expert each): written piece by piece, so a stack of experts is never whole in memory (the
            whole `sources` + `transform` still serve `numpy()` and `array_view()`).
        piece_axis: 1 for a 2-D tensor written in blocks of columns (a transposed vocabulary-sized weight,
            read in blocks of source rows).
        """
        self.mark_used(sources)
        return CheckpointTensor(
            self, list(sources), tuple(shape), transform, dtype, name, layout_only, pieces, piece_axis
        )


def _name(source: Source) -> str:
    return source if isinstance(source, str) else source[0]


def _scale_source(source: Source, block: Sequence[int]) -> Source:
    """The scales of an FP8 weight source: the whole grid, or the grid rows of a block of weight rows (a
    block that starts on a scale block's boundary)."""
    scale = fp8.scale_name(_name(source))
    if isinstance(source, str):
        return scale
    rows = source[1]
    if not isinstance(rows, tuple) or rows[0] % block[0]:
        raise ValueError(f"{_name(source)}: FP8 rows must be read in blocks of {block[0]}, got {rows}")
    return scale, (rows[0] // block[0], -(-rows[1] // block[0]))


def expand_scale_grid(grid: np.ndarray, out_features: int, block_out: int) -> np.ndarray:
    """A weight's [ceil(out/b0), ceil(in/b1)] scales in the graph's blocked-DequantizeLinear form for its
    transposed [in, out] weight: [ceil(in/b1), out], each block's scale repeated along out (one fp32 per
    b1 weights: 3% of an e4m3 weight's bytes at b1 = 128)."""
    return np.repeat(grid.astype(np.float32), block_out, axis=0)[:out_features].T


class CheckpointTensor(ir.LazyTensor):
    """A lazy graph initializer read from a checkpoint, in `dtype`.

    `with_dtype(d)` gives the same initializer stored as `d` (the precision pass narrows weights this way,
    reading bf16 straight into bf16). `array_view()` gives the float32 result as a numpy view where the
    transform makes one: a later pass that re-lays the tensor again (the ORT lowering's MoE layouts)
    composes its transform with this one, so one copy is made instead of two. `tofile` writes a pieced
    tensor (stacked experts, blocks of a vocabulary-sized weight) one piece at a time.
    """

    def __init__(
        self,
        ckpt: Checkpoint,
        sources: list[Source],
        shape: tuple[int, ...],
        transform: Transform | None,
        dtype: ir.DataType,
        name: str | None,
        layout_only: bool,
        pieces: Sequence[tuple[Sequence[Source], Transform | None]] | None,
        piece_axis: int = 0,
    ) -> None:
        self._ckpt, self._sources, self._transform = ckpt, sources, transform
        self._layout_only, self._pieces, self._piece_axis = layout_only, pieces, piece_axis
        super().__init__(
            lambda: ir.tensor(np.ascontiguousarray(self._compute(self.dtype)), dtype=self.dtype, name=name),
            dtype=dtype,
            shape=ir.Shape(list(shape)),
            name=name,
        )

    def with_dtype(self, dtype: ir.DataType) -> CheckpointTensor:
        return CheckpointTensor(
            self._ckpt, self._sources, tuple(self.shape.numpy()), self._transform, dtype, self.name,
            self._layout_only, self._pieces, self._piece_axis,
        )  # fmt: skip

    def array_view(self) -> np.ndarray:
        return self._compute(ir.DataType.FLOAT, contiguous=False)

    def _native(self, sources: Sequence[Source], dtype: ir.DataType) -> bool:
        """Whether the transform may run on the stored arrays: it only moves elements and every source is
        stored as `dtype` already."""
        return self._layout_only and all(self._ckpt.stored_dtype(s) == dtype for s in sources)

    def _run(self, sources: Sequence[Source], transform: Transform | None, dtype: ir.DataType) -> np.ndarray:
        arrays = self._ckpt.read_many(sources, native=self._native(sources, dtype))
        return cast_array(transform(arrays) if transform else arrays[0], dtype)

    def _compute(self, dtype: ir.DataType, contiguous: bool = True) -> np.ndarray:
        out = self._run(self._sources, self._transform, dtype)
        expected = tuple(self.shape.numpy())
        assert out.shape == expected, (self.name, out.shape, expected)
        return np.ascontiguousarray(out) if contiguous else out

    def _chunks(self) -> Iterator[np.ndarray]:
        """The tensor's pieces in order. Pieces are read and re-laid `PIECES_AHEAD` ahead of the one being
        written, on their own threads (reads, torch copies and writes release the GIL): done one after
        the other, a stack of experts wrote at half the disk's speed, the one tensor in flight waiting on
        each step in turn."""
        if self._pieces is None:
            yield self._compute(self.dtype)
            return

        def piece(job: tuple[Sequence[Source], Transform | None]) -> np.ndarray:
            return np.ascontiguousarray(self._run(job[0], job[1], self.dtype))

        jobs = iter(self._pieces)
        with ThreadPoolExecutor(max_workers=PIECES_AHEAD, thread_name_prefix="qwen-piece") as pool:
            ahead = collections.deque(pool.submit(piece, job) for job in itertools.islice(jobs, PIECES_AHEAD))
            while ahead:
                chunk = ahead.popleft().result()
                for job in itertools.islice(jobs, 1):
                    ahead.append(pool.submit(piece, job))
                yield chunk

    def tofile(self, file: Any) -> None:
        """Write the tensor at the file's position: straight to disk where it can (qwen_export.direct_io),
        else with paced writeback (qwen_export.fsutil), as a checkpoint-sized export otherwise runs into
        the kernel's dirty-page throttling."""
        if self._piece_axis == 0 or self._pieces is None:
            writer = DirectWriter(file, self.nbytes)
            for chunk in self._chunks():
                writer.write(chunk)
            writer.close()
            return
        # Blocks of columns: each row of a block lands at its place in the row-major tensor.
        base, (rows, cols) = file.tell(), tuple(self.shape.numpy())
        itemsize, column = np.dtype(self.dtype.numpy()).itemsize, 0
        for chunk in self._chunks():
            width = chunk.shape[1]
            for row in range(rows):
                file.seek(base + (row * cols + column) * itemsize)
                file.write(memoryview(chunk[row].view(np.uint8)))
            column += width
        file.seek(base + rows * cols * itemsize)
        file.flush()
        finish_writeback(file.fileno(), base, rows * cols * itemsize)

    def tobytes(self) -> bytes:
        chunks = list(self._chunks())
        if self._piece_axis == 0 or self._pieces is None:
            return b"".join(chunk.tobytes() for chunk in chunks)
        return np.concatenate(chunks, axis=1).tobytes()


def find_text_prefix(ckpt: Checkpoint) -> str:
    for prefix in ("model.language_model.", "model."):
        if ckpt.has(prefix + "embed_tokens.weight"):
            return prefix
    raise CheckpointError(
        f"{ckpt.model_dir}: missing tensor model.embed_tokens.weight "
        "(or model.language_model.embed_tokens.weight)"
    )


def expert_layout(ckpt: Checkpoint, mlp_prefix: str, spec: ModelSpec) -> str:
    """'stacked' (experts.gate_up_proj [E, 2I, H]) or 'per_expert' (experts.{e}.gate_proj.weight)."""
    if ckpt.has(mlp_prefix + "experts.gate_up_proj"):
        return "stacked"
    if ckpt.has(mlp_prefix + "experts.0.gate_proj.weight"):
        return "per_expert"
    raise CheckpointError(
        f"{ckpt.model_dir}: missing tensor {mlp_prefix}experts.gate_up_proj (or per-expert "
        f"{mlp_prefix}experts.0.gate_proj.weight)"
    )
