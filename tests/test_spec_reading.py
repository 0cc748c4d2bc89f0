"""config.json read from its stated fields (no transformers import) against transformers' own reading, and
the build's background confirmation of it: a disagreement rebuilds from transformers' reading, a rejection
fails the build with nothing at OUT."""

from __future__ import annotations

import dataclasses

import pytest

from qwen_export.build import build
from qwen_export.errors import ConfigError
from qwen_export.exporter import export as export_module
from qwen_export.exporter.spec import read_config_json, spec_from_config, spec_from_stated_fields
from qwen_export.presets import PRESETS, materialize

from checkpoints import LOCAL_CLASSES, make_local_checkpoint


@pytest.mark.parametrize("preset", sorted(n for n, p in PRESETS.items() if p.has_weights))
def test_stated_fields_read_as_transformers_reads_them_presets(preset):
    config = read_config_json(materialize(preset))
    stated = spec_from_stated_fields(config)
    assert stated is not None, "configs that transformers writes state every field"
    assert stated == spec_from_config(config)


@pytest.mark.parametrize("architecture", sorted(LOCAL_CLASSES))
def test_stated_fields_read_as_transformers_reads_them_local_classes(architecture, tmp_path):
    folder = make_local_checkpoint(architecture, tmp_path / "ckpt")
    config = read_config_json(folder)
    stated = spec_from_stated_fields(config)
    assert stated is not None and stated == spec_from_config(config)


@pytest.mark.parametrize("field", ["head_dim", "rms_norm_eps", "tie_word_embeddings", "layer_types"])
def test_a_field_left_to_defaults_is_not_guessed(field):
    config = read_config_json(materialize("tiny-qwen3.5-moe"))
    del config[field]
    assert spec_from_stated_fields(config) is None


def test_build_rebuilds_when_the_readings_disagree(tmp_path, monkeypatch):
    reference = build(tmp_path / "reference", preset="tiny-qwen3.5-moe", target="ort")
    real = export_module.spec_from_stated_fields

    def wrong_epsilon(config, source="config.json"):
        spec = real(config, source)
        return dataclasses.replace(spec, rms_norm_eps=1e-2)

    monkeypatch.setattr(export_module, "spec_from_stated_fields", wrong_epsilon)
    logs: list[str] = []
    result = build(tmp_path / "out", preset="tiny-qwen3.5-moe", target="ort", log=logs.append)
    assert any("building again from transformers' reading" in line for line in logs)
    assert result.model_path.read_bytes() == reference.model_path.read_bytes()
    assert result.manifest["files"] == reference.manifest["files"]


def test_build_fails_cleanly_when_transformers_rejects_a_stated_config(tmp_path, monkeypatch):
    def rejects(config, source="config.json"):
        raise ConfigError(f"{source}: transformers rejected the config (ValueError: planted)")

    monkeypatch.setattr(export_module, "spec_from_config", rejects)
    with pytest.raises(ConfigError, match="planted"):
        build(tmp_path / "out", preset="tiny-qwen3.5-moe", target="onnx")
    assert not (tmp_path / "out").exists()


def test_a_stated_value_of_the_wrong_type_is_left_to_transformers():
    config = read_config_json(materialize("tiny-qwen3.5-moe"))
    config["num_hidden_layers"] = "4"
    assert spec_from_stated_fields(config) is None
