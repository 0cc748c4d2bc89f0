"""Deployment spec: limits, GPU targets and precision, validated before any work; its optimization profiles.

A spec becomes two TensorRT optimization profiles over the one decoder graph:

- `prefill`: batch 1..max_batch, sequence 1..max_prompt, past 0 (the KV cache starts empty);
- `decode`: batch 1..max_batch, sequence 1, past 0..max_context-1.

A prefill that continues from carried state (chunked prefill) is outside both profiles.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qwen_export.errors import QwenExportError
from qwen_export.targets import TARGETS, EngineTraits, names

PRECISIONS = ("fp16", "bf16")
INT32_MAX = 2**31 - 1
# An engine's weights: in its precision (an FP8 checkpoint dequantized), or an FP8 checkpoint's e4m3 kept.
WEIGHTS = ("dequant", "fp8")
FP8_MIN_SM = 89  # FP8 tensor cores: Ada (sm89), Hopper (sm90), Blackwell


def fp8_weight_targets() -> list[str]:
    """The engine targets that keep an FP8 checkpoint's e4m3 weights."""
    return [t.name for t in TARGETS.values() if t.engine and t.engine.fp8_weights]


# Product names a deployer types, mapped to the compute capability an engine is built for.
GPU_NAMES: dict[str, str] = {
    "t4": "sm75", "rtx2080ti": "sm75",
    "a100": "sm80", "a800": "sm80", "a30": "sm80",
    "a10": "sm86", "a10g": "sm86", "a40": "sm86", "rtx3090": "sm86", "rtx3080": "sm86", "rtxa6000": "sm86",
    "l4": "sm89", "l40": "sm89", "l40s": "sm89", "rtx4090": "sm89", "rtx4080": "sm89", "rtx6000ada": "sm89",
    "h100": "sm90", "h200": "sm90", "h800": "sm90", "gh200": "sm90",
    "b200": "sm100", "gb200": "sm100",
    "rtx5090": "sm120", "rtx5080": "sm120", "rtxpro6000": "sm120",
    "gb10": "sm121",
}  # fmt: skip
KNOWN_SMS = ("sm75", "sm80", "sm86", "sm89", "sm90", "sm100", "sm120", "sm121")
BF16_MIN_SM = 80
VISION_LIMITS = ("max_image_pixels", "max_video_frames")


class DeploySpecError(QwenExportError):
    """The deployment spec cannot be built; the message lists every problem found."""


def sm_number(sm: str) -> int:
    return int(sm.removeprefix("sm"))


def resolve_gpu(name: str) -> str:
    """'sm89', 'sm_89', 'SM89', 'l40s', 'RTX 4090' -> 'sm89'; an unknown name raises DeploySpecError."""
    key = re.sub(r"[\s_\-]", "", name.strip().lower()).removeprefix("nvidia")
    if key in GPU_NAMES:
        return GPU_NAMES[key]
    if key in KNOWN_SMS:
        return key
    known = ", ".join(KNOWN_SMS) + "; or " + ", ".join(sorted(GPU_NAMES))
    raise DeploySpecError(f"unknown GPU {name!r}: use a compute capability or a product name ({known})")


@dataclass(frozen=True)
class DeploySpec:
    """What an engine must serve. `gpus` are canonical compute capabilities ('sm89'), in the order given."""

    gpus: tuple[str, ...]
    precision: str = "bf16"
    max_batch: int = 1
    max_prompt: int = 2048
    max_context: int = 4096
    target: str = "trt-rtx"
    workspace_mib: int | None = None  # None: the builder's default (all device memory)
    logits_fp32: bool = True
    weights: str = "dequant"
    # A multimodal build's vision engine (qwen_export/engines/vision.py); None: the default, or no vision.
    max_image_pixels: int | None = None
    max_video_frames: int | None = None
    requested: tuple[str, ...] = field(default=(), compare=False)  # the names as the user wrote them

    @classmethod
    def create(
        cls,
        gpus: str | Sequence[str],
        precision: str = "bf16",
        max_batch: int = 1,
        max_prompt: int = 2048,
        max_context: int = 4096,
        target: str = "trt-rtx",
        workspace_mib: int | None = None,
        logits_fp32: bool = True,
        weights: str = "dequant",
        max_image_pixels: int | None = None,
        max_video_frames: int | None = None,
    ) -> DeploySpec:
        """Build and validate a spec; every problem is reported in one DeploySpecError."""
        names = [g for g in (gpus.split(",") if isinstance(gpus, str) else gpus) if str(g).strip()]
        problems: list[str] = []
        sms: list[str] = []
        for name in names:
            try:
                sm = resolve_gpu(str(name))
            except DeploySpecError as e:
                problems.append(str(e))
                continue
            if sm not in sms:
                sms.append(sm)
        spec = cls(
            gpus=tuple(sms),
            precision=str(precision).lower(),
            max_batch=max_batch,
            max_prompt=max_prompt,
            max_context=max_context,
            target=target,
            workspace_mib=workspace_mib,
            logits_fp32=logits_fp32,
            weights=str(weights).lower(),
            max_image_pixels=max_image_pixels,
            max_video_frames=max_video_frames,
            requested=tuple(str(n).strip() for n in names),
        )
        problems += spec.problems(gpus_given=bool(names))
        if problems:
            raise DeploySpecError("; ".join(problems))
        return spec

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> DeploySpec:
        allowed = {
            "gpus", "gpu", "precision", "max_batch", "max_prompt", "max_context", "target", "workspace_mib",
            "logits_fp32", "weights", "max_image_pixels", "max_video_frames",
        }  # fmt: skip
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise DeploySpecError(f"unknown deployment spec keys {unknown}; known: {sorted(allowed)}")
        kwargs = dict(data)
        if "gpu" in kwargs:
            kwargs["gpus"] = kwargs.pop("gpu")
        if "gpus" not in kwargs:
            raise DeploySpecError('the deployment spec needs `gpus` (for example ["sm89", "sm120"])')
        for key in ("max_batch", "max_prompt", "max_context", "workspace_mib", *VISION_LIMITS):
            if key in kwargs and kwargs[key] is not None and not isinstance(kwargs[key], int):
                raise DeploySpecError(f"{key} must be an integer, got {kwargs[key]!r}")
        return cls.create(**kwargs)

    @classmethod
    def from_file(cls, path: str | Path) -> DeploySpec:
        """A JSON (or, on Python 3.11+, TOML) file with the keys of `DeploySpec.create`."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise DeploySpecError(f"{path}: cannot read the deployment spec ({e.strerror})") from None
        try:
            if path.suffix == ".toml":
                import tomllib

                data = tomllib.loads(text)
            else:
                data = json.loads(text)
        except (ValueError, ImportError) as e:
            raise DeploySpecError(f"{path}: malformed deployment spec ({e})") from None
        if not isinstance(data, dict):
            raise DeploySpecError(f"{path}: the deployment spec must be an object of keys")
        return cls.from_mapping(data)

    def problems(self, gpus_given: bool = True) -> list[str]:
        out: list[str] = []
        traits = TARGETS[self.target].engine if self.target in TARGETS else None
        if traits is None:
            out.append(f"unknown target {self.target!r}: engines build for {', '.join(names('engine'))}")
        if not self.gpus and not gpus_given:
            out.append("no GPU target: pass one or more, for example --gpu sm89,sm120")
        if self.precision not in PRECISIONS:
            if self.precision == "fp32" and traits is not None and not traits.builds_fp32:
                out.append(
                    f"precision fp32 cannot be built with {traits.builder}: it has no fp32 attention kernel "
                    "(opset-23 Attention builds only in fp16/bf16); use --precision fp16 or bf16 (norms, "
                    "router, DeltaNet gates and recurrent state stay fp32 inside the engine)"
                )
            else:
                out.append(f"unknown precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        for key in ("max_batch", "max_prompt", "max_context"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                out.append(f"{key} must be at least 1, got {value!r}")
            elif value > INT32_MAX:
                out.append(f"{key} {value} exceeds TensorRT's int32 dimension limit")
        if (
            isinstance(self.max_prompt, int)
            and isinstance(self.max_context, int)
            and self.max_prompt > self.max_context
        ):
            out.append(
                f"max_prompt {self.max_prompt} is above max_context {self.max_context}: a prompt must fit in "
                "the context; raise --max-context or lower --max-prompt"
            )
        for key in VISION_LIMITS:
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                out.append(f"{key} must be a positive integer, got {value!r}")
        if self.workspace_mib is not None and (
            not isinstance(self.workspace_mib, int) or self.workspace_mib < 1
        ):
            out.append(f"workspace_mib must be a positive integer, got {self.workspace_mib!r}")
        if self.weights not in WEIGHTS:
            out.append(f"unknown weights {self.weights!r}: use one of {', '.join(WEIGHTS)}")
        elif self.weights == "fp8" and not traits.fp8_weights:
            fp8 = " or ".join(fp8_weight_targets())
            out.append(
                f"--weights fp8 builds with the {fp8} target (the {self.target} target takes bf16/fp16 "
                f"weights); use --target {fp8} or --weights dequant"
            )
        for sm in self.gpus:
            out += self._gpu_problems(sm, traits)
        return out

    def _gpu_problems(self, sm: str, traits: EngineTraits | None) -> list[str]:
        label = self.label(sm)
        out = []
        aot = traits.aot_sms if traits is not None else None
        if aot is not None and sm == "sm75":
            out.append(
                f"{label}: {traits.builder} cannot build this model for Turing: it has no fp32 GEMM there, "
                "and the DeltaNet recurrence keeps its state in fp32; build it with --target trt on that GPU"
            )
        elif aot is not None and sm not in aot:
            out.append(
                f"{label}: {traits.builder} cannot build for {sm} (it builds ahead of time only for "
                f"{', '.join(aot)}); build it with --target trt on that GPU"
            )
        if self.precision == "bf16" and sm_number(sm) < BF16_MIN_SM:
            out.append(f"{label}: {sm} has no bf16 support; use --precision fp16 for it")
        if self.weights == "fp8" and sm_number(sm) < FP8_MIN_SM:
            out.append(
                f"{label}: FP8 weights need sm89 or newer (FP8 tensor cores: Ada, Hopper, Blackwell); "
                "build it with --weights dequant, or leave it out"
            )
        return out

    def label(self, sm: str) -> str:
        """The user's own name for a target where it differs from the SM ('l40s (sm89)')."""
        for name in self.requested:
            try:
                if resolve_gpu(name) == sm and name.lower() != sm:
                    return f"{name} ({sm})"
            except DeploySpecError:
                continue
        return sm

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["gpus"] = list(self.gpus)
        data["requested"] = list(self.requested)
        for key in VISION_LIMITS:  # a text-only spec reads (and fingerprints) as it did before they existed
            if data[key] is None:
                del data[key]
        return data

    def fingerprint_json(self) -> dict[str, Any]:
        """What identifies the engines: everything but the user's spelling of the GPU names."""
        data = self.to_json()
        data.pop("requested")
        return data

    def profiles(self, inputs: Sequence[tuple[str, Sequence[int | str | None]]]) -> list[Profile]:
        """The text tower's (and the token embedding's) prefill and decode profiles."""
        return build_profiles(self, inputs)


@dataclass(frozen=True)
class Profile:
    """One optimization profile: per input, (min, opt, max) dimensions."""

    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shapes": {k: [list(s) for s in v] for k, v in self.shapes.items()}}


# The exporter's symbolic dimensions (see exporter/model.py).
_BATCH, _SEQ, _TOTAL, _PAST = "batch", "sequence", "total_sequence", "past_sequence"


def build_profiles(
    spec: DeploySpec, inputs: Sequence[tuple[str, Sequence[int | str | None]]]
) -> list[Profile]:
    """Prefill and decode profiles for a graph's inputs, given as (name, dims with symbolic names)."""
    b = spec.max_batch
    # (min, opt, max) per symbolic dimension in each profile; opt is where builders tune.
    ranges = {
        "prefill": {
            _BATCH: (1, b, b),
            _SEQ: (1, spec.max_prompt, spec.max_prompt),
            _TOTAL: (1, spec.max_prompt, spec.max_prompt),
            _PAST: (0, 0, 0),
        },
        "decode": {
            _BATCH: (1, b, b),
            _SEQ: (1, 1, 1),
            _TOTAL: (1, max(1, spec.max_context // 2), spec.max_context),
            _PAST: (0, max(1, spec.max_context // 2) - 1, spec.max_context - 1),
        },
    }
    bound = "the deployment spec"
    return [Profile(name, profile_shapes(inputs, dims, bound)) for name, dims in ranges.items()]


def profile_shapes(
    inputs: Sequence[tuple[str, Sequence[int | str | None]]],
    ranges: dict[str, tuple[int, int, int]],
    bounded_by: str,
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) dimensions per input: fixed dims as they are, symbolic ones from `ranges`; a symbol
    `ranges` lacks is a one-line error naming what could not bound it."""
    shapes = {}
    for input_name, dims in inputs:
        mins, opts, maxs = [], [], []
        for axis, d in enumerate(dims):
            if isinstance(d, int) and d >= 0:
                lo = opt = hi = d
            elif isinstance(d, str) and d in ranges:
                lo, opt, hi = ranges[d]
            else:
                raise DeploySpecError(
                    f"input {input_name!r} has dimension {axis} = {d!r}, which {bounded_by} cannot bound "
                    f"(known: {', '.join(ranges)})"
                )
            mins.append(lo)
            opts.append(opt)
            maxs.append(hi)
        shapes[input_name] = (tuple(mins), tuple(opts), tuple(maxs))
    return shapes
