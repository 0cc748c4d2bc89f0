"""`build --multimodal`: the vision tower and token embedding through each target's passes, beside the text
tower, on the local multimodal checkpoints of both classes (conftest.py's `multimodal_export`).

Tiers: structural (which vision fusions fired, the manifest), numeric (the build's own --check against
transformers, ONNX Runtime with optimizations off; the built artifact's greedy tokens against transformers'
`generate`), engine (TensorRT-RTX builds on this CPU for sm80/89/120; the vision engine's bf16/fp16 graph
emulated in fp32 on the CPU against transformers' vision tower).
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
import torch
from typer.testing import CliRunner

from qwen_export.build import BuildRequest, build_artifact
from qwen_export.cli import app
from qwen_export.engines.spec import DeploySpec, DeploySpecError
from qwen_export.engines.toolchain import TensorRTRtx
from qwen_export.engines.vision import VisionLimits
from qwen_export.errors import QwenExportError
from qwen_export.golden.reference import load_reference
from qwen_export.multimodal_build import VisionCheck, reference_vision_features
from qwen_export.passes.base import QwenPass
from qwen_export.passes.manager import PassManager
from qwen_export.runtime.emulation import emulate_in_fp32
from qwen_export.runtime.multimodal import MultimodalRunner
from qwen_export.targets import PipelineOptions, Target, VisionPipelines, get_target, registered
from qwen_export.tolerances import tolerance_for

RTX_READY, RTX_WHY = TensorRTRtx().available()
GPUS = "sm80,sm89,sm120"
LIMITS = ["--max-batch", "2", "--max-prompt", "256", "--max-context", "1024"]
MEDIA = ["--max-image-pixels", "4096", "--max-video-frames", "4"]


def vision_spec(result):
    from qwen_export.exporter.vision_spec import VisionSpec

    info = result.info["multimodal"]["vision_spec"]
    return VisionSpec(**{**info, "mrope_section": tuple(info["mrope_section"])})


@pytest.fixture(scope="module")
def ort_build(multimodal_export, tmp_path_factory):
    """`build --multimodal --target ort --check` through the CLI: (checkpoint, out folder, CLI result)."""
    folder, _ = multimodal_export
    out = tmp_path_factory.mktemp("mm-build") / "ort"
    args = ["build", "--model", str(folder), "--target", "ort", "--multimodal", "--check", "--out", str(out)]
    return folder, out, CliRunner().invoke(app, args)


# --- ONNX Runtime targets ---------------------------------------------------------------------------------
def test_ort_build_check_passes_with_vision_fusions(ort_build):
    _, out, result = ort_build
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["check"]["passed"] is True and manifest["check"]["golden"] == "transformers (live)"
    mm = manifest["multimodal"]
    assert mm["graphs"] == {"text": "model.onnx", "vision": "vision.onnx", "embed": "embed.onnx"}
    # depth-1 vision tower: one attention block, its tanh-GELU MLP, the merger's exact GELU
    assert mm["fused_ops"]["vision"] == {"Attention": 1, "FastGelu": 1, "BiasGelu": 1}
    assert manifest["fused_ops"]["top"]["GatedAttention"] == 1  # the text tower fused as in a text build
    vision_check = mm["check"]["vision"]
    assert vision_check["checked"] and vision_check["first_failure"] is None
    last = vision_check["passes"][-1]["numerics"]
    assert set(last["cases"]) == {"image", "video", "two_images"}
    assert last["max_vs_golden"] <= tolerance_for("fp32")["logits_max_abs"]
    for name in ("vision.onnx", "vision.onnx.data", "embed.onnx", "embed.onnx.data"):
        assert name in manifest["files"]


def test_built_artifact_generates_transformers_tokens(ort_build, multimodal_images):
    folder, out, _ = ort_build
    runner = MultimodalRunner(out, optimize=False)
    arrays = runner.preprocess("describe", images=[multimodal_images["a"]])
    result = runner.generate(runner.build_inputs(arrays), 16)
    with torch.no_grad():
        kw = {k: torch.from_numpy(v) for k, v in arrays.items()}
        ref = load_reference(folder).generate(
            **kw, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None
        )
    assert result.tokens == ref[0, arrays["input_ids"].shape[1] :].tolist()


class _ScaleVisionWeight(QwenPass):
    """A planted fault: scales the first vision-block MLP weight by 1.5."""

    name = "planted-fault"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        value = next(v for n, v in model.graph.initializers.items() if "linear_fc1" in n)
        value.const_value = ir.tensor(value.const_value.numpy() * 1.5)
        return ir.passes.PassResult(model, True)


def test_check_names_a_faulty_vision_stage(multimodal_export, tmp_path):
    folder, _ = multimodal_export

    def faulty_vision(options: PipelineOptions) -> VisionPipelines:
        normal = get_target("ort").vision_passes(options)
        return VisionPipelines([*normal.vision, _ScaleVisionWeight()], normal.embed)

    base = get_target("ort")
    target = Target("ort-faulty-vision", "test", "ort", base.pipeline, "onnxruntime", vision=faulty_vision)
    with registered(target):
        request = BuildRequest(
            tmp_path / "out", target=target.name, model_dir=folder, check=True, multimodal=True
        )
        result = build_artifact(request)
    assert result.check_passed is False
    assert result.report.first_failure == "vision.onnx planted-fault"


def test_multimodal_build_refusals(multimodal_export, tmp_path):
    folder, _ = multimodal_export
    runner = CliRunner()
    base = ["build", "--model", str(folder), "--out", str(tmp_path / "x")]
    cases = {
        "does not build the vision tower": [*base, "--target", "fused", "--multimodal"],
        "add --multimodal": [*base, "--target", "trt-rtx", "--gpu", "sm89", *MEDIA],
        "does not shard": [*base, "--target", "ort", "--multimodal", "--tp", "2"],
    }
    for message, args in cases.items():
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, args
        assert not (tmp_path / "x").exists()


# --- media limits -------------------------------------------------------------------------------------------
def test_vision_engine_limits_refuse_media_before_compute(multimodal_export):
    vspec = vision_spec(multimodal_export[1]).to_json()
    limits = VisionLimits.from_spec(
        DeploySpec.create("sm89", max_image_pixels=4096, max_video_frames=4), vspec
    )
    assert limits.max_patches == 256 * 2  # 4096 px / 4x4 patches, two temporal patches of 2 frames
    limits.check(np.array([[1, 16, 16]]), np.array([[2, 16, 16]]))  # exactly at the limits
    with pytest.raises(QwenExportError, match="image 2: 64x68 = 4352 pixels .* max_image_pixels 4096"):
        limits.check(np.array([[1, 8, 8], [1, 17, 16]]), None)
    with pytest.raises(QwenExportError, match="video 1: 6 frames exceeds .* max_video_frames 4"):
        limits.check(None, np.array([[3, 4, 4]]))
    with pytest.raises(
        DeploySpecError, match="max_video_frames 1 is below the vision tower's temporal patch"
    ):
        VisionLimits.from_spec(DeploySpec.create("sm89", max_video_frames=1), vspec)
    with pytest.raises(DeploySpecError, match="max_image_pixels must be a positive integer"):
        DeploySpec.create("sm89", max_image_pixels=0)


# --- engines ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_vision_engine_precision_emulated_against_transformers(multimodal_export, precision):
    """The graph the vision engine is built from, each low-precision tensor rounded through its dtype and
    computed on in fp32 (ort-cpu-emulated), against transformers' fp32 vision tower: relative L2 error of the
    features within the precision's per-layer tolerance (measured: bf16 0.008, fp16 0.001)."""
    folder, result = multimodal_export
    vspec = vision_spec(result)
    passes = get_target("trt-rtx").vision_passes(PipelineOptions(precision=precision)).vision
    model, _ = PassManager(passes).run(ir.load(result.out_dir / "vision.onnx"))
    assert {v.name: v.dtype for v in model.graph.outputs} == {"vision_embeds": ir.DataType.FLOAT}
    reference = reference_vision_features(load_reference(folder), vspec)
    outputs = VisionCheck(vspec, reference).run(emulate_in_fp32(model))
    bound = tolerance_for(precision)["layer_rel"]
    for case, out in outputs.items():
        rel = np.linalg.norm(out.logits - reference[case]) / np.linalg.norm(reference[case])
        assert rel <= bound, f"{case}: {precision} on ort-cpu-emulated, relative error {rel:.2e} > {bound}"


@pytest.mark.skipif(
    not RTX_READY, reason=f"needs TensorRT-RTX (pip tensorrt-rtx, runs on this CPU): {RTX_WHY}"
)
def test_trt_rtx_builds_text_vision_and_embed_engines(multimodal_export, tmp_path, monkeypatch):
    monkeypatch.setenv("QWEN_EXPORT_CACHE", str(tmp_path / "cache"))  # a real build, not a cache hit
    folder, _ = multimodal_export
    out = tmp_path / "engines"
    args = ["build", "--model", str(folder), "--target", "trt-rtx", "--multimodal", "--gpu", GPUS]
    result = CliRunner().invoke(app, [*args, *LIMITS, *MEDIA, "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    mm = manifest["multimodal"]
    assert mm["limits"] == {"max_image_pixels": 4096, "max_video_frames": 4, "max_patches": 512}
    for tower in ("text", "vision", "embed"):
        assert sorted(mm["engines"][tower]) == ["sm120", "sm80", "sm89"]
        for path in mm["engines"][tower].values():
            assert (out / path).stat().st_size > 0
    vision = json.loads((out / "vision" / "manifest.json").read_text())
    (profile,) = vision["deploy"]["profiles"]
    assert profile["shapes"]["pixel_values"] == [[4, 96], [256, 96], [512, 96]]
    assert vision["graph"]["ops"]["Attention"] == 1 and vision["precision"]["precision"] == "bf16"
    text = json.loads((out / "manifest.json").read_text())
    assert "input_ids" not in text["deploy"]["profiles"][0]["shapes"]
    assert text["deploy"]["profiles"][0]["shapes"]["position_ids"][2] == [3, 2, 256]


def test_text_quality_runs_on_a_multimodal_build(ort_build, tmp_path):
    """diff --text: windows of real text through embed.onnx and the text tower, against transformers."""
    from qwen_export.quality import text_quality

    _, out, _ = ort_build
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog, and then it sleeps. " * 30)
    quality = text_quality(out, text, windows=2)
    assert quality.passed and quality.top1_agreement == 1.0, quality.to_json()
