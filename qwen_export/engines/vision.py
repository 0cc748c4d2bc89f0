"""A multimodal build's vision engine: its optimization profile from the spec's media limits, and the check
that refuses an image or video over those limits before any compute.

The vision graph takes every image (or every video) of a prompt in one call, packed along the patch axis:

- `patches`: at most one video of `max_video_frames` frames at `max_image_pixels` per frame (which also
  covers one image at `max_image_pixels`); at least one merge block;
- `segment_bounds`: one attention segment per image or temporal patch, each at least one merge block.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from qwen_export.engines.spec import DeploySpec, DeploySpecError, Profile, profile_shapes
from qwen_export.errors import QwenExportError

# Defaults when the spec leaves them out: a 1024x1024 image (Qwen3.5's processors resize larger ones to
# about this), and a 16-frame clip.
DEFAULT_MAX_IMAGE_PIXELS = 1024 * 1024
DEFAULT_MAX_VIDEO_FRAMES = 16


@dataclass(frozen=True)
class VisionLimits:
    """What one vision engine call serves, in the user's units and in graph dimensions."""

    max_image_pixels: int
    max_video_frames: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int

    @classmethod
    def from_spec(cls, spec: DeploySpec, vision_spec: Mapping[str, Any]) -> VisionLimits:
        limits = cls(
            spec.max_image_pixels or DEFAULT_MAX_IMAGE_PIXELS,
            spec.max_video_frames or DEFAULT_MAX_VIDEO_FRAMES,
            int(vision_spec["patch_size"]),
            int(vision_spec["temporal_patch_size"]),
            int(vision_spec["spatial_merge_size"]),
        )
        smallest = (limits.patch_size * limits.spatial_merge_size) ** 2
        if limits.max_image_pixels < smallest:
            raise DeploySpecError(
                f"max_image_pixels {limits.max_image_pixels} is below one merged patch "
                f"({smallest} pixels); raise --max-image-pixels"
            )
        if limits.max_video_frames < limits.temporal_patch_size:
            raise DeploySpecError(
                f"max_video_frames {limits.max_video_frames} is below the vision tower's temporal patch "
                f"({limits.temporal_patch_size} frames); raise --max-video-frames"
            )
        return limits

    @property
    def patches_per_frame(self) -> int:
        return self.max_image_pixels // self.patch_size**2

    @property
    def max_patches(self) -> int:
        return self.patches_per_frame * math.ceil(self.max_video_frames / self.temporal_patch_size)

    def to_json(self) -> dict[str, int]:
        return {
            "max_image_pixels": self.max_image_pixels,
            "max_video_frames": self.max_video_frames,
            "max_patches": self.max_patches,
        }

    def profiles(self, inputs: Sequence[tuple[str, Sequence[int | str | None]]]) -> list[Profile]:
        """One profile over the vision graph's inputs (dims named as exporter/vision.py names them)."""
        block = self.spatial_merge_size**2
        ranges = {
            "patches": (block, self.patches_per_frame, self.max_patches),
            "segment_bounds": (2, 2, self.max_patches // block + 1),
        }
        return [Profile("vision", profile_shapes(inputs, ranges, "the media limits"))]

    def check(self, image_grids: np.ndarray | None, video_grids: np.ndarray | None) -> None:
        """Refuse, naming the limit, an image or video (as the processor resized it: grid_thw rows) that
        the vision engine was not built for."""
        area = self.patch_size**2
        for i, (_, h, w) in enumerate(_rows(image_grids), 1):
            pixels = int(h * w * area)
            if pixels > self.max_image_pixels:
                raise QwenExportError(
                    f"image {i}: {w * self.patch_size}x{h * self.patch_size} = {pixels} pixels after "
                    f"resizing exceeds the vision engine's max_image_pixels {self.max_image_pixels}; "
                    "downscale it or rebuild with a larger --max-image-pixels"
                )
        for i, (t, h, w) in enumerate(_rows(video_grids), 1):
            frames = int(t * self.temporal_patch_size)
            if frames > self.max_video_frames:
                raise QwenExportError(
                    f"video {i}: {frames} frames exceeds the vision engine's max_video_frames "
                    f"{self.max_video_frames}; send fewer frames or rebuild with a larger --max-video-frames"
                )
            pixels = int(h * w * area)
            if pixels > self.max_image_pixels:
                raise QwenExportError(
                    f"video {i}: {pixels} pixels per frame after resizing exceeds the vision engine's "
                    f"max_image_pixels {self.max_image_pixels}; downscale it or rebuild with a larger "
                    "--max-image-pixels"
                )


def _rows(grids: np.ndarray | None) -> list[tuple[int, int, int]]:
    return [] if grids is None else [tuple(int(v) for v in row) for row in np.asarray(grids).reshape(-1, 3)]
