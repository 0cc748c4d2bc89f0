"""Normalised description of a Qwen3.5-family text model, read from a Hugging Face config.json."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qwen_export.errors import ConfigError

# architecture -> (family, where the text tower's tensors live in the checkpoint)
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "Qwen3_5MoeForCausalLM": "qwen3_5_moe",
    "Qwen3_5MoeForConditionalGeneration": "qwen3_5_moe",
    "Qwen3_5ForCausalLM": "qwen3_5",
    "Qwen3_5ForConditionalGeneration": "qwen3_5",
    "Qwen3NextForCausalLM": "qwen3_next",
}
_TEXT_MODEL_TYPES = {
    "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
    "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM",
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
    "qwen3_5_text": "Qwen3_5ForCausalLM",
    "qwen3_next": "Qwen3NextForCausalLM",
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything the exporter needs to know about the text tower's shapes and math."""

    architecture: str
    family: str  # qwen3_5_moe | qwen3_5 | qwen3_next
    multimodal: bool
    vocab_size: int
    hidden_size: int
    num_layers: int
    layer_types: tuple[str, ...]
    rms_norm_eps: float
    tie_word_embeddings: bool
    # gated full attention
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    partial_rotary_factor: float
    attention_bias: bool
    # Gated DeltaNet
    linear_num_key_heads: int
    linear_num_value_heads: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_conv_kernel_dim: int
    # feed-forward: per layer "moe" or "dense"
    mlp_types: tuple[str, ...]
    intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    norm_topk_prob: bool
    hidden_act: str = "silu"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def conv_dim(self) -> int:
        return 2 * self.linear_num_key_heads * self.linear_key_head_dim + self.value_dim

    @property
    def value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    def attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full_attention"]

    def linear_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def read_config_json(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: config.json not found; pass a Hugging Face checkpoint folder")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return data


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _architecture(config: dict[str, Any], source: str | os.PathLike) -> str:
    architectures = config.get("architectures") or []
    architecture = architectures[0] if architectures else _TEXT_MODEL_TYPES.get(config.get("model_type", ""))
    if architecture not in SUPPORTED_ARCHITECTURES:
        supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
        raise ConfigError(
            f"{source}: architecture {architecture or config.get('model_type')!r} is not in the Qwen3.5 "
            f"family; supported: {supported}"
        )
    return architecture


def spec_from_config(config: dict[str, Any], source: str | os.PathLike = "config.json") -> ModelSpec:
    """Build a ModelSpec through transformers' own config classes, so defaults match the reference."""
    architecture = _architecture(config, source)
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.for_model(**config)
        text = cfg.get_text_config()
    except Exception as e:  # transformers raises many types for bad configs
        raise ConfigError(f"{source}: transformers rejected the config ({type(e).__name__}: {e})") from None
    return _spec(architecture, cfg, text, source)


class _Unstated(Exception):
    """config.json leaves a field to transformers' defaults."""


class _Stated:
    """Attribute access to the fields config.json states; a field it leaves out raises _Unstated (not
    AttributeError, so that `getattr(x, name, default)` cannot quietly substitute our own default)."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self._fields = fields

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in self._fields:
            raise _Unstated(name)
        return self._fields[name]


def spec_from_stated_fields(
    config: dict[str, Any], source: str | os.PathLike = "config.json"
) -> ModelSpec | None:
    """The spec read straight from config.json when it states every field the spec needs (configs that
    transformers writes do), without importing transformers (and with it torch, ~2 s); None when a field is
    left to transformers' defaults. Callers confirm it with `spec_from_config` before publishing anything
    (qwen_export.exporter.export.SpeculativeSpec runs that in the background)."""
    architecture = _architecture(config, source)
    text_fields = config.get("text_config") if architecture.endswith("ForConditionalGeneration") else config
    if not isinstance(text_fields, dict):
        return None
    try:
        return _spec(architecture, _Stated(config), _Stated(text_fields), source)
    except ConfigError:
        raise
    except Exception:  # _Unstated, or a stated value of a type only transformers' reading can judge
        return None


def _spec(architecture: str, cfg: Any, text: Any, source: str | os.PathLike) -> ModelSpec:
    family = SUPPORTED_ARCHITECTURES[architecture]
    try:
        n = text.num_hidden_layers
        layer_types = tuple(text.layer_types)
        if family == "qwen3_next":
            mlp_types = tuple(
                "moe"
                if (
                    i not in text.mlp_only_layers
                    and text.num_experts > 0
                    and (i + 1) % text.decoder_sparse_step == 0
                )
                else "dense"
                for i in range(n)
            )
        elif family == "qwen3_5_moe":
            mlp_types = ("moe",) * n
        else:
            mlp_types = ("dense",) * n
        rope = text.rope_parameters or {}
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(
                f"{source}: rope_type {rope.get('rope_type')!r} is not supported (only 'default')"
            )
        spec = ModelSpec(
            architecture=architecture,
            family=family,
            multimodal=architecture.endswith("ForConditionalGeneration"),
            vocab_size=text.vocab_size,
            hidden_size=text.hidden_size,
            num_layers=n,
            layer_types=layer_types,
            rms_norm_eps=float(text.rms_norm_eps),
            tie_word_embeddings=bool(cfg.tie_word_embeddings),
            num_attention_heads=text.num_attention_heads,
            num_key_value_heads=text.num_key_value_heads,
            head_dim=text.head_dim,
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            partial_rotary_factor=float(rope.get("partial_rotary_factor", 1.0)),
            attention_bias=bool(text.attention_bias),
            linear_num_key_heads=text.linear_num_key_heads,
            linear_num_value_heads=text.linear_num_value_heads,
            linear_key_head_dim=text.linear_key_head_dim,
            linear_value_head_dim=text.linear_value_head_dim,
            linear_conv_kernel_dim=text.linear_conv_kernel_dim,
            mlp_types=mlp_types,
            **_feed_forward_fields(family, text, mlp_types),
            hidden_act=text.hidden_act,
        )
    except AttributeError as e:
        raise ConfigError(f"{source}: config lacks a field the {family} family needs ({e})") from None
    _validate(spec, source)
    return spec


def _feed_forward_fields(family: str, text: Any, mlp_types: tuple[str, ...]) -> dict[str, Any]:
    """Only the fields the family's layers use are read; the others are 0 (Qwen3.5-MoE always renormalises
    the top-k weights: its config has no norm_topk_prob switch)."""
    fields: dict[str, Any] = {"intermediate_size": 0, "num_experts": 0, "num_experts_per_tok": 0}
    fields |= {"moe_intermediate_size": 0, "shared_expert_intermediate_size": 0, "norm_topk_prob": True}
    if "dense" in mlp_types:
        fields["intermediate_size"] = int(text.intermediate_size)
    if "moe" in mlp_types:
        fields |= {
            "num_experts": int(text.num_experts),
            "num_experts_per_tok": int(text.num_experts_per_tok),
            "moe_intermediate_size": int(text.moe_intermediate_size),
            "shared_expert_intermediate_size": int(text.shared_expert_intermediate_size),
            "norm_topk_prob": bool(text.norm_topk_prob) if family == "qwen3_next" else True,
        }
    return fields


def _validate(spec: ModelSpec, source: str | os.PathLike) -> None:
    if len(spec.layer_types) != spec.num_layers:
        raise ConfigError(
            f"{source}: layer_types has {len(spec.layer_types)} entries for {spec.num_layers} layers"
        )
    bad = set(spec.layer_types) - {"full_attention", "linear_attention"}
    if bad:
        raise ConfigError(f"{source}: unsupported layer types {sorted(bad)}")
    if spec.hidden_act != "silu":
        raise ConfigError(f"{source}: hidden_act {spec.hidden_act!r} is not supported (only 'silu')")
    if spec.num_attention_heads % spec.num_key_value_heads:
        raise ConfigError(f"{source}: num_attention_heads is not a multiple of num_key_value_heads")
    if spec.linear_num_value_heads % spec.linear_num_key_heads:
        raise ConfigError(f"{source}: linear_num_value_heads is not a multiple of linear_num_key_heads")
    if spec.rotary_dim % 2:
        raise ConfigError(f"{source}: rotary dimension {spec.rotary_dim} must be even")
