"""Library entry point: checkpoint folder or preset -> OUT/model.onnx (+ external data), OUT/export.json."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx_ir as ir

from qwen_export import __version__
from qwen_export.artifact import (
    DATA_FILE,
    DRAFT_DATA_FILE,
    DRAFT_FILE,
    EXPORT_FORMAT,
    EXPORT_INFO_FILE,
    MODEL_FILE,
)
from qwen_export.direct_io import ALIGN
from qwen_export.errors import QwenExportError
from qwen_export.exporter.checkpoint import Checkpoint
from qwen_export.exporter.model import HIDDEN_STATES, build_decoder, present_shape, state_specs
from qwen_export.exporter.mtp import build_draft, draft_io_signature, has_mtp
from qwen_export.exporter.spec import (
    ModelSpec,
    config_hash,
    read_config_json,
    spec_from_config,
    spec_from_stated_fields,
)
from qwen_export.exporter.vision import build_vision_encoder, vision_io_signature
from qwen_export.exporter.vision_embed import build_token_embedder, embed_io_signature
from qwen_export.exporter.vision_spec import vision_spec_from_config
from qwen_export.fsutil import atomic_output_dir, check_writable_parent
from qwen_export.memory import peak_rss_mib

# Extra graphs of a multimodal export (export_model(..., multimodal=True)); model.onnx is the text tower.
VISION_FILE = "vision.onnx"
EMBED_FILE = "embed.onnx"


@dataclass
class ExportResult:
    out_dir: Path
    spec: ModelSpec
    info: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.out_dir / MODEL_FILE

    def render(self, console: Any) -> None:
        info = self.info
        console.print(
            f"[green]wrote[/green] {self.model_path} ({info['graph']['nodes']} nodes, "
            f"{info['timings_s']['total']:.1f} s, peak RSS {info['peak_rss_mib']:.0f} MiB)",
            highlight=False,
        )


def resolve_source(preset: str | None, model_dir: str | os.PathLike | None) -> tuple[Path, str]:
    """(checkpoint folder, human description) for exactly one of --preset / --model."""
    if (preset is None) == (model_dir is None):
        raise QwenExportError("pass exactly one of --preset NAME or --model DIR")
    if preset is not None:
        from qwen_export.presets import materialize

        return materialize(preset), f"preset:{preset}"
    path = Path(model_dir).expanduser().resolve()
    if not path.is_dir():
        raise QwenExportError(
            f"{path}: not a folder; pass a Hugging Face checkpoint folder (config.json + *.safetensors)"
        )
    return path, str(path)


def load_model_source(model_dir: Path) -> tuple[dict[str, Any], ModelSpec, Checkpoint]:
    config = read_config_json(model_dir)
    spec = spec_from_config(config, model_dir / "config.json")
    return config, spec, Checkpoint.open(model_dir, config)


# The dtypes an export stores its weights and computes in (`--dtype`); tolerances use the same names.
EXPORT_DTYPES = ("fp32", "bf16", "fp16")
WEIGHT_FORMS = ("fp8", "dequant")  # an FP8 checkpoint's quantized weights: kept e4m3, or dequantized
_TORCH_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
_SAFETENSORS_DTYPES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}


def checkpoint_dtype(config: dict[str, Any], ckpt: Checkpoint) -> str:
    """The precision a checkpoint is stored in: config.json's `dtype` (`torch_dtype` in older files, or
    text_config's), else the floating dtype holding the most weights. An FP8 checkpoint counts as the
    dtype of its unquantized modules (bf16 in Qwen's releases)."""
    for fields in (config, config.get("text_config") or {}):
        stated = fields.get("dtype") or fields.get("torch_dtype")
        if stated in _TORCH_DTYPE_NAMES:
            return _TORCH_DTYPE_NAMES[stated]
    sizes = {k: v for k, v in ckpt.floating_dtypes().items() if k in _SAFETENSORS_DTYPES}
    return _SAFETENSORS_DTYPES[max(sizes, key=sizes.__getitem__)] if sizes else "fp32"


def resolve_precision(
    config: dict[str, Any], ckpt: Checkpoint, dtype: str | None, weights: str | None
) -> tuple[str, str | None]:
    """(dtype, weights) of an export: the checkpoint's own precision unless overridden; `weights` is
    "fp8" or "dequant" for an FP8 checkpoint (default "fp8": kept) and None otherwise."""
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise QwenExportError(f"--dtype {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    if weights is not None and weights not in WEIGHT_FORMS:
        raise QwenExportError(f"--weights {weights!r} is not one of {', '.join(WEIGHT_FORMS)}")
    if ckpt.fp8_block is None:
        if weights == "fp8":
            raise QwenExportError(
                f"{ckpt.model_dir}: --weights fp8 needs an FP8 checkpoint (config.json has no "
                "quantization_config); this one exports in its own dtype or --dtype"
            )
        weights = None
    else:
        weights = weights or "fp8"
    return dtype or checkpoint_dtype(config, ckpt), weights


class SpeculativeSpec:
    """The spec read from config.json's stated fields at once, confirmed through transformers' config
    classes on a background thread (importing transformers, and with it torch, takes ~2 s: it overlaps
    the export instead of preceding it). Without every field stated, it is read through transformers
    now. `confirm()` returns transformers' spec; a caller publishes its output only when that equals
    `spec`."""

    def __init__(self, config: dict[str, Any], source: Path) -> None:
        self._config, self._source = config, source
        self._confirmed: ModelSpec | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        stated = spec_from_stated_fields(config, source)
        if stated is None:
            self.spec = self._confirmed = spec_from_config(config, source)
        else:
            self.spec = stated
            self._thread = threading.Thread(target=self._confirm, name="confirm-config", daemon=True)
            self._thread.start()

    def _confirm(self) -> None:
        try:
            self._confirmed = spec_from_config(self._config, self._source)
        except BaseException as e:  # re-raised by confirm() on the caller's thread
            self._error = e

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def confirm(self) -> ModelSpec:
        self.join()
        if self._error is not None:
            raise self._error
        assert self._confirmed is not None
        return self._confirmed


def io_signature(
    spec: ModelSpec, multimodal: bool = False, model: ir.Model | None = None, final_hidden: bool = False
) -> dict[str, list[dict[str, Any]]]:
    """The graph's inputs and outputs with their dtypes (read from `model` when given: a low-precision
    export carries its KV cache and conv state in bf16/fp16); `final_hidden` (or `model` having it) adds
    the `hidden_states` output the MTP draft graph takes."""
    states = state_specs(spec)
    dtypes: dict[str, str] = {}
    if model is not None:
        for value in [*model.graph.inputs, *model.graph.outputs]:
            dtypes[value.name] = _NUMPY_NAMES.get(value.type.dtype, "float32")
    if multimodal:
        embeds_shape = ["batch", "sequence", spec.hidden_size]
        tokens = {"name": "inputs_embeds", "dtype": "float32", "shape": embeds_shape}
        positions = {"name": "position_ids", "dtype": "int64", "shape": [3, "batch", "sequence"]}
    else:
        tokens = {"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}
        positions = {"name": "position_ids", "dtype": "int64", "shape": ["batch", "sequence"]}
    inputs = [
        tokens,
        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "total_sequence"]},
        positions,
    ] + [
        {"name": s.input_name, "dtype": dtypes.get(s.input_name, "float32"), "shape": list(s.shape)}
        for s in states
    ]
    outputs = [{"name": "logits", "dtype": "float32", "shape": ["batch", "sequence", spec.vocab_size]}] + [
        {"name": s.output_name, "dtype": dtypes.get(s.output_name, "float32"), "shape": present_shape(s)}
        for s in states
    ]
    if final_hidden or (model is not None and any(v.name == HIDDEN_STATES for v in model.graph.outputs)):
        outputs.append(
            {"name": HIDDEN_STATES, "dtype": "float32", "shape": ["batch", "sequence", spec.hidden_size]}
        )
    return {"inputs": inputs, "outputs": outputs}


_NUMPY_NAMES = {
    ir.DataType.FLOAT: "float32",
    ir.DataType.FLOAT16: "float16",
    ir.DataType.BFLOAT16: "bfloat16",
    ir.DataType.INT64: "int64",
}


def tool_versions() -> dict[str, str]:
    """Installed versions, read from package metadata (importing torch to ask would cost a second)."""
    return {
        "qwen_export": __version__,
        "python": platform.python_version(),
        **{
            name: metadata.version(name)
            for name in ("onnx", "onnx_ir", "onnxruntime", "torch", "transformers")
        },
    }


def save_model(model: ir.Model, path: Path, data_file: str | None = None) -> None:
    """Write a model with its weights as external data, materialising and writing tensors on four threads
    (peak memory stays bounded by the in-flight budget plus the largest piece of a pieced tensor).

    Four, not one per core: the writers spend most of their time in write(2) and numpy/torch copies, which
    release the GIL. On this 2-core machine a 5 GB FP8 export went from 0.25 to 0.39 GB/s with four (the
    disk wrote 0.5 GB/s)."""
    ir.save(
        model,
        path,
        external_data=data_file or f"{Path(path).name}.data",
        max_workers=4,
        max_in_flight_bytes=256 << 20,
        alignment=ALIGN,  # large tensors start on a block: their bytes can be written with direct I/O
    )


def export_model(
    out: str | os.PathLike,
    preset: str | None = None,
    model_dir: str | os.PathLike | None = None,
    debug_hidden_states: bool = False,
    log=None,
    multimodal: bool = False,
    dtype: str | None = None,
    weights: str | None = None,
    draft: bool = True,
) -> ExportResult:
    """Export the text tower to OUT/model.onnx with external weights; nothing is left at OUT on failure.

    The export keeps the checkpoint's precision: a bf16 checkpoint exports bf16 weights and activations
    with fp32 islands where the math needs them (the precision pass: norm statistics, softmax and the
    router, DeltaNet gates and recurrent state, logits). `dtype` (fp32 | bf16 | fp16) overrides it. An
    FP8 checkpoint keeps its e4m3 weights behind blocked DequantizeLinear nodes (`weights="fp8"`) or has
    them dequantized into `dtype` (`weights="dequant"`).

    `multimodal=True` (opt-in, *ForConditionalGeneration checkpoints) writes instead the text tower's
    `inputs_embeds` + mRoPE variant as model.onnx, the vision tower as vision.onnx and the token embedding
    as embed.onnx (each with its own .data file); export.json gains a "multimodal" section.

    A checkpoint with an MTP layer (`mtp.*`) also gets its draft graph, mtp.onnx (exporter/mtp.py), and
    model.onnx outputs its final hidden states for it; `draft=False` leaves the layer out.
    """
    out_path = check_writable_parent(Path(out))
    start = time.perf_counter()
    source_dir, source = resolve_source(preset, model_dir)
    config, spec, ckpt = load_model_source(source_dir)
    dtype, weights = resolve_precision(config, ckpt, dtype, weights)
    keep_fp8 = weights == "fp8"
    extra_graphs: dict[str, ir.Model] = {}
    if multimodal:
        vspec = vision_spec_from_config(config, source_dir / "config.json")
        model = build_decoder(
            spec,
            ckpt,
            debug_hidden_states=debug_hidden_states,
            multimodal=True,
            mrope_section=vspec.mrope_section,
            keep_fp8=keep_fp8,
        )
        extra_graphs = {
            VISION_FILE: build_vision_encoder(vspec, ckpt),
            EMBED_FILE: build_token_embedder(spec, ckpt),
        }
    else:
        with_draft = draft and has_mtp(ckpt)
        model = build_decoder(
            spec, ckpt, debug_hidden_states=debug_hidden_states, keep_fp8=keep_fp8, final_hidden=with_draft
        )
    draft_model = build_draft(spec, ckpt, keep_fp8) if draft and has_mtp(ckpt) and not multimodal else None
    left_out = ckpt.account()
    precision_stats = narrow(model, dtype)
    if draft_model is not None:
        narrow(draft_model, dtype)
    if log:
        log(
            f"{source}: {spec.architecture}, {spec.num_layers} layers, "
            f"{len(ckpt.used)} of {len(ckpt.tensors)} "
            f"checkpoint tensors used; exporting in {dtype}"
            + (f" with FP8 weights {'kept' if keep_fp8 else 'dequantized'}" if weights else "")
        )
        for part, count in left_out.items():
            log(f"left out on purpose: {part} ({count} tensors)")
    build_s = time.perf_counter() - start

    with atomic_output_dir(out_path) as tmp:
        save_start = time.perf_counter()
        save_model(model, tmp / MODEL_FILE, DATA_FILE)
        for file, graph in extra_graphs.items():
            save_model(graph, tmp / file)
        if draft_model is not None:
            save_model(draft_model, tmp / DRAFT_FILE, DRAFT_DATA_FILE)
        save_s = time.perf_counter() - save_start
        info = {
            "format": EXPORT_FORMAT,
            "source": source,
            "source_dir": str(source_dir),
            "architecture": spec.architecture,
            "family": spec.family,
            "config_sha256": config_hash(config),
            "spec": spec.to_json(),
            "versions": tool_versions(),
            "dtype": dtype,
            "weights": weights,
            "precision_islands": precision_stats,
            "io": io_signature(spec, multimodal, model),
            "checkpoint": {"tensors": len(ckpt.tensors), "used": len(ckpt.used), "left_out": left_out},
            "graph": {
                "nodes": len(model.graph),
                "initializers": len(model.graph.initializers),
                "opset": dict(model.opset_imports),
                "debug_hidden_states": debug_hidden_states,
            },
            "timings_s": {
                "load_and_build": round(build_s, 3),
                "save": round(save_s, 3),
                "total": round(time.perf_counter() - start, 3),
            },
            "peak_rss_mib": round(peak_rss_mib(), 1),
        }
        if draft_model is not None:
            info["draft"] = {
                "graph": DRAFT_FILE,
                "kind": "mtp",
                "io": draft_io_signature(spec, draft_model),
                "nodes": len(draft_model.graph),
            }
        if multimodal:
            info["multimodal"] = {
                "graphs": {"text": MODEL_FILE, "vision": VISION_FILE, "embed": EMBED_FILE},
                "vision_spec": vspec.to_json(),
                "io": {"vision": vision_io_signature(vspec), "embed": embed_io_signature(spec)},
                "nodes": {file: len(graph.graph) for file, graph in extra_graphs.items()},
            }
        (tmp / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2))
    return ExportResult(out_path, spec, info)


def narrow(model: ir.Model, dtype: str) -> dict[str, int]:
    """Apply the precision policy for a bf16/fp16 export in place (nothing for fp32); returns the islands'
    node counts."""
    if dtype == "fp32":
        return {}
    from qwen_export.passes.precision import Precision

    # The residual stream stays in the low dtype as transformers keeps it (engines keep theirs fp32): on
    # the tiny presets this moves top-1 agreement with transformers in bf16 from 0.988 to 0.994+.
    precision = Precision(dtype, logits_fp32=True, residual="low")
    precision(model)
    return dict(precision.stats.extras["islands"])


def export_fingerprint(source_dir: Path) -> str:
    """What an export depends on: the checkpoint files (name, size, mtime) and the exporter's own code."""
    digest = hashlib.sha256(__version__.encode())
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    for path in sorted(source_dir.iterdir()):
        if path.is_file() and (path.suffix in (".json", ".safetensors")):
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def cached_export(
    preset: str | None = None, model_dir: str | os.PathLike | None = None, log=None, multimodal: bool = False
) -> Path:
    """An export folder for the source, reused from the cache while the checkpoint and exporter are unchanged
    (engine builds start from it, so an unchanged rebuild re-exports nothing); `multimodal`: the three
    graphs of export_model(..., multimodal=True)."""
    from qwen_export.cache import cache_root, entry_lock, touch

    source_dir, _ = resolve_source(preset, model_dir)
    key = export_fingerprint(source_dir) + ("-multimodal" if multimodal else "")
    folder = cache_root() / "exports" / key
    with entry_lock(folder):
        if not (folder / EXPORT_INFO_FILE).is_file():  # engines take the main graph only
            export_model(
                folder, preset=preset, model_dir=model_dir, log=log, draft=False, multimodal=multimodal
            )
            return folder
    touch(folder)
    if log:
        log(f"reusing the export of {source_dir} from {folder}")
    return folder


def source_fields(source: str, source_dir: Path, spec: ModelSpec, config: dict[str, Any]) -> dict[str, Any]:
    """What a build manifest says of its source model."""
    return {
        "source": source,
        "source_dir": str(source_dir),
        "architecture": spec.architecture,
        "family": spec.family,
        "config_sha256": config_hash(config),
    }
