"""Multimodal export (vision tower, inputs_embeds + mRoPE text graph) and runtime vs the HF reference,
on the local checkpoints of tests/multimodal_support.py (fixtures in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from multimodal_support import MAX_PIXELS, MIN_PIXELS
from PIL import Image

from qwen_export.errors import QwenExportError
from qwen_export.exporter.checkpoint import Checkpoint
from qwen_export.exporter.export import export_model, load_model_source
from qwen_export.exporter.model import build_decoder
from qwen_export.golden.reference import load_reference
from qwen_export.runtime.mrope import rope_index
from qwen_export.runtime.multimodal import MultimodalRunner, run_multimodal
from qwen_export.runtime.multimodal_inputs import load_image
from qwen_export.tolerances import FP32_MAX_ABS

TOL = FP32_MAX_ABS


# --- fixtures ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(multimodal_images) -> dict[str, Path]:
    return multimodal_images


@pytest.fixture(scope="module")
def case(multimodal_export):
    folder, result = multimodal_export
    return folder, result, MultimodalRunner(result.out_dir, optimize=False), load_reference(folder)


def hf_inputs(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in arrays.items()}


# --- end to end vs the reference -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["image", "video"])
def test_prefill_and_greedy_match_reference(case, images, kind):
    _, _, runner, model = case
    if kind == "image":
        arrays = runner.preprocess("describe", images=[images["a"]])
        assert arrays["image_grid_thw"].tolist() == [[1, 8, 12]]
    else:
        arrays = runner.preprocess("what happens?", videos=[[images["f0"], images["f1"]]], chat=False)
        assert arrays["video_grid_thw"].tolist() == [[1, 10, 10]]
    inputs = runner.build_inputs(arrays)
    kw = hf_inputs(arrays)
    with torch.no_grad():
        ref = model(**kw).logits.numpy()
        positions, delta = model.model.get_rope_index(
            kw["input_ids"], kw["mm_token_type_ids"], kw.get("image_grid_thw"), kw.get("video_grid_thw")
        )
        generated = model.generate(
            **kw, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0, eos_token_id=None
        )
    np.testing.assert_array_equal(inputs.position_ids, positions.numpy())
    np.testing.assert_array_equal(inputs.rope_delta, delta.numpy())
    logits = runner.prefill(inputs).logits
    assert np.abs(logits - ref).max() <= TOL
    result = runner.generate(inputs, 32)
    assert result.tokens == generated[0, arrays["input_ids"].shape[1] :].tolist()
    assert np.abs(result.prefill_logits - ref).max() <= TOL


def test_image_changes_the_answer(case, images):
    """The vision path matters: two images, same prompt, next-token logits far apart beyond tolerance."""
    _, _, runner, _ = case
    last = [
        runner.prefill(runner.build_inputs(runner.preprocess("hi", [images[k]]))).logits[0, -1] for k in "ab"
    ]
    assert np.abs(last[0] - last[1]).max() > 100 * TOL


def test_run_multimodal_library_entry(case, images):
    _, result, _, _ = case
    out = run_multimodal(
        result.out_dir,
        "hi",
        images=[images["a"]],
        videos=[[images["f0"], images["f1"]]],
        max_new_tokens=4,
        stop_tokens=(),
        optimize=False,
    )
    assert len(out.tokens) == 4 and isinstance(out.text, str)
    assert out.image_grids == [[1, 8, 12]] and out.video_grids == [[1, 10, 10]]
    with pytest.raises(QwenExportError, match="at least one image or video"):
        run_multimodal(result.out_dir, "hi")


# --- the export -------------------------------------------------------------------------------------------
def test_export_uses_every_tensor_and_writes_three_graphs(case):
    folder, result, _, _ = case
    info = result.info
    assert info["checkpoint"]["used"] == info["checkpoint"]["tensors"]
    assert info["checkpoint"]["left_out"] == {}
    assert info["multimodal"]["graphs"] == {
        "text": "model.onnx",
        "vision": "vision.onnx",
        "embed": "embed.onnx",
    }
    text = onnx.load(result.out_dir / "model.onnx", load_external_data=False)
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in text.graph.input
    }
    assert dims["inputs_embeds"] == ["batch", "sequence", 64]
    assert dims["position_ids"] == [3, "batch", "sequence"]
    assert "input_ids" not in dims
    vision = onnx.load(result.out_dir / "vision.onnx", load_external_data=False)
    vdims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in vision.graph.input
    }
    assert vdims["pixel_values"] == ["patches", 96]
    assert [o.name for o in vision.graph.output] == ["vision_embeds"]


def test_default_graph_is_untouched_by_the_multimodal_option(case):
    folder = case[0]
    _, spec, ckpt = load_model_source(folder)
    default = build_decoder(spec, ckpt)
    explicit = build_decoder(spec, Checkpoint.open(folder), multimodal=False)
    nodes = [(n.op_type, n.name) for n in default.graph]
    assert nodes == [(n.op_type, n.name) for n in explicit.graph]
    assert not any("/mrope/" in name for _, name in nodes)
    assert [v.name for v in default.graph.inputs][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert default.graph.inputs[2].shape.rank() == 2
    mm = build_decoder(spec, Checkpoint.open(folder), multimodal=True)
    assert any("/rotary_emb/mrope/" in n.name for n in mm.graph)
    assert not any(n.name.startswith("/embed_tokens/") for n in mm.graph)


def test_text_only_export_still_leaves_the_vision_tower_out(case, tmp_path):
    folder = case[0]
    info = export_model(tmp_path / "text", model_dir=folder).info
    assert "multimodal" not in info
    assert info["checkpoint"]["left_out"] == {"vision tower": 21}


# --- mRoPE port -------------------------------------------------------------------------------------------
def test_rope_index_matches_transformers_with_padding_and_several_grids(case):
    model = case[3]
    img, vid, start, end = 261, 262, 259, 260
    image_grids = np.array([[1, 4, 6], [1, 2, 2]])
    video_grids = np.array([[2, 4, 4]])  # two temporal patches: two frame blocks separated by text
    row = [1, 2, start, *[img] * 6, end, 3, start, img, end, 4, start, *[vid] * 4, end, 5, start]
    row += [*[vid] * 4, end, 6, 7]
    pad = 3
    ids = np.array([[0] * pad + row, row + [0] * pad])
    mask = np.array([[0] * pad + [1] * len(row), [1] * len(row) + [0] * pad])
    types = np.where(ids == img, 1, np.where(ids == vid, 2, 0)) * mask
    image_grids2 = np.concatenate([image_grids, image_grids])
    video_grids2 = np.concatenate([video_grids, video_grids])
    ours = rope_index(ids, types, image_grids2, video_grids2, 2, mask)
    with torch.no_grad():
        ref = model.model.get_rope_index(
            torch.from_numpy(ids),
            torch.from_numpy(types),
            torch.from_numpy(image_grids2),
            torch.from_numpy(video_grids2),
            attention_mask=torch.from_numpy(mask),
        )
    np.testing.assert_array_equal(ours[0], ref[0].numpy())
    np.testing.assert_array_equal(ours[1], ref[1].numpy())


# --- preprocessing and bad inputs -------------------------------------------------------------------------
def test_video_frames_follow_the_processor_layout(case, tmp_path):
    """Frames already on the patch grid are not resampled: pixel_values_videos is their normalised patches."""
    runner = case[2]
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (2, 32, 48, 3), dtype=np.uint8)
    paths = []
    for i, f in enumerate(frames):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(f).save(paths[-1])
    arrays = runner.preprocess("x", videos=[paths], chat=False)
    x = (frames.astype(np.float32) / 255 - 0.5) / 0.5  # [T, H, W, C]
    x = x.transpose(0, 3, 1, 2).reshape(1, 2, 3, 4, 2, 4, 6, 2, 4)  # t, tp, c, gh, mh, p, gw, mw, p
    expected = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(8 * 12, -1)
    assert arrays["video_grid_thw"].tolist() == [[1, 8, 12]]
    np.testing.assert_allclose(arrays["pixel_values_videos"], expected, atol=1e-6)


def test_chat_template_is_applied_when_the_checkpoint_has_one(case, images):
    runner = case[2]
    arrays = runner.preprocess("describe", images=[images["a"]])
    text = runner.processor.tokenizer.decode(arrays["input_ids"][0])
    assert text.startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")
    assert text.endswith("describe<|im_end|>\n<|im_start|>assistant\n")


def test_huge_image_is_resized_by_the_processor(case, tmp_path):
    runner = case[2]
    path = tmp_path / "huge.png"
    gradient = np.linspace(0, 255, 3000, dtype=np.float32)
    Image.fromarray(np.broadcast_to(gradient, (2000, 3000)).astype(np.uint8)).convert("RGB").save(path)
    arrays = runner.preprocess("hi", images=[path])
    (t, h, w), patch = arrays["image_grid_thw"][0], runner.vspec.patch_size
    assert t == 1 and MIN_PIXELS <= h * w * patch * patch <= MAX_PIXELS
    assert abs(w / h - 1.5) < 0.3  # aspect ratio kept as closely as the patch grid allows
    result = runner.generate(runner.build_inputs(arrays), 2)
    assert len(result.tokens) == 2


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_bad_images_get_clear_errors(tmp_path, images):
    with pytest.raises(QwenExportError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(QwenExportError, match="empty file"):
        load_image(_write(tmp_path / "empty.png", b""))
    with pytest.raises(QwenExportError, match="not a readable image"):
        load_image(_write(tmp_path / "text.png", b"this is not an image\n" * 10))
    truncated = images["a"].read_bytes()[:200]
    with pytest.raises(QwenExportError, match="not a readable image"):
        load_image(_write(tmp_path / "truncated.png", truncated))
    wide = tmp_path / "wide.png"
    Image.new("RGB", (100000, 1)).save(wide)
    with pytest.raises(QwenExportError, match="aspect ratio 100000:1"):
        load_image(wide)


def test_bad_videos_and_prompts_get_clear_errors(case, images, tmp_path):
    runner = case[2]
    with pytest.raises(QwenExportError, match="at least 2 frames"):
        runner.preprocess("x", videos=[[images["f0"]]])
    with pytest.raises(QwenExportError, match="differ in size"):
        runner.preprocess("x", videos=[[images["f0"], images["a"]]])
    with pytest.raises(QwenExportError, match="processor rejected"):
        runner.preprocess("<|image_pad|> <|image_pad|>", images=[images["a"]])  # two slots, one image
    with pytest.raises(QwenExportError, match="not a multimodal export"):
        text_only = export_model(tmp_path / "text", model_dir=case[0])
        MultimodalRunner(text_only.out_dir)


def test_processor_files_must_match_config(case, tmp_path):
    folder = case[0]
    config = json.loads((folder / "config.json").read_text())
    other = tmp_path / "ckpt"
    other.mkdir()
    for f in folder.iterdir():
        (other / f.name).symlink_to(f)
    (other / "config.json").unlink()
    (other / "config.json").write_text(json.dumps({**config, "image_token_id": 300}))
    out = export_model(tmp_path / "out", model_dir=other, multimodal=True)
    with pytest.raises(QwenExportError, match="image_token_id = 300"):
        MultimodalRunner(out.out_dir)
    with pytest.raises(QwenExportError, match="no preprocessor_config.json"):
        MultimodalRunner(out.out_dir, processor_dir=tmp_path)


def test_cli_run_with_an_image(case, images):
    from typer.testing import CliRunner

    from qwen_export.cli import app
    from qwen_export.runtime.multimodal import MultimodalPrompt
    from qwen_export.runtime.session import Session

    _, result, _, _ = case
    args = [
        "run",
        str(result.out_dir),
        "--prompt",
        "hi",
        "--image",
        str(images["a"]),
        "--max-new-tokens",
        "4",
    ]
    out = CliRunner().invoke(app, [*args, "--json", "--stop", "-1"])
    assert out.exit_code == 0, out.output
    payload = json.loads(out.output.strip().splitlines()[-1])
    expected = run_multimodal(result.out_dir, "hi", images=[images["a"]], max_new_tokens=4, stop_tokens=())
    assert payload["ids"] == expected.tokens
    bad = CliRunner().invoke(app, [*args[:4], "--image", str(images["a"]) + ".missing"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    session = Session.load(result.out_dir)  # a multimodal artifact's session takes prompts with media
    prompt = MultimodalPrompt("hi", images=[images["a"]])
    assert session.generate([prompt], 4, stop_tokens=()).tokens == [expected.tokens]
