"""Numerics before and after each pipeline (ONNX Runtime CPU, graph optimizations off) against the HF
golden reference: prefill logits at prompt lengths 1, 63, 64, 65, 200, the states after 200 tokens, and 32
greedy tokens decoded through the carried states. Tolerance 2e-4 (fp32)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from passes_support import TINY_PRESETS, TOL, exported, golden, max_abs

from qwen_export.golden.reference import load_reference, reference_forward
from qwen_export.golden.store import make_prompt
from qwen_export.passes.manager import PassManager
from qwen_export.presets import materialize
from qwen_export.runtime.ort_decoder import OrtDecoder, positions_from_mask
from qwen_export.targets import pipeline

pytestmark = pytest.mark.usefixtures("verify_every_pass")

LENGTHS = (1, 63, 64, 65, 200)
STAGES = ["export", "fused", "onnx"]  # before any pass; qwen ops as functions; lowered to standard ONNX


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    cache: dict[tuple[str, str], OrtDecoder] = {}

    def get(preset: str, stage: str) -> OrtDecoder:
        if (preset, stage) not in cache:
            model = exported(preset)
            if stage != "export":
                model, report = PassManager(pipeline(stage)).run(model)
                assert all(r.verified for r in report.records)
            path = tmp_path_factory.mktemp(f"{preset}-{stage}") / "model.onnx"
            ir.save(model, path, external_data="model.onnx.data")
            cache[preset, stage] = OrtDecoder(path)
        return cache[preset, stage]

    return get


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_prefill_logits_and_states_match_golden(decoder, preset, stage):
    d, g = decoder(preset, stage), golden(preset)
    for length in LENGTHS:
        ids, ref = g.prefill(length)
        out = d.prefill(ids)
        assert max_abs(out.logits, ref) <= TOL, f"prefill {length}"
    states = g.final_states()
    assert set(out.states) == set(states)
    for suffix, ref_state in states.items():
        assert max_abs(out.states[suffix], ref_state) <= TOL, suffix


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_greedy_decode_through_states_matches_golden(decoder, preset, stage):
    d, g = decoder(preset, stage), golden(preset)
    tokens, step_logits = d.greedy(g.greedy_prompt, g.greedy_tokens.shape[1])
    np.testing.assert_array_equal(tokens, g.greedy_tokens)
    assert max_abs(step_logits, g.greedy_logits) <= TOL


@pytest.fixture(scope="module")
def padded_batch():
    """Prompts of lengths 65, 40, 7 left-padded into one batch, with each prompt's own HF logits."""
    model = load_reference(materialize("tiny-qwen3.5-moe"))
    prompts = [make_prompt(512, n, seed=5) for n in (65, 40, 7)]
    width = max(p.shape[1] for p in prompts)
    ids, mask = np.zeros((3, width), np.int64), np.zeros((3, width), np.int64)
    for row, p in enumerate(prompts):
        ids[row, width - p.shape[1] :], mask[row, width - p.shape[1] :] = p[0], 1
    return ids, mask, [reference_forward(model, p)[0] for p in prompts]


@pytest.mark.parametrize("stage", ["fused", "onnx"])
def test_left_padded_batch_matches_reference(decoder, padded_batch, stage):
    """The mask lives in the fused bodies now (sequence length from X): each row gives its own logits."""
    d = decoder("tiny-qwen3.5-moe", stage)
    ids, mask, refs = padded_batch
    out = d.step(ids, mask, positions_from_mask(mask), d.empty_states(3))
    for row, ref in enumerate(refs):
        assert max_abs(out.logits[row : row + 1, ids.shape[1] - ref.shape[1] :], ref) <= TOL, f"row {row}"
