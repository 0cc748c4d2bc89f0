"""Local multimodal checkpoints for the tests: random weights (the vision tower's at a scale where its output
matters), token ids inside the tiny vocabulary, and the processor files a real checkpoint ships (a Qwen2-VL
image processor, a Qwen3-VL video processor, a byte-level tokenizer with the Qwen vision special tokens, and a
small chat template)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

from qwen_export.presets import PRESETS, randomize_flat_parameters

from checkpoints import LOCAL_CLASSES, TINY_VISION

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
TOKEN_IDS = dict(vision_start_token_id=259, vision_end_token_id=260, image_token_id=261, video_token_id=262)
MIN_PIXELS, MAX_PIXELS = 256, 4096
CHAT_TEMPLATE = (
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.content is string %}{{ m.content }}{%- else %}{%- for c in m.content %}"
    "{%- if c.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif c.type == 'video' %}<|video_pad|>"
    "{%- elif c.type == 'text' %}{{ c.text }}{%- endif %}{%- endfor %}{%- endif %}<|im_end|>\n"
    "{% endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_multimodal_checkpoint(architecture: str, folder: Path, seed: int = 7) -> Path:
    """A random multimodal checkpoint plus the processor files a real one ships."""
    text = dict(PRESETS[LOCAL_CLASSES[architecture]].text_config)
    config_cls = transformers.Qwen3_5MoeConfig if "Moe" in architecture else transformers.Qwen3_5Config
    config = config_cls(text_config=text, vision_config=TINY_VISION, **TOKEN_IDS)
    config.architectures = [architecture]
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    randomize_flat_parameters(model, seed)
    gen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():  # HF's 0.02-std init leaves vision features ~1e-2; give them unit scale
        for name, p in model.named_parameters():
            if ".visual." not in f".{name}":
                continue
            if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("pos_embed.weight"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
    model.save_pretrained(folder)
    save_processor_files(folder)
    return folder


PATCH, MERGE, TEMPORAL_PATCH = 4, 2, 2
# preprocessor_config.json as a real Qwen3.5 checkpoint ships it (same keys; sizes for the tiny vision tower).
# It names the Qwen2-VL image processor, so AutoImageProcessor picks its torchvision class where torchvision
# imports (the class transformers' reference arrays in tests/data/processor_reference/ were made with).
IMAGE_PROCESSOR_CONFIG = {
    "size": {"longest_edge": MAX_PIXELS, "shortest_edge": MIN_PIXELS},
    "patch_size": PATCH,
    "temporal_patch_size": TEMPORAL_PATCH,
    "merge_size": MERGE,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}


def save_processor_files(folder: Path) -> None:
    """The processor files, the same bytes every run (tests/test_multimodal_preprocess.py hashes them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(IMAGE_PROCESSOR_CONFIG, indent=2) + "\n")
    Qwen3VLVideoProcessor(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": 2 * MAX_PIXELS},
        cap_pixels_per_frame=False,
        patch_size=PATCH,
        merge_size=MERGE,
        temporal_patch_size=TEMPORAL_PATCH,
        image_mean=IMAGE_PROCESSOR_CONFIG["image_mean"],
        image_std=IMAGE_PROCESSOR_CONFIG["image_std"],
    ).save_pretrained(folder)
    # Byte-level BPE without merges: 256 byte tokens, then the specials at 256.. (ids as in TOKEN_IDS).
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([*SPECIALS, "<|image_pad|>", "<|video_pad|>"])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def write_images(folder: Path, sizes: dict[str, tuple[int, int]], seed: int = 0) -> dict[str, Path]:
    """Seeded random RGB PNGs, name -> (height, width)."""
    rng = np.random.default_rng(seed)
    paths = {}
    for name, (h, w) in sizes.items():
        paths[name] = folder / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[name])
    return paths
