"""Engines from the checkpoints people download: bf16 and FP8 checkpoints through `build --target trt-rtx`
(TensorRT-RTX builds ahead of time on this CPU; running the engines needs a GPU)."""

from __future__ import annotations

import json

import onnx_ir as ir
import pytest
import torch
from typer.testing import CliRunner

from qwen_export.cli import app
from qwen_export.fp8_checkpoint import quantize_checkpoint
from qwen_export.golden.reference import load_reference
from qwen_export.presets import materialize

pytest.importorskip("tensorrt_rtx_bindings", reason="needs the trt-rtx extra (pip install -e '.[trt-rtx]')")
runner = CliRunner()
LIMITS = ["--max-batch", "1", "--max-prompt", "64", "--max-context", "128"]


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    return quantize_checkpoint(materialize("tiny-qwen3.5-moe"), tmp_path_factory.mktemp("fp8") / "ckpt")


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bf16") / "ckpt"
    load_reference(materialize("tiny-qwen3.5-moe")).to(torch.bfloat16).save_pretrained(folder)
    return folder


def build(model, out, *flags):
    return runner.invoke(app, ["build", "-m", str(model), "-t", "trt-rtx", *LIMITS, *flags, "-o", str(out)])


def prepared_graph(folder, gpus: str, weights: str) -> ir.Model:
    """The graph the engines were built from: the cached export through the target's passes."""
    from qwen_export.engines.graph import engine_passes, run_passes
    from qwen_export.engines.progress import Stages
    from qwen_export.engines.spec import DeploySpec
    from qwen_export.exporter.export import cached_export

    spec = DeploySpec.create(gpus, max_batch=1, max_prompt=64, max_context=128, weights=weights)
    export = ir.load(cached_export(model_dir=folder) / "model.onnx")
    model, _ = run_passes(export, engine_passes(spec), Stages(None))
    return model


def test_fp8_checkpoint_builds_fp8_engines_for_sm89_and_sm120(tmp_path, fp8_checkpoint):
    out = tmp_path / "engines"
    result = build(fp8_checkpoint, out, "--gpu", "sm89,sm120")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["engines"]) == ["sm120", "sm89"]
    assert manifest["deploy"]["weights"] == "fp8"
    passes = {p["name"]: p for p in manifest["passes"]}
    assert list(passes) == ["widen-to-fp32", "lower-trt-rtx", "precision", "fp8-weights"]
    # Attention, DeltaNet and shared-expert projections: 4 + 3 x 3 + 4 x 3 MatMuls read e4m3 weights.
    assert passes["fp8-weights"]["stats"]["fired"] == {"DequantizeLinear": 25}
    graph = prepared_graph(fp8_checkpoint, "sm89,sm120", "fp8")
    fp8 = [v for v in graph.graph.initializers.values() if v.dtype == ir.DataType.FLOAT8E4M3FN]
    dequantize = [n for n in graph.graph if n.op_type == "DequantizeLinear"]
    assert len(fp8) == len(dequantize) == 25
    assert all(n.attributes.get_int("output_dtype") == int(ir.DataType.BFLOAT16) for n in dequantize)
    assert all(all(u.node.op_type == "MatMul" for u in n.outputs[0].uses()) for n in dequantize)


def test_fp8_checkpoint_dequantized_builds_without_fp8(tmp_path, fp8_checkpoint):
    out = tmp_path / "engines"
    result = build(fp8_checkpoint, out, "--gpu", "sm80", "--weights", "dequant")
    assert result.exit_code == 0, result.output
    graph = prepared_graph(fp8_checkpoint, "sm80", "dequant")
    assert not any(v.dtype == ir.DataType.FLOAT8E4M3FN for v in graph.graph.initializers.values())
    assert not any(n.op_type == "DequantizeLinear" for n in graph.graph)


def test_bf16_checkpoint_builds_engines(tmp_path, bf16_checkpoint):
    out = tmp_path / "engines"
    result = build(bf16_checkpoint, out, "--gpu", "sm89")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["passes"][0]["name"] == "widen-to-fp32" and manifest["deploy"]["weights"] == "dequant"


@pytest.mark.parametrize(
    ("checkpoint", "flags", "message"),
    [
        ("fp8", ["--gpu", "sm80,sm89"], "sm80: FP8 weights need sm89 or newer"),
        ("fp8", ["--gpu", "a10"], "a10 (sm86): FP8 weights need sm89 or newer"),
        ("bf16", ["--gpu", "sm89", "--weights", "fp8"], "--weights fp8 needs an FP8 checkpoint"),
        ("fp8", ["--gpu", "sm89", "--weights", "int4"], "unknown weights 'int4'"),
    ],
)
def test_fp8_requests_a_target_cannot_run_are_refused(
    tmp_path, fp8_checkpoint, bf16_checkpoint, checkpoint, flags, message
):
    out = tmp_path / "engines"
    result = build(fp8_checkpoint if checkpoint == "fp8" else bf16_checkpoint, out, *flags)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not out.exists()


def test_fp8_weights_are_refused_for_the_plugin_target(tmp_path, fp8_checkpoint):
    out = tmp_path / "engines"
    flags = ["-t", "trt", "--gpu", "sm90", "--weights", "fp8", "-o", str(out)]
    result = runner.invoke(app, ["build", "-m", str(fp8_checkpoint), *flags])
    assert result.exit_code == 2, result.output
    assert "--weights fp8 builds with the trt-rtx target" in " ".join(result.output.split())
