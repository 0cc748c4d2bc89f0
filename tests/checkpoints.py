"""Local Hugging Face checkpoint folders of every supported class, with seeded random weights."""

from __future__ import annotations

from pathlib import Path

from qwen_export.presets import PRESETS, randomize_flat_parameters

TINY_VISION = dict(
    depth=1,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    out_hidden_size=64,
    patch_size=4,
    spatial_merge_size=2,
    temporal_patch_size=2,
    num_position_embeddings=64,
)

# class name -> (text config preset it borrows, whether it is the multimodal wrapper)
LOCAL_CLASSES = {
    "Qwen3_5MoeForCausalLM": "tiny-qwen3.5-moe",
    "Qwen3_5MoeForConditionalGeneration": "tiny-qwen3.5-moe",
    "Qwen3_5ForCausalLM": "tiny-qwen3.5",
    "Qwen3_5ForConditionalGeneration": "tiny-qwen3.5",
    "Qwen3NextForCausalLM": "tiny-qwen3-next",
}
MULTIMODAL_CLASSES = [c for c in LOCAL_CLASSES if c.endswith("ForConditionalGeneration")]


def make_local_checkpoint(architecture: str, folder: Path, seed: int = 7, **save_kwargs) -> Path:
    """Save a randomly initialised transformers model of `architecture` to `folder` (safetensors)."""
    import torch
    import transformers

    text = dict(PRESETS[LOCAL_CLASSES[architecture]].text_config)
    if architecture == "Qwen3_5MoeForConditionalGeneration":
        config = transformers.Qwen3_5MoeConfig(text_config=text, vision_config=TINY_VISION)
    elif architecture == "Qwen3_5ForConditionalGeneration":
        config = transformers.Qwen3_5Config(text_config=text, vision_config=TINY_VISION)
    elif architecture.startswith("Qwen3_5Moe"):
        config = transformers.Qwen3_5MoeTextConfig(**text)
    elif architecture.startswith("Qwen3_5"):
        config = transformers.Qwen3_5TextConfig(**text)
    else:
        config = transformers.Qwen3NextConfig(**text)
    config.architectures = [architecture]
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    randomize_flat_parameters(model, seed)
    model.save_pretrained(folder, **save_kwargs)
    return folder
