"""Batched multimodal prompts (different media and lengths, left padded into one text-graph batch) and
`Session` on a multimodal artifact, against each prompt run alone and against transformers' `generate`, on
the local checkpoints of tests/multimodal_support.py (fixtures in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from multimodal_support import write_images

from qwen_export.errors import QwenExportError
from qwen_export.golden.reference import load_reference
from qwen_export.runtime.multimodal import MultimodalPrompt, MultimodalRunner, run_multimodal_batch
from qwen_export.runtime.session import Session
from qwen_export.tolerances import FP32_MAX_ABS

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def prompts(multimodal_images, tmp_path_factory) -> list[MultimodalPrompt]:
    """An image prompt, a 2-frame video prompt and a two-image prompt (a tall third image), all of
    different lengths."""
    tall = write_images(tmp_path_factory.mktemp("tall"), {"c": (40, 24)}, seed=5)["c"]
    img = multimodal_images
    return [
        MultimodalPrompt("describe the picture in a few words", images=[img["a"]]),
        MultimodalPrompt("what happens?", videos=[[img["f0"], img["f1"]]]),
        MultimodalPrompt("which is brighter", images=[img["b"], tall]),
    ]


@pytest.fixture(scope="module")
def case(multimodal_export, prompts):
    """(checkpoint, artifact, runner, each prompt's processor arrays, the batch's results)."""
    folder, result = multimodal_export
    runner = MultimodalRunner(result.out_dir, optimize=False)
    rows = [runner.prompt_arrays(p) for p in prompts]
    batch = runner.generate_batch(runner.build_batch(rows), NEW_TOKENS)
    return folder, result.out_dir, runner, rows, batch


def test_batch_rows_match_each_prompt_alone_and_transformers(case):
    folder, _, runner, rows, batch = case
    lengths = [r["input_ids"].shape[1] for r in rows]
    assert len(set(lengths)) == 3  # every row but the longest is left padded
    assert [r.prompt_tokens for r in batch] == lengths
    assert [len(r.image_grids) for r in batch] == [1, 0, 2] and batch[1].video_grids == [[1, 10, 10]]
    model = load_reference(folder)
    for arrays, got in zip(rows, batch, strict=True):
        alone = runner.generate(runner.build_inputs(arrays), NEW_TOKENS)
        assert got.tokens == alone.tokens and len(got.tokens) == NEW_TOKENS
        assert got.prefill_logits.shape == alone.prefill_logits.shape
        assert np.abs(got.prefill_logits[0, -1] - alone.prefill_logits[0, -1]).max() <= FP32_MAX_ABS
        with torch.no_grad():
            generated = model.generate(
                **{k: torch.from_numpy(v) for k, v in arrays.items()},
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=0,
                eos_token_id=None,
            )
        assert got.tokens == generated[0, arrays["input_ids"].shape[1] :].tolist()


def test_each_row_stops_at_its_own_stop_token(case):
    _, _, runner, rows, batch = case
    stop = batch[1].tokens[2]
    stopped = runner.generate_batch(runner.build_batch(rows), NEW_TOKENS, stop_tokens=[stop])
    for free, got in zip(batch, stopped, strict=True):
        cut = free.tokens.index(stop) + 1 if stop in free.tokens else NEW_TOKENS
        assert got.tokens == free.tokens[:cut]


def test_session_on_a_multimodal_artifact(case, prompts):
    _, artifact, _, _, batch = case
    session = Session.load(artifact)
    assert session.multimodal is not None
    result = session.generate(prompts, NEW_TOKENS)
    assert result.tokens == [r.tokens for r in batch]
    assert result.texts is not None and all(isinstance(t, str) for t in result.texts)
    assert result.timings["vision_and_embed_s"] > 0
    streamed = [step.tolist() for step in session.stream(prompts[:1], 4)]
    assert [s[0] for s in streamed] == batch[0].tokens[:4]
    # The library entry point runs the same batch.
    again = run_multimodal_batch(artifact, prompts, NEW_TOKENS, stop_tokens=())
    assert [r.tokens for r in again] == result.tokens


def test_bad_batches_get_one_line_errors(case, prompts, multimodal_images):
    _, artifact, runner, _, _ = case
    session = Session.load(artifact)
    bad = [prompts[0], MultimodalPrompt("<|image_pad|> what is this?")]  # a placeholder, no image
    ids = runner.batch_arrays([prompts[0], [1, 2, runner.vspec.image_token_id]])  # the same, as token ids
    errors = {
        "prompt 1: .*no images": lambda: session.generate(bad, 4),
        "prompt 1: the prompt has image placeholder tokens but no image": lambda: runner.build_batch(ids),
        "decoding runs on text artifacts": lambda: session.generate(prompts, 4, speculative=2),
        "at least 2 frames": lambda: session.generate(
            [MultimodalPrompt("x", videos=[[multimodal_images["f0"]]])], 4
        ),
        "not found": lambda: session.generate([MultimodalPrompt("x", images=[Path("missing.png")])], 4),
        "pass at least one prompt": lambda: runner.build_batch([]),
        "use generate_batch": lambda: runner.generate(
            runner.build_batch([runner.prompt_arrays(p) for p in prompts]), 4
        ),
    }
    for message, call in errors.items():
        with pytest.raises(QwenExportError, match=message) as raised:
            call()
        assert "\n" not in str(raised.value)


def test_cli_run_text_only_on_a_multimodal_artifact(case):
    """Without --image the prompt goes through embed.onnx and the text graph (text mRoPE positions)."""
    from typer.testing import CliRunner

    from qwen_export.cli import app

    _, artifact, _, _, _ = case
    out = CliRunner().invoke(app, ["run", str(artifact), "--prompt", "hi", "--max-new-tokens", "4", "--json"])
    assert out.exit_code == 0, out.output
    session = Session.load(artifact)
    assert (
        json.loads(out.output.strip().splitlines()[-1])["ids"]
        == session.generate([session.encode("hi")], 4).tokens[0]
    )
