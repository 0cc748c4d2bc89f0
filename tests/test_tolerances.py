"""The int4/int8 tolerances come from the trained reference model: MEASURED_ON_TRAINED is a copy of the
worst int4 and int8 rows of benchmarks/quality.json (scripts/bench_quality.py), and TOLERANCES applies the
stated margin to it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen_export.tolerances import MEASURED_ON_TRAINED, TOLERANCES, derived_bounds

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.json"


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_measurements_are_the_quality_benchmarks_worst_rows(precision):
    rows = [r for r in json.loads(QUALITY.read_text())["rows"] if r["precision"] == precision]
    assert rows, f"benchmarks/quality.json has no {precision} row"
    assert MEASURED_ON_TRAINED[precision] == {
        "top1_agreement": min(r["top1_agreement"] for r in rows),
        "kl_mean": max(r["kl_mean"] for r in rows),
    }


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_tolerances_are_the_measurement_with_its_margin(precision):
    bounds = derived_bounds(MEASURED_ON_TRAINED[precision])
    assert {k: TOLERANCES[precision][k] for k in bounds} == bounds
    measured = MEASURED_ON_TRAINED[precision]
    assert measured["top1_agreement"] - 0.04 < bounds["top1_min"] <= measured["top1_agreement"] - 0.03
    assert 2 * measured["kl_mean"] <= bounds["kl_mean_max"] < 3 * measured["kl_mean"]


@pytest.mark.parametrize("target", ["ort-int8", "ort-cpu-int4"])
def test_the_trained_models_quantized_builds_are_within_the_derived_bounds_on_text(tmp_path, target):
    """diff --text on the trained checkpoint's quantized builds: within the bounds derived from it, on
    held-out windows past the 16 the benchmark measured."""
    from qwen_export.build import build
    from qwen_export.presets import materialize
    from qwen_export.quality import text_quality
    from qwen_export.targets import get_target

    out = build(tmp_path / target, preset="trained-qwen3.5-moe", target=target).out_dir
    report = text_quality(out, materialize("trained-qwen3.5-moe") / "heldout.txt", windows=24)
    precision = get_target(target).precision  # the registry's word for a target's precision
    assert report.precision == precision
    assert report.tolerances == {k: TOLERANCES[precision][k] for k in ("top1_min", "kl_mean_max")}
    assert report.passed, report.to_json()
