"""The PyTorch reference: transformers' own classes, loaded from a checkpoint folder."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from qwen_export.exporter.spec import read_config_json, spec_from_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network


REFERENCE_DTYPES = ("fp32", "bf16", "fp16")  # the names exports and tolerances use


def load_reference(model_dir: str | Path, dtype: str = "fp32"):
    """The transformers model for a checkpoint folder, in `dtype` (fp32 | bf16 | fp16), eval mode, eager
    attention. An FP8 checkpoint's reference is transformers on its dequantized weights: transformers'
    own FP8 loading of MoE models is reported broken (huggingface/transformers#44230)."""
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    from qwen_export.exporter import fp8

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # its "Loading weights" bar would land in our CLIs' output
    model_dir = Path(model_dir)
    config = read_config_json(model_dir)
    spec = spec_from_config(config, model_dir / "config.json")
    cls = getattr(transformers, spec.architecture)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    if fp8.quantization_config(config) is not None:
        return _dequantized_reference(model_dir, config, cls).to(torch_dtype).eval()
    model = cls.from_pretrained(model_dir, dtype=torch_dtype, attn_implementation="eager")
    return model.eval()


_PER_EXPERT = re.compile(
    r"^(?P<prefix>.*\.mlp\.experts)\.(?P<expert>\d+)\.(?P<part>gate|up|down)_proj\.weight$"
)


def _dequantized_reference(model_dir: Path, config: dict, cls):
    """An fp32 transformers model holding an FP8 checkpoint's dequantized weights, its per-expert weights
    stacked the way transformers keeps them (gate_up_proj [E, 2I, H], down_proj [E, H, I])."""
    import torch
    from transformers import AutoConfig

    from qwen_export.exporter import fp8
    from qwen_export.exporter.checkpoint import MTP_PART, Checkpoint

    plain = {k: v for k, v in config.items() if k != "quantization_config"}
    if isinstance(plain.get("text_config"), dict):
        plain["text_config"] = {k: v for k, v in plain["text_config"].items() if k != "quantization_config"}
    model = cls._from_config(AutoConfig.for_model(**plain), attn_implementation="eager", dtype=torch.float32)
    ckpt = Checkpoint.open(model_dir, config)
    names = [n for n in ckpt.tensors if not n.endswith(fp8.SCALE_SUFFIX) and not re.search(MTP_PART[0], n)]
    state: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, dict[int, np.ndarray]]] = {}
    for name, array in zip(names, ckpt.read_many(names), strict=True):
        match = _PER_EXPERT.match(name)
        if match:
            parts = experts.setdefault(match["prefix"], {})
            parts.setdefault(match["part"], {})[int(match["expert"])] = array
        else:
            state[name] = torch.from_numpy(np.ascontiguousarray(array))
    for prefix, parts in experts.items():
        count = len(parts["gate"])
        gate_up = [np.concatenate([parts["gate"][e], parts["up"][e]]) for e in range(count)]
        state[prefix + ".gate_up_proj"] = torch.from_numpy(np.stack(gate_up))
        state[prefix + ".down_proj"] = torch.from_numpy(np.stack([parts["down"][e] for e in range(count)]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(
            f"{model_dir}: dequantized weights do not fit {cls.__name__}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model


def reference_forward(model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None):
    """Full forward of a prompt from empty state: (logits [B,T,V] numpy, the HF cache)."""
    import torch

    ids = torch.as_tensor(input_ids, dtype=torch.long)
    mask = None if attention_mask is None else torch.as_tensor(attention_mask, dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    return out.logits.float().numpy(), out.past_key_values


def reference_greedy(
    model, input_ids: np.ndarray, max_new_tokens: int, attention_mask: np.ndarray | None = None
):
    """HF `generate` greedy: (new tokens [B, N], raw step logits [B, N, V])."""
    import torch

    ids = torch.as_tensor(input_ids, dtype=torch.long)
    mask = (
        torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask, dtype=torch.long)
    )
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            eos_token_id=None,
        )
    tokens = out.sequences[:, ids.shape[1] :].numpy()
    logits = torch.stack(out.logits, dim=1).float().numpy()
    return tokens, logits


def cache_states(cache, layer_types: list[str] | tuple[str, ...]) -> dict[str, np.ndarray]:
    """The HF cache as our state dict: `i.key`/`i.value` or `i.conv_state`/`i.recurrent_state`.

    HF keeps `kernel` columns of conv state; the last `kernel - 1` carry all the information the next
    step needs, and that is what the exported graph carries.
    """
    states: dict[str, np.ndarray] = {}
    for i, kind in enumerate(layer_types):
        layer = cache.layers[i]
        if kind == "full_attention":
            states[f"{i}.key"] = layer.keys.float().numpy()
            states[f"{i}.value"] = layer.values.float().numpy()
        else:
            conv = layer.conv_states[0]
            states[f"{i}.conv_state"] = conv[..., 1:].float().numpy()
            states[f"{i}.recurrent_state"] = layer.recurrent_states[0].float().numpy()
    return states
