"""Multimodal golden cases: an image prompt and a video prompt, their seeded PNGs, the processor's arrays and
what transformers makes of them (vision features, prefill logits, greedy tokens).

The PNGs live in the golden folder (media/), so `validate` can run the whole path a user runs (files ->
processor -> artifact); the processor's arrays are stored too, so the artifact's numbers are checked on
exactly the pixels the reference saw. Shared by `golden`, `validate` and `diff` (which builds the same cases
live when it has no stored golden)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MEDIA_DIR = "media"
MEDIA_SEED = 2026
MULTIMODAL_NEW_TOKENS = 16
# name -> (prompt, image sizes (h, w), video frame sizes (h, w)); the sizes keep the tiny processor's grids
# small while still resizing (48x32 -> 8x12 patches) and covering two temporal patches of a video.
CASE_MEDIA: dict[str, tuple[str, list[tuple[int, int]], list[tuple[int, int]]]] = {
    "image": ("describe the picture", [(32, 48)], []),
    "video": ("what happens?", [], [(40, 40), (40, 40)]),
}
PIXEL_KEYS = ("pixel_values", "pixel_values_videos")


@dataclass
class MultimodalCase:
    """One media prompt: its files, the processor's arrays and the reference's outputs (when known)."""

    name: str
    prompt: str
    images: list[Path]
    videos: list[list[Path]]
    arrays: dict[str, np.ndarray]  # the processor's output, transformers' keyword names
    vision_features: np.ndarray | None = None  # the merger's output over all the prompt's media
    prefill_logits: np.ndarray | None = None  # [1, T, V]
    greedy_tokens: np.ndarray | None = None  # [1, N]

    @property
    def pixels(self) -> tuple[np.ndarray, np.ndarray]:
        """(pixel rows, grid_thw) of the modality this case holds."""
        if "pixel_values" in self.arrays:
            return self.arrays["pixel_values"], self.arrays["image_grid_thw"]
        return self.arrays["pixel_values_videos"], self.arrays["video_grid_thw"]


def write_case_media(folder: Path, seed: int = MEDIA_SEED) -> dict[str, tuple[list[Path], list[list[Path]]]]:
    """Seeded random RGB PNGs for every case under folder/media; name -> (images, videos)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / MEDIA_DIR).mkdir(parents=True, exist_ok=True)

    def png(name: str, size: tuple[int, int]) -> Path:
        path = folder / MEDIA_DIR / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        return path

    media = {}
    for case, (_, images, frames) in CASE_MEDIA.items():
        image_files = [png(f"{case}-{i}", size) for i, size in enumerate(images)]
        videos = [[png(f"{case}-frame{i}", size) for i, size in enumerate(frames)]] if frames else []
        media[case] = (image_files, videos)
    return media


def preprocess_case(
    processor: Any, temporal_patch: int, name: str, images: list[Path], videos: list[list[Path]]
) -> MultimodalCase:
    """A case's files through the checkpoint's processor, as MultimodalRunner.preprocess runs them."""
    from qwen_export.runtime.multimodal_inputs import load_image, load_video_frames, process, prompt_text

    prompt = CASE_MEDIA[name][0]
    pil = [load_image(p) for p in images]
    frames = [load_video_frames(v, temporal_patch) for v in videos]
    text = prompt_text(processor, prompt, len(pil), len(frames))
    return MultimodalCase(
        name, prompt, list(images), [list(v) for v in videos], process(processor, text, pil, frames)
    )


def reference_vision(model: Any, pixels: np.ndarray, grid_thw: np.ndarray, blocks: bool = False):
    """transformers' vision tower on processed pixels: the merger's output and, with `blocks`, every vision
    block's output (forward hooks on model.model.visual.blocks)."""
    import torch

    visual = model.model.visual
    captured: dict[int, np.ndarray] = {}
    hooks = (
        [
            blk.register_forward_hook(
                lambda _m, _i, out, i=i: captured.__setitem__(
                    i, (out[0] if isinstance(out, tuple) else out).float().numpy()
                )
            )
            for i, blk in enumerate(visual.blocks)
        ]
        if blocks
        else []
    )
    try:
        with torch.no_grad():
            out = visual(torch.from_numpy(pixels).to(visual.dtype), grid_thw=torch.from_numpy(grid_thw))
    finally:
        for h in hooks:
            h.remove()
    features = out.pooler_output.float().numpy()
    return (features, [captured[i] for i in range(len(captured))]) if blocks else features


def run_reference(model: Any, case: MultimodalCase, new_tokens: int = MULTIMODAL_NEW_TOKENS) -> None:
    """Fill a case's reference outputs from transformers: vision features, prefill logits, greedy tokens."""
    import torch

    kw = {k: torch.from_numpy(v) for k, v in case.arrays.items()}
    case.vision_features = reference_vision(model, *case.pixels)
    with torch.no_grad():
        case.prefill_logits = model(**kw).logits.float().numpy()
        generated = model.generate(
            **kw, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
            eos_token_id=None,
        )  # fmt: skip
    case.greedy_tokens = generated[:, case.arrays["input_ids"].shape[1] :].numpy()


def live_cases(model: Any, processor: Any, temporal_patch: int, folder: Path) -> list[MultimodalCase]:
    """The golden's cases made now (media written under `folder`), with transformers' outputs."""
    cases = []
    for name, (images, videos) in write_case_media(folder).items():
        case = preprocess_case(processor, temporal_patch, name, images, videos)
        run_reference(model, case)
        cases.append(case)
    return cases


def case_tensors(cases: list[MultimodalCase]) -> dict[str, np.ndarray]:
    """The cases as golden tensors: `mm.<case>.arrays.<key>`, `mm.<case>.vision_features`, ..."""
    tensors: dict[str, np.ndarray] = {}
    for c in cases:
        tensors |= {f"mm.{c.name}.arrays.{k}": v for k, v in c.arrays.items()}
        for key in ("vision_features", "prefill_logits", "greedy_tokens"):
            tensors[f"mm.{c.name}.{key}"] = getattr(c, key)
    return tensors


def case_manifest(cases: list[MultimodalCase], folder: Path) -> dict[str, Any]:
    """The manifest's "multimodal" section: per case its prompt and media files (relative to the golden)."""
    return {
        "seed": MEDIA_SEED,
        "new_tokens": MULTIMODAL_NEW_TOKENS,
        "cases": {
            c.name: {
                "prompt": c.prompt,
                "images": [str(p.relative_to(folder)) for p in c.images],
                "videos": [[str(p.relative_to(folder)) for p in v] for v in c.videos],
            }
            for c in cases
        },
    }


def stored_cases(
    manifest: dict[str, Any], tensors: dict[str, np.ndarray], folder: Path
) -> list[MultimodalCase]:
    """The cases of a loaded golden (empty for a text model's golden)."""
    cases = []
    for name, entry in manifest.get("multimodal", {}).get("cases", {}).items():
        prefix = f"mm.{name}.arrays."
        cases.append(
            MultimodalCase(
                name,
                entry["prompt"],
                [folder / p for p in entry["images"]],
                [[folder / p for p in v] for v in entry["videos"]],
                {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)},
                tensors[f"mm.{name}.vision_features"],
                tensors[f"mm.{name}.prefill_logits"],
                tensors[f"mm.{name}.greedy_tokens"],
            )
        )
    return cases


def feature_error(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max |Δ|, max |Δ| / max |ref|) of vision features: a tower output, held to the per-layer tolerance."""
    if ours.shape != ref.shape:
        return float("inf"), float("inf")
    err = float(np.abs(ours - ref).max()) if ours.size else 0.0
    return err, err / max(float(np.abs(ref).max()), 1e-30)
