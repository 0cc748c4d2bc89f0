"""The generation runtime against Hugging Face `generate` (greedy, token for token), plus its input checks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from qwen_export.errors import QwenExportError
from qwen_export.exporter.export import export_model
from qwen_export.golden.reference import load_reference, reference_greedy
from qwen_export.golden.store import make_prompt
from qwen_export.presets import materialize
from qwen_export.runtime.sampling import SamplingConfig
from qwen_export.runtime.session import Session

from checkpoints import LOCAL_CLASSES, make_local_checkpoint

NEW_TOKENS = 64
LENGTHS = [23, 5, 64, 1]  # a batch of 4 prompts of different lengths (left padded)


def hf_batch_greedy(model, prompts, n):
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    tokens, _ = reference_greedy(model, ids, n, attention_mask=mask)
    return tokens.tolist()


def check_against_hf(session: Session, model) -> None:
    prompt = make_prompt(512, 17, seed=21)[0].tolist()
    single = session.generate([prompt], NEW_TOKENS)
    assert single.tokens == hf_batch_greedy(model, [prompt], NEW_TOKENS)
    prompts = [make_prompt(512, n, seed=30 + n)[0].tolist() for n in LENGTHS]
    batch = session.generate(prompts, NEW_TOKENS)
    assert batch.tokens == hf_batch_greedy(model, prompts, NEW_TOKENS)


@pytest.fixture(scope="module")
def artifact(tiny_moe_export):
    return tiny_moe_export


@pytest.mark.parametrize("preset", ["tiny-qwen3.5-moe", "tiny-qwen3-next", "tiny-qwen3.5"])
def test_greedy_generation_equals_hf_generate(tmp_path, preset):
    out = export_model(tmp_path / "a", preset=preset).out_dir
    check_against_hf(Session.load(out), load_reference(materialize(preset)))


@pytest.mark.parametrize("architecture", ["Qwen3_5MoeForConditionalGeneration", "Qwen3NextForCausalLM"])
def test_greedy_generation_equals_hf_generate_local(tmp_path, architecture):
    assert architecture in LOCAL_CLASSES
    folder = make_local_checkpoint(architecture, tmp_path / "ckpt")
    out = export_model(tmp_path / "a", model_dir=folder).out_dir
    check_against_hf(Session.load(out), load_reference(folder))


def test_streaming_yields_the_same_tokens(artifact):
    session = Session.load(artifact)
    prompt = make_prompt(512, 9)[0].tolist()
    streamed = [int(t[0]) for t in session.stream([prompt], 12)]
    assert streamed == session.generate([prompt], 12).tokens[0]


def test_stop_tokens_end_a_row(artifact):
    session = Session.load(artifact)
    prompt = make_prompt(512, 9)[0].tolist()
    free = session.generate([prompt], 12).tokens[0]
    stop = free[4]
    stopped = session.generate([prompt], 12, stop_tokens=[stop]).tokens[0]
    assert stopped == free[: free.index(stop) + 1]


def test_sampling_is_seeded_and_filters_work(artifact):
    session = Session.load(artifact)
    prompt = [make_prompt(512, 9)[0].tolist()] * 2
    greedy = session.generate(prompt, 10).tokens
    a = session.generate(prompt, 10, SamplingConfig(greedy=False, temperature=1.5, seed=3)).tokens
    b = session.generate(prompt, 10, SamplingConfig(greedy=False, temperature=1.5, seed=3)).tokens
    c = session.generate(prompt, 10, SamplingConfig(greedy=False, temperature=1.5, seed=4)).tokens
    assert a == b and a != c and a != greedy
    # top-k 1 and a tiny nucleus both collapse to the most likely token.
    assert session.generate(prompt, 10, SamplingConfig(greedy=False, top_k=1, seed=1)).tokens == greedy
    assert session.generate(prompt, 10, SamplingConfig(greedy=False, top_p=1e-6, seed=1)).tokens == greedy


SAMPLING_OPTIONS = [["--temperature", "0.7"], ["--top-k", "5"], ["--top-p", "0.9"], ["--seed", "1"]]


@pytest.mark.parametrize("option", SAMPLING_OPTIONS, ids=[o[0] for o in SAMPLING_OPTIONS])
def test_run_refuses_sampling_options_without_sample(artifact, option):
    from typer.testing import CliRunner

    from qwen_export.cli import app

    args = ["run", str(artifact), "--ids", "1,2,3", "--max-new-tokens", "2", *option]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2
    assert f"{option[0]} only apply to sampling: add --sample" in refused.output
    sampled = CliRunner().invoke(app, [*args, "--sample", "--json"])
    assert sampled.exit_code == 0, sampled.output
    assert len(json.loads(sampled.stdout.strip().splitlines()[-1])["ids"]) == 2
    speculative = CliRunner().invoke(app, [*args, "--speculative", "1"])  # greedy only: drop, not add
    assert speculative.exit_code == 2
    assert f"--speculative decodes greedily (lossless); drop {option[0]}" in speculative.output


@pytest.mark.parametrize("option", ["--ids", "--stop"])
def test_run_names_a_malformed_token_id_list(artifact, option):
    from typer.testing import CliRunner

    from qwen_export.cli import app

    args = ["run", str(artifact), "--ids", "1,2", option, "1,x"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2
    assert f"{option} '1,x': token ids are comma-separated integers" in refused.output


def test_timings_are_reported(artifact):
    result = Session.load(artifact).generate([[1, 2, 3]], 8)
    assert result.time_to_first_token_s > 0 and result.decode_tokens_per_s > 0


def test_ids_outside_vocabulary(artifact):
    with pytest.raises(QwenExportError, match="token id 512 is outside the vocabulary"):
        Session.load(artifact).generate([[1, 512]], 4)


def test_incomplete_artifact(tmp_path, artifact):
    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    (broken / "model.onnx.data").unlink()
    with pytest.raises(QwenExportError, match="model.onnx.data is missing"):
        Session.load(broken)


def test_artifact_from_another_version(tmp_path, artifact):
    broken = tmp_path / "broken"
    shutil.copytree(artifact, broken)
    info = json.loads((broken / "export.json").read_text())
    info["format"] = "qwen-export/export@99"
    (broken / "export.json").write_text(json.dumps(info))
    with pytest.raises(QwenExportError, match="another qwen-export version"):
        Session.load(broken)


def test_engine_artifact_without_gpu_says_so(tmp_path):
    folder = tmp_path / "engine-artifact"
    folder.mkdir()
    (folder / "manifest.json").write_text(
        json.dumps(
            {
                "format": "qwen-export/build@1",
                "target": "trt-rtx",
                "engines": {"sm89": {"path": "engines/sm89/model.engine"}},
            }
        )
    )
    with pytest.raises(QwenExportError, match="GPU|tensorrt_rtx"):
        Session.load(folder)


def test_decode_loop_feeds_the_mask_and_positions_of_a_grown_prompt():
    """Each step of the shared decode loop gets the mask the prompt's grows to and its new tokens' positions,
    as positions_from_mask counts them over that mask (left padding), without concatenating: every step's
    mask is a view of one buffer."""
    from qwen_export.runtime.decoding import sample_stream
    from qwen_export.runtime.ort_decoder import positions_from_mask

    mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]], np.int64)
    vocab, masks, positions_fed = 7, [], []

    def step(tokens, step_mask, positions, states):
        masks.append(step_mask)
        positions_fed.append(positions.copy())
        return np.eye(vocab)[tokens[:, 0] + 1], states

    steps = list(sample_stream(lambda: (np.eye(vocab)[[0, 1, 2]], None), step, mask, 5))
    assert len(steps) == 5 and len(masks) == 4
    assert all(np.shares_memory(m, masks[-1]) for m in masks)
    grown = mask
    for step_mask, positions in zip(masks, positions_fed, strict=True):
        grown = np.concatenate([grown, np.ones((3, 1), np.int64)], axis=1)
        np.testing.assert_array_equal(step_mask, grown)
        np.testing.assert_array_equal(positions, positions_from_mask(grown)[:, -1:])
