"""The `trt` target: full TensorRT with our plugin library, on the GPU it builds for.

The orchestration is the one the trt-rtx tests exercise; here only what differs is checked, and only
where TensorRT and a GPU exist.
"""

from __future__ import annotations

import pytest

from qwen_export.engines.builder import build_engines
from qwen_export.engines.spec import DeploySpec
from qwen_export.engines.toolchain import TensorRT, ToolchainUnavailable, current_sm
from qwen_export.exporter.export import export_model

READY, WHY = TensorRT().available()
GPU = current_sm()
needs_gpu_and_tensorrt = pytest.mark.skipif(
    not READY or GPU is None, reason=f"needs a GPU and TensorRT ({WHY if not READY else 'no CUDA GPU'})"
)


@pytest.mark.skipif(READY, reason="TensorRT is installed here")
def test_without_tensorrt_the_trt_target_says_why_before_any_work(tmp_path):
    model = export_model(tmp_path / "m", preset="tiny-qwen3.5-moe").model_path
    spec = DeploySpec.create("h200", "bf16", target="trt")
    with pytest.raises(ToolchainUnavailable, match="needs a GPU and TensorRT"):
        build_engines(model, spec, tmp_path / "out", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "out").exists()
    plan = build_engines(model, spec, tmp_path / "out", cache_dir=tmp_path / "cache", dry_run=True)
    assert plan.toolchain_ready is False and plan.to_build == ["sm90"]


@needs_gpu_and_tensorrt
def test_trt_engine_for_this_gpu_with_timing_cache(tmp_path):
    model = export_model(tmp_path / "m", preset="tiny-qwen3.5-moe").model_path
    spec = DeploySpec.create(GPU, "bf16", target="trt", max_batch=1, max_prompt=128, max_context=512)
    timing_cache = tmp_path / "timing.cache"
    result = build_engines(
        model, spec, tmp_path / "out", cache_dir=tmp_path / "cache", timing_cache=timing_cache
    )
    assert result.built == [GPU] and timing_cache.stat().st_size > 0
    assert result.manifest["timing_cache"]["used"] is True
    again = build_engines(
        model, spec, tmp_path / "out2", cache_dir=tmp_path / "cache", timing_cache=timing_cache
    )
    assert again.reused == [GPU]
