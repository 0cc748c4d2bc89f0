"""The target registry is the one source of truth: a target added through it alone reaches `build --help`,
`qwen-export passes`, `qwen-export targets`, option checks, the runtime and the build itself."""

from __future__ import annotations

import json

import onnx_ir as ir
import pytest
from typer.testing import CliRunner

from qwen_export.build import BuildRequest, build_artifact
from qwen_export.cli import app
from qwen_export.errors import QwenExportError
from qwen_export.passes.base import PassStats, QwenPass
from qwen_export.passes.pipeline import cleanup, finish, fusions
from qwen_export.runtime.session import Artifact, Session
from qwen_export.targets import TARGETS, Target, get_target, names, registered
from qwen_export.tolerances import artifact_precision

runner = CliRunner()


class MarkThrowaway(QwenPass):
    """Record in the model's metadata that the throwaway target built it (for the registry test)."""

    name = "mark-throwaway"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        model.metadata_props["qwen_export.throwaway"] = "1"
        self.stats = PassStats(fired={"metadata": 1})
        return ir.passes.PassResult(model, True)


def _throwaway_pipeline(options) -> list[QwenPass]:
    from qwen_export.passes.lower_portable import LowerPortable

    return [*cleanup(), *fusions(), LowerPortable(), *finish(), MarkThrowaway()]


THROWAWAY = Target(
    "throwaway-onnx",
    "a target that exists only in this test: the portable graph, marked in its metadata",
    "onnx",
    _throwaway_pipeline,
    "onnxruntime",
)


def test_a_target_added_through_the_registry_alone_reaches_every_surface(tmp_path):
    with registered(THROWAWAY):
        help_text = " ".join(runner.invoke(app, ["build", "--help"]).output.replace("│", " ").split())
        assert "throwaway-onnx: a target that exists only in this test" in help_text

        listed = {p["name"]: p for p in json.loads(runner.invoke(app, ["passes", "--json"]).output)}
        assert listed["mark-throwaway"]["targets"] == ["throwaway-onnx"]
        assert "throwaway-onnx" in listed["fuse-moe"]["targets"]
        targets = json.loads(runner.invoke(app, ["targets", "--json"]).output)
        assert {"name": "throwaway-onnx", "kind": "onnx", "precision": "fp32"}.items() <= next(
            t for t in targets if t["name"] == "throwaway-onnx"
        ).items()

        out = tmp_path / "out"
        result = runner.invoke(
            app, ["build", "-p", "tiny-qwen3.5", "-t", "throwaway-onnx", "-o", str(out), "--check"]
        )
        assert result.exit_code == 0, result.output
        assert "mark-throwaway" in result.output and "check passed" in result.output
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["target"] == "throwaway-onnx" and manifest["passes"][-1]["name"] == "mark-throwaway"
        assert ir.load(out / "model.onnx").metadata_props["qwen_export.throwaway"] == "1"
        assert artifact_precision(manifest) == "fp32"
        # The runtime takes it as an ONNX Runtime artifact from its registry entry.
        assert Artifact.open(out).target == "throwaway-onnx"
        assert len(Session.load(out).generate([[1, 2, 3]], 2).tokens[0]) == 2
    assert "throwaway-onnx" not in TARGETS
    assert "throwaway-onnx" not in runner.invoke(app, ["passes", "--json"]).output


def test_options_a_target_does_not_take_are_refused_before_any_work(tmp_path):
    with pytest.raises(QwenExportError, match="--gpu is not an option of target onnx .*trt-rtx, trt"):
        build_artifact(BuildRequest(tmp_path / "o", "onnx", preset="tiny-qwen3.5", gpu="sm89"))
    with pytest.raises(QwenExportError, match="--check is not an option of target trt-rtx"):
        build_artifact(BuildRequest(tmp_path / "o", "trt-rtx", preset="tiny-qwen3.5", gpu="sm89", check=True))
    result = runner.invoke(
        app, ["build", "-p", "tiny-qwen3.5", "--max-batch", "4", "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "--max-batch is not an option of target onnx" in result.output
    assert not (tmp_path / "o").exists()


def test_registry_declares_each_target_once_with_a_pipeline_of_qwen_passes():
    with pytest.raises(ValueError, match="registered twice"):
        with registered(get_target("onnx")):
            pass
    assert "onnx" in TARGETS  # a failed registration leaves the original in place
    for target in TARGETS.values():
        passes = target.passes()
        assert passes and all(isinstance(p, QwenPass) for p in passes), target.name
        assert (target.kind == "engine") == (target.engine is not None) == (target.options >= {"gpu"})
    assert names("engine") == ("trt-rtx", "trt")
    assert get_target("ort-cpu-int4").cpu_kernels and get_target("ort-int8").precision == "int8"


def test_passes_lists_the_engine_pipelines_passes_too():
    listed = {p["name"]: p for p in json.loads(runner.invoke(app, ["passes", "--json"]).output)}
    assert listed["lower-trt-rtx"]["targets"] == ["trt-rtx"]
    assert listed["precision"]["targets"] == ["trt-rtx", "trt"]
    assert listed["lower-trt-plugins"]["targets"] == ["trt-plugins", "trt"]


def test_the_cli_is_a_thin_layer():
    from pathlib import Path

    import qwen_export.cli

    source = Path(qwen_export.cli.__file__).read_text()
    assert len(source.splitlines()) <= 400
    # Tables are drawn by the result types' renderers, and targets are only named in the registry.
    assert "Table(" not in source and "trt-rtx" not in source and '"ort"' not in source
