"""Built-in presets: small Qwen3.5-family models with random weights from a fixed seed, and config-only
presets of the real Qwen3.5 family.

A random-weight preset is materialised once as a real Hugging Face checkpoint folder (config.json +
model.safetensors) in the cache, so presets travel the same loading path as user checkpoints, and the
reference model is transformers' own class loaded from that folder.

A config-only preset carries the exact published config.json of a real model (the bytes under
qwen_export/family_configs/, provenance in family_configs/SOURCES.md) and no weights: it serves planning
and spec reading, never materialisation.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwen_export.cache import cache_root, touch
from qwen_export.errors import QwenExportError
from qwen_export.fsutil import atomic_output_dir

if TYPE_CHECKING:
    from qwen_export.listing import Listing

PRESET_SEED = 20260216
PRESET_FORMAT = 3  # bump when the way presets are generated changes (2, 3: the tiny presets' MTP layer)

_TINY_TEXT: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_conv_kernel_dim=4,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
    layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
)
_TINY_MOE: dict[str, Any] = dict(
    num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32
)
# small-qwen3.5-moe: Qwen3.5-35B-A3B's shape at about 0.5B parameters
_SMALL_MOE: dict[str, Any] = dict(
    vocab_size=32000, hidden_size=1024, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=2, head_dim=128,
    linear_num_key_heads=8, linear_num_value_heads=16, linear_key_head_dim=64,
    linear_value_head_dim=64, linear_conv_kernel_dim=4,
    rms_norm_eps=1e-6, max_position_embeddings=262144,
    rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
    num_experts=64, num_experts_per_tok=4,
    moe_intermediate_size=256, shared_expert_intermediate_size=256,
)  # fmt: skip


@dataclass(frozen=True)
class Preset:
    name: str
    architecture: str
    text_config: dict[str, Any]
    description: str
    vision_config: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    has_weights: bool = True  # False: config-only, the exact published config.json and no weights
    mtp: bool = False  # random-weight presets: the checkpoint also carries an MTP layer (mtp.*)
    trained: bool = False  # the trained reference model committed under golden/ (its folder is the preset)

    def config_dict(self) -> dict[str, Any]:
        """The config as transformers would write it (built by transformers' own config class); for a
        config-only preset, the published config.json exactly as released; for the trained model, its own."""
        if not self.has_weights:
            return json.loads(self.config_bytes())
        if self.trained:
            return json.loads((trained_folder() / "config.json").read_text())
        return _hf_config(self).to_dict()

    def config_bytes(self) -> bytes:
        """A config-only preset's config.json, byte for byte as published."""
        if self.has_weights:
            raise QwenExportError(f"preset {self.name!r} has random weights; its config is config_dict()")
        return _family_config_bytes(self.name)

    def fingerprint(self) -> str:
        if not self.has_weights:  # the published file is the whole preset
            return hashlib.sha256(self.config_bytes()).hexdigest()[:12]
        if self.trained:  # committed files: the config and the weights' size stand for them
            folder = trained_folder()
            blob = (folder / "config.json").read_bytes() + str((folder / WEIGHTS).stat().st_size).encode()
            return hashlib.sha256(blob).hexdigest()[:12]
        blob = json.dumps(
            [PRESET_FORMAT, PRESET_SEED, self.architecture, self.text_config, self.vision_config, self.mtp],
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "tiny-qwen3.5-moe",
            "Qwen3_5MoeForCausalLM",
            {**_TINY_TEXT, **_TINY_MOE},
            "4 layers (3 DeltaNet + 1 attention), 8 experts top-2 + shared expert, and an MTP layer",
            mtp=True,
        ),
        Preset(
            "tiny-qwen3-next",
            "Qwen3NextForCausalLM",
            {
                **_TINY_TEXT,
                **_TINY_MOE,
                "intermediate_size": 96,
                "norm_topk_prob": True,
                "mlp_only_layers": [1],
            },
            "Qwen3-Next layout (fused qkvz projections), layer 1 dense MLP, the rest MoE, and an MTP layer",
            mtp=True,
        ),
        Preset(
            "tiny-qwen3.5",
            "Qwen3_5ForCausalLM",
            {**_TINY_TEXT, "intermediate_size": 128},
            "dense Qwen3.5: 4 layers with SwiGLU MLPs, and an MTP layer",
            mtp=True,
        ),
        Preset(
            "small-qwen3.5-moe",
            "Qwen3_5MoeForCausalLM",
            _SMALL_MOE,
            "about 0.5B parameters shaped like Qwen3.5-35B-A3B (8 layers, 64 experts top-4), for benchmarks",
        ),
    ]
}

TRAINED = "trained-qwen3.5-moe"
WEIGHTS = "model.safetensors"
MTP_WEIGHTS = "mtp.safetensors"  # a random-weight preset's MTP layer, a shard of its own


def trained_folder() -> Path:
    """The trained reference model's checkpoint folder (golden/trained-qwen3.5-moe, installed with the
    package; scripts/train_reference.py writes it)."""
    return Path(str(resources.files("qwen_export.golden"))) / TRAINED


PRESETS[TRAINED] = Preset(
    TRAINED,
    "Qwen3_5MoeForCausalLM",
    {},
    "trained on the Python standard library: 8 layers, 8 experts top-2, an MTP layer and a BPE tokenizer "
    "(golden/trained-qwen3.5-moe)",
    mtp=True,
    trained=True,
)

# Config-only presets: (name, Hugging Face repository the config.json was published in, description).
_FAMILY: tuple[tuple[str, str, str], ...] = (
    ("qwen3.5-397b-a17b", "Qwen/Qwen3.5-397B-A17B", "60 layers, hidden 4096, 512 experts top-10"),
    ("qwen3.5-122b-a10b", "Qwen/Qwen3.5-122B-A10B", "48 layers, hidden 3072, 256 experts top-8"),
    ("qwen3.5-35b-a3b", "Qwen/Qwen3.5-35B-A3B", "40 layers, hidden 2048, 256 experts top-8"),
    ("qwen3.5-27b", "Qwen/Qwen3.5-27B", "dense, 64 layers, hidden 5120"),
    ("qwen3.5-9b", "Qwen/Qwen3.5-9B", "dense, 32 layers, hidden 4096"),
    ("qwen3.5-4b", "Qwen/Qwen3.5-4B", "dense, 32 layers, hidden 2560, tied embeddings"),
    ("qwen3.5-2b", "Qwen/Qwen3.5-2B", "dense, 24 layers, hidden 2048, tied embeddings"),
    ("qwen3.5-0.8b", "Qwen/Qwen3.5-0.8B", "dense, 24 layers, hidden 1024, tied embeddings"),
    ("qwen3-next-80b-a3b", "Qwen/Qwen3-Next-80B-A3B-Instruct", "text only, 48 layers, 512 experts top-10"),
)


@functools.cache
def _family_config_bytes(name: str) -> bytes:
    return (resources.files("qwen_export") / "family_configs" / f"{name}.json").read_bytes()


def _config_only_preset(name: str, repo: str, shape: str) -> Preset:
    config = json.loads(_family_config_bytes(name))
    multimodal = "text_config" in config
    return Preset(
        name,
        config["architectures"][0],
        config["text_config"] if multimodal else config,
        f"{repo} config.json ({shape})",
        vision_config=config.get("vision_config"),
        has_weights=False,
    )


PRESETS.update((name, _config_only_preset(name, repo, shape)) for name, repo, shape in _FAMILY)


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise QwenExportError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def _hf_config(preset: Preset):
    import transformers

    if preset.architecture.startswith("Qwen3_5Moe"):
        text_cls, full_cls = transformers.Qwen3_5MoeTextConfig, transformers.Qwen3_5MoeConfig
    elif preset.architecture.startswith("Qwen3_5"):
        text_cls, full_cls = transformers.Qwen3_5TextConfig, transformers.Qwen3_5Config
    else:
        text_cls, full_cls = transformers.Qwen3NextConfig, None
    if preset.architecture.endswith("ForConditionalGeneration"):
        cfg = full_cls(text_config=preset.text_config, vision_config=preset.vision_config)
    else:
        cfg = text_cls(**preset.text_config)
    cfg.architectures = [preset.architecture]
    return cfg


def _require_weights(preset: Preset) -> None:
    if not preset.has_weights:
        raise QwenExportError(
            f"preset {preset.name!r} is config-only (no weights): use `qwen-export plan --preset "
            f"{preset.name}`, or export a downloaded checkpoint with --model DIR"
        )


def build_random_model(preset: Preset):
    """The preset's transformers model: seeded random weights, non-trivial where HF inits are flat."""
    _require_weights(preset)
    if preset.trained:
        raise QwenExportError(f"preset {preset.name!r} is trained, not random: load materialize()'s folder")
    import torch
    import transformers

    torch.manual_seed(PRESET_SEED)
    model = getattr(transformers, preset.architecture)(_hf_config(preset)).eval()
    randomize_flat_parameters(model, seed=PRESET_SEED)
    return model


def randomize_flat_parameters(model, seed: int) -> None:
    """HF initialises zero-centred norm weights at 0 and routers near 0; tests could not fail on those.

    Norm weights get N(0, 0.1); routers get logits with unit spread so top-k choices are decisive;
    embeddings and lm_head get unit-scale rows so logits are well separated.
    """
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            hidden = param.shape[-1]
            if name.endswith("norm.weight"):
                param.copy_(
                    torch.randn(param.shape, generator=gen) * 0.1
                    + (1.0 if "linear_attn.norm" in name else 0.0)
                )
            elif name.endswith("mlp.gate.weight"):
                param.copy_(torch.randn(param.shape, generator=gen) * (2.0 / hidden**0.5))
            elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
                param.copy_(torch.randn(param.shape, generator=gen) * (1.0 / hidden**0.5))


def _add_mtp_layer(folder: Path, model) -> None:
    """Add a seeded random MTP layer (golden/mtp.py) to a saved checkpoint, experts one per expert as Qwen's
    checkpoints store them; transformers neither builds nor saves this layer. It goes in its own shard
    (with an index), so model.safetensors stays byte for byte what transformers wrote."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qwen_export.golden.mtp import MtpReference

    gen = torch.Generator().manual_seed(PRESET_SEED + 2)
    mtp = MtpReference(model)
    mtp.init_weights(model.config.initializer_range, gen)
    with torch.no_grad():  # the same non-flat norms and decisive router as the main layers
        for name, param in mtp.named_parameters():
            if name.endswith("norm.weight") or "norm_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
            elif name.endswith("mlp.gate.weight"):
                param.copy_(torch.randn(param.shape, generator=gen) * (2.0 / param.shape[-1] ** 0.5))
    tensors = {k: v.contiguous() for k, v in mtp.to_checkpoint().items()}
    save_file(tensors, folder / MTP_WEIGHTS, metadata={"format": "pt"})
    with safe_open(folder / WEIGHTS, "pt") as f:
        weight_map = dict.fromkeys(f.keys(), WEIGHTS)
    weight_map |= dict.fromkeys(tensors, MTP_WEIGHTS)
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def materialize(name: str, quiet: bool = False) -> Path:
    """Path of the preset's checkpoint folder, creating it on first use."""
    preset = get_preset(name)
    _require_weights(preset)  # before anything is written
    if preset.trained:
        folder = trained_folder()
        if not (folder / WEIGHTS).is_file():
            raise QwenExportError(f"{folder}: the trained model is missing; run scripts/train_reference.py")
        return folder
    folder = cache_root() / "presets" / f"{name}-{preset.fingerprint()}"
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        touch(folder)  # its last use, for `qwen-export cache`
        return folder
    if not quiet:
        from rich.console import Console

        Console(stderr=True).print(f"[dim]materialising preset {name} (seed {PRESET_SEED}) in {folder}[/dim]")
    model = build_random_model(preset)
    with atomic_output_dir(folder) as tmp:
        model.save_pretrained(tmp)
        if preset.mtp:
            _add_mtp_layer(tmp, model)
        (tmp / "preset.json").write_text(
            json.dumps({"preset": name, "seed": PRESET_SEED, "fingerprint": preset.fingerprint()}, indent=2)
        )
    return folder


def preset_table() -> Listing:
    from qwen_export.listing import Listing

    rows = [
        {
            "name": name,
            "architecture": p.architecture,
            "weights": "trained"
            if p.trained
            else f"random (seed {PRESET_SEED})"
            if p.has_weights
            else "none (config only)",
            "description": p.description,
        }
        for name, p in PRESETS.items()
    ]
    return Listing("presets", ("preset", "architecture", "weights", "description"), rows, json_key="name")
