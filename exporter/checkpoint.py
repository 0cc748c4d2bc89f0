"""Tensor-by-tensor access to a safetensors checkpoint, with strict accounting of every tensor.

The exporter never materialises the whole checkpoint: each graph initializer is an `ir.LazyTensor` whose
loader reads one checkpoint tensor (memory-mapped) and applies a small layout transform when the model is
saved. Every tensor in the checkpoint must be used by the text tower or belong to a part the export leaves
out on purpose (vision tower, MTP layers), which is reported with a count.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from safetensors import safe_open

from qwen_export.errors import CheckpointError
from qwen_export.exporter.spec import ModelSpec

Transform = Callable[[list[np.ndarray]], np.ndarray]

# Tensors outside the text tower that the export leaves out on purpose: (regex, human name).
LEFT_OUT_PARTS: tuple[tuple[str, str], ...] = (
    (r"^(model\.)?visual\.", "vision tower"),
    (r"^mtp\.", "MTP (multi-token prediction) layers"),
)


@dataclass
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str


@dataclass
class Checkpoint:
    """Index of a Hugging Face safetensors checkpoint folder (one file or sharded with an index)."""

    model_dir: Path
    tensors: dict[str, TensorInfo]
    used: set[str] = field(default_factory=set)

    @classmethod
    def open(cls, model_dir: Path) -> Checkpoint:
        model_dir = Path(model_dir)
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise CheckpointError(
                f"{model_dir}: no *.safetensors files (pickled .bin checkpoints are not loaded)"
            )
        index_path = model_dir / "model.safetensors.index.json"
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: malformed index ({e})") from None
            listed = {model_dir / f for f in set(weight_map.values())}
            missing = sorted(str(f) for f in listed if not f.is_file())
            if missing:
                raise CheckpointError(f"{index_path}: lists shard {missing[0]} which does not exist")
            files = sorted(listed)
        tensors: dict[str, TensorInfo] = {}
        for path in files:
            try:
                with safe_open(path, framework="numpy") as f:
                    for name in f.keys():
                        sl = f.get_slice(name)
                        if name in tensors:
                            raise CheckpointError(
                                f"{path}: tensor {name} also appears in {tensors[name].file}"
                            )
                        tensors[name] = TensorInfo(path, tuple(sl.get_shape()), sl.get_dtype())
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
        return cls(model_dir, tensors)

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

    # --- loading --------------------------------------------------------------------------------------
    def read(self, name: str) -> np.ndarray:
        """One tensor as numpy, floats widened to float32 (bf16 arrives as ml_dtypes' bfloat16: no torch
        import on the export path)."""
        return self.read_many([name])[0]

    def read_many(self, names: Sequence[str]) -> list[np.ndarray]:
        """Tensors as numpy, each file opened once: opening parses the whole header, which costs more than
        reading a small tensor (a per-expert checkpoint has thousands). Files are closed on return, so
        their mapped pages do not stay resident."""
        arrays = []
        with ExitStack() as stack:
            handles: dict[Path, Any] = {}
            for name in names:
                info = self.tensors[name]
                if info.file not in handles:
                    handles[info.file] = stack.enter_context(safe_open(info.file, framework="numpy"))
                array = handles[info.file].get_tensor(name)
                floating = info.dtype.startswith(("F", "BF"))
                arrays.append(array.astype(np.float32, copy=False) if floating else array)
        return arrays

    def lazy(
        self,
        sources: Sequence[str],
        shape: Sequence[int],
        transform: Transform | None = None,
        name: str | None = None,
    ) -> ViewableLazyTensor:
        """A graph initializer computed from checkpoint tensors only when the model is written."""
        self.used.update(sources)

        def view() -> np.ndarray:
            arrays = self.read_many(sources)
            out = transform(arrays) if transform else arrays[0]
            assert out.shape == tuple(shape), (name, out.shape, shape)
            return out

        return ViewableLazyTensor(view, dtype=ir.DataType.FLOAT, shape=ir.Shape(list(shape)), name=name)


class ViewableLazyTensor(ir.LazyTensor):
    """A lazy float32 initializer whose layout transform can be read as a numpy view.

    A later pass that re-lays the tensor again (the ORT lowering's MoE layouts) composes its transform with
    this one through `array_view()`, so one copy is made instead of two: transposing 1 GB of experts into
    MatMul layout and back costs seconds.
    """

    def __init__(self, view: Callable[[], np.ndarray], **kwargs) -> None:
        self.array_view = view
        super().__init__(
            lambda: ir.tensor(np.ascontiguousarray(view(), dtype=np.float32), name=kwargs.get("name")),
            **kwargs,
        )


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
