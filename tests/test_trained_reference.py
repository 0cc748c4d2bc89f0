"""The committed trained reference (golden/trained-qwen3.5-moe, made by scripts/train_reference.py) loads
with transformers, reproduces its logged held-out perplexity, beats the unigram baseline, and carries a
complete MTP layer whose drafts agree with the main model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from qwen_export.errors import CheckpointError
from qwen_export.golden.mtp import PREFIX, MtpReference
from qwen_export.golden.perplexity import WINDOW, draft_agreement, perplexity, reference_nll, token_windows

FOLDER = Path(__file__).resolve().parents[1] / "golden" / "trained-qwen3.5-moe"
FILES = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "heldout.txt",
    "training_log.json",
    "training_log.md",
}
MAX_BYTES = 25_000_000


@pytest.fixture(scope="module")
def log() -> dict[str, Any]:
    return json.loads((FOLDER / "training_log.json").read_text())


@pytest.fixture(scope="module")
def model():
    from transformers import Qwen3_5MoeForCausalLM

    return Qwen3_5MoeForCausalLM.from_pretrained(FOLDER, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def mtp_tensors() -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(FOLDER / "model.safetensors").items() if k.startswith(PREFIX)}


@pytest.fixture(scope="module")
def windows():
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(FOLDER / "tokenizer.json"))
    return token_windows(tokenizer.encode((FOLDER / "heldout.txt").read_text(encoding="utf-8")).ids, WINDOW)


def test_folder_is_complete_and_small():
    present = {p.name for p in FOLDER.iterdir() if p.is_file()}
    assert set(FILES) <= present, sorted(set(FILES) - present)
    size = sum((FOLDER / name).stat().st_size for name in present)
    assert size <= MAX_BYTES, f"{FOLDER} holds {size} bytes"


def test_config_keeps_the_qwen35_moe_layout():
    config = json.loads((FOLDER / "config.json").read_text())
    assert config["architectures"] == ["Qwen3_5MoeForCausalLM"]
    assert config["num_hidden_layers"] >= 8
    assert len(config["layer_types"]) == config["num_hidden_layers"]
    assert {"linear_attention", "full_attention"} <= set(config["layer_types"])
    assert config["num_experts"] >= 8
    assert config.get("mtp_num_hidden_layers") == 1


def test_tokenizer_round_trips_heldout_text():
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(FOLDER / "tokenizer.json"))
    text = (FOLDER / "heldout.txt").read_text(encoding="utf-8")
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_heldout_perplexity_reproduces_and_beats_unigram(model, windows, log):
    final = log["final"]
    assert windows.shape == (final["heldout_windows"], WINDOW)
    nll, count = reference_nll(model, windows)
    assert count == final["heldout_tokens_scored"]
    ppl = perplexity(nll, count)
    assert ppl == pytest.approx(final["heldout_perplexity"], rel=1e-4)
    assert ppl < final["unigram_perplexity"]


def test_mtp_layer_is_complete(model, mtp_tensors):
    assert mtp_tensors, "model.safetensors has no mtp.* tensors"
    MtpReference(model).load_checkpoint_tensors(mtp_tensors, str(FOLDER))  # raises on a missing tensor
    dropped = dict(mtp_tensors)
    dropped.pop(sorted(dropped)[0])
    with pytest.raises(CheckpointError, match="missing tensor"):
        MtpReference(model).load_checkpoint_tensors(dropped, "dropped")


def test_mtp_drafts_agree_with_the_main_model(model, mtp_tensors, windows, log):
    mtp = MtpReference(model)
    mtp.load_checkpoint_tensors(mtp_tensors, str(FOLDER))
    measured = draft_agreement(model, mtp.eval(), windows)
    logged = log["final"]["mtp_agreement_with_main_greedy"]
    # argmax ties may break differently on another machine; a handful of positions at most
    assert measured["mtp_agreement_with_main_greedy"] == pytest.approx(logged, abs=2e-3)
    assert measured["mtp_agreement_with_main_greedy"] >= 0.5
