"""The MTP draft graph (mtp.onnx) against the PyTorch reference of the MTP layer (golden/mtp.py, after
vLLM's and SGLang's qwen3_5_mtp.py), on ONNX Runtime with graph optimizations off.

The reference runs whole sequences from an empty cache; the draft graph runs the same pairs in two pieces
(a prefix, then the rest through its KV cache), so the cache handling is checked as well as the math."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qwen_export.artifact import DRAFT_FILE, MODEL_FILE
from qwen_export.errors import CheckpointError
from qwen_export.exporter.export import export_model
from qwen_export.golden.mtp import load_mtp_reference, reference_draft
from qwen_export.golden.reference import load_reference
from qwen_export.presets import materialize
from qwen_export.runtime.ort_decoder import OrtDecoder, positions_from_mask
from qwen_export.tolerances import FP32_MAX_ABS

MTP_PRESETS = ("tiny-qwen3.5-moe", "tiny-qwen3.5", "tiny-qwen3-next")


@pytest.fixture(scope="module", params=MTP_PRESETS)
def preset_export(request, tmp_path_factory):
    out = export_model(tmp_path_factory.mktemp("mtp") / request.param, preset=request.param)
    return request.param, out.out_dir


def _prompts(vocab: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Two rows, the second left-padded by 5."""
    rng = np.random.default_rng(7)
    ids = rng.integers(0, vocab, (2, length))
    mask = np.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    return ids, mask


def test_export_writes_the_draft_graph_and_the_main_hidden_states(preset_export):
    _, folder = preset_export
    info = json.loads((folder / "export.json").read_text())
    assert info["draft"]["graph"] == DRAFT_FILE and (folder / DRAFT_FILE).is_file()
    assert "hidden_states" in [o["name"] for o in info["io"]["outputs"]]
    assert "MTP (multi-token prediction) layers" not in info["checkpoint"]["left_out"]
    names = [i["name"] for i in info["draft"]["io"]["inputs"]]
    assert names[:4] == ["input_ids", "hidden_states", "attention_mask", "position_ids"]


@pytest.mark.parametrize("split", [1, 20])
def test_draft_graph_matches_the_reference(preset_export, split):
    preset, folder = preset_export
    _check_draft(folder, materialize(preset), split)


def test_an_fp8_checkpoints_draft_graph_matches_the_reference_on_its_dequantized_weights(tmp_path):
    """Qwen's FP8 release quantizes the MTP layer's projections and experts like the text tower's; the
    draft graph keeps them e4m3 behind blocked DequantizeLinear (--weights fp8)."""
    from qwen_export.fp8_checkpoint import quantize_checkpoint

    fp8_dir = quantize_checkpoint(materialize("tiny-qwen3.5-moe"), tmp_path / "fp8")
    out = export_model(tmp_path / "out", model_dir=fp8_dir, dtype="fp32", weights="fp8").out_dir
    _check_draft(out, fp8_dir, 20)


def _check_draft(folder, model_dir, split: int) -> None:
    model = load_reference(model_dir)
    mtp = load_mtp_reference(model_dir, model)
    ids, mask = _prompts(model.config.vocab_size, 40)
    hidden_ref, draft_hidden_ref, draft_logits_ref = reference_draft(model, mtp, ids, mask)

    main = OrtDecoder(folder / MODEL_FILE).prefill(ids, mask)
    np.testing.assert_allclose(main.extra["hidden_states"], hidden_ref, atol=FP32_MAX_ABS, rtol=0)

    draft = OrtDecoder(folder / DRAFT_FILE)
    positions = positions_from_mask(mask)[:, :-1]
    pair_mask, hidden = mask[:, :-1], main.extra["hidden_states"][:, :-1]
    states, logits, draft_hidden = draft.empty_states(2), [], []
    for lo, hi in ((0, split), (split, ids.shape[1] - 1)):
        out = draft.run_feeds(
            {
                "input_ids": ids[:, 1:][:, lo:hi],
                "hidden_states": hidden[:, lo:hi],
                "attention_mask": pair_mask[:, :hi],
                "position_ids": positions[:, lo:hi],
            },
            states,
        )
        states = out.states
        logits.append(out.logits)
        draft_hidden.append(out.extra["draft_hidden_states"])
    real = pair_mask.astype(bool)  # padded pairs are not compared (their rows attend to nothing)
    np.testing.assert_allclose(
        np.concatenate(draft_hidden, 1)[real], draft_hidden_ref[real], atol=FP32_MAX_ABS, rtol=0
    )
    # The draft's logits are its last pair's (a draft token is sampled there): each piece's last.
    rows = real[:, split - 1]
    np.testing.assert_allclose(
        logits[0][rows, 0], draft_logits_ref[rows, split - 1], atol=FP32_MAX_ABS, rtol=0
    )
    np.testing.assert_allclose(logits[1][:, 0], draft_logits_ref[:, -1], atol=FP32_MAX_ABS, rtol=0)


@pytest.mark.parametrize("split", [1, 20])
def test_verify_graph_matches_the_reference(preset_export, split):
    """The verify graph (runtime/verify_graph.py: the main graph and the MTP layer in one run) against
    transformers and the MTP reference, run in two pieces through its states: the first piece's pairs take
    the prompt's next tokens (`next_ids`), the second's the main model's greedy tokens (next_ids -1)."""
    import torch

    from qwen_export.runtime.verify_graph import NEXT_IDS, PREDICTED_IDS, compose_verify_graph

    preset, folder = preset_export
    model = load_reference(materialize(preset))
    mtp = load_mtp_reference(materialize(preset), model)
    ids, mask = _prompts(model.config.vocab_size, 40)
    positions = positions_from_mask(mask)
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), output_hidden_states=True
        )
        greedy = out.logits.argmax(-1).numpy()
        pair_ids = np.concatenate([ids[:, 1 : split + 1], greedy[:, split:]], axis=1)
        draft_hidden_ref, draft_logits_ref = (
            t.float().numpy()
            for t in mtp(model, torch.as_tensor(pair_ids), out.hidden_states[-1], torch.as_tensor(positions),
                         torch.as_tensor(mask))
        )  # fmt: skip

    graph = compose_verify_graph(folder / MODEL_FILE, folder / DRAFT_FILE)
    verify = OrtDecoder(folder / MODEL_FILE, graph=graph)
    states, pieces = verify.empty_bound_states(2), []
    for lo, hi, next_ids in ((0, split, ids[:, 1 : split + 1]), (split, ids.shape[1], None)):
        feeds = {
            "input_ids": ids[:, lo:hi],
            "attention_mask": mask[:, :hi],
            "position_ids": positions[:, lo:hi],
            NEXT_IDS: np.full((2, hi - lo), -1) if next_ids is None else next_ids,
        }
        piece, states = verify.step_all_bound(feeds, states)
        pieces.append(piece)
    real = mask.astype(bool)  # padded positions attend to nothing: not compared
    for name, ref in (("draft_hidden_states", draft_hidden_ref), ("draft_logits", draft_logits_ref)):
        got = np.concatenate([p[name] for p in pieces], axis=1)
        np.testing.assert_allclose(got[real], ref[real], atol=FP32_MAX_ABS, rtol=0, err_msg=name)
    logits = out.logits.float().numpy()
    top2 = np.sort(logits, axis=-1)[..., -2:]
    clear = real & (top2[..., 1] - top2[..., 0] > 2 * FP32_MAX_ABS)  # no near-tie to flip
    assert clear.mean() > 0.9
    predicted = np.concatenate([p[PREDICTED_IDS] for p in pieces], axis=1)
    np.testing.assert_array_equal(predicted[clear], logits.argmax(-1)[clear])


def test_speculative_decoding_on_a_bf16_export_runs_its_verify_graph_emulated(tmp_path):
    """A bf16 graph runs in fp32 emulation on the CPU (runtime/emulation.py); the verify graph, composed in
    memory, goes through the same emulation and gives plain decoding's tokens."""
    from qwen_export.runtime.session import Session

    session = Session.load(export_model(tmp_path / "bf16", preset="tiny-qwen3.5-moe", dtype="bf16").out_dir)
    prompts = _batch_prompts(session.backend.vocab_size, 1)
    plain = session.generate(prompts, 32).tokens
    assert session.generate(prompts, 32, speculative=2).tokens == plain
    assert session.backend.emulated and session.verify.emulated


def test_verify_graph_needs_the_main_hidden_states(tmp_path):
    from qwen_export.errors import QwenExportError
    from qwen_export.runtime.verify_graph import compose_verify_graph

    with_mtp = export_model(tmp_path / "mtp", preset="tiny-qwen3.5-moe").out_dir
    without = export_model(tmp_path / "plain", model_dir=_without_mtp(tmp_path)).out_dir
    with pytest.raises(QwenExportError, match="no hidden_states output; re-export"):
        compose_verify_graph(without / MODEL_FILE, with_mtp / DRAFT_FILE)


def test_an_incomplete_mtp_layer_is_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    source = materialize("tiny-qwen3.5-moe")
    broken = tmp_path / "ckpt"
    broken.mkdir()
    (broken / "config.json").write_bytes((source / "config.json").read_bytes())
    tensors = {}  # the preset's shards (its MTP layer is a shard of its own) in one file
    for shard in sorted(source.glob("*.safetensors")):
        tensors |= load_file(shard)
    del tensors["mtp.layers.0.mlp.experts.3.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"mtp\.layers\.0\.mlp\.experts\.3\.up_proj\.weight"):
        export_model(tmp_path / "out", model_dir=broken)
    assert not (tmp_path / "out").exists()


def _batch_prompts(vocab: int, batch: int) -> list[list[int]]:
    rng = np.random.default_rng(11 + batch)
    return [rng.integers(0, vocab, 9 + 4 * row).tolist() for row in range(batch)]


@pytest.fixture(scope="module")
def preset_session(preset_export):
    from qwen_export.runtime.session import Session

    return Session.load(preset_export[1])


@pytest.fixture(scope="module")
def transformers_greedy(preset_export):
    """transformers' `generate`, greedy, 64 new tokens, for batch 1 and batch 4 (left-padded)."""
    from qwen_export.golden.reference import reference_greedy

    model = load_reference(materialize(preset_export[0]))
    tokens = {}
    for batch in (1, 4):
        prompts = _batch_prompts(model.config.vocab_size, batch)
        width = max(map(len, prompts))
        ids = np.array([[0] * (width - len(p)) + p for p in prompts])
        mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        tokens[batch] = (prompts, reference_greedy(model, ids, 64, mask)[0])
    return tokens


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_speculative_decoding_gives_the_greedy_tokens(preset_session, transformers_greedy, k, batch):
    prompts, expected = transformers_greedy[batch]
    plain = preset_session.generate(prompts, 64)
    assert plain.tokens == expected.tolist()
    speculative = preset_session.generate(prompts, 64, speculative=k)
    assert speculative.tokens == expected.tolist()
    report = speculative.speculative
    assert report["k"] == k and len(report["acceptance_per_position"]) == k


def test_both_rollbacks_give_the_greedy_tokens(preset_session, transformers_greedy):
    """ "recompute" reruns every partly rejected round; "refeed" folds that into the next verify step and
    recomputes only when the re-fed tokens pile up."""
    from qwen_export.runtime.speculative import SpeculativeStats

    prompts, expected = transformers_greedy[4]
    width = max(map(len, prompts))
    ids = np.array([[0] * (width - len(p)) + p for p in prompts])
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    recomputes = {}
    for rollback in ("refeed", "recompute"):
        decoder = preset_session.speculative_decoder(2, rollback=rollback)
        stats = SpeculativeStats(2)
        tokens = np.stack(list(decoder.stream(ids, mask, 64, stats=stats)), axis=1)
        assert tokens.tolist() == expected.tolist(), rollback
        recomputes[rollback] = stats.recompute_steps
    assert recomputes["refeed"] < recomputes["recompute"]


def _without_mtp(tmp_path):
    """The tiny MoE checkpoint with its MTP layer removed."""
    from safetensors.numpy import load_file, save_file

    source = materialize("tiny-qwen3.5-moe")
    folder = tmp_path / "no-mtp"
    folder.mkdir()
    (folder / "config.json").write_bytes((source / "config.json").read_bytes())
    tensors = load_file(source / "model.safetensors")  # the main shard: no mtp.* tensors in it
    save_file({k: v for k, v in tensors.items() if not k.startswith("mtp.")}, folder / "model.safetensors")
    return folder


def test_run_speculative_reports_acceptance_per_position(preset_export):
    from typer.testing import CliRunner

    from qwen_export.cli import app

    args = ["run", str(preset_export[1]), "--ids", "1,2,3,4", "--max-new-tokens", "16", "--json"]
    result = CliRunner().invoke(app, [*args, "--speculative", "3"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report["ids"]) == 16
    assert len(report["speculative"]["acceptance_per_position"]) == 3


@pytest.mark.parametrize("k", ["0", "9", "-1"])
def test_run_refuses_a_draft_length_outside_1_to_8(tiny_moe_export, k):
    from typer.testing import CliRunner

    from qwen_export.cli import app

    result = CliRunner().invoke(app, ["run", str(tiny_moe_export), "--ids", "1,2", "--speculative", k])
    assert result.exit_code == 2
    assert f"--speculative {k}: draft between 1 and 8" in result.output


def test_run_speculative_without_a_draft_graph_says_how_to_get_one(tmp_path):
    from typer.testing import CliRunner

    from qwen_export.cli import app

    folder = export_model(tmp_path / "out", model_dir=_without_mtp(tmp_path)).out_dir
    assert not (folder / DRAFT_FILE).exists()
    result = CliRunner().invoke(app, ["run", str(folder), "--ids", "1,2", "--speculative", "2"])
    assert result.exit_code == 2
    assert "no MTP draft graph (mtp.onnx)" in result.output and "mtp.* tensors" in result.output


@pytest.mark.parametrize("target", ["ort", "ort-cpu-int4"])
def test_build_carries_the_draft_graph_through_the_targets_passes(tmp_path, target):
    from qwen_export.build import build
    from qwen_export.runtime.session import Session

    result = build(tmp_path / target, preset="tiny-qwen3.5-moe", target=target)
    draft = result.manifest["draft"]
    assert draft["fused_ops"]["top"] == {"GatedAttention": 1, "MoE": 1, "RMSNorm": 5}
    assert DRAFT_FILE in result.manifest["files"]
    session = Session.load(result.out_dir)
    prompts = _batch_prompts(512, 4)
    plain = session.generate(prompts, 32)
    for k in (1, 3):
        assert session.generate(prompts, 32, speculative=k).tokens == plain.tokens


# --- the trained reference model (golden/trained-qwen3.5-moe) -------------------------------------------

TRAINED = "trained-qwen3.5-moe"


@pytest.fixture(scope="module")
def trained_export(tmp_path_factory):
    return export_model(tmp_path_factory.mktemp("trained") / "fp32", preset=TRAINED).out_dir


@pytest.fixture(scope="module")
def heldout_prompts():
    """Four held-out prompts of different lengths, tokenized with the model's own tokenizer."""
    from qwen_export.runtime.tokenizer import Tokenizer

    folder = materialize(TRAINED)
    ids = Tokenizer.find(folder).encode((folder / "heldout.txt").read_text())
    return [ids[i * 700 : i * 700 + 40 + 9 * i] for i in range(4)]


@pytest.mark.parametrize("batch", [1, 4])
def test_trained_model_speculative_decoding_gives_transformers_greedy_tokens(
    trained_export, heldout_prompts, batch
):
    from qwen_export.golden.reference import reference_greedy
    from qwen_export.runtime.session import Session

    prompts = heldout_prompts[:batch]
    width = max(map(len, prompts))
    ids = np.array([[0] * (width - len(p)) + p for p in prompts])
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    expected = reference_greedy(load_reference(materialize(TRAINED)), ids, 64, mask)[0].tolist()
    session = Session.load(trained_export)
    assert session.generate(prompts, 64).tokens == expected
    for k in (1, 2, 3):
        assert session.generate(prompts, 64, speculative=k).tokens == expected, k


@pytest.fixture(scope="module")
def trained_cpu_builds(tmp_path_factory):
    from qwen_export.build import build

    root = tmp_path_factory.mktemp("trained-cpu")
    return {t: build(root / t, preset=TRAINED, target=t).out_dir for t in ("ort-cpu-int4", "ort-cpu")}


def test_speculative_decoding_updates_the_states_in_place(trained_cpu_builds, monkeypatch, heldout_prompts):
    """On a graph whose ops update states in place (qwen.cpu), the verify step writes the DeltaNet states
    into a second set of buffers and its KV rows, the MTP layer's included, over the caches, and the draft
    steps write the MTP layer's KV cache in place (runtime/speculative.py). On the trained model's held-out
    text rounds both accept every draft (the buffers swap) and reject some; buffers are regrown every 3
    rows here, so rounds cross regrowths. The tokens equal the copying path's and plain decoding's, for
    every rollback (the copying path has no "snapshot": its states are not updated in place)."""
    from qwen_export.errors import QwenExportError
    from qwen_export.runtime import in_place
    from qwen_export.runtime.session import Session
    from qwen_export.runtime.speculative import ROLLBACKS, SpeculativeStats
    from qwen_export.runtime.verify_graph import POSITION_PREFIX

    session = Session.load(trained_cpu_builds["ort-cpu-int4"])
    assert session.speculative_decoder(2).rollback == "snapshot"  # composes the verify graph
    verify, draft = session.verify, session.draft
    deltanet = [s for s, grows in verify.in_place.items() if grows is False]
    assert len(deltanet) == 12, "DeltaNet states in place: six layers' conv and recurrent states"
    assert {n for n in verify.output_names if n.startswith(POSITION_PREFIX)} == {
        POSITION_PREFIX + s for s in deltanet
    }, "each with its states after every column"
    assert verify.in_place["mtp.0.key"] and verify.in_place["mtp.0.value"], "the MTP layer's KV cache too"
    assert draft.in_place and all(draft.in_place.values()), "the MTP layer's KV cache in place"
    monkeypatch.setattr(in_place, "GROW_ROWS", 3)
    prompts = heldout_prompts

    def speculative(rollback: str) -> list[list[int]]:
        """Each prompt at batch 1 (as `plain`: on an int4 graph a left-padded batch can round an int8
        activation differently and flip a near-tie): a round advances only when all of its batch's rows
        accept, so at batch 1 the rounds that accept every draft are common."""
        tokens, stats = [], SpeculativeStats(2)
        for prompt in prompts:
            ids = np.array([prompt])
            steps = session.speculative_decoder(2, rollback=rollback).stream(
                ids, np.ones_like(ids), 24, stats=stats
            )
            tokens.append([int(t[0]) for t in steps])
        assert 0 < stats.accepted[1] < stats.rounds, "rounds that accept both drafts, and others"
        return tokens

    plain = [session.generate([prompt], 24).tokens[0] for prompt in prompts]
    fast = {rollback: speculative(rollback) for rollback in ROLLBACKS}
    monkeypatch.setattr(verify, "in_place", {})
    monkeypatch.setattr(draft, "in_place", {})
    with pytest.raises(QwenExportError, match="rollback 'snapshot' needs"):
        session.speculative_decoder(2, rollback="snapshot")
    assert session.speculative_decoder(2).rollback == "refeed"
    assert fast.pop("snapshot") == plain
    for rollback, tokens in fast.items():
        assert tokens == plain == speculative(rollback), rollback


def test_step_tokens_is_the_kernels_width():
    """cpu_kernels.STEP_TOKENS (which runtime/speculative.py keeps its steps under) is kStepTokens of
    plugins/ort_cpu/common/step_tokens.h."""
    import re

    from qwen_export import cpu_kernels
    from qwen_export.runtime.speculative import STEP_TOKENS, max_refeed

    header = (cpu_kernels.SOURCE_DIR / "common" / "step_tokens.h").read_text()
    assert int(re.search(r"kStepTokens = (\d+);", header).group(1)) == STEP_TOKENS
    assert all(max_refeed(k) + k + 1 < STEP_TOKENS for k in range(1, 9)), "a verify step stays under it"


@pytest.mark.parametrize("target", ["ort-cpu-int4", "ort-cpu"])
def test_a_few_token_step_gives_the_bits_of_one_token_steps(trained_cpu_builds, heldout_prompts, target):
    """On the qwen.cpu graphs a step of up to STEP_TOKENS - 1 tokens (a verify step) gives every token the
    logits, hidden state and states that one-token steps give, bit for bit (the attention decode loops and
    the delta rule's recurrence per token; the int4 and fp32 products are the same per row)."""
    from qwen_export.runtime.speculative import STEP_TOKENS

    decoder = OrtDecoder(trained_cpu_builds[target] / MODEL_FILE, optimize=True)
    prompt = np.array([heldout_prompts[1]])
    width, new = prompt.shape[1], np.array([heldout_prompts[3][: STEP_TOKENS - 1]])

    def prefilled():
        mask = np.ones_like(prompt)
        return decoder.step_all_bound(
            {"input_ids": prompt, "attention_mask": mask, "position_ids": positions_from_mask(mask)},
            decoder.empty_bound_states(1),
        )[1]

    def feeds(first: int, count: int) -> dict[str, np.ndarray]:
        return {
            "input_ids": new[:, first : first + count],
            "attention_mask": np.ones((1, width + first + count), np.int64),
            "position_ids": np.arange(width + first, width + first + count)[None],
        }

    whole, whole_states = decoder.step_all_bound(feeds(0, new.shape[1]), prefilled())
    states, steps = prefilled(), []
    for i in range(new.shape[1]):
        out, states = decoder.step_all_bound(feeds(i, 1), states)
        steps.append(out)
    for name in ("logits", "hidden_states"):
        np.testing.assert_array_equal(whole[name], np.concatenate([o[name] for o in steps], axis=1), name)
    for suffix, value in whole_states.items():
        np.testing.assert_array_equal(value.numpy(), states[suffix].numpy(), suffix)


def test_int4_speculative_decoding_gives_plain_tokens_at_every_k(trained_cpu_builds):
    """ort-cpu-int4 (int8 activations, where a near-tie flips on the last bit): 128 tokens of greedy
    speculative decoding, k = 1, 2 and 3 and every rollback, equal plain decoding's, on the prompts of
    scripts/bench_speculative.py (before the few-token steps gave one-token bits, k = 3 left plain decoding's
    tokens on one of these prompts)."""
    from qwen_export.runtime.session import Session
    from qwen_export.runtime.speculative import ROLLBACKS

    session = Session.load(trained_cpu_builds["ort-cpu-int4"])
    ids = session.encode((materialize(TRAINED) / "heldout.txt").read_text())
    stride = (len(ids) - 64) // 4
    for prompt in (ids[i * stride : i * stride + 64] for i in range(4)):
        plain = session.generate([prompt], 128).tokens
        for k in (1, 2, 3):
            for rollback in ROLLBACKS:
                steps = session.speculative_decoder(k, rollback=rollback).stream(
                    np.array([prompt]), np.ones((1, 64), np.int64), 128
                )
                tokens = [int(t[0]) for t in steps]
                assert [tokens] == plain, (k, rollback)


def test_trained_mtp_first_draft_is_accepted_at_least_half_the_time_on_held_out_text(
    trained_export, heldout_prompts
):
    from qwen_export.runtime.session import Session

    session = Session.load(trained_export)
    acceptance = [
        session.generate([prompt], 64, speculative=2).speculative["acceptance_per_position"][0]
        for prompt in heldout_prompts
    ]
    assert np.mean(acceptance) >= 0.5, acceptance


def test_diff_text_scores_the_trained_model_on_held_out_text(trained_export):
    from typer.testing import CliRunner

    from qwen_export.cli import app

    text = materialize(TRAINED) / "heldout.txt"
    result = CliRunner().invoke(
        app, ["diff", str(trained_export), "--text", str(text), "--windows", "4", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert "Loading weights" not in result.output  # transformers' own progress bar stays out of ours
    report = json.loads(result.stdout)
    # An fp32 export is the reference up to float rounding: same perplexity, same predictions.
    assert report["precision"] == "fp32" and report["windows"] == 4 and report["predicted_tokens"] == 4 * 255
    # the windows the text holds, as the training script counted them when it logged the held-out perplexity
    log = json.loads((materialize(TRAINED) / "training_log.json").read_text())
    assert report["text_windows"] == log["final"]["heldout_windows"]
    # the table says it scored a part, and how to score the whole text
    from rich.console import Console

    from qwen_export.quality import TextQuality

    fields = {k: v for k, v in report.items() if k not in ("perplexity_delta", "passed")}
    console = Console(record=True, width=400)
    TextQuality(**fields).render(console)
    title = " ".join(console.export_text().split())  # rich wraps the title to the table's width
    assert f"--windows {log['final']['heldout_windows']} scores them all" in title
    assert abs(report["perplexity_delta"]) < 1e-5
    assert report["top1_agreement"] == 1.0 and report["kl_mean"] < 1e-9
    assert 1.0 < report["reference_perplexity"] < 100


def test_diff_text_refuses_a_model_without_a_tokenizer(tiny_moe_export, tmp_path):
    from typer.testing import CliRunner

    from qwen_export.cli import app

    text = tmp_path / "t.txt"
    text.write_text("def f():\n    return 1\n")
    result = CliRunner().invoke(app, ["diff", str(tiny_moe_export), "--text", str(text)])
    assert result.exit_code == 2 and "no tokenizer.json" in result.output
