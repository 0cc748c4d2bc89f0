"""Write a Hugging Face checkpoint in Qwen's official FP8 layout (and read it back, for tests).

The format itself (block size, scale names, which weights are quantized, quantization_config) is declared
once in `qwen_export.exporter.fp8`; this module only applies it:

- `quantize_checkpoint(src, dst)`: every weight for which `fp8.is_quantized_weight` holds becomes F8_E4M3
  with a `<name>_scale_inv` block-scale grid; stacked experts (`mlp.experts.gate_up_proj [E, 2I, H]`,
  `mlp.experts.down_proj [E, H, I]`) are split one per expert (`mlp.experts.{e}.{gate,up,down}_proj.weight`,
  gate being gate_up_proj's first I rows, as transformers' experts `chunk(2)` it); every other floating
  tensor is written in bf16, integer tensors unchanged.
- `dequantize_checkpoint(fp8_dir, dst)`: the inverse view, an unquantized checkpoint transformers loads.
- `quantize_fp8` / `dequantize_fp8`: the reference block math.

Block math (per 128x128 block of a [out, in] weight, ragged blocks at the edges included):
scale = amax(|block|) / 448 (1.0 for an all-zero block), q = e4m3(round-to-nearest-even(W / scale)),
saturated to +-448, and W ~ q * scale. For every element, |W - q * scale| <= 2^-4 |W| + 2^-10 scale: half an
e4m3 step (the step is 2^-3 of the binade's base; e4m3 has 3 mantissa bits) for normal values, half the
subnormal step (2^-9) times the scale below 2^-6. So the error of a block is at most 2^-4 of its amax.

Checkpoint files are written by a streaming safetensors writer: the header of each shard is computed from
shapes and dtypes alone, then each tensor is produced and written in pieces (one expert at a time), so
memory stays bounded by one source tensor (one expert of a stacked tensor), never a shard. Sources are
read with plain positioned reads (not mmap), so nothing of a large checkpoint stays resident either.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from qwen_export.errors import CheckpointError, ConfigError, QwenExportError
from qwen_export.exporter import fp8
from qwen_export.exporter.checkpoint import VISION_PART
from qwen_export.exporter.safetensors_io import (  # noqa: F401  (re-exported for tests)
    INDEX_FILE,
    SAFETENSORS_DTYPES,
    SourceTensor,
    read_checkpoint_index,
    read_safetensors_header,
)
from qwen_export.fsutil import atomic_output_dir

FP8_NUMPY = ml_dtypes.float8_e4m3fn
FP8_MAX = float(ml_dtypes.finfo(FP8_NUMPY).max)  # 448
DEFAULT_SHARD_BYTES = 4 << 30
SINGLE_FILE = "model.safetensors"

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
OUTPUT_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}

# Stacked experts as transformers holds them, and the per-expert names of the official release.
_STACKED = re.compile(r"^(?P<prefix>.*mlp\.experts\.)(?P<kind>gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^(?P<prefix>.*mlp\.experts\.)(?P<e>\d+)\.(?P<kind>gate|up|down)_proj\.weight$")
# The vision tower is copied unquantized; the MTP layer follows the text tower's rule (its experts e4m3).
_LEFT_OUT = [re.compile(VISION_PART[0])]


# --------------------------------------------------------------------------------------------------------
# block math
# --------------------------------------------------------------------------------------------------------


def _round_up_bf16(values: np.ndarray) -> np.ndarray:
    """bf16 values >= `values` (so a bf16-stored scale never makes |W / scale| exceed 448)."""
    rounded = values.astype(ml_dtypes.bfloat16)
    low = rounded.astype(np.float32) < values
    if low.any():
        bits = rounded.view(np.uint16).copy()
        bits[low] += 1  # positive finite bf16: the next representable value up
        rounded = bits.view(ml_dtypes.bfloat16)
    return rounded


def quantize_fp8(
    weight: np.ndarray, block: Sequence[int] = fp8.BLOCK, scale_dtype: str = "F32"
) -> tuple[np.ndarray, np.ndarray]:
    """(e4m3 weight, scale_inv) of a 2-D weight: per block scale = amax/448 (1.0 for an all-zero block),
    q = round(W / scale) saturated to +-448. The scale is stored as F32 or BF16 (rounded up, and the
    division uses the stored value, so dequantization is exactly q * stored scale)."""
    if scale_dtype not in fp8.SCALE_DTYPES:
        raise QwenExportError(f"scale dtype {scale_dtype!r}: choose one of {', '.join(fp8.SCALE_DTYPES)}")
    w = np.asarray(weight, dtype=np.float32)
    if w.ndim != 2:
        raise QwenExportError(f"FP8 block quantization needs a 2-D weight, got shape {w.shape}")
    rows, cols = w.shape
    br, bc = block
    gr, gc = fp8.scale_grid(w.shape, block)
    if (rows, cols) != (gr * br, gc * bc):
        padded = np.zeros((gr * br, gc * bc), np.float32)
        padded[:rows, :cols] = w
    else:
        padded = w
    blocks = padded.reshape(gr, br, gc, bc)
    amax = np.abs(blocks).max(axis=(1, 3))
    if not np.isfinite(amax).all():
        raise QwenExportError("weight holds NaN or inf values; FP8 block scales would be undefined")
    scale = np.where(amax > 0, amax / np.float32(FP8_MAX), np.float32(1.0)).astype(np.float32)
    stored = _round_up_bf16(scale) if scale_dtype == "BF16" else scale
    q = blocks / stored.astype(np.float32)[:, None, :, None]
    np.clip(q, -FP8_MAX, FP8_MAX, out=q)
    q8 = q.astype(FP8_NUMPY).reshape(padded.shape)
    if padded is not w:
        q8 = np.ascontiguousarray(q8[:rows, :cols])
    return q8, stored


def dequantize_fp8(weight: np.ndarray, scale_inv: np.ndarray, block: Sequence[int] = fp8.BLOCK) -> np.ndarray:
    """float32 W = weight * scale_inv, block (i, j) of `block` rows x columns using scale_inv[i, j]."""
    w = np.asarray(weight).astype(np.float32)
    s = np.asarray(scale_inv).astype(np.float32)
    if w.ndim != 2 or s.shape != fp8.scale_grid(w.shape, block):
        raise QwenExportError(
            f"scale_inv of shape {s.shape} does not match weight {w.shape} at block {tuple(block)} "
            f"(expected {fp8.scale_grid(w.shape, block) if w.ndim == 2 else 'a 2-D weight'})"
        )
    return fp8.dequantize(w, s, block)


# --------------------------------------------------------------------------------------------------------
# safetensors: header reading, positioned reads, streaming writer
# --------------------------------------------------------------------------------------------------------


@dataclass
class OutTensor:
    """A tensor to write: its header entry, and a producer yielding its bytes in order (arrays of `dtype`
    whose concatenation is the tensor), called only when the writer reaches it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[], Iterable[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * SAFETENSORS_DTYPES[self.dtype].itemsize


def safetensors_header(tensors: Sequence[OutTensor], metadata: dict[str, str] | None = None) -> bytes:
    """8-byte length + JSON header (padded with spaces to a multiple of 8, as safetensors writes it)."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return len(blob).to_bytes(8, "little") + blob


def write_safetensors(
    path: Path, tensors: Sequence[OutTensor], metadata: dict[str, str] | None = None, fsync: bool = True
) -> int:
    """Stream `tensors` into one safetensors file; returns the bytes written."""
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise QwenExportError(f"{path}: duplicate tensor names")
    written = 0
    with open(path, "wb") as f:
        head = safetensors_header(tensors, metadata)
        f.write(head)
        written += len(head)
        for t in tensors:
            want = SAFETENSORS_DTYPES[t.dtype]
            got = 0
            for piece in t.produce():
                if piece.dtype != want:
                    raise QwenExportError(f"{t.name}: produced {piece.dtype}, declared {t.dtype}")
                f.write(np.ascontiguousarray(piece).reshape(-1).view(np.uint8))
                got += piece.nbytes
            if got != t.nbytes:
                raise QwenExportError(f"{t.name}: produced {got} bytes, declared {t.nbytes} ({t.shape})")
            written += got
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    return written


def plan_shards(tensors: Sequence[OutTensor], shard_bytes: int) -> list[list[OutTensor]]:
    """Consecutive tensors grouped into shards of at most shard_bytes (a larger tensor gets its own)."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


def write_sharded(
    out_dir: Path,
    tensors: Sequence[OutTensor],
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    fsync: bool = True,
    on_shard: Callable[[Path, int], None] | None = None,
) -> list[Path]:
    """Write `tensors` as model.safetensors, or as model-0000i-of-0000n.safetensors shards plus
    model.safetensors.index.json (transformers' names) when they do not fit one shard."""
    shards = plan_shards(tensors, shard_bytes)
    if not shards:
        raise QwenExportError("no tensors to write")
    n = len(shards)
    files = [
        Path(out_dir) / (SINGLE_FILE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors")
        for i in range(n)
    ]
    for path, shard in zip(files, shards, strict=True):
        written = write_safetensors(path, shard, fsync=fsync)
        if on_shard:
            on_shard(path, written)
    if n > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors)},
            "weight_map": {
                t.name: path.name for path, shard in zip(files, shards, strict=True) for t in shard
            },
        }
        _write_json(Path(out_dir) / INDEX_FILE, index)
    return files


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


# --------------------------------------------------------------------------------------------------------
# quantize
# --------------------------------------------------------------------------------------------------------


def _is_left_out(name: str) -> bool:
    return any(p.search(name) for p in _LEFT_OUT)


@dataclass(frozen=True)
class LayoutEntry:
    """One tensor of the official FP8 layout and where it comes from in the unquantized source.

    role: "fp8" (F8_E4M3 weight), "scale" (its `_scale_inv`, right after it), "bf16" (a floating tensor
    kept in bf16) or "same" (copied unchanged: integers). `expert`/`rows`: the slice of a stacked source
    tensor (expert index, and rows [r0, r1) of gate_up_proj) that this per-expert weight is."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: str
    role: str
    expert: int | None = None
    rows: tuple[int, int] | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * SAFETENSORS_DTYPES[self.dtype].itemsize


def official_fp8_layout(
    sources: dict[str, tuple[str, tuple[int, ...]]], scale_dtype: str = "F32"
) -> list[LayoutEntry]:
    """The official FP8 layout of an unquantized checkpoint given only its tensors' (dtype, shape): names,
    dtypes and shapes of what `quantize_checkpoint` writes, in writing order (natural name order, each
    scale right after its weight, a stacked MoE block's experts where the block was)."""
    out: list[LayoutEntry] = []
    stacked: dict[str, dict[str, str]] = {}
    for name in sorted(sources, key=_natural_key):
        dtype, shape = sources[name]
        if dtype.startswith("F8"):
            raise CheckpointError(f"tensor {name} is already {dtype}; the source must be unquantized")
        m = _STACKED.match(name)
        if m and len(shape) == 3 and not _is_left_out(name):
            group = stacked.setdefault(m["prefix"], {})
            group[m["kind"]] = name
            if len(group) == 2:
                out.extend(_expert_layout(m["prefix"], group, sources, scale_dtype))
            continue
        out.extend(_weight_layout(name, dtype, shape, name, scale_dtype))
    lonely = [p for p, g in stacked.items() if len(g) != 2]
    if lonely:
        raise CheckpointError(f"{lonely[0]}gate_up_proj and {lonely[0]}down_proj must come together")
    return out


def _weight_layout(
    name: str,
    dtype: str,
    shape: tuple[int, ...],
    source: str,
    scale_dtype: str,
    expert: int | None = None,
    rows: tuple[int, int] | None = None,
) -> list[LayoutEntry]:
    if dtype not in FLOAT_DTYPES:
        return [LayoutEntry(name, dtype, shape, source, "same", expert, rows)]
    if not _is_left_out(name) and fp8.is_quantized_weight(name, shape):
        return [
            LayoutEntry(name, fp8.FP8_DTYPE, shape, source, "fp8", expert, rows),
            LayoutEntry(
                fp8.scale_name(name), scale_dtype, fp8.scale_grid(shape), source, "scale", expert, rows
            ),
        ]
    return [LayoutEntry(name, "BF16", shape, source, "bf16", expert, rows)]


def _expert_layout(
    prefix: str, group: dict[str, str], sources: dict[str, tuple[str, tuple[int, ...]]], scale_dtype: str
) -> list[LayoutEntry]:
    """Stacked experts -> per-expert gate/up/down (gate = gate_up_proj's first I rows, up the next I)."""
    gate_up, down = group["gate_up_proj"], group["down_proj"]
    (gu_dtype, gu_shape), (down_dtype, down_shape) = sources[gate_up], sources[down]
    experts, two_i, hidden = gu_shape
    if two_i % 2 or down_shape != (experts, hidden, two_i // 2):
        raise CheckpointError(
            f"{gate_up} {gu_shape} and {down} {down_shape} are not [E, 2I, H] and [E, H, I]"
        )
    inter = two_i // 2
    out: list[LayoutEntry] = []
    for e in range(experts):
        for kind, source, dtype, shape, rows in [
            ("gate", gate_up, gu_dtype, (inter, hidden), (0, inter)),
            ("up", gate_up, gu_dtype, (inter, hidden), (inter, two_i)),
            ("down", down, down_dtype, (hidden, inter), None),
        ]:
            out.extend(
                _weight_layout(f"{prefix}{e}.{kind}_proj.weight", dtype, shape, source, scale_dtype, e, rows)
            )
    return out


def _quantizing_producers(
    layout: Sequence[LayoutEntry], tensors: dict[str, SourceTensor], scale_dtype: str
) -> list[OutTensor]:
    """The layout's tensors produced from the source: an F8 weight's producer quantizes once and hands its
    scale to the scale's producer (planned right after it)."""
    scales: dict[str, np.ndarray] = {}

    def reader(entry: LayoutEntry) -> Callable[[], np.ndarray]:
        src = tensors[entry.source]
        if entry.expert is None:
            return src.read
        return lambda: src.read_rows((entry.expert,), entry.rows)

    def produce(entry: LayoutEntry) -> Callable[[], Iterable[np.ndarray]]:
        read = reader(entry)
        if entry.role == "fp8":

            def weight() -> Iterator[np.ndarray]:
                q, scales[entry.name] = quantize_fp8(read(), fp8.BLOCK, scale_dtype)
                yield q

            return weight
        if entry.role == "scale":
            weight_name = entry.name.removesuffix(fp8.SCALE_SUFFIX)

            def scale() -> Iterator[np.ndarray]:
                found = scales.pop(weight_name, None)
                yield found if found is not None else quantize_fp8(read(), fp8.BLOCK, scale_dtype)[1]

            return scale
        if entry.role == "bf16" and tensors[entry.source].dtype != "BF16":
            return lambda: [read().astype(np.float32).astype(ml_dtypes.bfloat16)]
        return lambda: [read()]  # bf16 already, or an integer tensor: bytes as they are

    return [OutTensor(e.name, e.dtype, e.shape, produce(e)) for e in layout]


def _copy_side_files(src_dir: Path, dst: Path) -> None:
    for path in sorted(src_dir.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.suffix != ".safetensors":
            if path.name not in ("config.json", INDEX_FILE):
                shutil.copy2(path, dst / path.name)


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: missing (a checkpoint folder holds config.json + *.safetensors)"
        ) from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: must be a JSON object")
    return config


def _set_dtype(config: dict[str, Any], dtype: str) -> None:
    for cfg in (config, config.get("text_config")):
        if isinstance(cfg, dict):
            cfg["dtype"] = dtype
            if "torch_dtype" in cfg:
                cfg["torch_dtype"] = dtype


def _check_distinct(src_dir: Path, dst_dir: Path) -> tuple[Path, Path]:
    src, dst = Path(src_dir).expanduser().resolve(), Path(dst_dir).expanduser().resolve()
    if not src.is_dir():
        raise QwenExportError(f"{src}: not a folder; pass a Hugging Face checkpoint folder")
    if dst == src or src in dst.parents:
        raise QwenExportError(f"output folder {dst} must not be (inside) the source checkpoint {src}")
    return src, dst


def quantize_checkpoint(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    *,
    scale_dtype: str = "F32",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write `src_dir` (an unquantized HF checkpoint folder) to `dst_dir` in Qwen's official FP8 layout.

    The output appears atomically (nothing at dst_dir on failure); config.json gains the official
    quantization_config and dtype bfloat16; other side files (tokenizer, generation config) are copied.
    """
    if scale_dtype not in fp8.SCALE_DTYPES:
        raise QwenExportError(f"scale dtype {scale_dtype!r}: choose one of {', '.join(fp8.SCALE_DTYPES)}")
    src, dst = _check_distinct(Path(src_dir), Path(dst_dir))
    config = _read_config(src)
    if fp8.quantization_config(config) is not None:
        raise ConfigError(f"{src / 'config.json'}: the checkpoint is already quantized (quantization_config)")
    tensors = read_checkpoint_index(src)
    layout = official_fp8_layout({n: (t.dtype, t.shape) for n, t in tensors.items()}, scale_dtype)
    plan = _quantizing_producers(layout, tensors, scale_dtype)
    config["quantization_config"] = dict(fp8.OFFICIAL_QUANTIZATION_CONFIG)
    _set_dtype(config, "bfloat16")
    with atomic_output_dir(dst) as tmp:
        write_sharded(tmp, plan, shard_bytes)
        _write_json(tmp / "config.json", config)
        _copy_side_files(src, tmp)
    return dst


# --------------------------------------------------------------------------------------------------------
# dequantize (reference for tests and for users whose tools want an unquantized checkpoint)
# --------------------------------------------------------------------------------------------------------


def dequantize_checkpoint(
    fp8_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    dtype: str = "float32",
    *,
    experts: str = "stacked",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write an FP8 checkpoint's dequantized weights as an unquantized HF checkpoint in `dtype`.

    experts="stacked" writes transformers' in-memory layout (`mlp.experts.gate_up_proj [E, 2I, H]`,
    `mlp.experts.down_proj [E, H, I]`, one expert produced at a time); "per_expert" keeps the FP8
    checkpoint's names. Every other name is unchanged; config.json loses quantization_config.
    """
    if dtype not in OUTPUT_DTYPES:
        raise QwenExportError(f"dtype {dtype!r}: choose one of {', '.join(OUTPUT_DTYPES)}")
    if experts not in ("stacked", "per_expert"):
        raise QwenExportError(f"experts {experts!r}: choose 'stacked' or 'per_expert'")
    src, dst = _check_distinct(Path(fp8_dir), Path(dst_dir))
    config = _read_config(src)
    block = fp8.fp8_block(config, str(src / "config.json"))
    if block is None:
        raise ConfigError(f"{src / 'config.json'}: no quantization_config; not an FP8 checkpoint")
    tensors = read_checkpoint_index(src)
    out_dtype = OUTPUT_DTYPES[dtype]
    np_out = SAFETENSORS_DTYPES[out_dtype]

    def reader(name: str) -> Callable[[], np.ndarray]:
        t = tensors[name]
        if t.dtype == fp8.FP8_DTYPE:
            scale = tensors.get(fp8.scale_name(name))
            if scale is None:
                raise CheckpointError(f"{t.file}: FP8 tensor {name} has no {fp8.scale_name(name)}")
            return lambda: dequantize_fp8(t.read(), scale.read(), block).astype(np_out)
        if t.dtype in FLOAT_DTYPES:
            return lambda: t.read().astype(np.float32).astype(np_out)
        return t.read

    groups: dict[str, dict[tuple[int, str], str]] = {}
    if experts == "stacked":
        for name in tensors:
            m = _PER_EXPERT.match(name)
            if m and not _is_left_out(name):
                groups.setdefault(m["prefix"], {})[(int(m["e"]), m["kind"])] = name
    plan: list[OutTensor] = []
    placed: set[str] = set()
    for name in sorted(tensors, key=_natural_key):
        t = tensors[name]
        if name.endswith(fp8.SCALE_SUFFIX) and name.removesuffix(fp8.SCALE_SUFFIX) in tensors:
            continue
        m = _PER_EXPERT.match(name)
        if m and m["prefix"] in groups:
            if m["prefix"] not in placed:  # the block's stacked pair goes where its first expert was
                placed.add(m["prefix"])
                plan.extend(_stacked_outputs(m["prefix"], groups[m["prefix"]], tensors, reader, out_dtype))
            continue
        read = reader(name)
        kept = out_dtype if t.dtype in FLOAT_DTYPES else t.dtype
        plan.append(OutTensor(name, kept, t.shape, lambda read=read: [read()]))
    config.pop("quantization_config", None)
    if isinstance(config.get("text_config"), dict):
        config["text_config"].pop("quantization_config", None)
    _set_dtype(config, dtype)
    with atomic_output_dir(dst) as tmp:
        write_sharded(tmp, plan, shard_bytes)
        _write_json(tmp / "config.json", config)
        _copy_side_files(src, tmp)
    return dst


def _stacked_outputs(
    prefix: str,
    group: dict[tuple[int, str], str],
    tensors: dict[str, SourceTensor],
    reader: Callable[[str], Callable[[], np.ndarray]],
    out_dtype: str,
) -> list[OutTensor]:
    """One MoE block's per-expert weights as transformers' stacked gate_up_proj and down_proj."""
    n = 1 + max(e for e, _ in group)
    missing = [(e, k) for e in range(n) for k in ("gate", "up", "down") if (e, k) not in group]
    if missing:
        e, k = missing[0]
        raise CheckpointError(f"missing tensor {prefix}{e}.{k}_proj.weight")
    inter, hidden = tensors[group[(0, "gate")]].shape

    def gate_up() -> Iterator[np.ndarray]:
        for e in range(n):
            yield np.concatenate([reader(group[(e, "gate")])(), reader(group[(e, "up")])()], axis=0)

    def down() -> Iterator[np.ndarray]:
        for e in range(n):
            yield reader(group[(e, "down")])()

    return [
        OutTensor(prefix + "gate_up_proj", out_dtype, (n, 2 * inter, hidden), gate_up),
        OutTensor(prefix + "down_proj", out_dtype, (n, hidden, inter), down),
    ]
