"""`qwen-export build --target trt-rtx` through the CLI (TensorRT-RTX builds ahead of time on the CPU)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qwen_export.cli import app

pytest.importorskip("tensorrt_rtx_bindings", reason="needs the trt-rtx extra (pip install -e '.[trt-rtx]')")
runner = CliRunner()
BUILD = ["build", "--preset", "tiny-qwen3.5-moe", "--target", "trt-rtx", "--gpu", "sm80,sm89,sm120"]


def test_cli_builds_engines_then_reuses_everything(tmp_path):
    out = tmp_path / "engines"
    first = runner.invoke(app, [*BUILD, "--precision", "fp16", "-o", str(out)])
    assert first.exit_code == 0, first.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "qwen-export/build@1" and manifest["target"] == "trt-rtx"
    assert sorted(manifest["engines"]) == ["sm120", "sm80", "sm89"]
    for sm, engine in manifest["engines"].items():
        assert (out / engine["path"]).stat().st_size == engine["bytes"] > 0, sm
    second = runner.invoke(app, [*BUILD, "--precision", "fp16", "-o", str(out)])
    assert second.exit_code == 0, second.output
    again = json.loads((out / "manifest.json").read_text())
    assert all(e["from_cache"] for e in again["engines"].values())  # an unchanged rebuild rebuilds nothing
    assert {sm: e["sha256"] for sm, e in again["engines"].items()} == {
        sm: e["sha256"] for sm, e in manifest["engines"].items()
    }
    # The runtime reads the artifact and says why it cannot run it here, before any compute.
    from qwen_export.errors import QwenExportError
    from qwen_export.runtime.session import Session

    with pytest.raises(QwenExportError, match="no NVIDIA GPU"):
        Session.load(out)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--gpu", "sm90"], "TensorRT-RTX cannot build for sm90"),
        (["--gpu", "sm89", "--precision", "fp32"], "no fp32 attention kernel"),
        (["--gpu", "gtx9000"], "unknown GPU 'gtx9000'"),
        (
            ["--gpu", "sm89", "--max-prompt", "4096", "--max-context", "1024"],
            "max_prompt 4096 is above max_context",
        ),
        (["--gpu", "sm89", "--max-batch", "0"], "batch"),
    ],
)
def test_bad_engine_requests_fail_before_any_work(tmp_path, flags, message):
    out = tmp_path / "engines"
    result = runner.invoke(
        app, ["build", "--preset", "tiny-qwen3.5-moe", "--target", "trt-rtx", *flags, "-o", str(out)]
    )
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not out.exists()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "engines"
    result = runner.invoke(app, [*BUILD, "--dry-run", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "build plan" in result.output and "sm120" in result.output
    assert not out.exists()
