"""Config-only presets of the real Qwen3.5 family: the exact published config.json of each model, read by
the project's spec reader, listed without weights, and refused by materialize."""

from __future__ import annotations

import hashlib
import json

import pytest
from typer.testing import CliRunner

from qwen_export.cli import app
from qwen_export.errors import QwenExportError
from qwen_export.exporter.spec import spec_from_config, spec_from_stated_fields
from qwen_export.presets import PRESET_SEED, PRESETS, build_random_model, materialize, preset_table

RANDOM = ["tiny-qwen3.5-moe", "tiny-qwen3-next", "tiny-qwen3.5", "small-qwen3.5-moe"]
TRAINED = ["trained-qwen3.5-moe"]  # golden/trained-qwen3.5-moe, tests/test_trained_reference.py

MOE, DENSE = "Qwen3_5MoeForConditionalGeneration", "Qwen3_5ForConditionalGeneration"

# The numbers of the issue and of the published configs (written out, not read from the files).
# name: (architecture, layers, hidden, q heads, kv heads, linear k heads, linear v heads,
#        experts, top-k, expert intermediate, shared intermediate, dense intermediate, vocab)
SHAPES = {
    "qwen3.5-397b-a17b": (MOE, 60, 4096, 32, 2, 16, 64, 512, 10, 1024, 1024, 0, 248320),
    "qwen3.5-122b-a10b": (MOE, 48, 3072, 32, 2, 16, 64, 256, 8, 1024, 1024, 0, 248320),
    "qwen3.5-35b-a3b": (MOE, 40, 2048, 16, 2, 16, 32, 256, 8, 512, 512, 0, 248320),
    "qwen3.5-27b": (DENSE, 64, 5120, 24, 4, 16, 48, 0, 0, 0, 0, 17408, 248320),
    "qwen3.5-9b": (DENSE, 32, 4096, 16, 4, 16, 32, 0, 0, 0, 0, 12288, 248320),
    "qwen3.5-4b": (DENSE, 32, 2560, 16, 4, 16, 32, 0, 0, 0, 0, 9216, 248320),
    "qwen3.5-2b": (DENSE, 24, 2048, 8, 2, 16, 16, 0, 0, 0, 0, 6144, 248320),
    "qwen3.5-0.8b": (DENSE, 24, 1024, 8, 2, 16, 16, 0, 0, 0, 0, 3584, 248320),
    "qwen3-next-80b-a3b": ("Qwen3NextForCausalLM", 48, 2048, 16, 2, 16, 32, 512, 10, 512, 512, 0, 151936),
}  # fmt: skip

# SHA-256 of each published config.json (family_configs/SOURCES.md says where each was recorded).
PUBLISHED_SHA256 = {
    "qwen3.5-397b-a17b": "3ae7fa89c2f7d1354096418ddaf1331e9e0898a8ca11e804fb6dbaa087efb7da",
    "qwen3.5-122b-a10b": "af07d0423658865afb52bd0d6fd3c2cc45d988425b76193467fd19129655cecd",
    "qwen3.5-35b-a3b": "5e4d7f74fec2f360eb9cfbfcd6ec0c4c76e684d3a11caaed259d9fd9bfbc7944",
    "qwen3.5-27b": "f8d190c5b89c1521220f935d2567a587d6e291ed69066a45a106560b05a2174c",
    "qwen3.5-9b": "d0883072e01861ed0b2d47be3c16c36a8e81c224c7ffaa310c6558fb3f932b05",
    "qwen3.5-4b": "ddc63e1c717afa86c865bb5e01313d89d72bb53b97ad4a8a03ba8510c0621670",
    "qwen3.5-2b": "ed1c1723241f23f7f4e23430759cbd7dcfb4103cbdfe052bfe7626b57c2615b4",
    "qwen3.5-0.8b": "b90b86f35c8e6925ef74ee04d0e758f0a845c83a42089ad82bbaa948de9b4204",
    "qwen3-next-80b-a3b": "2d483c7cabad7c8704478ed4038fa7e7b2eff840bc00a118eccbe38e2b488303",
}

QWEN35 = [name for name in SHAPES if name.startswith("qwen3.5-")]


def test_the_family_is_exactly_the_config_only_presets():
    assert {n for n, p in PRESETS.items() if not p.has_weights} == set(SHAPES)
    assert all(PRESETS[n].has_weights for n in RANDOM + TRAINED)
    assert set(PRESETS) == set(SHAPES) | set(RANDOM) | set(TRAINED)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_config_is_the_published_file_byte_for_byte(name):
    preset = PRESETS[name]
    data = preset.config_bytes()
    assert hashlib.sha256(data).hexdigest() == PUBLISHED_SHA256[name]
    assert preset.config_dict() == json.loads(data)
    assert preset.fingerprint() == PUBLISHED_SHA256[name][:12]
    preset.config_dict()["architectures"] = ["mutated"]  # each call is a fresh copy
    assert preset.config_dict()["architectures"] == [SHAPES[name][0]]


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_spec_reads_the_published_shapes(name):
    arch, layers, hidden, heads, kv, lk, lv, experts, top_k, moe_i, shared_i, dense_i, vocab = SHAPES[name]
    spec = spec_from_config(PRESETS[name].config_dict(), name)
    assert spec.architecture == arch
    assert spec.multimodal == arch.endswith("ForConditionalGeneration")
    assert (spec.num_layers, spec.hidden_size, spec.vocab_size) == (layers, hidden, vocab)
    assert (spec.num_attention_heads, spec.num_key_value_heads, spec.head_dim) == (heads, kv, 256)
    assert (spec.linear_num_key_heads, spec.linear_num_value_heads) == (lk, lv)
    assert (spec.linear_key_head_dim, spec.linear_value_head_dim) == (128, 128)
    assert spec.linear_conv_kernel_dim == 4
    assert (spec.num_experts, spec.num_experts_per_tok) == (experts, top_k)
    assert (spec.moe_intermediate_size, spec.shared_expert_intermediate_size) == (moe_i, shared_i)
    assert spec.intermediate_size == dense_i
    assert spec.mlp_types == ("moe" if experts else "dense",) * layers
    assert spec.layer_types == tuple(
        "full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(layers)
    )
    assert spec.rope_theta == 1e7 and spec.partial_rotary_factor == 0.25


@pytest.mark.parametrize("name", QWEN35)
def test_qwen35_configs_carry_the_family_constants(name):
    config = PRESETS[name].config_dict()
    text = config["text_config"]
    assert text["rope_parameters"]["mrope_section"] == [11, 11, 10]
    assert text["rope_parameters"]["rope_theta"] == 1e7
    assert text["rope_parameters"]["partial_rotary_factor"] == 0.25
    assert text["max_position_embeddings"] == 262144
    assert text["mtp_num_hidden_layers"] == 1
    assert "vision_config" in config
    # every field the spec needs is stated, so the fast reading agrees with transformers' own
    assert spec_from_stated_fields(config, name) == spec_from_config(config, name)


def test_qwen3_next_is_the_text_only_causal_lm():
    config = PRESETS["qwen3-next-80b-a3b"].config_dict()
    assert config["architectures"] == ["Qwen3NextForCausalLM"]
    assert "text_config" not in config and "vision_config" not in config
    assert config["max_position_embeddings"] == 262144
    assert config["full_attention_interval"] == 4


def test_preset_table_lists_weights():
    table = preset_table()
    assert table.columns == ("preset", "architecture", "weights", "description")
    rows = table.to_json()
    for name in RANDOM:
        assert rows[name]["weights"] == f"random (seed {PRESET_SEED})"
    for name in SHAPES:
        assert rows[name]["weights"] == "none (config only)"
        assert rows[name]["architecture"] == SHAPES[name][0]


def test_presets_cli_json_lists_weights():
    result = CliRunner().invoke(app, ["presets", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert set(rows) == set(PRESETS)
    assert rows["tiny-qwen3.5-moe"]["weights"] == f"random (seed {PRESET_SEED})"
    assert rows["qwen3.5-397b-a17b"]["weights"] == "none (config only)"
    assert rows["trained-qwen3.5-moe"]["weights"] == "trained"


@pytest.mark.parametrize("name", ["qwen3.5-397b-a17b", "qwen3.5-0.8b", "qwen3-next-80b-a3b"])
def test_materialize_refuses_a_config_only_preset_and_writes_nothing(name, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("QWEN_EXPORT_CACHE", str(cache))
    with pytest.raises(QwenExportError) as err:
        materialize(name, quiet=True)
    message = str(err.value)
    assert "\n" not in message
    assert f"{name!r} is config-only (no weights)" in message
    assert f"qwen-export plan --preset {name}" in message and "--model DIR" in message
    assert not cache.exists()
    with pytest.raises(QwenExportError, match="config-only"):
        build_random_model(PRESETS[name])


def test_config_bytes_is_only_for_config_only_presets():
    with pytest.raises(QwenExportError):
        PRESETS["tiny-qwen3.5-moe"].config_bytes()
