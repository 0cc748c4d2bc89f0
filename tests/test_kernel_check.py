"""`qwen-export kernels check` on every preset and on local checkpoints of every supported class: each op's
Triton kernels under the interpreter on the model's own layers, against the transformers modules."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qwen_export.cli import app
from qwen_export.kernel_check import check_kernels

from checkpoints import LOCAL_CLASSES, make_local_checkpoint

runner = CliRunner()
PRESETS = ("tiny-qwen3.5-moe", "tiny-qwen3-next", "tiny-qwen3.5")
# Which ops a model has: dense Qwen3.5 has no MoE block.
OPS = {"common", "rms_norm", "gated_rms_norm", "gated_attention", "gated_deltanet", "moe"}  # common: the GEMM


def _ops(rows: list[dict]) -> set[str]:
    return {r["kernel"].split(".")[0] for r in rows}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_kernel_passes_on_the_preset(preset):
    result = runner.invoke(app, ["kernels", "check", "--preset", preset, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] and not report["missing"]
    assert all(r["passed"] and r["guards_ok"] for r in report["kernels"])
    assert _ops(report["kernels"]) == (OPS - {"moe"} if preset == "tiny-qwen3.5" else OPS)
    for dtype in ("fp16", "bf16"):  # every precision is checked, not only fp32
        assert any(dtype in r["case"] for r in report["kernels"]), dtype


@pytest.mark.parametrize("architecture", sorted(LOCAL_CLASSES))
def test_every_kernel_passes_on_local_checkpoints(tmp_path, architecture):
    folder = make_local_checkpoint(architecture, tmp_path / architecture)
    report = check_kernels(model_dir=folder, dtypes=("bfloat16",))
    assert report.passed, [r.to_json() for r in report.rows if not r.passed]
    assert {"rms_norm", "gated_attention", "gated_deltanet"} <= _ops([r.to_json() for r in report.rows])


def test_a_wrong_kernel_fails_the_check_and_exits_1(monkeypatch):
    from qwen_export.plugins.rms_norm import kernels

    real = kernels.rms_norm

    def off_by_a_little(*args, **kwargs):
        out = real(*args, **kwargs)
        target = kwargs["out"]
        target.add_(1e-2)
        return out

    monkeypatch.setattr(kernels, "rms_norm", off_by_a_little)
    result = runner.invoke(app, ["kernels", "check", "--preset", "tiny-qwen3.5", "--dtype", "float32"])
    assert result.exit_code == 1
    assert "FAIL" in result.output and "rms_norm" in result.output
