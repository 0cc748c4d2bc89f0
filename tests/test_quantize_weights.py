"""Weight-only quantization (passes/quantize_weights.py, targets ort-int4 / ort-int8).

- The block quantizer against an independent NumPy statement of the math, and MatMulNBits / QMoE on ONNX
  Runtime's CPU kernels against NumPy products with the dequantized weights (the layouts are right).
- The tiny presets' int4/int8 pipelines leave no float MatMul with a constant weight and no fp32 MoE.
- With fp32 activations (accuracy_level 0) the int4 graph equals transformers run with dequant(quant(W))
  in place of every weight: the quantized graph holds exactly the weights the math says.
- Against the HF golden (accuracy_level 4, the targets' setting): top-1 agreement and mean KL of prefill
  and decode logits within qwen_export/tolerances.py's int4/int8 entries, and top-1 identical wherever the
  golden's top-1/top-2 margin exceeds MARGIN (tiny random models have many near-ties; a quantized model
  may only flip those). Greedy decoding agrees up to the first golden step with a margin below MARGIN.
- An ort-int4 build artifact loads in the runtime and `diff` holds it to the int4 tolerances.
- ort-cpu-int4 (the same int4 weights on qwen-export's CPU kernels) is held to the same golden checks; its
  kernels are tested one by one in tests/test_cpu_kernels.py.
"""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from passes_support import TINY_PRESETS, exported, golden

from qwen_export.errors import QwenExportError
from qwen_export.golden.store import PROMPT_LENGTHS
from qwen_export.metrics import agreement_length, compare_logits
from qwen_export.passes.quantize_weights import QuantizeWeights, dequantize_blockwise, quantize_blockwise
from qwen_export.targets import pipeline
from qwen_export.tolerances import FP32_MAX_ABS, tolerance_for

MARGIN = {4: 0.5, 8: 0.1}  # logits: a golden top-1 lead above this may not flip (max |Δ| seen: 0.44 / 0.04)
BITS = {"ort-int4": 4, "ort-int8": 8, "ort-cpu-int4": 4}


# ------------------------------------------------------------------------------------------- the math


def reference_quantize(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Element by element, unpacked: (q [R, K] ints in [0, 2^bits), scales [R, blocks])."""
    rows, k = w.shape
    blocks = -(-k // block)
    q = np.zeros((rows, k), np.int64)
    scales = np.zeros((rows, blocks), np.float32)
    half = 2 ** (bits - 1)
    for r in range(rows):
        for j in range(blocks):
            part = w[r, j * block : (j + 1) * block]
            scale = np.float32(part[np.abs(part).argmax()] / -half)
            scales[r, j] = scale
            for i, value in enumerate(part):
                level = 0.0 if scale == 0 else np.rint(value * np.float32(1 / scale))
                q[r, j * block + i] = int(np.clip(level, -half, half - 1)) + half
    return q, scales


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_matches_the_stated_math_and_round_trips(bits):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((5, 80)).astype(np.float32)  # 80 = 2.5 blocks of 32: a zero-padded last block
    w[1, :32] = 0.0  # an all-zero block: scale 0, dequantizes to 0
    q, scales = quantize_blockwise(w, bits, 32)
    assert q.shape == (5, 3, 32 * bits // 8) and q.dtype == np.uint8 and scales.shape == (5, 3)
    ref_q, ref_scales = reference_quantize(w, bits, 32)
    np.testing.assert_array_equal(scales, ref_scales)
    unpacked = np.stack([q & 15, q >> 4], -1).reshape(5, -1) if bits == 4 else q.reshape(5, -1)
    np.testing.assert_array_equal(unpacked[:, :80], ref_q)
    back = dequantize_blockwise(q, scales, bits, 80)
    step = np.repeat(np.abs(scales), 32, axis=1)[:, :80]
    assert np.all(np.abs(back - w) <= step * (1 + 1e-6))  # half a step, a full one where +2^(b-1) clips
    assert np.all(back[1, :32] == 0)
    extreme = np.abs(w[:, 32:64]).argmax(1)  # every block's extreme is represented exactly
    np.testing.assert_array_equal(back[np.arange(5), 32 + extreme], w[np.arange(5), 32 + extreme])


def _run(nodes, inputs, outputs, initializers, feeds):
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


@pytest.mark.parametrize("bits", [4, 8])
def test_matmul_nbits_layout_on_ort(bits):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    k, n = 72, 40  # K not a multiple of the block
    w = rng.standard_normal((k, n)).astype(np.float32)
    q, scales = quantize_blockwise(w.T, bits, 32)
    x = rng.standard_normal((2, 3, k)).astype(np.float32)
    node = helper.make_node(
        "MatMulNBits", ["x", "q", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits, block_size=32
    )
    y = _run(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scales, "s")],
        {"x": x},
    )
    expected = x @ dequantize_blockwise(q, scales, bits, k).T
    np.testing.assert_allclose(y, expected, atol=1e-5, rtol=1e-5)


def numpy_moe(x, logits, fc1, fc2, k, normalize=True):
    """Softmax over all experts, top k, renormalised (or not); interleaved SwiGLU fc1 [E, 2I, H], fc2
    [E, H, I]."""
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        top = np.argsort(-probs[t], kind="stable")[:k]
        weights = probs[t, top] / probs[t, top].sum() if normalize else probs[t, top]
        for e, weight in zip(top, weights, strict=True):
            h = fc1[e] @ x[t]
            gate, up = h[0::2], h[1::2]
            out[t] += weight * (fc2[e] @ (gate / (1 + np.exp(-gate)) * up))
    return out


def test_qmoe_layout_on_ort():
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    e, h, i, k = 8, 64, 32, 2
    fc1 = rng.standard_normal((e, 2 * i, h)).astype(np.float32) * 0.1
    fc2 = rng.standard_normal((e, h, i)).astype(np.float32) * 0.1
    q1, s1 = quantize_blockwise(fc1.reshape(-1, h), 4, 32)
    q2, s2 = quantize_blockwise(fc2.reshape(-1, i), 4, 32)
    x = rng.standard_normal((5, h)).astype(np.float32)
    logits = rng.standard_normal((5, e)).astype(np.float32)
    node = helper.make_node(
        "QMoE",
        ["x", "r", "q1", "s1", "", "q2", "s2"],
        ["y"],
        domain="com.microsoft",
        k=k,
        normalize_routing_weights=1,
        activation_type="swiglu",
        swiglu_fusion=1,
        activation_alpha=1.0,
        activation_beta=0.0,
        expert_weight_bits=4,
        block_size=32,
        weights_prepacked=0,
    )
    initializers = {
        "q1": q1.reshape(e, 2 * i, h // 2),
        "s1": s1.reshape(e, 2 * i, h // 32),
        "q2": q2.reshape(e, h, i // 2),
        "s2": s2.reshape(e, h, i // 32),
    }
    y = _run(
        [node],
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, h]),
            helper.make_tensor_value_info("r", TensorProto.FLOAT, [5, e]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, name) for name, v in initializers.items()],
        {"x": x, "r": logits},
    )
    d1 = dequantize_blockwise(q1, s1, 4, h).reshape(fc1.shape)
    d2 = dequantize_blockwise(q2, s2, 4, i).reshape(fc2.shape)
    np.testing.assert_allclose(y, numpy_moe(x, logits, d1, d2, k), atol=1e-5)


# ------------------------------------------------------------------------------------------ whole model


def lowered(preset: str, target: str) -> tuple[ir.Model, QuantizeWeights]:
    model = exported(preset)
    passes = pipeline(target)
    for p in passes:
        p(model)
    return model, next(p for p in passes if isinstance(p, QuantizeWeights))


def saved(model: ir.Model, tmp: str) -> Path:
    path = Path(tmp) / "model.onnx"
    ir.save(model, path, external_data="model.onnx.data")
    return path


@pytest.mark.parametrize("target", ["ort-int4", "ort-int8"])
def test_tiny_moe_pipeline_quantizes_every_weight_product(target):
    model, quantize = lowered("tiny-qwen3.5-moe", target)
    ops = collections.Counter(f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in model.graph)
    weight_matmuls = [n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None]
    assert not weight_matmuls and "com.microsoft::MoE" not in ops, ops
    # 4 layers: DeltaNet in/out (3 x 2), attention qkv/o (2), per MoE router+shared and shared down (4 x 2),
    # lm_head (1) = 17 MatMulNBits; one QMoE per MoE layer.
    assert ops["com.microsoft::MatMulNBits"] == 17 and ops["com.microsoft::QMoE"] == 4, ops
    assert quantize.stats.fired == {"MatMulNBits": 17, "QMoE": 4} and not quantize.stats.kept
    assert all(
        n.attributes["bits" if n.op_type == "MatMulNBits" else "expert_weight_bits"].value == BITS[target]
        for n in model.graph
        if n.op_type in ("MatMulNBits", "QMoE")
    )
    reference = exported("tiny-qwen3.5-moe")  # the model's inputs and outputs do not change
    assert [v.name for v in model.graph.inputs] == [v.name for v in reference.graph.inputs]
    assert [v.name for v in model.graph.outputs] == [v.name for v in reference.graph.outputs]


@pytest.mark.parametrize("block", [32, 128])
def test_int4_graph_equals_transformers_with_dequantized_weights(block):
    """accuracy_level 0 (fp32 activations): the only change from fp32 is W -> dequant(quant(W)). Block 128
    is the default: MatMuls use it whole (K = 64 is one zero-padded block), the experts (hidden 64, expert
    32) the largest power of two that divides both, 32."""
    import torch

    from qwen_export.exporter.export import resolve_source
    from qwen_export.golden.reference import load_reference, reference_forward
    from qwen_export.passes.remove_unused import RemoveUnused

    preset = "tiny-qwen3.5-moe"
    model = exported(preset)
    for p in [*pipeline("ort"), QuantizeWeights(bits=4, block_size=block, accuracy_level=0), RemoveUnused()]:
        p(model)
    ids, _ = golden(preset).prefill(65)
    hf = load_reference(resolve_source(preset, None)[0])
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if param.ndim >= 2 and not any(s in name for s in ("embed_tokens", "conv1d", "norm")):
                w = param.numpy()
                q, s = quantize_blockwise(w.reshape(-1, w.shape[-1]), 4, 32 if "experts" in name else block)
                param.copy_(torch.from_numpy(dequantize_blockwise(q, s, 4, w.shape[-1]).reshape(w.shape)))
    expected = reference_forward(hf, ids)[0]
    from qwen_export.runtime.ort_decoder import OrtDecoder

    with tempfile.TemporaryDirectory() as tmp:
        logits = OrtDecoder(saved(model, tmp)).prefill(ids).logits
    assert float(np.abs(logits - expected).max()) < FP32_MAX_ABS


def _margins(logits: np.ndarray) -> np.ndarray:
    top2 = np.sort(logits.reshape(-1, logits.shape[-1]), -1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def _check_against_golden(ours: np.ndarray, ref: np.ndarray, bits: int, what: str) -> dict:
    tol = tolerance_for(f"int{bits}", random_weights=True)  # the tiny presets' random weights
    m = compare_logits(ours, ref)
    assert m["top1_agreement"] >= tol["top1_min"], (what, m)
    assert m["kl_mean"] <= tol["kl_mean_max"], (what, m)
    assert m["max_abs"] <= tol["logits_max_abs"], (what, m)
    flat_ours, flat_ref = ours.reshape(-1, ours.shape[-1]), ref.reshape(-1, ref.shape[-1])
    decisive = _margins(ref) > MARGIN[bits]
    flipped = (flat_ours.argmax(-1) != flat_ref.argmax(-1)) & decisive
    assert not flipped.any(), (what, "top-1 flipped where the golden margin exceeds", MARGIN[bits])
    return m


@pytest.mark.parametrize("target", ["ort-int4", "ort-int8", "ort-cpu-int4"])
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_tiny_quantized_model_against_golden(preset, target):
    from qwen_export.runtime.ort_decoder import OrtDecoder, positions_from_mask

    bits, g = BITS[target], golden(preset)
    model, _ = lowered(preset, target)
    with tempfile.TemporaryDirectory() as tmp:
        decoder = OrtDecoder(saved(model, tmp))
        for length in PROMPT_LENGTHS:
            ids, ref = g.prefill(length)
            _check_against_golden(decoder.prefill(ids).logits, ref, bits, f"prefill {length}")
        # Decode through the carried states, fed the golden tokens (teacher forcing): step logits.
        ids = g.greedy_prompt
        mask = np.ones_like(ids)
        out = decoder.prefill(ids, mask)
        states, steps = out.states, [out.logits[:, -1]]
        for t in range(g.greedy_tokens.shape[1] - 1):
            token = g.greedy_tokens[:, t : t + 1]
            position = positions_from_mask(mask)[:, -1:] + 1
            mask = np.concatenate([mask, np.ones_like(token)], axis=1)
            out = decoder.step(token, mask, position, states)
            states = out.states
            steps.append(out.logits[:, -1])
        _check_against_golden(np.stack(steps, axis=1), g.greedy_logits, bits, "decode steps")
        # Free-running greedy: identical up to the first golden step whose lead is a near-tie.
        tokens, _ = decoder.greedy(g.greedy_prompt, g.greedy_tokens.shape[1])
        near_tie = np.flatnonzero(_margins(g.greedy_logits) <= MARGIN[bits])
        first_tie = int(near_tie[0]) if near_tie.size else g.greedy_tokens.shape[1]
        assert agreement_length(tokens[0], g.greedy_tokens[0]) >= first_tie


def test_int4_artifact_runs_in_the_runtime_and_diff_uses_int4_tolerances(tmp_path):
    from qwen_export.build import build
    from qwen_export.diff import diff_artifact
    from qwen_export.golden.store import repo_golden_dir
    from qwen_export.runtime.session import Session

    result = build(tmp_path / "int4", preset="tiny-qwen3.5-moe", target="ort-int4", check=True)
    out = result.out_dir
    # --check holds the fp32 stages to 2e-4 and, from quantize-weights on, the int4 max |Δ| on logits
    stages = {r.name: r.numerics.tolerance for r in result.report.records}
    assert stages["lower-ort"] == FP32_MAX_ABS
    assert stages["quantize-weights"] == tolerance_for("int4")["logits_max_abs"]
    assert result.check_passed and result.manifest["check"]["passed"]
    (out / "model.onnx.data").unlink()
    with pytest.raises(QwenExportError, match="model.onnx.data is missing"):
        Session.load(out)
    out = build(tmp_path / "int4", preset="tiny-qwen3.5-moe", target="ort-int4").out_dir
    session = Session.load(out)
    assert session.artifact.target == "ort-int4"
    result = session.generate([[1, 2, 3], [4, 5]], 4)
    assert [len(t) for t in result.tokens] == [4, 4]
    report = diff_artifact(out, against=repo_golden_dir("tiny-qwen3.5-moe"))
    assert report.precision == "int4" and report.tolerances == tolerance_for("int4", random_weights=True)
    assert report.passed, report.to_json()


def test_validate_points_a_quantized_artifact_to_diff(tmp_path):
    from typer.testing import CliRunner

    from qwen_export.build import build
    from qwen_export.cli import app
    from qwen_export.golden.store import repo_golden_dir

    out = build(tmp_path / "int8", preset="tiny-qwen3.5", target="ort-int8").out_dir
    result = CliRunner().invoke(app, ["validate", str(out), "--golden", str(repo_golden_dir("tiny-qwen3.5"))])
    assert result.exit_code == 2
    assert "an artifact in int8" in result.output and f"qwen-export diff {out}" in result.output
