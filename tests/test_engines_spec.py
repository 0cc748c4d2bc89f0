"""Deployment spec: names, profiles, and clear errors before any work."""

from __future__ import annotations

import json

import pytest

from qwen_export.engines.api import deploy_spec
from qwen_export.engines.builder import build_engines
from qwen_export.engines.spec import DeploySpec, DeploySpecError, resolve_gpu
from qwen_export.engines.toolchain import BuildOptions
from qwen_export.errors import QwenExportError

EXPORTER_INPUTS = [
    ("input_ids", ["batch", "sequence"]),
    ("attention_mask", ["batch", "total_sequence"]),
    ("position_ids", ["batch", "sequence"]),
    ("past_key_values.0.conv_state", ["batch", 128, 3]),
    ("past_key_values.3.key", ["batch", 2, "past_sequence", 32]),
]


@pytest.mark.parametrize(
    ("name", "sm"),
    [
        ("sm89", "sm89"),
        ("SM_120", "sm120"),
        ("l40s", "sm89"),
        ("RTX 4090", "sm89"),
        ("rtx5090", "sm120"),
        ("a100", "sm80"),
        ("h200", "sm90"),
        ("NVIDIA H100", "sm90"),
        ("b200", "sm100"),
    ],
)
def test_gpu_names_resolve_to_compute_capabilities(name, sm):
    assert resolve_gpu(name) == sm


def test_spec_deduplicates_and_keeps_the_users_names():
    spec = DeploySpec.create("sm89,l40s, rtx5090", "bf16")
    assert spec.gpus == ("sm89", "sm120")
    assert spec.label("sm120") == "rtx5090 (sm120)"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gpus": "sm89,quadro9000"}, "unknown GPU 'quadro9000'"),
        (
            {"gpus": "sm89", "max_prompt": 8192, "max_context": 4096},
            "max_prompt 8192 is above max_context 4096",
        ),
        ({"gpus": "sm89", "max_batch": 0}, "max_batch must be at least 1"),
        ({"gpus": "sm89", "precision": "fp32"}, "no fp32 attention kernel"),
        ({"gpus": "sm89", "precision": "int3"}, "unknown precision 'int3'"),
        ({"gpus": "h100"}, "h100 (sm90): TensorRT-RTX cannot build for sm90"),
        ({"gpus": "sm100"}, "build it with --target trt on that GPU"),
        ({"gpus": "t4", "precision": "fp16"}, "no fp32 GEMM"),
        ({"gpus": "sm75", "precision": "bf16", "target": "trt"}, "sm75 has no bf16 support"),
        ({"gpus": "sm89", "target": "tensorrt-llm"}, "unknown target 'tensorrt-llm'"),
        ({"gpus": "", "precision": "bf16"}, "no GPU target"),
    ],
)
def test_bad_specs_are_refused_with_a_clear_message(kwargs, message):
    with pytest.raises(DeploySpecError) as err:
        DeploySpec.create(**kwargs)
    assert message in str(err.value)
    assert isinstance(err.value, QwenExportError)  # the CLI prints it on one line, exit code 2


def test_every_problem_is_reported_at_once():
    with pytest.raises(DeploySpecError) as err:
        DeploySpec.create("h100,foo", "fp32", max_batch=0, max_prompt=10, max_context=5)
    text = str(err.value)
    for part in ("unknown GPU 'foo'", "fp32", "max_batch", "max_prompt 10 is above max_context 5", "sm90"):
        assert part in text


def test_trt_target_accepts_hopper_and_blackwell_datacenter_gpus():
    assert DeploySpec.create("h200,b200", "bf16", target="trt").gpus == ("sm90", "sm100")


def test_profiles_prefill_and_decode():
    spec = DeploySpec.create("sm89", "bf16", max_batch=4, max_prompt=512, max_context=4096)
    prefill, decode = spec.profiles(EXPORTER_INPUTS)
    assert (prefill.name, decode.name) == ("prefill", "decode")
    assert prefill.shapes["input_ids"] == ((1, 1), (4, 512), (4, 512))
    assert prefill.shapes["attention_mask"] == ((1, 1), (4, 512), (4, 512))
    assert prefill.shapes["past_key_values.3.key"] == ((1, 2, 0, 32), (4, 2, 0, 32), (4, 2, 0, 32))
    assert decode.shapes["input_ids"] == ((1, 1), (4, 1), (4, 1))
    assert decode.shapes["past_key_values.3.key"] == ((1, 2, 0, 32), (4, 2, 2047, 32), (4, 2, 4095, 32))
    assert decode.shapes["attention_mask"][2] == (4, 4096)
    assert decode.shapes["past_key_values.0.conv_state"] == ((1, 128, 3), (4, 128, 3), (4, 128, 3))


def test_profiles_refuse_an_unknown_dynamic_dimension():
    spec = DeploySpec.create("sm89")
    with pytest.raises(DeploySpecError, match="cannot bound"):
        spec.profiles([("pixel_values", ["batch", "height"])])


def test_spec_file_and_flags(tmp_path):
    path = tmp_path / "deploy.json"
    path.write_text(json.dumps({"gpus": ["l40s", "rtx5090"], "precision": "fp16", "max_context": 8192}))
    spec = deploy_spec(spec_file=path, max_batch=8)
    assert (spec.gpus, spec.precision, spec.max_context, spec.max_batch) == (
        ("sm89", "sm120"),
        "fp16",
        8192,
        8,
    )
    assert deploy_spec(spec_file=path, gpu="sm80").gpus == ("sm80",)
    path.write_text(json.dumps({"gpus": ["sm89"], "max_tokens": 3}))
    with pytest.raises(DeploySpecError, match="unknown deployment spec keys"):
        DeploySpec.from_file(path)
    path.write_text("{not json")
    with pytest.raises(DeploySpecError, match="malformed"):
        DeploySpec.from_file(path)


def test_builder_options_are_checked():
    assert BuildOptions(opt_level=7).problems("trt-rtx")[0].startswith("builder optimization level")
    assert (
        "no hardware-compatibility level"
        in BuildOptions(hardware_compatibility="ampere_plus").problems("trt-rtx")[0]
    )
    assert BuildOptions(hardware_compatibility="ampere_plus").problems("trt") == []


def test_bad_input_stops_the_build_before_any_work(tmp_path):
    spec = DeploySpec.create("sm89", "bf16")
    out, cache = tmp_path / "out", tmp_path / "cache"
    with pytest.raises(QwenExportError, match="no such ONNX file"):
        build_engines(tmp_path / "missing.onnx", spec, out, cache_dir=cache)
    (tmp_path / "model.onnx").write_bytes(b"")
    with pytest.raises(DeploySpecError, match="hardware-compatibility"):
        build_engines(
            tmp_path / "model.onnx", spec, out, cache_dir=cache, hardware_compatibility="ampere_plus"
        )
    with pytest.raises(DeploySpecError, match="optimization level"):
        build_engines(tmp_path / "model.onnx", spec, out, cache_dir=cache, opt_level=9)
    assert not out.exists() and not cache.exists()
