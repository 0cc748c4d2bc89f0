"""mRoPE position ids for a multimodal prompt: a numpy port of Qwen3_5[Moe]Model.get_rope_index.

Text tokens advance one position on all three axes (t, h, w); each image or video frame takes a block of
positions laid out over its merged grid (t fixed, h = row, w = column, all offset by the running
position), after which the running position advances by max(h, w) of the merged grid. Decode steps after
the prompt use text positions shifted by the returned delta, as transformers does.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np

from qwen_export.errors import QwenExportError

TEXT, IMAGE, VIDEO = 0, 1, 2  # the processor's mm_token_type_ids


def rope_index(
    input_ids: np.ndarray,
    mm_token_type_ids: np.ndarray,
    image_grid_thw: np.ndarray | None,
    video_grid_thw: np.ndarray | None,
    spatial_merge_size: int,
    attention_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(position_ids [3, B, T] int64, deltas [B, 1] int64) exactly as transformers computes them."""
    input_ids = np.asarray(input_ids)
    types_all = np.asarray(mm_token_type_ids)
    batch, length = input_ids.shape
    if video_grid_thw is not None:
        # Frames are separated by timestamps in the prompt, so every frame is its own grid with t = 1.
        video_grid_thw = np.repeat(np.asarray(video_grid_thw), np.asarray(video_grid_thw)[:, 0], axis=0)
        video_grid_thw[:, 0] = 1
    grids: dict[int, Iterator[np.ndarray]] = {
        IMAGE: iter(np.asarray(image_grid_thw)) if image_grid_thw is not None else iter(()),
        VIDEO: iter(video_grid_thw) if video_grid_thw is not None else iter(()),
    }
    positions = np.zeros((3, batch, length), dtype=np.int64)
    deltas = []
    for b in range(batch):
        keep = np.ones(length, bool) if attention_mask is None else np.asarray(attention_mask[b]).astype(bool)
        types = types_all[b][keep]
        current, parts = 0, []
        for kind, group in itertools.groupby(types.tolist()):
            count = len(list(group))
            if kind == TEXT:
                parts.append(np.broadcast_to(np.arange(count, dtype=np.int64) + current, (3, count)))
                current += count
                continue
            grid = next(grids[kind], None)
            if grid is None:
                raise QwenExportError(
                    f"prompt row {b}: more {'image' if kind == IMAGE else 'video'} placeholder runs than "
                    "grids from the processor"
                )
            block = vision_positions(current, grid, spatial_merge_size)
            if block.shape[1] != count:
                raise QwenExportError(
                    f"prompt row {b}: a run of {count} placeholder tokens does not match its grid "
                    f"{grid.tolist()} ({block.shape[1]} tokens after merging)"
                )
            parts.append(block)
            current += int(max(grid[1], grid[2])) // spatial_merge_size
        row = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), np.int64)
        positions[:, b, keep] = row
        deltas.append((int(row.max()) + 1 if row.size else 0) - len(types))
    return positions, np.asarray(deltas, dtype=np.int64)[:, None]


def vision_positions(start: int, grid_thw: np.ndarray, spatial_merge_size: int) -> np.ndarray:
    """[3, t*h*w/merge^2] positions of one image or frame (Qwen3_5Model.get_vision_position_ids)."""
    t = int(grid_thw[0])
    h = int(grid_thw[1]) // spatial_merge_size
    w = int(grid_thw[2]) // spatial_merge_size
    tt, hh, ww = np.meshgrid(
        np.arange(t, dtype=np.int64), np.arange(h) + start, np.arange(w) + start, indexing="ij"
    )
    block = np.stack([tt, hh, ww], axis=0).reshape(3, -1)
    block[0] += start
    return block


def decode_positions(next_position: np.ndarray) -> np.ndarray:
    """[3, B, 1] position ids of one decode step: the same text position on every axis."""
    return np.broadcast_to(np.asarray(next_position, np.int64).reshape(1, -1, 1), (3, len(next_position), 1))
