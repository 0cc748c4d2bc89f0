"""`qwen-export profile`: per-layer and per-op-type latency that accounts for the measured step time."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qwen_export.cli import app
from qwen_export.profile import profile_artifact


@pytest.fixture(scope="module")
def artifact(tiny_moe_export):
    return tiny_moe_export


def test_per_layer_times_add_up_to_the_step(artifact):
    report = profile_artifact(artifact, prompt_tokens=65, decode_steps=12, repeats=4)
    for name, phase in report.phases.items():
        layers = [k for k in phase.per_layer_ms if k != "other"]
        assert layers == [f"layer {i}" for i in range(4)], name
        total = sum(phase.per_layer_ms.values())
        # Within 15% of the step time measured around each run (profiling on in both).
        assert abs(total - phase.step_ms_mean) <= 0.15 * phase.step_ms_mean, (name, total, phase.step_ms_mean)
        assert phase.step_ms_p90 >= phase.step_ms_p50 > 0
        assert "MatMul" in phase.per_op_type_ms and "Scan" in phase.per_op_type_ms
    # Three DeltaNet layers dominate a 65-token prefill of this model; the attention layer does not.
    prefill = report.phases["prefill"].per_layer_ms
    assert min(prefill["layer 0"], prefill["layer 1"], prefill["layer 2"]) > prefill["layer 3"]


def test_cli_writes_json_and_chart(artifact, tmp_path):
    report_path, chart = tmp_path / "profile.json", tmp_path / "profile.png"
    result = CliRunner().invoke(
        app,
        [
            "profile",
            str(artifact),
            "--decode-steps",
            "4",
            "--report",
            str(report_path),
            "--chart",
            str(chart),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(report_path.read_text())
    assert set(data["phases"]) == {"prefill", "decode"}
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "layer 3" in result.output
