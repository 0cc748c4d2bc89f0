"""`build` and the `qwen-export build` / `passes` commands: artifact contents, manifest, atomicity, errors."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import onnx_ir as ir
import pytest
from passes_support import EXPECTED_FUSED, TOL, golden, max_abs
from typer.testing import CliRunner

from qwen_export.build import build
from qwen_export.cli import app
from qwen_export.errors import QwenExportError
from qwen_export.passes.base import QwenPass, pass_name
from qwen_export.runtime.ort_decoder import OrtDecoder
from qwen_export.targets import get_target, pass_catalog, pipeline, registered

from checkpoints import make_local_checkpoint

pytestmark = pytest.mark.usefixtures("verify_every_pass")

runner = CliRunner()


@pytest.fixture(scope="module")
def onnx_build(tmp_path_factory):
    return build(tmp_path_factory.mktemp("b") / "out", preset="tiny-qwen3.5-moe", target="onnx", check=True)


def test_artifact_files_and_manifest(onnx_build):
    out = onnx_build.out_dir
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "model.onnx",
        "model.onnx.data",
        "mtp.onnx",  # the preset has an MTP layer: its draft graph
        "mtp.onnx.data",
        "passes.json",
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == onnx_build.manifest
    assert manifest["target"] == "onnx" and manifest["source"] == "preset:tiny-qwen3.5-moe"
    assert [p["name"] for p in manifest["passes"]] == [pass_name(p) for p in pipeline("onnx")]
    for name, info in manifest["files"].items():
        data = (out / name).read_bytes()
        assert info["bytes"] == len(data) and info["sha256"] == hashlib.sha256(data).hexdigest()
    top, nested = EXPECTED_FUSED["tiny-qwen3.5-moe"]
    assert manifest["fused_ops"] == {"top": dict(sorted(top.items())), "nested": dict(sorted(nested.items()))}
    assert (
        manifest["graph"]["qwen_ops"] == {"top": {}, "nested": {}}
        and "qwen" not in manifest["graph"]["opset"]
    )
    assert manifest["check"] == {
        "enabled": True,
        "tolerance": TOL,
        "passed": True,
        "first_failure": None,
        "golden": "preset:tiny-qwen3.5-moe",
    }
    assert {"onnx", "onnx_ir", "onnxscript", "onnxruntime", "torch", "transformers"} <= set(
        manifest["versions"]
    )
    assert set(manifest["timings_s"]) == {"export", "passes", "save", "total"}
    passes = json.loads((out / "passes.json").read_text())
    assert passes == json.loads(json.dumps(onnx_build.report.to_json()))
    assert [p["name"] for p in passes["passes"]] == [p["name"] for p in manifest["passes"]]


def test_built_model_matches_golden(onnx_build):
    g = golden("tiny-qwen3.5-moe")
    decoder = OrtDecoder(onnx_build.model_path)
    ids, ref = g.prefill(65)
    assert max_abs(decoder.prefill(ids).logits, ref) <= TOL
    tokens, _ = decoder.greedy(g.greedy_prompt, 8)
    assert (tokens == g.greedy_tokens[:, :8]).all()


def test_fused_target_keeps_qwen_functions(tmp_path):
    result = build(tmp_path / "out", preset="tiny-qwen3.5", target="fused")
    model = ir.load(result.model_path)
    assert {n.op_type for n in model.graph if n.domain == "qwen"} == {
        "RMSNorm",
        "GatedDeltaNet",
        "GatedAttention",
    }
    assert {f.name for f in model.functions.values()} == {
        "RMSNorm",
        "GatedRMSNorm",
        "GatedDeltaNet",
        "GatedAttention",
    }
    assert result.check_passed is None and result.manifest["check"]["enabled"] is False


def test_local_checkpoint_without_golden_checks_stage_to_stage(tmp_path):
    folder = make_local_checkpoint("Qwen3_5MoeForConditionalGeneration", tmp_path / "ckpt")
    logs: list[str] = []
    result = build(tmp_path / "out", model_dir=folder, target="fused", check=True, log=logs.append)
    assert result.check_passed is True and result.manifest["check"]["golden"] is None
    assert any("no golden reference" in line for line in logs)
    assert result.manifest["fused_ops"]["top"] == dict(sorted(EXPECTED_FUSED["tiny-qwen3.5-moe"][0].items()))
    assert all(r.numerics.max_vs_golden is None for r in result.report.records)


class Boom(QwenPass):
    """Fail (for the atomicity test)."""

    name = "plant-boom"

    def call(self, model):
        raise RuntimeError("boom")


def test_failed_build_keeps_previous_artifact(tmp_path):
    out = tmp_path / "out"
    build(out, preset="tiny-qwen3.5", target="fused")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    boom = dataclasses.replace(get_target("fused"), name="fused-boom", pipeline=lambda options: [Boom()])
    with registered(boom), pytest.raises(RuntimeError, match="boom"):
        build(out, preset="tiny-qwen3.5", target="fused-boom")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_bad_input_fails_before_work(tmp_path):
    with pytest.raises(QwenExportError, match="unknown target"):
        build(tmp_path / "out", preset="tiny-qwen3.5", target="tensorrt")
    with pytest.raises(QwenExportError, match="exactly one of"):
        build(tmp_path / "out", target="onnx")
    assert not (tmp_path / "out").exists()


# --- command line --------------------------------------------------------------------------------


def test_cli_build_prints_a_table_per_pass(tmp_path):
    result = runner.invoke(
        app, ["build", "--preset", "tiny-qwen3.5", "-t", "onnx", "-o", str(tmp_path / "o"), "--check"]
    )
    assert result.exit_code == 0, result.output
    for p in pipeline("onnx"):
        assert pass_name(p) in result.output
    assert "GatedDeltaNet×3" in result.output and "check passed" in result.output
    assert (tmp_path / "o" / "manifest.json").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "tiny-qwen3.5", "-t", "tensorrt"], "unknown target 'tensorrt'"),
        (["--preset", "no-such-preset"], "unknown preset 'no-such-preset'"),
        ([], "exactly one of --preset NAME or --model DIR"),
    ],
)
def test_cli_build_bad_input_exits_2(tmp_path, args, message):
    out = tmp_path / "o"
    result = runner.invoke(app, ["build", *args, "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not out.exists()


class PlantWrongScale(QwenPass):
    """Halve the attention score scale (for the CLI check-failure test)."""

    name = "plant-wrong-scale"

    def call(self, model):
        node = next(n for n in model.graph if n.op_type == "GatedAttention")
        node.attributes["scale"] = ir.AttrFloat32("scale", node.attributes["scale"].value / 2)
        return ir.passes.PassResult(model, True)


def test_cli_check_failure_names_the_pass_and_exits_1(tmp_path):
    fused = get_target("fused")
    planted = dataclasses.replace(
        fused, name="fused-planted", pipeline=lambda options: [*fused.passes(options), PlantWrongScale()]
    )
    with registered(planted):
        result = runner.invoke(
            app,
            ["build", "--preset", "tiny-qwen3.5", "-t", planted.name, "-o", str(tmp_path / "o"), "--check"],
        )
    assert result.exit_code == 1, result.output
    assert "first stage out of tolerance: plant-wrong-scale" in " ".join(result.output.split())
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["check"]["passed"] is False and manifest["check"]["first_failure"] == "plant-wrong-scale"


def test_cli_passes_lists_every_pass_with_its_summary():
    result = runner.invoke(app, ["passes", "--json"])
    assert result.exit_code == 0, result.output
    listed = {p["name"]: p for p in json.loads(result.output)}
    assert set(listed) == {pass_name(c) for c in pass_catalog()}
    assert listed["fuse-moe"]["summary"].startswith("Fuse each sparse MoE block")
    assert {"onnx", "fused"} <= set(listed["fuse-moe"]["targets"])
    assert listed["infer-shapes"]["targets"] == []  # in the catalog for library pipelines, in no target
    table = runner.invoke(app, ["passes"])
    assert table.exit_code == 0 and "fuse-gated-deltanet" in table.output
