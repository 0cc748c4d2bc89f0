"""Preprocessing parity with transformers' processor as it runs with torchvision (issue #18).

tests/data/processor_reference/ holds transformers' own processor output (AutoProcessor with torchvision,
scripts/make_processor_reference.py) for seeded PNGs and the test processor files. Here: our arrays equal
those (bit for bit on x86-64), the inputs are still the ones the reference was made from (sha256), and
greedy tokens from our runtime on the image files equal transformers' `generate` fed the reference arrays.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from multimodal_support import save_processor_files, write_images
from safetensors.numpy import load_file

from qwen_export.golden.reference import load_reference
from qwen_export.runtime import multimodal_inputs
from qwen_export.runtime.multimodal import MultimodalRunner
from qwen_export.runtime.multimodal_inputs import (
    load_image,
    load_processor,
    load_video_frames,
    process,
    prompt_text,
)
from qwen_export.tolerances import FP32_MAX_ABS

REFERENCE = Path(__file__).parent / "data" / "processor_reference"
MANIFEST = json.loads((REFERENCE / "manifest.json").read_text())
CASES = list(MANIFEST["cases"])
PIXEL_KEYS = ("pixel_values", "pixel_values_videos")
STEP = (1 / 255) / 0.5  # one uint8 step after normalisation with the test processor's std 0.5
# torch's uint8 antialiased resize is fixed-point arithmetic in its AVX2 kernel (AVX-512 machines run the same
# code): there our arrays must equal the reference's bit for bit. Elsewhere torch takes another uint8 kernel,
# so a reference made on x86-64 is only matched within one uint8 step.
EXACT = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
GREEDY_CASES = ["image_same", "image_down", "video", "image_and_video", "two_images"]
NEW_TOKENS = 24


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Processor files and PNGs written now, the way the reference script wrote them."""
    folder = tmp_path_factory.mktemp("processor_inputs")
    save_processor_files(folder)
    sizes = {name: (v["height"], v["width"]) for name, v in MANIFEST["images"].items()}
    write_images(folder, sizes, seed=MANIFEST["seed"])
    return folder


@pytest.fixture(scope="module")
def processor(inputs):
    return load_processor(inputs)


def reference(case: str) -> dict[str, np.ndarray]:
    return load_file(str(REFERENCE / f"{case}.safetensors"))


def media(folder: Path, case: str) -> tuple[list[Path], list[list[Path]]]:
    spec = MANIFEST["cases"][case]
    return [folder / f"{n}.png" for n in spec["images"]], [
        [folder / f"{n}.png" for n in v] for v in spec["videos"]
    ]


def preprocess(processor, folder: Path, case: str) -> dict[str, np.ndarray]:
    """What MultimodalRunner.preprocess does, without an export."""
    images, videos = media(folder, case)
    pil = [load_image(p) for p in images]
    frames = [load_video_frames(v, 2) for v in videos]
    text = prompt_text(processor, MANIFEST["cases"][case]["prompt"], len(pil), len(frames))
    return process(processor, text, pil, frames, MANIFEST["cases"][case]["video_fps"])


def pixel_steps(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, float]:
    """Largest difference per pixel array, in uint8 steps."""
    return {
        k: float(np.abs(ours[k].astype(np.float64) - ref[k]).max()) / STEP for k in PIXEL_KEYS if k in ref
    }


def assert_matches_reference(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
    assert sorted(ours) == sorted(ref)
    for key, want in ref.items():
        got = ours[key]
        assert got.dtype == want.dtype and got.shape == want.shape, (key, got.dtype, got.shape, want.shape)
        if key in PIXEL_KEYS and not EXACT:
            np.testing.assert_allclose(got, want, rtol=0, atol=STEP * 1.0001, err_msg=key)
        else:
            np.testing.assert_array_equal(got, want, err_msg=f"{key}: {pixel_steps(ours, ref)} uint8 steps")


# --- the reference is still about these inputs --------------------------------------------------------------
def test_reference_inputs_are_the_ones_written_now(inputs):
    assert {n: sha256(inputs / f"{n}.png") for n in MANIFEST["images"]} == {
        n: v["sha256"] for n, v in MANIFEST["images"].items()
    }
    assert {n: sha256(inputs / n) for n in MANIFEST["processor_files"]} == MANIFEST["processor_files"]
    assert {p.name for p in inputs.iterdir() if p.suffix != ".png"} == set(MANIFEST["processor_files"])
    assert {c: sha256(REFERENCE / f"{c}.safetensors") for c in CASES} == {
        c: v["sha256"] for c, v in MANIFEST["cases"].items()
    }
    assert MANIFEST["versions"]["torchvision"] and MANIFEST["versions"]["transformers"] == "5.23.0"
    assert MANIFEST["processor_classes"] == ["Qwen2VLImageProcessor", "Qwen3VLVideoProcessor"]


def test_cases_cover_resizing_both_ways():
    """No resize, down, up, odd aspect ratio, the issue's video: grids against the input sizes."""
    sizes = {n: (v["height"], v["width"]) for n, v in MANIFEST["images"].items()}
    grids = {c: reference(c) for c in ("image_same", "image_down", "image_up", "image_odd", "video")}
    resized = {
        c: tuple(int(x) * 4 for x in r.get("image_grid_thw", r.get("video_grid_thw"))[0, 1:])
        for c, r in grids.items()
    }
    assert resized["image_same"] == sizes["same"]
    assert np.prod(resized["image_down"]) < np.prod(sizes["down"])
    assert np.prod(resized["image_up"]) > np.prod(sizes["up"])
    assert resized["image_odd"] != sizes["odd"] and sizes["odd"][1] / sizes["odd"][0] > 8
    assert sizes["frame0"] == (75, 110) and resized["video"] != sizes["frame0"]


# --- our arrays against transformers + torchvision ----------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_arrays_equal_transformers_with_torchvision(processor, inputs, case):
    assert_matches_reference(preprocess(processor, inputs, case), reference(case))


def test_processor_classes_are_the_torchvision_ones_or_their_torch_only_subclasses(processor):
    """transformers' torchvision classes where torchvision imports, else our subclasses (never PIL)."""
    names = (type(processor.image_processor).__name__, type(processor.video_processor).__name__)
    if multimodal_inputs.torchvision_available():
        assert names == ("Qwen2VLImageProcessor", "Qwen3VLVideoProcessor")
    else:
        assert names == ("TorchImageProcessor", "TorchVideoProcessor")
        assert type(processor.image_processor).__mro__[1].__name__ == "Qwen2VLImageProcessor"


def float_resize(image, height: int, width: int, resample=None, antialias: bool = True):
    """The resize this runtime had before issue #18: float bicubic, then round and clamp back to uint8."""
    x = image.reshape(-1, *image.shape[-3:]).float()
    x = torch.nn.functional.interpolate(x, size=(height, width), mode="bicubic", antialias=antialias)
    x = x.reshape(*image.shape[:-2], height, width)
    return x.round_().clamp_(0, 255).to(torch.uint8) if image.dtype == torch.uint8 else x


@pytest.mark.parametrize("case", ["video", "image_down"])
def test_the_old_float_resize_is_caught(processor, inputs, case, monkeypatch):
    """The regression the user hit: a float resize is more than one uint8 step off the reference."""
    monkeypatch.setattr(multimodal_inputs, "tv_resize", float_resize)
    ours, ref = preprocess(processor, inputs, case), reference(case)
    assert max(pixel_steps(ours, ref).values()) >= 2
    with pytest.raises(AssertionError):
        assert_matches_reference(ours, ref)


# --- greedy tokens: our runtime from the files vs transformers from the reference arrays --------------------
@pytest.fixture(scope="module")
def checkpoint(multimodal_export):
    folder, result = multimodal_export
    # The reference was made with these processor files: the checkpoint must carry the same bytes.
    assert {n: sha256(folder / n) for n in MANIFEST["processor_files"]} == MANIFEST["processor_files"]
    return MultimodalRunner(result.out_dir), load_reference(folder)


@pytest.mark.parametrize("case", GREEDY_CASES)
def test_greedy_tokens_match_transformers_on_the_torchvision_arrays(checkpoint, inputs, case):
    runner, model = checkpoint
    images, videos = media(inputs, case)
    arrays = runner.preprocess(MANIFEST["cases"][case]["prompt"], images, videos)
    ref = reference(case)
    np.testing.assert_array_equal(arrays["input_ids"], ref["input_ids"])
    result = runner.generate(runner.build_inputs(arrays), NEW_TOKENS)
    feeds = {k: torch.from_numpy(v) for k, v in ref.items()}
    with torch.no_grad():
        logits = model(**feeds).logits.numpy()
        generated = model.generate(
            **feeds,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )
    # Greedy tokens on random weights shrug off a few uint8 steps; the prefill logits do not (the old float
    # resize moves them far beyond the tolerance), so both are checked.
    worst = float(np.abs(result.prefill_logits - logits).max())
    assert worst <= FP32_MAX_ABS, f"prefill logits {worst:.3g} away from transformers'"
    assert result.tokens == generated[0, ref["input_ids"].shape[1] :].tolist()


@pytest.mark.parametrize("case", ["video", "image_and_video"])
def test_cli_run_gives_the_same_tokens(checkpoint, inputs, case):
    """`qwen-export run --image/--video` is the runner above: its greedy ids are the ones checked against
    transformers' `generate` in the test before."""
    import json

    from typer.testing import CliRunner

    from qwen_export.cli import app

    runner, _ = checkpoint
    images, videos = media(inputs, case)
    prompt = MANIFEST["cases"][case]["prompt"]
    expected = runner.generate(runner.build_inputs(runner.preprocess(prompt, images, videos)), NEW_TOKENS)
    args = ["run", str(runner.artifact.folder), "--prompt", prompt, "--max-new-tokens", str(NEW_TOKENS)]
    args += [a for image in images for a in ("--image", str(image))]
    args += [a for video in videos for a in ("--video", ",".join(str(f) for f in video))]
    out = CliRunner().invoke(app, [*args, "--json", "--stop", "-1"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output.strip().splitlines()[-1])["ids"] == expected.tokens
