"""Reference arrays for tests/test_multimodal_preprocess.py: transformers' own processor, with torchvision.

    python scripts/make_processor_reference.py           # from the project venv (.venv)

Stage 1 (project venv) writes the inputs into a temporary folder: the test processor files
(tests/multimodal_support.py: save_processor_files) and seeded random PNGs (write_images). Stage 2 runs this
file again in .venv-torchvision (scripts/setup_torchvision_env.sh; torch 2.14.1 + torchvision 0.29.1, the
project's pins for the rest) with `--inputs DIR`: transformers' AutoProcessor, which there picks the
torchvision image processor (Qwen2VLImageProcessor) and the Qwen3-VL video processor, processes every case.
Its arrays go to tests/data/processor_reference/<case>.safetensors, and manifest.json records the versions,
the command, the cases and the sha256 of every input file, so the test can prove its inputs are the same.
Stage 2 imports nothing from this project: the prompt and processor call are spelled out here as the runtime
makes them (runtime/multimodal_inputs.py: prompt_text, process), and the test compares input_ids too.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "processor_reference"
TORCHVISION_PYTHON = ROOT / ".venv-torchvision" / "bin" / "python"
SEED = 0
VIDEO_FPS = 2.0
PROMPT = "Describe."
# name -> (height, width). The test processor resizes to multiples of 8 px within 256..4096 px (images) and
# 256..8192 px over a video's frames.
IMAGES = {
    "same": (16, 32),  # multiple of 8, 512 px: no resize
    "down": (24, 400),  # 9600 px: over the cap, antialiased downscale to 8x256
    "up": (10, 12),  # 120 px: under the minimum, upscaled to 16x24
    "odd": (7, 61),  # aspect ratio 8.7, rounded to 8x64
    "frame0": (75, 110),  # the 2-frame 110x75 video, downscaled to 48x72
    "frame1": (75, 110),
}
VIDEO = ["frame0", "frame1"]
# case -> (images, videos); each case is one prompt through the checkpoint's chat template.
CASES: dict[str, tuple[list[str], list[list[str]]]] = {
    "image_same": (["same"], []),
    "image_down": (["down"], []),
    "image_up": (["up"], []),
    "image_odd": (["odd"], []),
    "video": ([], [VIDEO]),
    "image_and_video": (["up"], [VIDEO]),
    "two_images": (["odd", "down"], []),
}
ARRAY_KEYS = (
    "input_ids",
    "attention_mask",
    "mm_token_type_ids",
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
)
COMMAND = "bash scripts/setup_torchvision_env.sh && python scripts/make_processor_reference.py"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_inputs(folder: Path) -> None:
    """Stage 1, project venv: processor files and PNGs exactly as the test writes them."""
    sys.path.insert(0, str(ROOT / "tests"))
    from multimodal_support import save_processor_files, write_images

    save_processor_files(folder)
    write_images(folder, IMAGES, seed=SEED)


def make_reference(inputs: Path, out: Path) -> None:
    """Stage 2, torchvision venv: transformers' AutoProcessor on every case."""
    import numpy as np
    import PIL
    import safetensors
    import tokenizers
    import torch
    import torchvision
    import transformers
    from PIL import Image
    from safetensors.numpy import save_file
    from transformers import AutoProcessor
    from transformers.video_utils import VideoMetadata

    processor = AutoProcessor.from_pretrained(inputs)
    kinds = (type(processor.image_processor).__name__, type(processor.video_processor).__name__)
    if kinds != ("Qwen2VLImageProcessor", "Qwen3VLVideoProcessor"):
        raise SystemExit(
            f"expected the torchvision image processor and the Qwen3-VL video processor, got {kinds}"
        )

    def rgb(name: str) -> Image.Image:
        with Image.open(inputs / f"{name}.png") as im:
            return im.convert("RGB")

    out.mkdir(parents=True, exist_ok=True)
    cases = {}
    for case, (image_names, videos) in CASES.items():
        content = [{"type": "image"}] * len(image_names) + [{"type": "video"}] * len(videos)
        messages = [{"role": "user", "content": [*content, {"type": "text", "text": PROMPT}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        kwargs = {"text": [text], "return_tensors": "np"}
        if image_names:
            kwargs["images"] = [rgb(n) for n in image_names]
        if videos:
            frames = [np.stack([np.asarray(rgb(n)) for n in v]) for v in videos]
            kwargs["videos"] = frames
            kwargs["videos_kwargs"] = {
                "do_sample_frames": False,
                "video_metadata": [
                    VideoMetadata(total_num_frames=len(f), fps=VIDEO_FPS, frames_indices=list(range(len(f))))
                    for f in frames
                ],
            }
        arrays = processor(**kwargs)
        tensors = {k: np.ascontiguousarray(arrays[k]) for k in ARRAY_KEYS if k in arrays}
        save_file(tensors, str(out / f"{case}.safetensors"))
        cases[case] = {
            "images": image_names,
            "videos": videos,
            "prompt": PROMPT,
            "text": text,
            "video_fps": VIDEO_FPS,
            "arrays": {k: [str(v.dtype), list(v.shape)] for k, v in tensors.items()},
            "sha256": sha256(out / f"{case}.safetensors"),
        }
    manifest = {
        "made_by": COMMAND,
        "versions": {
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "pillow": PIL.__version__,
            "numpy": np.__version__,
            "safetensors": safetensors.__version__,
            "python": sys.version.split()[0],
        },
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "processor_classes": list(kinds),
        "seed": SEED,
        "images": {
            name: {"height": h, "width": w, "sha256": sha256(inputs / f"{name}.png")}
            for name, (h, w) in IMAGES.items()
        },
        "processor_files": {
            p.name: sha256(p) for p in sorted(inputs.iterdir()) if p.suffix in (".json", ".jinja")
        },
        "cases": cases,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=Path, help="stage 2 only: the folder stage 1 wrote")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.inputs is not None:
        make_reference(args.inputs, args.out)
        return
    if not TORCHVISION_PYTHON.is_file():
        raise SystemExit(f"{TORCHVISION_PYTHON} is missing: run scripts/setup_torchvision_env.sh first")
    with tempfile.TemporaryDirectory() as tmp:
        write_inputs(Path(tmp))
        subprocess.run(
            [str(TORCHVISION_PYTHON), __file__, "--inputs", tmp, "--out", str(args.out)], check=True
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
