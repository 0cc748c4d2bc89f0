"""Local Hugging Face folders of every supported class: exported graph vs the transformers reference."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from safetensors import safe_open

from qwen_export.exporter.export import export_model
from qwen_export.golden.reference import load_reference, reference_forward, reference_greedy
from qwen_export.golden.store import make_prompt
from qwen_export.runtime.ort_decoder import OrtDecoder
from qwen_export.tolerances import FP32_MAX_ABS

from checkpoints import LOCAL_CLASSES, make_local_checkpoint

TOL = FP32_MAX_ABS


def checkpoint_tensor_names(folder) -> list[str]:
    names = []
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as st:
            names += list(st.keys())
    return names


@pytest.mark.parametrize("architecture", sorted(LOCAL_CLASSES))
def test_local_checkpoint_matches_reference(tmp_path, architecture):
    folder = make_local_checkpoint(architecture, tmp_path / "ckpt")
    result = export_model(tmp_path / "out", model_dir=folder)
    decoder = OrtDecoder(result.model_path)
    model = load_reference(folder)

    rng = np.random.default_rng(0)
    for batch in (1, 3):
        ids = rng.integers(0, 512, size=(batch, 65))
        ref, _ = reference_forward(model, ids)
        assert np.abs(decoder.prefill(ids).logits - ref).max() <= TOL, f"batch {batch}"

    prompt = make_prompt(512, 12, seed=4)
    ref_tokens, ref_logits = reference_greedy(model, prompt, 32)
    tokens, logits = decoder.greedy(prompt, 32)
    np.testing.assert_array_equal(tokens, ref_tokens)
    assert np.abs(logits - ref_logits).max() <= TOL

    # Every checkpoint tensor is used, or belongs to a part the export leaves out and names.
    info = json.loads((tmp_path / "out" / "export.json").read_text())
    names = checkpoint_tensor_names(folder)
    vision = sum(1 for n in names if n.startswith("model.visual."))
    assert info["checkpoint"]["tensors"] == len(names)
    assert info["checkpoint"]["used"] == len(names) - vision
    assert info["checkpoint"]["left_out"] == ({"vision tower": vision} if vision else {})
    if architecture.endswith("ForConditionalGeneration"):
        assert vision > 0


def test_sharded_bf16_checkpoint(tmp_path):
    """A bf16 checkpoint split in shards with an index is read tensor by tensor (widened to fp32 on
    request; tests/test_export_precision.py covers the default, bf16)."""
    import torch

    folder = make_local_checkpoint("Qwen3NextForCausalLM", tmp_path / "ckpt", max_shard_size="100KB")
    # Re-save in bf16 through transformers so the files are what a real bf16 checkpoint looks like.
    model = load_reference(folder).to(torch.bfloat16)
    bf16 = tmp_path / "bf16"
    model.save_pretrained(bf16, max_shard_size="100KB")
    assert (bf16 / "model.safetensors.index.json").is_file()
    assert len(list(bf16.glob("*.safetensors"))) > 1

    result = export_model(tmp_path / "out", model_dir=bf16, dtype="fp32")
    reference = load_reference(bf16)  # fp32 model holding the bf16 values
    ids = make_prompt(512, 65, seed=2)
    ref, _ = reference_forward(reference, ids)
    assert np.abs(OrtDecoder(result.model_path).prefill(ids).logits - ref).max() <= TOL
    assert result.info["checkpoint"]["used"] == result.info["checkpoint"]["tensors"]


def test_graph_signature_is_dynamic_and_holds_every_expert(tmp_path):
    result = export_model(tmp_path / "out", preset="tiny-qwen3.5-moe")
    model = onnx.load(result.model_path, load_external_data=False)
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input
    }
    assert dims["input_ids"] == ["batch", "sequence"]
    assert dims["attention_mask"] == ["batch", "total_sequence"]
    assert dims["position_ids"] == ["batch", "sequence"]
    assert dims["past_key_values.3.key"] == ["batch", 2, "past_sequence", 32]
    assert dims["past_key_values.0.conv_state"] == ["batch", 128, 3]
    assert dims["past_key_values.0.recurrent_state"] == ["batch", 4, 16, 16]
    outputs = [o.name for o in model.graph.output]
    assert outputs[0] == "logits"
    assert sorted(outputs[1:]) == sorted(
        [n.replace("past_key_values.", "present.") for n in dims if "past" in n] + ["hidden_states"]
    )  # the preset has an MTP layer: the main graph also hands its final hidden states to mtp.onnx
    experts = {i.name: list(i.dims) for i in model.graph.initializer if "experts" in i.name}
    for layer in range(4):
        assert experts[f"layers.{layer}.mlp.experts.gate_up_proj.T"] == [8, 64, 64]
        assert experts[f"layers.{layer}.mlp.experts.down_proj.T"] == [8, 32, 64]
    assert all(
        i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer if i.name in experts
    )
