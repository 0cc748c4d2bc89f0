"""Exports keep the checkpoint's precision: bf16 against transformers in bf16, FP8 both ways against
transformers on the dequantized weights, and the round trip the build pipelines start with.

Tolerances: qwen_export/tolerances.py (bf16: max |Δ| 0.2 on logits, top-1 ≥ 0.99; fp32: 2e-4), greedy
tokens identical for 32 steps. The bf16 graphs run in ONNX Runtime emulated in fp32 (runtime/emulation.py:
its CPU provider has no bf16 kernels).
"""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx_ir as ir
import pytest
import torch

from qwen_export.exporter.export import export_model
from qwen_export.fp8_checkpoint import quantize_checkpoint
from qwen_export.golden.reference import load_reference, reference_forward, reference_greedy
from qwen_export.golden.store import PROMPT_LENGTHS, make_prompt
from qwen_export.passes.widen import WidenToFp32
from qwen_export.presets import materialize
from qwen_export.runtime.ort_decoder import OrtDecoder
from qwen_export.tolerances import tolerance_for

from checkpoints import LOCAL_CLASSES, make_local_checkpoint

BF16 = tolerance_for("bf16")
FP32_MAX_ABS = tolerance_for("fp32")["logits_max_abs"]
TINY_PRESETS = ("tiny-qwen3.5-moe", "tiny-qwen3-next", "tiny-qwen3.5")
VOCAB = 512  # every tiny preset's and local class's


def data_bytes(folder) -> int:
    return (folder / "model.onnx.data").stat().st_size


def check_against(decoder: OrtDecoder, reference, max_abs: float, top1_min: float) -> None:
    """Prefill logits within `max_abs` with top-1 agreement ≥ `top1_min`, and 32 identical greedy tokens."""
    agree = total = 0
    cases = [(1, length) for length in PROMPT_LENGTHS] + [(2, 33)]  # the golden's prompts, and a batch
    for batch, length in cases:
        ids = np.random.default_rng(length).integers(0, VOCAB, size=(batch, length))
        ref, _ = reference_forward(reference, ids)
        ours = decoder.prefill(ids).logits
        assert np.abs(ours - ref).max() <= max_abs, (batch, length, np.abs(ours - ref).max())
        agree += int((ours.argmax(-1) == ref.argmax(-1)).sum())
        total += ref.shape[0] * ref.shape[1]
    assert agree / total >= top1_min, agree / total
    prompt = make_prompt(VOCAB, 12, seed=5)
    ref_tokens, _ = reference_greedy(reference, prompt, 32)
    tokens, _ = decoder.greedy(prompt, 32)
    np.testing.assert_array_equal(tokens, ref_tokens)


@pytest.fixture(scope="module")
def bf16_local_checkpoints(tmp_path_factory):
    """Every local class saved by transformers in bf16, as a real bf16 checkpoint is."""
    folders = {}
    for architecture in LOCAL_CLASSES:
        root = tmp_path_factory.mktemp(architecture)
        fp32 = make_local_checkpoint(architecture, root / "fp32")
        model = load_reference(fp32).to(torch.bfloat16)
        model.save_pretrained(root / "bf16")
        folders[architecture] = root / "bf16"
    return folders


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_bf16_export_of_a_preset_matches_transformers_in_bf16(tmp_path, preset):
    fp32 = export_model(tmp_path / "fp32", preset=preset)
    bf16 = export_model(tmp_path / "bf16", preset=preset, dtype="bf16")
    assert fp32.info["dtype"] == "fp32" and bf16.info["dtype"] == "bf16"  # presets are fp32 checkpoints
    ratio = data_bytes(bf16.out_dir) / data_bytes(fp32.out_dir)
    assert 0.45 < ratio < 0.56, ratio
    decoder = OrtDecoder(bf16.model_path)
    assert decoder.emulated
    check_against(
        decoder, load_reference(materialize(preset), "bf16"), BF16["logits_max_abs"], BF16["top1_min"]
    )


@pytest.mark.parametrize("architecture", sorted(LOCAL_CLASSES))
def test_bf16_checkpoint_exports_in_bf16_by_default(tmp_path, bf16_local_checkpoints, architecture):
    folder = bf16_local_checkpoints[architecture]
    bf16 = export_model(tmp_path / "bf16", model_dir=folder)
    fp32 = export_model(tmp_path / "fp32", model_dir=folder, dtype="fp32")
    assert bf16.info["dtype"] == "bf16"
    ratio = data_bytes(bf16.out_dir) / data_bytes(fp32.out_dir)
    assert 0.45 < ratio < 0.56, ratio
    io = {v["name"]: v["dtype"] for v in bf16.info["io"]["inputs"] + bf16.info["io"]["outputs"]}
    attention = bf16.spec.attention_layers()[0]
    linear = bf16.spec.linear_layers()[0]
    assert io["logits"] == "float32"
    assert io[f"present.{attention}.key"] == "bfloat16"
    assert io[f"present.{linear}.recurrent_state"] == "float32"  # the delta rule's state stays fp32
    check_against(
        OrtDecoder(bf16.model_path), load_reference(folder, "bf16"), BF16["logits_max_abs"], BF16["top1_min"]
    )


def test_bf16_weights_are_copied_bit_for_bit(tmp_path, bf16_local_checkpoints):
    """bf16 checkpoint tensors reach the graph unchanged (read as bf16, never widened and narrowed)."""
    from safetensors import safe_open

    folder = bf16_local_checkpoints["Qwen3_5MoeForCausalLM"]
    result = export_model(tmp_path / "out", model_dir=folder)
    model = ir.load(result.model_path)
    with safe_open(next(folder.glob("*.safetensors")), framework="pt") as f:  # saved one per expert
        gate = f.get_tensor("model.layers.0.mlp.experts.3.gate_proj.weight")  # [I, H]
        up = f.get_tensor("model.layers.0.mlp.experts.3.up_proj.weight")
    stacked = "layers.0.mlp.experts.gate_up_proj"
    graph_name = next(n for n in model.graph.initializers if n.startswith(stacked))
    stored = model.graph.initializers[graph_name].const_value  # [E, H, 2I]
    assert stored.dtype == ir.DataType.BFLOAT16
    expected = torch.cat([gate, up]).T.contiguous().view(torch.int16).numpy()
    np.testing.assert_array_equal(stored.numpy()[3].view(np.int16), expected)


@pytest.fixture(scope="module")
def fp8_checkpoints(tmp_path_factory):
    """Each tiny preset converted to Qwen's official FP8 layout (per-expert, 128x128 block scales)."""
    root = tmp_path_factory.mktemp("fp8")
    return {preset: quantize_checkpoint(materialize(preset), root / preset) for preset in TINY_PRESETS}


@pytest.mark.parametrize("weights", ["fp8", "dequant"])
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_fp8_checkpoint_matches_transformers_on_dequantized_weights(
    tmp_path, fp8_checkpoints, preset, weights
):
    folder = fp8_checkpoints[preset]
    result = export_model(tmp_path / "out", model_dir=folder, dtype="fp32", weights=weights)
    assert result.info["weights"] == weights
    assert result.info["checkpoint"]["used"] == result.info["checkpoint"]["tensors"]
    model = ir.load(result.model_path)
    dequantize = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    fp8_initializers = [v for v in model.graph.initializers.values() if v.dtype == ir.DataType.FLOAT8E4M3FN]
    if weights == "fp8":
        assert dequantize and len(fp8_initializers) == len(dequantize)
        assert all(n.attributes.get_int("block_size") == 128 for n in dequantize)
    else:
        assert not dequantize and not fp8_initializers
    check_against(OrtDecoder(result.model_path), load_reference(folder, "fp32"), FP32_MAX_ABS, 1.0)


def test_fp8_weights_take_about_half_the_bytes_of_bf16(tmp_path, fp8_checkpoints):
    folder = fp8_checkpoints["tiny-qwen3.5-moe"]
    kept = export_model(tmp_path / "fp8", model_dir=folder)  # defaults: the checkpoint's bf16, FP8 kept
    dequantized = export_model(tmp_path / "dq", model_dir=folder, weights="dequant")
    assert (kept.info["dtype"], kept.info["weights"]) == ("bf16", "fp8")
    assert (dequantized.info["dtype"], dequantized.info["weights"]) == ("bf16", "dequant")
    # Experts and projections at 1 byte plus fp32 scales per 128 weights; embeddings, norms, router in bf16.
    assert data_bytes(kept.out_dir) < 0.7 * data_bytes(dequantized.out_dir)
    reference = load_reference(folder, "bf16")
    for result in (kept, dequantized):
        check_against(OrtDecoder(result.model_path), reference, BF16["logits_max_abs"], BF16["top1_min"])


@pytest.mark.parametrize("preset", ["tiny-qwen3.5-moe", "tiny-qwen3-next"])
def test_widened_low_precision_export_is_the_fp32_graph(tmp_path, fp8_checkpoints, preset):
    """The build pipelines start by widening: a bf16 or FP8-kept export becomes the exporter's fp32 graph
    (same nodes, same initializer names) with the same numbers as exporting its weights in fp32."""
    fp32 = ir.load(export_model(tmp_path / "fp32", preset=preset).model_path)
    bf16 = ir.load(export_model(tmp_path / "bf16", preset=preset, dtype="bf16").model_path)
    WidenToFp32()(bf16)

    def ops(model: ir.Model) -> collections.Counter:
        return collections.Counter(n.op_type for n in model.graph)

    assert ops(bf16) == ops(fp32)
    assert sorted(bf16.graph.initializers) == sorted(fp32.graph.initializers)
    assert all(
        v.dtype == ir.DataType.FLOAT for v in bf16.graph.initializers.values() if v.dtype.is_floating_point()
    )

    kept = ir.load(
        export_model(tmp_path / "kept", model_dir=fp8_checkpoints[preset], dtype="fp32").model_path
    )
    widen = WidenToFp32()
    widen(kept)
    assert widen.stats.fired["DequantizeLinear"] > 0
    ir.save(kept, tmp_path / "widened.onnx", external_data="widened.onnx.data")
    dequant = export_model(
        tmp_path / "dq", model_dir=fp8_checkpoints[preset], dtype="fp32", weights="dequant"
    )
    ids = np.random.default_rng(0).integers(0, VOCAB, size=(1, 40))
    np.testing.assert_allclose(
        OrtDecoder(tmp_path / "widened.onnx").prefill(ids).logits,
        OrtDecoder(dequant.model_path).prefill(ids).logits,
        rtol=0,
        atol=1e-5,
    )


def test_export_json_records_precision(tmp_path):
    result = export_model(tmp_path / "out", preset="tiny-qwen3.5-moe", dtype="fp16")
    info = json.loads((tmp_path / "out" / "export.json").read_text())
    assert info["dtype"] == "fp16" and info["weights"] is None
    assert info["precision_islands"]["router"] > 0 and info["precision_islands"]["recurrence"] > 0
    assert result.info["io"]["outputs"][0] == {
        "name": "logits", "dtype": "float32", "shape": ["batch", "sequence", VOCAB]
    }  # fmt: skip


def test_validate_and_diff_hold_a_bf16_export_to_bf16(tmp_path):
    """validate against a golden made in bf16 (the checkpoint dtype it would default to) and diff against
    the live reference, which runs in the export's dtype."""
    from qwen_export.diff import diff_artifact
    from qwen_export.golden.store import generate_golden
    from qwen_export.validate import validate_artifact

    export_model(tmp_path / "bf16", preset="tiny-qwen3.5-moe", dtype="bf16")
    generate_golden(materialize("tiny-qwen3.5-moe"), tmp_path / "golden", "test", dtype="bf16")
    report = validate_artifact(tmp_path / "bf16", tmp_path / "golden")
    assert report.passed, report.to_json()
    assert (report.precision, report.reference_dtype, report.emulated) == ("bf16", "bf16", True)
    assert report.tolerance == BF16["logits_max_abs"]
    assert report.greedy_match_length == report.greedy_tokens == 32
    diff = diff_artifact(tmp_path / "bf16")
    assert diff.reference_dtype == "bf16" and diff.passed, diff.to_json()
    assert diff.greedy_agreement == diff.greedy_tokens
