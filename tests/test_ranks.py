"""Sharded builds (`build --tp N [--ep M]`): the rank graphs, run together on ONNX Runtime CPU through the
loopback collective, against the unsharded build and the transformers reference.

Tolerance: FP32_MAX_ABS (2e-4) on logits, as for every fp32 export. The ranks sum partial products in
another order than one graph does, so they are held to the reference tolerance, not to equal bits; greedy
tokens must be identical to transformers' and to the unsharded build's over 32 steps (through the carried,
sharded states). small-qwen3.5-moe's ranks are held to transformers alone (WITH_UNSHARDED below).

`--ep M` splits the experts into M groups of the tp ranks (M divides tp; qwen_export/layout.py): "ep 2" is
`--tp 2 --ep 2`. tp 4 needs 4 linear-attention key heads: the tiny presets have 2, small-qwen3.5-moe has 8.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
import pytest

from qwen_export.build import BuildRequest, build_artifact
from qwen_export.collectives import LOOPBACK_DOMAIN, LOOPBACK_OP
from qwen_export.errors import QwenExportError
from qwen_export.fp8_checkpoint import quantize_checkpoint
from qwen_export.golden.reference import load_reference, reference_forward, reference_greedy
from qwen_export.golden.store import make_prompt
from qwen_export.presets import materialize
from qwen_export.runtime.ort_decoder import OrtDecoder
from qwen_export.runtime.ranks import RankedDecoder, open_decoder
from qwen_export.runtime.session import Artifact
from qwen_export.tolerances import FP32_MAX_ABS

from checkpoints import LOCAL_CLASSES, make_local_checkpoint

TOL = FP32_MAX_ABS
LENGTHS = (1, 63, 64, 65, 200)
SPLITS = {  # source -> (tp, ep) splits its heads allow
    "tiny-qwen3.5-moe": [(2, 1), (2, 2)],
    "tiny-qwen3-next": [(2, 1), (2, 2)],
    "tiny-qwen3.5": [(2, 1)],
    "small-qwen3.5-moe": [(4, 1), (4, 4)],  # 8 linear key heads, 2 kv heads: tp 4 copies each kv head
}
CASES = [(preset, tp, ep) for preset, splits in SPLITS.items() for tp, ep in splits]
# The presets whose ranks are also held to their unsharded build. small-qwen3.5-moe's ranks are held to
# transformers alone (the same tolerance, the same greedy tokens), without an unsharded fp32 build of their
# own (18 s of the suite's 15-minute budget).
WITH_UNSHARDED = {"tiny-qwen3.5-moe", "tiny-qwen3-next", "tiny-qwen3.5"}


def _build(out, tp: int, ep: int, target: str = "onnx", **source):
    return build_artifact(BuildRequest(out=out, target=target, tp=tp, ep=ep, **source))


@dataclass
class Expected:
    """What a ranked build of a preset must reproduce: transformers' and the unsharded build's prefill
    logits for each of LENGTHS, and both greedy continuations (computed once per preset, shared by its
    splits)."""

    prompts: dict[int, np.ndarray]
    reference_logits: dict[int, np.ndarray]
    greedy_prompt: np.ndarray
    reference_tokens: np.ndarray
    whole_logits: dict[int, np.ndarray] | None  # None: held to the reference alone
    whole_tokens: np.ndarray | None


def expected_outputs(whole: OrtDecoder | None, reference) -> Expected:
    vocab = reference.config.get_text_config().vocab_size  # a multimodal config keeps it in text_config
    prompts = {length: make_prompt(vocab, length, seed=length) for length in LENGTHS}
    prompt = make_prompt(vocab, 12, seed=4)
    return Expected(
        prompts=prompts,
        reference_logits={n: reference_forward(reference, ids)[0] for n, ids in prompts.items()},
        greedy_prompt=prompt,
        reference_tokens=reference_greedy(reference, prompt, 32)[0],
        whole_logits=None if whole is None else {n: whole.prefill(ids).logits for n, ids in prompts.items()},
        whole_tokens=None if whole is None else whole.greedy(prompt, 32)[0],
    )


def _compare(ranked: OrtDecoder, expected: Expected) -> None:
    for length, ids in expected.prompts.items():
        ours = ranked.prefill(ids).logits
        assert np.abs(ours - expected.reference_logits[length]).max() <= TOL, (
            f"prefill {length} vs transformers"
        )
        if expected.whole_logits is not None:
            whole = expected.whole_logits[length]
            assert np.abs(ours - whole).max() <= TOL, f"prefill {length} vs unsharded"
    tokens, _ = ranked.greedy(expected.greedy_prompt, 32)
    np.testing.assert_array_equal(tokens, expected.reference_tokens)
    if expected.whole_tokens is not None:
        np.testing.assert_array_equal(tokens, expected.whole_tokens)


@pytest.fixture(scope="module")
def expected(tmp_path_factory):
    built: dict[str, Expected] = {}

    def get(preset: str) -> Expected:
        if preset not in built:
            whole = None
            if preset in WITH_UNSHARDED:
                out = tmp_path_factory.mktemp("whole") / preset
                _build(out, 1, 1, preset=preset)
                whole = OrtDecoder(out / "model.onnx")
            built[preset] = expected_outputs(whole, load_reference(materialize(preset)))
        return built[preset]

    return get


@pytest.mark.parametrize(("preset", "tp", "ep"), CASES, ids=[f"{p}-tp{t}-ep{e}" for p, t, e in CASES])
def test_ranks_match_unsharded_and_transformers(tmp_path, expected, preset, tp, ep):
    out = tmp_path / "ranks"
    result = _build(out, tp, ep, preset=preset)
    manifest = result.manifest
    assert (manifest["tp"], manifest["ep"]) == (tp, ep)
    assert sorted(p.name for p in (out / "ranks").iterdir()) == [str(r) for r in range(tp)]
    ranked = open_decoder(Artifact.open(out).model_path)
    assert isinstance(ranked, RankedDecoder) and len(ranked.ranks) == tp
    _compare(ranked, expected(preset))
    ranked.close()


@pytest.mark.parametrize("architecture", sorted(LOCAL_CLASSES))
def test_local_checkpoints_shard(tmp_path, architecture):
    folder = make_local_checkpoint(architecture, tmp_path / "ckpt")
    moe = "Moe" in architecture or "Next" in architecture
    tp, ep = (2, 2) if moe else (2, 1)
    _build(tmp_path / "ranks", tp, ep, model_dir=folder)
    _build(tmp_path / "whole", 1, 1, model_dir=folder)
    ranked = open_decoder(Artifact.open(tmp_path / "ranks").model_path)
    _compare(ranked, expected_outputs(OrtDecoder(tmp_path / "whole" / "model.onnx"), load_reference(folder)))
    ranked.close()


def test_rank_graphs_carry_loopback_collectives(tmp_path):
    _build(tmp_path / "ranks", 2, 2, preset="tiny-qwen3.5-moe")
    per_rank = []
    for rank in (0, 1):
        path = tmp_path / "ranks" / "ranks" / str(rank) / "model.onnx"
        model = onnx.load(str(path), load_external_data=False)
        nodes = [n for n in model.graph.node if n.domain == LOOPBACK_DOMAIN and n.op_type == LOOPBACK_OP]
        attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
        assert {a["rank"] for a in attrs} == {rank}
        assert [a["tag"] for a in attrs] == list(range(len(nodes)))
        per_rank.append([(a["collective_operation"], a["nb_rank"]) for a in attrs])
    assert per_rank[0] == per_rank[1]
    layers = 4  # tiny-qwen3.5-moe: per layer one all_reduce after the mixer and one after the MoE
    assert per_rank[0].count((b"all_reduce", 2)) == 2 * layers + 1  # + the embedding
    assert per_rank[0].count((b"all_gather", 2)) == 1  # the logits


def test_validate_and_run_work_on_a_ranks_artifact(tmp_path):
    from qwen_export.golden.store import repo_golden_dir
    from qwen_export.runtime.session import Session
    from qwen_export.validate import validate_artifact

    _build(tmp_path / "ranks", 2, 1, preset="tiny-qwen3.5")
    report = validate_artifact(tmp_path / "ranks", repo_golden_dir("tiny-qwen3.5"))
    assert report.passed, report
    session = Session.load(tmp_path / "ranks")
    result = session.generate([[1, 2, 3]], max_new_tokens=4)
    assert len(result.tokens[0]) == 4


def test_bad_splits_are_refused_in_one_line_writing_nothing(tmp_path):
    out = tmp_path / "ranks"
    with pytest.raises(QwenExportError, match="tp 4 does not divide linear_num_key_heads 2.*tp that shards"):
        _build(out, 4, 1, preset="tiny-qwen3.5-moe")
    with pytest.raises(QwenExportError, match="ep 3 does not divide tp 2"):
        _build(out, 2, 3, preset="tiny-qwen3.5-moe")
    with pytest.raises(QwenExportError, match="ep 2 needs a MoE model"):
        _build(out, 2, 2, preset="tiny-qwen3.5")
    with pytest.raises(QwenExportError, match="--check runs one graph per stage"):
        build_artifact(BuildRequest(out=out, preset="tiny-qwen3.5", tp=2, check=True))
    with pytest.raises(QwenExportError, match="--tp is not an option of target trt-rtx"):
        _build(out, 2, 1, target="trt-rtx", preset="tiny-qwen3.5")
    fp8 = quantize_checkpoint(materialize("tiny-qwen3.5-moe"), tmp_path / "fp8")
    with pytest.raises(QwenExportError, match="FP8 checkpoint are not supported yet"):
        _build(out, 2, 1, model_dir=fp8)
    assert not out.exists()


def test_a_missing_or_foreign_rank_is_refused(tmp_path):
    import shutil

    _build(tmp_path / "a", 2, 1, preset="tiny-qwen3.5")
    _build(tmp_path / "b", 2, 1, preset="tiny-qwen3.5")
    shutil.rmtree(tmp_path / "b" / "ranks" / "1")
    with pytest.raises(QwenExportError, match="rank 1 of 2 is missing"):
        Artifact.open(tmp_path / "b")
    shutil.copytree(tmp_path / "a" / "ranks" / "1", tmp_path / "b" / "ranks" / "1")
    with pytest.raises(QwenExportError, match="copied from another build"):
        Artifact.open(tmp_path / "b")
    info = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert info["format"] == "qwen-export/ranks@1" and info["layout"]["tp"] == 2


def _rank_graph_elements(preset: str, tp: int, ep: int, rank: int) -> tuple[int, int]:
    """(elements of the checkpoint-read initializers in rank `rank`'s exported graph, elements the layout
    assigns that rank)."""
    from qwen_export.exporter.checkpoint import CheckpointTensor, find_text_prefix
    from qwen_export.exporter.export import load_model_source
    from qwen_export.exporter.model import build_decoder
    from qwen_export.exporter.shard import RankCheckpoint, RankContext, rank_spec
    from qwen_export.layout import make_layout

    _, spec, ckpt = load_model_source(materialize(preset))
    layout = make_layout(spec, tp, ep)
    view = RankCheckpoint(ckpt, layout, rank, find_text_prefix(ckpt))
    model = build_decoder(rank_spec(spec, layout), view, rank=RankContext(layout, rank))
    read = {
        v.name: int(np.prod(v.const_value.shape.numpy()))
        for v in model.graph.initializers.values()
        if isinstance(v.const_value, CheckpointTensor)
    }
    if spec.tie_word_embeddings:  # the tied head reads the embedding a second time, transposed
        read.pop("embed_tokens.weight.T", None)
    expected = sum(int(np.prod(shape)) for _, shape in layout.rank_weights(rank))
    return sum(read.values()), expected


@pytest.mark.parametrize(("preset", "tp", "ep"), CASES, ids=[f"{p}-tp{t}-ep{e}" for p, t, e in CASES])
def test_each_rank_graph_holds_what_the_layout_assigns_it(preset, tp, ep):
    for rank in range(tp):
        held, assigned = _rank_graph_elements(preset, tp, ep, rank)
        assert held == assigned, f"rank {rank}"


@pytest.mark.parametrize("ep", [1, 8])
def test_plan_per_gpu_weights_are_the_layouts_shards(ep):
    from qwen_export.exporter.spec import spec_from_config
    from qwen_export.gpus import parse_gpus
    from qwen_export.layout import make_layout
    from qwen_export.plan import make_plan, weight_bytes
    from qwen_export.presets import get_preset

    spec = spec_from_config(get_preset("qwen3.5-397b-a17b").config_dict())
    plan = make_plan(spec, parse_gpus("8xh200"), precision="fp8", tp=8, ep=ep, context=262144)
    layout = make_layout(spec, 8, ep)
    per_rank = [
        sum(weight_bytes(t, shape, "fp8").total for t, shape in layout.rank_weights(r)) for r in layout.ranks
    ]
    assert abs(plan.weights_per_gpu - max(per_rank)) <= 0.01 * max(per_rank)
