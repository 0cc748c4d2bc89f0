"""golden, validate, diff and profile on multimodal artifacts (vision.onnx + embed.onnx + the inputs_embeds
text graph), against transformers' reference on the local checkpoints of tests/multimodal_support.py.

Tolerances: logits within the fp32 max |Δ| (FP32_MAX_ABS, 2e-4); vision features and every vision block's
output within the fp32 per-layer tolerance relative to their scale (1e-5; measured ~4e-7)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from typer.testing import CliRunner

from qwen_export.cli import app
from qwen_export.diff import diff_artifact
from qwen_export.golden.reference import load_reference
from qwen_export.golden.store import PROMPT_LENGTHS, generate_golden
from qwen_export.profile import profile_artifact
from qwen_export.tolerances import FP32_MAX_ABS, tolerance_for
from qwen_export.validate import validate_artifact

LAYER_REL = tolerance_for("fp32")["layer_rel"]
ONE_CLASS = ["Qwen3_5MoeForConditionalGeneration"]  # the slower checks run on one class
cli = CliRunner()


@pytest.fixture(scope="module")
def golden_dir(multimodal_export, tmp_path_factory) -> Path:
    folder, _ = multimodal_export
    out = tmp_path_factory.mktemp("golden") / "golden"
    generate_golden(folder, out, str(folder))
    return out


@pytest.fixture(scope="module")
def deep_vision(tmp_path_factory):
    """A checkpoint whose vision tower has two blocks (so a fault can be bisected to the second) and its
    multimodal export: (checkpoint folder, artifact folder)."""
    import multimodal_support

    from qwen_export.exporter.export import export_model

    root = tmp_path_factory.mktemp("deep")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(multimodal_support, "TINY_VISION", {**multimodal_support.TINY_VISION, "depth": 2})
        folder = multimodal_support.make_multimodal_checkpoint(ONE_CLASS[0], root / "ckpt")
    return folder, export_model(root / "out", model_dir=folder, multimodal=True).out_dir


def scaled_vision_mlp(artifact: Path, out: Path, block: int, factor: float = 1.5) -> Path:
    """A copy of the artifact with vision block `block`'s MLP output weight scaled (a planted fault)."""
    shutil.copytree(artifact, out, ignore=shutil.ignore_patterns("vision.onnx*"))
    model = onnx.load(str(artifact / "vision.onnx"))
    init = next(
        i for i in model.graph.initializer if i.name.startswith(f"blocks.{block}.mlp.linear_fc2.weight")
    )
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
    onnx.save(model, str(out / "vision.onnx"), save_as_external_data=True, location="vision.onnx.data")
    return out


# --- golden -----------------------------------------------------------------------------------------------
def test_golden_holds_image_and_video_cases(multimodal_export, golden_dir):
    from qwen_export.golden.store import load_golden

    folder, _ = multimodal_export
    golden = load_golden(golden_dir)
    cases = {c.name: c for c in golden.multimodal_cases}
    assert set(cases) == {"image", "video"}
    assert cases["image"].arrays["image_grid_thw"].tolist() == [[1, 8, 12]]
    assert cases["video"].arrays["video_grid_thw"].tolist() == [[1, 10, 10]]
    assert all(p.is_file() for c in cases.values() for p in [*c.images, *sum(c.videos, [])])
    # the text golden is all there, in its own format
    assert {f"prefill.{n}.logits" for n in PROMPT_LENGTHS} <= set(golden.tensors)
    assert golden.greedy_tokens.shape == (1, 32)
    # the stored features are transformers' get_image_features / get_video_features on the stored arrays
    model = load_reference(folder)
    with torch.no_grad():
        image = model.get_image_features(
            torch.from_numpy(cases["image"].arrays["pixel_values"]),
            torch.from_numpy(cases["image"].arrays["image_grid_thw"]),
        ).pooler_output
        video = model.get_video_features(
            torch.from_numpy(cases["video"].arrays["pixel_values_videos"]),
            torch.from_numpy(cases["video"].arrays["video_grid_thw"]),
        ).pooler_output
    np.testing.assert_allclose(cases["image"].vision_features, torch.cat(image).numpy(), atol=1e-6)
    np.testing.assert_allclose(cases["video"].vision_features, torch.cat(video).numpy(), atol=1e-6)
    assert cases["image"].greedy_tokens.shape == (1, 16)


def test_corrupted_media_fails_to_load(golden_dir, tmp_path):
    from qwen_export.errors import QwenExportError
    from qwen_export.golden.store import load_golden

    copy = Path(shutil.copytree(golden_dir, tmp_path / "g"))
    (copy / "media" / "image-0.png").write_bytes(b"not a png")
    with pytest.raises(QwenExportError, match="sha256"):
        load_golden(copy)


# --- validate ---------------------------------------------------------------------------------------------
def test_validate_runs_image_and_video_prompts(multimodal_export, golden_dir):
    _, result = multimodal_export
    report = validate_artifact(result.out_dir, golden_dir)
    assert report.passed, report.rows
    rows = {r.name.split(" (")[0]: r for r in report.rows}
    for case in ("image", "video"):
        assert rows[f"{case}: preprocessing"].max_abs == 0.0
        assert rows[f"{case}: vision features"].max_abs < 1e-5
        assert rows[f"{case}: prefill logits"].max_abs <= FP32_MAX_ABS
        assert rows[f"{case}: prefill logits"].top1_agreement == 1.0
    assert report.greedy_cases == {"image": [16, 16], "video": [16, 16]}


@pytest.mark.parametrize("multimodal_export", ONE_CLASS, indirect=True)
def test_validate_fails_on_a_corrupted_vision_graph(multimodal_export, golden_dir, tmp_path):
    _, result = multimodal_export
    faulty = scaled_vision_mlp(result.out_dir, tmp_path / "faulty", block=0)
    report = validate_artifact(faulty, golden_dir)
    assert not report.passed
    failed = {r.name.split(" (")[0] for r in report.rows if not r.passed}
    assert {"image: vision features", "video: vision features"} <= failed
    out = cli.invoke(app, ["validate", str(faulty), "--golden", str(golden_dir)])
    assert out.exit_code == 1, out.output


# --- diff -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("multimodal_export", ONE_CLASS, indirect=True)
def test_diff_live_covers_media_and_vision_blocks(multimodal_export):
    _, result = multimodal_export
    report = diff_artifact(result.out_dir, per_layer=True)
    assert report.passed
    assert {"prefill_65", "image_prefill", "video_prefill"} <= set(report.prefill)
    assert all(m["max_abs"] <= FP32_MAX_ABS and m["top1_agreement"] == 1.0 for m in report.prefill.values())
    assert all(m["vision_rel"] <= LAYER_REL and m["greedy_agreement"] == 16 for m in report.media.values())
    assert [b["ok"] for b in report.vision_blocks] == [True] and report.first_bad_vision_block is None
    assert [layer["ok"] for layer in report.layers] == [True] * 4


def test_diff_per_layer_names_the_planted_vision_block(deep_vision, tmp_path):
    _, artifact = deep_vision
    clean = diff_artifact(artifact, per_layer=True)
    assert clean.passed and [b["ok"] for b in clean.vision_blocks] == [True, True]
    faulty = scaled_vision_mlp(artifact, tmp_path / "faulty", block=1)
    report = diff_artifact(faulty, per_layer=True)
    assert not report.passed
    assert report.first_bad_vision_block == 1
    assert report.vision_blocks[0]["ok"] and report.vision_blocks[1]["rel"] > 100 * LAYER_REL
    assert report.first_bad_layer is None  # text prompts do not touch the vision tower
    assert not any(m["vision_ok"] for m in report.media.values())
    out = cli.invoke(app, ["diff", str(faulty), "--per-layer"])
    assert out.exit_code == 1
    assert "first vision block out of tolerance: 1" in out.output


def test_diff_against_the_golden(multimodal_export, golden_dir):
    _, result = multimodal_export
    report = diff_artifact(result.out_dir, golden_dir)
    assert report.passed and report.greedy_agreement == 32
    assert set(report.media) == {"image", "video"}


# --- profile ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("multimodal_export", ONE_CLASS, indirect=True)
def test_profile_has_vision_prefill_and_decode(multimodal_export, multimodal_images):
    _, result = multimodal_export
    report = profile_artifact(result.out_dir, prompt_tokens=17, decode_steps=3, repeats=2)
    assert list(report.phases) == ["vision", "prefill", "decode"]
    vision = report.phases["vision"]
    assert set(vision.per_layer_ms) == {"block 0", "other"} and vision.runs == 2
    assert abs(vision.coverage - 1) < 0.05  # every microsecond of a run attributed
    assert set(report.phases["prefill"].per_layer_ms) == {"layer 0", "layer 1", "layer 2", "layer 3", "other"}
    assert report.vision_grid == [[1, 8, 12]]
    with_image = profile_artifact(result.out_dir, 5, 1, repeats=1, image=multimodal_images["f0"])
    assert with_image.vision_grid == [[1, 10, 10]]


# --- command line -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("multimodal_export", ONE_CLASS, indirect=True)
def test_cli_accepts_multimodal_artifacts_and_refuses_bad_input(multimodal_export, golden_dir, tmp_path):
    folder, result = multimodal_export
    art = str(result.out_dir)
    out = cli.invoke(app, ["validate", art, "--golden", str(golden_dir), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["greedy_cases"] == {"image": [16, 16], "video": [16, 16]}
    text_golden = Path(__file__).resolve().parents[1] / "golden" / "tiny-qwen3.5-moe"
    for args, message in (
        (["validate", art, "--golden", str(text_golden)], "a text golden"),
        (["diff", art, "--per-pass"], "--per-pass rebuilds the text pipeline only"),
        (["profile", art, "--image", str(tmp_path / "missing.png")], "image file not found"),
    ):
        out = cli.invoke(app, args)
        assert out.exit_code == 2, out.output
        assert message in out.output and "Traceback" not in out.output
    report = tmp_path / "profile.json"
    out = cli.invoke(
        app, ["profile", art, "--prompt-tokens", "5", "--decode-steps", "1", "--report", str(report)]
    )
    assert out.exit_code == 0, out.output
    assert set(json.loads(report.read_text())["phases"]) == {"vision", "prefill", "decode"}
