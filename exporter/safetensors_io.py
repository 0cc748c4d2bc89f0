"""Reading safetensors checkpoints with positioned reads: the header parsed once per file, then each tensor
(or one expert of a stacked tensor, or a block of its rows) read straight from its byte range.

No mmap: a mapped checkpoint's touched pages count as the process's resident memory, and an export reads
every byte of a checkpoint larger than memory. Reads of exactly the bytes needed keep memory at the
tensor being converted, and parse the (for a per-expert checkpoint, megabyte-sized) header only once.
Large reads bypass the page cache (qwen_export/direct_io.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from qwen_export.direct_io import read_range
from qwen_export.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype name <-> numpy dtype (bf16 and fp8 through ml_dtypes, as safetensors.numpy does).
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of a safetensors file: where its bytes are, read with positioned reads."""

    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file

    @property
    def np_dtype(self) -> np.dtype:
        return SAFETENSORS_DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.np_dtype.itemsize

    def read(self) -> np.ndarray:
        return self.read_rows(())

    def read_rows(self, lead: tuple[int, ...], rows: tuple[int, int] | None = None) -> np.ndarray:
        """The sub-tensor at leading indices `lead`, optionally only rows [r0, r1) of its next axis
        (a contiguous byte range: one expert of a stacked tensor, or half of one)."""
        shape = self.shape
        strides = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
        start = sum(i * s for i, s in zip(lead, strides, strict=False))
        sub = list(shape[len(lead) :])
        if rows is not None:
            r0, r1 = rows
            start += r0 * strides[len(lead)]
            sub[0] = r1 - r0
        count, itemsize = math.prod(sub), self.np_dtype.itemsize
        begin = self.offset + start * itemsize
        direct = read_range(self.file, begin, count * itemsize)
        if direct is not None and begin % itemsize == 0:
            data = direct[: len(direct) // itemsize * itemsize].view(self.np_dtype)
        else:
            with open(self.file, "rb") as f:
                data = np.fromfile(f, dtype=self.np_dtype, count=count, offset=begin)
        if data.size != count:
            raise CheckpointError(f"{self.file}: tensor {self.name} is truncated")
        return data.reshape(sub)


def read_safetensors_header(path: Path) -> dict[str, SourceTensor]:
    """The tensors of one .safetensors file, by name, in file order."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size <= 0 or size > 100 << 20:
                raise ValueError(f"implausible header length {size}")
            header = json.loads(f.read(size))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    base = 8 + size
    tensors = {}
    for name, entry in sorted(
        ((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0]
    ):
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
        tensors[name] = SourceTensor(
            path, name, entry["dtype"], tuple(entry["shape"]), base + entry["data_offsets"][0]
        )
    return tensors


def read_checkpoint_index(model_dir: Path) -> dict[str, SourceTensor]:
    """Every tensor of a checkpoint folder (one file, or the shards its index lists)."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            files = sorted({model_dir / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors files")
    tensors: dict[str, SourceTensor] = {}
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{index}: lists shard {path} which does not exist")
        for name, info in read_safetensors_header(path).items():
            if name in tensors:
                raise CheckpointError(f"{path}: tensor {name} also appears in {tensors[name].file}")
            tensors[name] = info
    return tensors
