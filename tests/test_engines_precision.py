"""The TensorRT-RTX lowering and the precision policy, measured on the CPU against the golden reference.

Runtimes (named in every assertion message):
- lowered fp32 graph: ONNX Runtime CPU, fp32;
- fp16: ONNX Runtime CPU running the fp16 graph natively (`ort-cpu-native`);
- bf16: ONNX Runtime CPU has no bf16 kernels, so the bf16 graph runs emulated (`ort-cpu-emulated`): every
  bf16 tensor is rounded through bf16 and computed on in fp32 (see qwen_export/engines/accuracy.py).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from qwen_export.engines.accuracy import emulate_in_fp32, evaluate
from qwen_export.exporter.export import export_model
from qwen_export.golden.store import load_golden, repo_golden_dir
from qwen_export.passes.lower_trt_rtx import LowerToTrtRtx
from qwen_export.passes.precision import Precision
from qwen_export.runtime.ort_decoder import OrtDecoder, positions_from_mask
from qwen_export.tolerances import FP32_MAX_ABS

TINY_PRESETS = ["tiny-qwen3.5-moe", "tiny-qwen3-next", "tiny-qwen3.5"]
RUNTIME = {"fp16": "ort-cpu-native", "bf16": "ort-cpu-emulated"}
LOW = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    paths: dict[str, object] = {}

    def get(preset: str):
        if preset not in paths:
            paths[preset] = export_model(tmp_path_factory.mktemp(preset), preset=preset).model_path
        return paths[preset]

    return get


def lowered(path, **options) -> ir.Model:
    model = ir.load(path)
    LowerToTrtRtx(**options)(model)
    return model


def save(model: ir.Model, folder) -> str:
    path = folder / "model.onnx"
    ir.save(model, path, external_data="model.onnx.data")
    return str(path)


@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("moe", ["gather", "hybrid", "dense-branch", "dense"])
def test_lowered_graph_matches_golden_in_fp32(exported, preset, moe, tmp_path):
    # dense-branch: a 1 MiB gather budget sends the longer prompts through the If's dense branch.
    options = {"moe": "hybrid", "gather_budget_mib": 1} if moe == "dense-branch" else {"moe": moe}
    lowering = LowerToTrtRtx(**options)
    model = ir.load(exported(preset))
    lowering(model)
    ops = [n.op_type for n in model.graph]
    moe_layers = {"tiny-qwen3.5-moe": 4, "tiny-qwen3-next": 3, "tiny-qwen3.5": 0}[preset]
    assert ops.count("Attention") == 1  # the one full-attention layer; its Softmax is gone
    assert ops.count("Softmax") == moe_layers  # routers only
    assert lowering.stats.fired["MoE"] == (0 if moe == "dense" else moe_layers)
    assert ops.count("If") == (moe_layers if moe in ("hybrid", "dense-branch") else 0)
    decoder = OrtDecoder(save(model, tmp_path))
    golden = load_golden(repo_golden_dir(preset))
    for length in (1, 63, 200):
        ids, ref = golden.prefill(length)
        assert np.abs(decoder.prefill(ids).logits - ref).max() <= FP32_MAX_ABS, (
            f"prefill {length}, ORT CPU fp32"
        )
    tokens, _ = decoder.greedy(golden.greedy_prompt, 32)
    assert (tokens == golden.greedy_tokens).all()


def test_lowered_attention_matches_on_a_left_padded_batch(exported, tmp_path):
    path = exported("tiny-qwen3.5-moe")
    reference = OrtDecoder(path)
    decoder = OrtDecoder(save(lowered(path), tmp_path))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 512, size=(2, 9))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # row 1 is left-padded: its first 4 queries see no real key
    a, b = reference.prefill(ids, mask), decoder.prefill(ids, mask)
    assert np.isfinite(b.logits).all()
    assert np.abs(a.logits[mask == 1] - b.logits[mask == 1]).max() <= FP32_MAX_ABS
    step = (ids[:, -1:] + 1) % 512
    mask2 = np.concatenate([mask, np.ones_like(step)], axis=1)
    position = positions_from_mask(mask)[:, -1:] + 1
    a2, b2 = reference.step(step, mask2, position, a.states), decoder.step(step, mask2, position, b.states)
    assert np.abs(a2.logits - b2.logits).max() <= FP32_MAX_ABS


@pytest.mark.parametrize("preset", TINY_PRESETS)
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_precision_policy_against_golden(exported, preset, precision, tmp_path):
    model = lowered(exported(preset))
    Precision(precision)(model)
    runtime = RUNTIME[precision]
    if runtime == "ort-cpu-emulated":
        emulate_in_fp32(model)
    result = evaluate(save(model, tmp_path), load_golden(repo_golden_dir(preset)), runtime, precision)
    context = f"{preset} {precision} on {runtime}: {result.to_json()}"
    assert result.top1_agreement >= 0.99, context
    assert result.greedy_identical, context


def test_precision_policy_fp16_emulated_agrees_with_native(exported, tmp_path):
    model = lowered(exported("tiny-qwen3.5-moe"))
    Precision("fp16")(model)
    emulate_in_fp32(model)
    result = evaluate(
        save(model, tmp_path), load_golden(repo_golden_dir("tiny-qwen3.5-moe")), "ort-cpu-emulated", "fp16"
    )
    assert result.top1_agreement >= 0.99 and result.greedy_identical, result.to_json()


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_precision_islands_and_io(exported, precision):
    model = lowered(exported("tiny-qwen3.5-moe"))
    policy = Precision(precision)
    policy(model)
    low, fp32 = LOW[precision], ir.DataType.FLOAT
    graph = model.graph
    dtypes = {v.name: v.type.dtype for v in [*graph.inputs, *graph.outputs]}
    assert dtypes["logits"] == fp32
    assert dtypes["past_key_values.3.key"] == dtypes["present.3.value"] == low
    assert dtypes["past_key_values.0.conv_state"] == dtypes["present.0.conv_state"] == low
    assert dtypes["past_key_values.0.recurrent_state"] == dtypes["present.2.recurrent_state"] == fp32
    for node in graph:
        floats = [v.type.dtype for v in node.inputs if v is not None and v.type.dtype in (fp32, low)]
        if node.op_type in ("Scan", "Softmax", "TopK", "ReduceMean", "Softplus"):
            assert set(floats) == {fp32}, node.name  # recurrence, router, norm statistics, gates
        if node.op_type in ("Attention", "Conv"):
            assert set(floats) == {low}, node.name
        if node.op_type == "MatMul" and node.inputs[1].const_value is not None:
            router = node.inputs[1].shape[-1] == 8  # [H, experts]
            assert set(floats) == ({fp32} if router else {low}), node.name
    weights = [v for v in graph.initializers.values() if len(v.shape) >= 2]
    assert sum(v.const_value.dtype == low for v in weights) > sum(
        v.const_value.dtype == fp32 for v in weights
    )
    assert policy.stats.extras["islands"]["recurrence"] == 3 and policy.stats.extras["islands"]["router"] > 0
