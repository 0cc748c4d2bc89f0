"""The exported graph (ONNX Runtime CPU, optimizations off) against the Hugging Face reference (fp32).

Tolerance: max |Δ| <= FP32_MAX_ABS on logits and states; greedy tokens identical.
"""

from __future__ import annotations

import numpy as np
import pytest

from qwen_export.exporter.export import export_model
from qwen_export.golden.reference import cache_states, load_reference, reference_forward, reference_greedy
from qwen_export.golden.store import PROMPT_LENGTHS, load_golden, make_prompt, repo_golden_dir
from qwen_export.presets import materialize
from qwen_export.runtime.ort_decoder import OrtDecoder, positions_from_mask
from qwen_export.tolerances import FP32_MAX_ABS

TOL = FP32_MAX_ABS
TINY_PRESETS = ["tiny-qwen3.5-moe", "tiny-qwen3-next", "tiny-qwen3.5"]


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cache: dict[str, tuple[OrtDecoder, object]] = {}

    def get(preset: str):
        if preset not in cache:
            result = export_model(tmp_path_factory.mktemp(preset), preset=preset)
            cache[preset] = (OrtDecoder(result.model_path), load_reference(materialize(preset)))
        return cache[preset]

    return get


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_prefill_logits_and_states_match_golden(exported, preset):
    decoder, _ = exported(preset)
    golden = load_golden(repo_golden_dir(preset))
    for length in PROMPT_LENGTHS:
        ids, ref = golden.prefill(length)
        out = decoder.prefill(ids)
        assert max_abs(out.logits, ref) <= TOL, f"prefill length {length}"
    for suffix, ref_state in golden.final_states().items():
        assert max_abs(out.states[suffix], ref_state) <= TOL, suffix


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_batch_of_three_matches_reference(exported, preset):
    decoder, model = exported(preset)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 512, size=(3, 65))
    ref, _ = reference_forward(model, ids)
    assert max_abs(decoder.prefill(ids).logits, ref) <= TOL


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_greedy_decode_through_states_matches_reference(exported, preset):
    decoder, model = exported(preset)
    golden = load_golden(repo_golden_dir(preset))
    tokens, step_logits = decoder.greedy(golden.greedy_prompt, 32)
    np.testing.assert_array_equal(tokens, golden.greedy_tokens)
    assert max_abs(step_logits, golden.greedy_logits) <= TOL
    # Each decode step against a full recompute of prompt + generated tokens.
    full = np.concatenate([golden.greedy_prompt, tokens[:, :-1]], axis=1)
    recomputed, _ = reference_forward(model, full)
    prompt_len = golden.greedy_prompt.shape[1]
    assert max_abs(step_logits, recomputed[:, prompt_len - 1 :]) <= TOL


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_prefill_continuing_from_carried_state(exported, preset):
    """40 tokens, then 30 more from the carried states (crossing the 64-token chunk boundary)."""
    decoder, model = exported(preset)
    ids = make_prompt(512, 70, seed=99)
    ref, cache = reference_forward(model, ids)
    first = decoder.prefill(ids[:, :40])
    mask = np.ones((1, 70), np.int64)
    second = decoder.step(ids[:, 40:], mask, np.arange(40, 70)[None], first.states)
    assert max_abs(second.logits, ref[:, 40:]) <= TOL
    layer_types = model.config.get_text_config().layer_types
    for suffix, ref_state in cache_states(cache, layer_types).items():
        assert max_abs(second.states[suffix], ref_state) <= TOL, suffix


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_left_padded_batch_matches_unpadded_reference(exported, preset):
    """Prompts of lengths 65, 40 and 7 left-padded into one batch give each prompt's own logits."""
    decoder, model = exported(preset)
    lengths = [65, 40, 7]
    prompts = [make_prompt(512, n, seed=5) for n in lengths]
    width = max(lengths)
    ids = np.zeros((3, width), np.int64)
    mask = np.zeros((3, width), np.int64)
    for row, p in enumerate(prompts):
        ids[row, width - p.shape[1] :] = p[0]
        mask[row, width - p.shape[1] :] = 1
    out = decoder.step(ids, mask, positions_from_mask(mask), decoder.empty_states(3))
    for row, p in enumerate(prompts):
        ref, _ = reference_forward(model, p)
        assert max_abs(out.logits[row : row + 1, width - p.shape[1] :], ref) <= TOL, f"row {row}"


def test_greedy_matches_hf_generate_live(exported):
    """Not only the stored golden: HF `generate` run now gives the same tokens."""
    decoder, model = exported("tiny-qwen3.5-moe")
    prompt = make_prompt(512, 9, seed=11)
    ref_tokens, _ = reference_greedy(model, prompt, 32)
    tokens, _ = decoder.greedy(prompt, 32)
    np.testing.assert_array_equal(tokens, ref_tokens)
