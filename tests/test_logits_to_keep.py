"""The `logits_to_keep` input of the CPU-kernel targets (passes/logits_to_keep.py): by default every
position's logits, as before; N keeps the last N; the runtime's generation steps ask for one and decode the
same tokens."""

from __future__ import annotations

import numpy as np
import pytest

from qwen_export.build import build
from qwen_export.runtime.ort_decoder import OrtDecoder, positions_from_mask
from qwen_export.runtime.session import Session


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return build(tmp_path_factory.mktemp("ltk") / "a", preset="tiny-qwen3.5-moe", target="ort-cpu-int4")


def test_the_pass_fired_and_the_input_defaults_to_every_position(artifact):
    record = next(p for p in artifact.manifest["passes"] if p["name"] == "logits-to-keep")
    assert record["modified"]
    decoder = OrtDecoder(artifact.model_path)
    assert decoder.keeps_logits
    ids = np.arange(3, 30)[None]
    assert decoder.prefill(ids).logits.shape == (1, 27, decoder.vocab_size)


@pytest.mark.parametrize("keep", [1, 5, 100])
def test_keeping_the_last_positions_gives_their_logits(artifact, keep):
    decoder = OrtDecoder(artifact.model_path)
    ids = np.stack([np.arange(3, 30), np.arange(40, 67)])
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions_from_mask(mask)}
    full = decoder.run_feeds(feeds, decoder.empty_states(2))
    kept = decoder.run_feeds({**feeds, "logits_to_keep": np.array(keep, np.int64)}, decoder.empty_states(2))
    np.testing.assert_allclose(kept.logits, full.logits[:, -keep:], rtol=0, atol=1e-5)
    for name, state in full.states.items():
        np.testing.assert_array_equal(kept.states[name], state)


def test_generation_asks_for_one_position_and_decodes_the_same_tokens(artifact):
    decoder = OrtDecoder(artifact.model_path)
    prompt = np.arange(5, 45)[None]
    tokens, _ = decoder.greedy(prompt, 12)  # full logits at every step
    session = Session.load(artifact.out_dir)
    assert session.generate([prompt[0].tolist()], 12).tokens == tokens.tolist()
    assert session.generate([prompt[0].tolist()], 12, speculative=2).tokens == tokens.tolist()
