"""The pass pipeline on local checkpoints of every supported class (not only presets): one qwen op per block,
nothing of a block left over, and both lowerings against the live transformers reference (fp32, 2e-4)."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import onnx_ir as ir
import pytest

from qwen_export.build import build
from qwen_export.golden.reference import load_reference, reference_forward, reference_greedy
from qwen_export.golden.store import make_prompt
from qwen_export.passes.functions import qwen_op_counts
from qwen_export.runtime.ort_decoder import OrtDecoder
from qwen_export.tolerances import FP32_MAX_ABS

from checkpoints import LOCAL_CLASSES, make_local_checkpoint

TOL = FP32_MAX_ABS
GENAI_BUILDER_NODES_4_LAYERS = (
    154  # onnxruntime-genai 0.18.0 on the 4-layer tiny Qwen3.5-MoE (docs/ort-lowering.md)
)
# Scopes of fused blocks: no standard op under them may remain in the fused top graph.
FUSED_SCOPE = re.compile(
    r"^/layers\.(\d+)/(linear_attn|self_attn|input_layernorm|post_attention_layernorm|mlp)/"
)


LENGTHS = (1, 63, 64, 65, 200)


@pytest.fixture(scope="module", params=sorted(LOCAL_CLASSES))
def case(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    folder = make_local_checkpoint(request.param, root / "ckpt", seed=11)
    outs = {t: build(root / t, model_dir=folder, target=t).out_dir for t in ("fused", "onnx", "ort")}
    model = load_reference(folder)
    prompts = {n: make_prompt(512, n, seed=8) for n in LENGTHS}
    refs = {n: reference_forward(model, ids)[0] for n, ids in prompts.items()}
    greedy_prompt = make_prompt(512, 16, seed=9)
    return folder, outs, model, (prompts, refs, greedy_prompt, *reference_greedy(model, greedy_prompt, 32))


def test_one_qwen_op_per_block(case):
    folder, outs, model, _ = case
    fused = ir.load(outs["fused"] / "model.onnx")
    text = model.config.get_text_config()
    kinds = Counter(text.layer_types)
    moe_layers = _mlp_types(model).count("moe")
    counts = qwen_op_counts(fused)
    assert dict(counts["top"]) == {
        k: v
        for k, v in {
            "RMSNorm": 2 * text.num_hidden_layers + 1,
            "GatedDeltaNet": kinds["linear_attention"],
            "GatedAttention": kinds["full_attention"],
            "MoE": moe_layers,
        }.items()
        if v
    }
    mlp = _mlp_types(model)
    leftovers = [
        n.name
        for n in fused.graph
        if n.domain == ""
        and (m := FUSED_SCOPE.match(n.name or ""))
        and not (m.group(2) == "mlp" and mlp[int(m.group(1))] == "dense")  # dense MLPs are not a qwen op
    ]
    assert not leftovers, f"ops of fused blocks left in the top graph: {leftovers[:5]}"


def _mlp_types(model) -> list[str]:
    return (
        ["moe" if hasattr(layer.mlp, "experts") else "dense" for layer in model.model.language_model.layers]
        if hasattr(model.model, "language_model")
        else ["moe" if hasattr(layer.mlp, "experts") else "dense" for layer in model.model.layers]
    )


@pytest.mark.parametrize("target", ["onnx", "ort"])
def test_lowering_matches_reference(case, target):
    _, outs, _, (prompts, refs, greedy_prompt, ref_tokens, ref_logits) = case
    decoder = OrtDecoder(outs[target] / "model.onnx")
    for length, ids in prompts.items():
        assert np.abs(decoder.prefill(ids).logits - refs[length]).max() <= TOL, f"{target} prefill {length}"
    tokens, logits = decoder.greedy(greedy_prompt, 32)
    np.testing.assert_array_equal(tokens, ref_tokens)
    assert np.abs(logits - ref_logits).max() <= TOL


def test_ort_graph_is_no_larger_than_genai_builders(case):
    _, outs, _, _ = case
    nodes = len(ir.load(outs["ort"] / "model.onnx").graph)
    assert nodes <= GENAI_BUILDER_NODES_4_LAYERS
