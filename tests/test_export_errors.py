"""Bad input: one-line error naming the file or tensor, exit code 2, and no output folder left behind."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from qwen_export.cli import app

from checkpoints import make_local_checkpoint

runner = CliRunner()


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    return make_local_checkpoint("Qwen3_5MoeForCausalLM", tmp_path_factory.mktemp("good") / "ckpt")


@pytest.fixture
def broken(tmp_path, good_checkpoint):
    folder = tmp_path / "broken"
    shutil.copytree(good_checkpoint, folder)
    return folder


def run_export(model_dir, out):
    return runner.invoke(app, ["export", "--model", str(model_dir), "-o", str(out)])


def assert_clean_failure(result, out, *fragments):
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())  # rich may wrap long paths
    for fragment in fragments:
        assert fragment in message, message
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*")), "temporary folder left behind"


def rewrite_tensors(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_config(tmp_path, broken):
    (broken / "config.json").unlink()
    out = tmp_path / "out"
    assert_clean_failure(run_export(broken, out), out, "config.json not found")


def test_malformed_config(tmp_path, broken):
    (broken / "config.json").write_text("{ not json")
    out = tmp_path / "out"
    assert_clean_failure(run_export(broken, out), out, "config.json", "malformed JSON")


def test_architecture_outside_family(tmp_path, broken):
    config = json.loads((broken / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (broken / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert_clean_failure(run_export(broken, out), out, "LlamaForCausalLM", "not in the Qwen3.5 family")


def test_missing_tensor(tmp_path, broken):
    rewrite_tensors(broken, lambda t: t.pop("model.layers.2.linear_attn.A_log"))
    out = tmp_path / "out"
    assert_clean_failure(run_export(broken, out), out, "missing tensor model.layers.2.linear_attn.A_log")


def test_extra_tensor(tmp_path, broken):
    rewrite_tensors(broken, lambda t: t.update({"model.layers.0.mystery.weight": torch.zeros(3)}))
    out = tmp_path / "out"
    assert_clean_failure(
        run_export(broken, out), out, "model.safetensors", "unexpected tensor model.layers.0.mystery.weight"
    )


def test_misshaped_tensor(tmp_path, broken):
    name = "model.layers.3.self_attn.k_proj.weight"
    rewrite_tensors(broken, lambda t: t.update({name: torch.zeros(63, 64)}))
    out = tmp_path / "out"
    assert_clean_failure(run_export(broken, out), out, "model.safetensors", name, "(63, 64)")


def test_not_a_safetensors_file(tmp_path, broken):
    (broken / "model.safetensors").write_bytes(b"\x00garbage")
    out = tmp_path / "out"
    assert_clean_failure(run_export(broken, out), out, "model.safetensors", "not a readable safetensors file")


def test_unwritable_output_folder(tmp_path, good_checkpoint):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "out"
    result = run_export(good_checkpoint, out)
    assert result.exit_code == 2, result.output
    assert "not writable" in " ".join(result.output.split())
    assert blocker.is_file()


def test_unknown_preset(tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", "--preset", "huge-qwen", "-o", str(out)])
    assert_clean_failure(result, out, "unknown preset 'huge-qwen'")


def test_preset_and_model_together(tmp_path, good_checkpoint):
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["export", "--preset", "tiny-qwen3.5", "--model", str(good_checkpoint), "-o", str(out)]
    )
    assert_clean_failure(result, out, "exactly one of --preset NAME or --model DIR")


def test_failure_keeps_previous_artifact(tmp_path, broken, good_checkpoint):
    """A failed re-export never destroys the good artifact already at OUT."""
    out = tmp_path / "out"
    assert run_export(good_checkpoint, out).exit_code == 0
    before = sorted(p.name for p in out.iterdir())
    (broken / "config.json").unlink()
    assert run_export(broken, out).exit_code == 2
    assert sorted(p.name for p in out.iterdir()) == before


def test_left_out_parts_are_logged(tmp_path):
    folder = make_local_checkpoint("Qwen3_5MoeForConditionalGeneration", tmp_path / "mm")
    out = tmp_path / "out"
    result = run_export(folder, out)
    assert result.exit_code == 0, result.output
    assert "left out on purpose: vision tower" in " ".join(result.output.split())


def test_an_incomplete_mtp_layer_is_refused_naming_the_tensor(tmp_path, broken):
    """A checkpoint with some mtp.* tensors exports the MTP draft graph, so a missing one is an error."""
    rewrite_tensors(
        broken, lambda t: t.update({"mtp.fc.weight": torch.zeros(4, 4), "mtp.norm.weight": torch.zeros(4)})
    )
    out = tmp_path / "out"
    result = run_export(broken, out)
    assert result.exit_code == 2
    assert "missing tensor mtp.pre_fc_norm_embedding.weight" in " ".join(result.output.split())
    assert not out.exists()


# --- FP8 checkpoints and precision options ------------------------------------------------------------


@pytest.fixture(scope="module")
def good_fp8_checkpoint(tmp_path_factory, good_checkpoint):
    from qwen_export.fp8_checkpoint import quantize_checkpoint

    return quantize_checkpoint(good_checkpoint, tmp_path_factory.mktemp("fp8") / "ckpt")


@pytest.fixture
def broken_fp8(tmp_path, good_fp8_checkpoint):
    folder = tmp_path / "broken-fp8"
    shutil.copytree(good_fp8_checkpoint, folder)
    return folder


def edit_config(folder, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def rewrite_fp8_tensors(folder, edit) -> None:
    for path in folder.glob("*.safetensors"):
        tensors = load_file(path)
        edit(tensors)
        save_file(tensors, path, metadata={"format": "pt"})


def test_unknown_quantization_method(tmp_path, broken_fp8):
    edit_config(broken_fp8, lambda c: c["quantization_config"].update(quant_method="awq"))
    out = tmp_path / "out"
    assert_clean_failure(run_export(broken_fp8, out), out, "quantization_config.quant_method 'awq'")


def test_fp8_weight_without_its_scale(tmp_path, broken_fp8):
    name = "model.layers.0.linear_attn.in_proj_qkv.weight"
    rewrite_fp8_tensors(broken_fp8, lambda t: t.pop(name + "_scale_inv", None))
    out = tmp_path / "out"
    assert_clean_failure(run_export(broken_fp8, out), out, f"FP8 weight {name} has no scale")


def test_fp8_scale_grid_of_the_wrong_shape(tmp_path, broken_fp8):
    name = "model.layers.3.self_attn.o_proj.weight_scale_inv"
    rewrite_fp8_tensors(broken_fp8, lambda t: t.update({name: torch.ones(2, 1)}) if name in t else None)
    out = tmp_path / "out"
    assert_clean_failure(run_export(broken_fp8, out), out, f"scale {name} has shape (2, 1), expected (1, 1)")


def test_fp8_weights_in_a_checkpoint_without_quantization_config(tmp_path, broken_fp8):
    edit_config(broken_fp8, lambda c: c.pop("quantization_config"))
    out = tmp_path / "out"
    assert_clean_failure(
        run_export(broken_fp8, out), out, "is F8_E4M3 but config.json has no quantization_config"
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--dtype", "fp64"], "--dtype 'fp64' is not one of fp32, bf16, fp16"),
        (["--weights", "fp8"], "--weights fp8 needs an FP8 checkpoint"),
        (["--weights", "int3"], "--weights 'int3' is not one of fp8, dequant"),
    ],
)
def test_bad_precision_options(tmp_path, good_checkpoint, options, message):
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", "--model", str(good_checkpoint), "-o", str(out), *options])
    assert_clean_failure(result, out, message)
