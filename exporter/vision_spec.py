"""What the multimodal export needs from config.json: the vision tower's shapes and the mRoPE layout."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from qwen_export.errors import ConfigError

# Qwen3.5's text rotary embedding falls back to this split when rope_parameters has no mrope_section.
DEFAULT_MROPE_SECTION = (11, 11, 10)


@dataclass(frozen=True)
class VisionSpec:
    """The vision tower (Qwen3_5[Moe]VisionModel) and how its output enters the text tower."""

    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    out_hidden_size: int
    num_position_embeddings: int
    rope_theta: float
    # token ids the processor writes and the text tower reads
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    # text mRoPE: how many rotary frequencies follow each of the (t, h, w) axes, interleaved
    mrope_section: tuple[int, int, int]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch in `pixel_values`: channels x frames x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merged_hidden_size(self) -> int:
        return self.hidden_size * self.spatial_merge_size**2

    @property
    def num_grid_per_side(self) -> int:
        return int(self.num_position_embeddings**0.5)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def vision_spec_from_config(config: dict[str, Any], source: str | os.PathLike = "config.json") -> VisionSpec:
    """Read the vision tower through transformers' own config classes, so defaults match the reference."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.for_model(**config)
    except Exception as e:  # transformers raises many types for bad configs
        raise ConfigError(f"{source}: transformers rejected the config ({type(e).__name__}: {e})") from None
    vision = getattr(cfg, "vision_config", None)
    if vision is None:
        raise ConfigError(
            f"{source}: no vision_config; the multimodal export needs a *ForConditionalGeneration checkpoint"
        )
    rope = getattr(cfg.get_text_config(), "rope_parameters", None) or {}
    section = tuple(int(s) for s in rope.get("mrope_section") or DEFAULT_MROPE_SECTION)
    vision_rope = getattr(vision, "rope_parameters", None) or {}
    try:
        spec = VisionSpec(
            depth=int(vision.depth),
            hidden_size=int(vision.hidden_size),
            num_heads=int(vision.num_heads),
            intermediate_size=int(vision.intermediate_size),
            hidden_act=str(vision.hidden_act),
            in_channels=int(vision.in_channels),
            patch_size=_single(vision.patch_size, "patch_size", source),
            temporal_patch_size=_single(vision.temporal_patch_size, "temporal_patch_size", source),
            spatial_merge_size=int(vision.spatial_merge_size),
            out_hidden_size=int(vision.out_hidden_size),
            num_position_embeddings=int(vision.num_position_embeddings),
            rope_theta=float(vision_rope.get("rope_theta", 10000.0)),
            image_token_id=int(cfg.image_token_id),
            video_token_id=int(cfg.video_token_id),
            vision_start_token_id=int(cfg.vision_start_token_id),
            vision_end_token_id=int(cfg.vision_end_token_id),
            mrope_section=section,  # type: ignore[arg-type]
        )
    except AttributeError as e:
        raise ConfigError(f"{source}: vision_config lacks a field the vision export needs ({e})") from None
    _validate(spec, vision_rope, source)
    return spec


def _single(value: Any, name: str, source: str | os.PathLike) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConfigError(f"{source}: vision_config.{name} {list(value)} is not square (unsupported)")
        value = value[0]
    return int(value)


def _validate(spec: VisionSpec, vision_rope: dict[str, Any], source: str | os.PathLike) -> None:
    if len(spec.mrope_section) != 3:
        raise ConfigError(f"{source}: mrope_section must have 3 entries (t, h, w), got {spec.mrope_section}")
    if vision_rope.get("rope_type", "axial") != "axial":
        raise ConfigError(
            f"{source}: vision rope_type {vision_rope.get('rope_type')!r} is not supported (only 'axial')"
        )
    if spec.hidden_size % spec.num_heads or spec.head_dim % 4:
        raise ConfigError(
            f"{source}: vision head_dim {spec.hidden_size}/{spec.num_heads} must be a whole multiple of 4"
        )
    side = spec.num_grid_per_side
    if side * side != spec.num_position_embeddings:
        raise ConfigError(
            f"{source}: vision num_position_embeddings {spec.num_position_embeddings} is not a square grid"
        )
    if spec.hidden_act not in VISION_ACTIVATIONS:
        raise ConfigError(
            f"{source}: vision hidden_act {spec.hidden_act!r} is not supported "
            f"(supported: {', '.join(sorted(VISION_ACTIVATIONS))})"
        )


# transformers activation name -> ONNX Gelu `approximate` attribute
VISION_ACTIVATIONS: dict[str, str] = {
    "gelu_pytorch_tanh": "tanh",
    "gelu": "none",
}
