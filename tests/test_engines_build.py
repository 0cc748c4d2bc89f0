"""TensorRT-RTX engines built ahead of time on this CPU, the manifest, and the engine cache.

One preset (tiny-qwen3.5-moe: attention, DeltaNet and MoE) builds bf16 and fp16 engines for sm80, sm89 and
sm120; the other tiny presets build one engine each, so that every preset is known to parse and build.
benchmarks/engines.md has the full matrix.
"""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from qwen_export.engines.builder import BuildPlan, BuildResult, build_engines
from qwen_export.engines.spec import DeploySpec
from qwen_export.engines.toolchain import TensorRTRtx
from qwen_export.exporter.export import export_model

READY, WHY = TensorRTRtx().available()
pytestmark = pytest.mark.skipif(not READY, reason=f"needs TensorRT-RTX: {WHY}")
GPUS = "sm80,sm89,sm120"
LIMITS = dict(max_batch=2, max_prompt=256, max_context=1024)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("engines")


@pytest.fixture(scope="module")
def moe_model(workdir):
    return export_model(workdir / "tiny-qwen3.5-moe", preset="tiny-qwen3.5-moe").model_path


@pytest.fixture(scope="module")
def first_builds(moe_model, workdir):
    """bf16 and fp16 engines for three GPUs, into a fresh engine cache; (result, seconds) per precision."""
    out = {}
    for precision in ("bf16", "fp16"):
        spec = DeploySpec.create(GPUS, precision, **LIMITS)
        start = time.perf_counter()
        result = build_engines(moe_model, spec, workdir / f"out-{precision}", cache_dir=workdir / "cache")
        out[precision] = (result, time.perf_counter() - start)
    return out


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_engines_for_three_gpus_and_the_manifest(first_builds, precision):
    result, _ = first_builds[precision]
    assert isinstance(result, BuildResult)
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    assert manifest["format"] == "qwen-export/build@1" and manifest["target"] == "trt-rtx"
    assert sorted(manifest["engines"]) == ["sm120", "sm80", "sm89"]
    assert manifest["built"] == ["sm80", "sm89", "sm120"] and manifest["reused"] == []
    for sm, entry in manifest["engines"].items():
        engine = result.out_dir / entry["path"]
        assert entry["path"] == f"engines/{sm}/model.engine"
        assert engine.stat().st_size == entry["bytes"] > 1_000_000
        assert sha256(engine) == entry["sha256"]
        assert entry["timings_s"]["build"] > 0 and entry["timings_s"]["parse"] > 0
        assert len(entry["fingerprint"]) == 64
    assert manifest["deploy"]["precision"] == precision
    assert [p["name"] for p in manifest["deploy"]["profiles"]] == ["prefill", "decode"]
    assert [p["name"] for p in manifest["passes"]] == ["widen-to-fp32", "lower-trt-rtx", "precision"]
    assert manifest["precision"]["islands"]["recurrence"] == 3
    assert manifest["fingerprint"]["model_sha256"] == manifest["model"]["sha256"]
    assert manifest["versions"]["tensorrt_rtx_bindings"]
    assert manifest["timing_cache"]["used"] is False and "TensorRT-RTX" in manifest["timing_cache"]["note"]
    for stage in ("fingerprint", "pass precision", "save graph", "sm89 build", "total"):
        assert manifest["timings_s"][stage] > 0, stage
    assert manifest["source"] == "preset:tiny-qwen3.5-moe"


def test_an_unchanged_rebuild_comes_from_the_cache(first_builds, moe_model, workdir):
    first, first_s = first_builds["bf16"]
    spec = DeploySpec.create(GPUS, "bf16", **LIMITS)
    start = time.perf_counter()
    again = build_engines(moe_model, spec, workdir / "out-bf16-again", cache_dir=workdir / "cache")
    seconds = time.perf_counter() - start
    assert again.built == [] and again.reused == ["sm80", "sm89", "sm120"]
    assert seconds < 0.1 * first_s, (seconds, first_s)
    for record in again.engines:
        assert record.sha256 == next(r.sha256 for r in first.engines if r.sm == record.sm)
        assert sha256(again.out_dir / record.path) == record.sha256
    assert not any(name.startswith("pass ") for name in again.timings_s)  # no pass ran


def test_a_changed_input_misses_the_cache_and_dry_run_writes_nothing(first_builds, moe_model, workdir):
    out = workdir / "dry"
    plan = build_engines(
        moe_model, DeploySpec.create(GPUS, "bf16", **LIMITS), out, cache_dir=workdir / "cache", dry_run=True
    )
    assert isinstance(plan, BuildPlan) and plan.to_build == []
    bigger = DeploySpec.create("sm89,sm120", "bf16", **{**LIMITS, "max_context": 2048})
    plan = build_engines(moe_model, bigger, out, cache_dir=workdir / "cache", dry_run=True)
    assert plan.to_build == ["sm89", "sm120"]
    plan = build_engines(
        moe_model,
        DeploySpec.create("sm89", "bf16", **LIMITS),
        out,
        cache_dir=workdir / "cache",
        opt_level=4,
        dry_run=True,
    )
    assert plan.to_build == ["sm89"]
    assert not out.exists()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("preset", ["tiny-qwen3-next", "tiny-qwen3.5"])
def test_other_presets_build(preset, precision, workdir):
    model = export_model(workdir / f"{preset}-{precision}", preset=preset).model_path
    result = build_engines(
        model,
        DeploySpec.create("sm80,sm89,sm120", precision, **LIMITS),
        workdir / f"out-{preset}-{precision}",
        use_cache=False,
    )
    assert [r.sm for r in result.engines] == ["sm80", "sm89", "sm120"]
    for record in result.engines:
        assert record.bytes > 1_000_000 and not record.from_cache
        assert sha256(result.out_dir / record.path) == record.sha256
