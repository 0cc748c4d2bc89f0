"""The PyTorch reference: transformers' own classes, loaded from a checkpoint folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from qwen_export.exporter.spec import read_config_json, spec_from_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network


def load_reference(model_dir: str | Path):
    """The transformers model for a checkpoint folder, in fp32 eval mode (eager attention)."""
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model_dir = Path(model_dir)
    spec = spec_from_config(read_config_json(model_dir), model_dir / "config.json")
    cls = getattr(transformers, spec.architecture)
    model = cls.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


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
