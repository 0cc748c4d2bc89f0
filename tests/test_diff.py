"""`qwen-export diff`: metrics against the reference, and planted faults located to their layer."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from qwen_export.build import build
from qwen_export.cli import app
from qwen_export.diff import diff_artifact
from qwen_export.golden.store import repo_golden_dir
from qwen_export.passes.base import QwenPass, pass_name
from qwen_export.targets import pipeline
from qwen_export.tolerances import FP32_MAX_ABS

runner = CliRunner()


@pytest.fixture(scope="module")
def artifact(tiny_moe_export):
    return tiny_moe_export


def planted(artifact, tmp_path, edit) -> str:
    """A copy of the artifact whose graph `edit(model)` has changed (weights loaded and re-saved)."""
    folder = tmp_path / "faulty"
    folder.mkdir()
    shutil.copy(artifact / "export.json", folder / "export.json")
    model = onnx.load(str(artifact / "model.onnx"))
    edit(model)
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return str(folder)


def wrong_epsilon(layer: int):
    def edit(model):
        node = next(
            n for n in model.graph.node if n.name == f"/layers.{layer}/post_attention_layernorm/Add_0"
        )
        model.graph.initializer.append(numpy_helper.from_array(np.array(0.5, np.float32), "planted_eps"))
        node.input[1] = "planted_eps"

    return edit


def swapped_experts(layer: int, a: int = 0, b: int = 1):
    def edit(model):
        for init in model.graph.initializer:
            if init.name.startswith(f"layers.{layer}.mlp.experts."):
                w = numpy_helper.to_array(init).copy()
                w[[a, b]] = w[[b, a]]
                init.CopyFrom(numpy_helper.from_array(w, init.name))

    return edit


def test_clean_artifact_passes_with_all_metrics(artifact):
    report = diff_artifact(artifact, repo_golden_dir("tiny-qwen3.5-moe"), per_layer=True)
    assert report.passed and report.first_bad_layer is None
    m = report.prefill["prefill_200"]
    assert m["max_abs"] < FP32_MAX_ABS and m["top1_agreement"] == 1.0 and m["top5_agreement"] == 1.0
    assert m["cosine_min"] > 0.999999 and m["kl_mean"] < 1e-9
    assert report.greedy_agreement == report.greedy_tokens == 32
    assert [layer["ok"] for layer in report.layers] == [True] * 4
    assert report.tolerances["logits_max_abs"] == FP32_MAX_ABS and report.precision == "fp32"


@pytest.mark.parametrize("layer", [1, 2])
def test_wrong_epsilon_is_located(artifact, tmp_path, layer):
    report = diff_artifact(planted(artifact, tmp_path, wrong_epsilon(layer)), per_layer=True)
    assert not report.passed
    assert report.first_bad_layer == layer
    assert all(entry["ok"] for entry in report.layers[:layer])


def test_swapped_experts_are_located(artifact, tmp_path):
    report = diff_artifact(planted(artifact, tmp_path, swapped_experts(2)), per_layer=True)
    assert report.first_bad_layer == 2
    assert not report.passed


def test_cli_writes_report_and_polygraphy_outputs(artifact, tmp_path):
    report_path, outputs_path = tmp_path / "report.json", tmp_path / "outputs.json"
    result = runner.invoke(
        app,
        [
            "diff",
            str(artifact),
            "--against",
            str(repo_golden_dir("tiny-qwen3.5-moe")),
            "--report",
            str(report_path),
            "--save-outputs",
            str(outputs_path),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["passed"] and set(report["prefill"]) == {f"prefill_{n}" for n in (1, 7, 63, 64, 65, 200)}
    from polygraphy.comparator import RunResults

    loaded = RunResults.load(str(outputs_path))
    assert loaded[0][0] == "qwen-export-onnxruntime"
    assert np.asarray(loaded[0][1][0]["logits"]).shape == (1, 1, 512)


def test_cli_exit_code_on_fault(artifact, tmp_path):
    faulty = planted(artifact, tmp_path, wrong_epsilon(1))
    result = runner.invoke(app, ["diff", faulty, "--per-layer"])
    assert result.exit_code == 1
    assert "first layer out of tolerance: 1" in result.output


def test_cli_names_a_missing_against_folder(artifact, tmp_path):
    missing = tmp_path / "no-such-golden"
    result = runner.invoke(app, ["diff", str(artifact), "--against", str(missing)])
    assert result.exit_code == 2
    assert f"--against {missing}: no such folder" in result.output


class PlantLayerEpsilon(QwenPass):
    """A buggy rewrite: layer 2's post-attention RMSNorm gets epsilon 0.5."""

    name = "plant-layer-epsilon"

    def call(self, model):
        node = next(n for n in model.graph if n.op_type == "RMSNorm" and "/layers.2/post_attention" in n.name)
        node.attributes["epsilon"] = ir.AttrFloat32("epsilon", 0.5)
        return ir.passes.PassResult(model, True)


class PlantLayerExpertSwap(QwenPass):
    """A buggy rewrite: layer 1's MoE sees experts 0 and 1 in swapped order."""

    name = "plant-expert-swap"

    def call(self, model):
        node = next(n for n in model.graph if n.op_type == "MoE" and n.name.startswith("/layers.1/"))
        for index in (2, 3):  # gate_up and down
            w = node.inputs[index].const_value.numpy().copy()
            w[[0, 1]] = w[[1, 0]]
            name = f"planted.{index}"
            value = ir.Value(
                name=name,
                shape=ir.Shape(w.shape),
                type=ir.TensorType(ir.DataType.FLOAT),
                const_value=ir.tensor(w, name=name),
            )
            model.graph.register_initializer(value)
            node.replace_input_with(index, value)
        return ir.passes.PassResult(model, True)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build(tmp_path_factory.mktemp("b") / "tiny-onnx", preset="tiny-qwen3.5-moe", target="onnx").out_dir


@pytest.mark.parametrize(
    "plant, after", [(PlantLayerEpsilon, "fuse-rms-norm"), (PlantLayerExpertSwap, "fuse-moe")]
)
def test_per_pass_names_the_pass_that_broke_it(built, plant, after):
    passes = pipeline("onnx")
    passes.insert([pass_name(p) for p in passes].index(after) + 1, plant())
    report = diff_artifact(built, repo_golden_dir("tiny-qwen3.5-moe"), per_pass=True, passes=passes)
    assert report.first_bad_pass == plant.name
    stages = [s["stage"] for s in report.passes]
    assert all(s["ok"] for s in report.passes[: stages.index(plant.name)])


def test_per_pass_on_a_clean_build(built):
    report = diff_artifact(built, per_pass=True)  # reference generated live from the source checkpoint
    assert report.first_bad_pass is None and report.passes and all(s["ok"] for s in report.passes)
    assert report.passed
