"""onnxruntime-genai as the peer in our benchmarks: its model builder and its runtime, on our checkpoints.

The builder accepts only the multimodal `Qwen3_5MoeForConditionalGeneration` layout, so a preset's text
weights are copied into that layout first (the text tower is identical: same logits, checked here). The
builder's graph declares mRoPE `position_ids` [3, B, T], which ONNX Runtime 1.31's RotaryEmbedding rejects;
`patch_for_ort` declares them [B, T] (the only change) so the model loads; results say so.

genai pins its own onnxruntime, so it lives in its own virtual environment (`scripts/setup_genai_env.sh`).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

VISION_FOR_LAYOUT = dict(
    depth=1,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    num_position_embeddings=64,
    in_channels=3,
)


def multimodal_copy(preset: str, out: Path) -> Path:
    """The preset's weights in the Qwen3_5MoeForConditionalGeneration layout (random tiny vision tower)."""
    import torch
    import transformers

    from qwen_export.presets import get_preset, materialize

    if (out / "config.json").is_file():
        return out
    text = dict(get_preset(preset).text_config)
    config = transformers.Qwen3_5MoeConfig(
        text_config=text, vision_config={**VISION_FOR_LAYOUT, "out_hidden_size": text["hidden_size"]}
    )
    config.architectures = ["Qwen3_5MoeForConditionalGeneration"]
    torch.manual_seed(0)
    wrapper = transformers.Qwen3_5MoeForConditionalGeneration(config).eval()
    text_model = transformers.Qwen3_5MoeForCausalLM.from_pretrained(materialize(preset)).eval()
    target = wrapper.state_dict()
    with torch.no_grad():
        for name, value in text_model.state_dict().items():
            target[
                "model.language_model." + name.removeprefix("model.") if name.startswith("model.") else name
            ].copy_(value)
        ids = torch.randint(0, text["vocab_size"], (1, 9))
        diff = (wrapper(input_ids=ids).logits - text_model(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-5, f"layout copy changed the text tower (max |Δ| {diff})"
    wrapper.save_pretrained(out)
    return out


def run_builder(
    genai_python: str, model_dir: Path, out: Path, timeout: int = 3600, precision: str = "fp32"
) -> dict:
    """Run `onnxruntime_genai.models.builder` (`-p precision -e cpu`: fp32, or int4 = its MatMulNBits/QMoE
    weight-only quantization with its CPU defaults: block 32, as ours, accuracy level 4); returns wall time
    and the graph's node count."""
    start = time.perf_counter()
    proc = subprocess.run(
        [
            genai_python,
            "-m",
            "onnxruntime_genai.models.builder",
            "-i",
            str(model_dir),
            "-o",
            str(out),
            "-p",
            precision,
            "-e",
            "cpu",
            "-c",
            str(out / "hf-cache"),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    seconds = time.perf_counter() - start
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1], "seconds": seconds}
    return {"seconds": seconds, "nodes": node_count(out / "model.onnx")}


def node_count(model_path: Path) -> int:
    import onnx

    return len(onnx.load(str(model_path), load_external_data=False).graph.node)


def patch_for_ort(genai_dir: Path) -> Path:
    """Declare position_ids [B, T] (see module docstring) and point genai_config.json at the patched file."""
    import onnx

    model = onnx.load(str(genai_dir / "model.onnx"), load_external_data=False)
    for value in model.graph.input:
        if value.name == "position_ids" and len(value.type.tensor_type.shape.dim) == 3:
            del value.type.tensor_type.shape.dim[0]
    patched = genai_dir / "model_pos2d.onnx"
    onnx.save(model, str(patched))
    config_path = genai_dir / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"]["filename"] = patched.name
    config_path.write_text(json.dumps(config, indent=2))
    return patched
