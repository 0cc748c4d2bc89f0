"""The PyTorch reference of Qwen3.5's multi-token-prediction (MTP) layer, which transformers drops.

The math follows vLLM's `Qwen3_5MultiTokenPredictor` (vllm/model_executor/models/qwen3_5_mtp.py, and
qwen3_next_mtp.py for Qwen3-Next) and SGLang's qwen3_5_mtp.py. Given the main model's hidden state h_t after
its final norm and the next token t+1:

    x = fc(concat([pre_fc_norm_embedding(embed(t+1)), pre_fc_norm_hidden(h_t)]))
    x = layers.0(x)          # a full-attention decoder layer with the model's MoE or MLP
    h = norm(x)              # the draft's hidden state; logits = lm_head(h)

Embeddings and lm_head are the main model's. The pair (h_t, token t+1) sits at position t, as vLLM feeds
its drafts (the target's positions, token ids shifted left by one). For more than one draft token the same
layer runs again on its own normed output. The decoder layer is transformers' own class for the
architecture, built with a one-layer config whose only layer is full attention; only the glue around it is
written here. Checkpoints store the MTP layer's experts one per expert (`mtp.layers.0.mlp.experts.{e}.*`),
bf16 checkpoints included; `to_checkpoint`/`load_checkpoint_tensors` convert from and to transformers'
stacked layout.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qwen_export.errors import CheckpointError

PREFIX = "mtp."
_STACKED = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_PER_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")


def _layer_config(text_config):
    """The main text config narrowed to one full-attention layer (the MTP layer is decoder layer 0)."""
    config = copy.deepcopy(text_config)
    config.num_hidden_layers = 1
    config.layer_types = ["full_attention"]
    return config


def _decoder_layer_class(main_model) -> type[nn.Module]:
    return type(main_model.model.layers[0])


class ZeroCentredRMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * (1 + w), computed in fp32 as the model's own norms are."""

    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * (1.0 + self.weight.float())).to(dtype)


class MtpReference(nn.Module):
    """One MTP layer (`mtp_num_hidden_layers` is 1 in every published Qwen3.5 config)."""

    def __init__(self, main_model):
        super().__init__()
        text_config = main_model.config.get_text_config()
        hidden, eps = text_config.hidden_size, text_config.rms_norm_eps
        self.pre_fc_norm_embedding = ZeroCentredRMSNorm(hidden, eps)
        self.pre_fc_norm_hidden = ZeroCentredRMSNorm(hidden, eps)
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.layers = nn.ModuleList([_decoder_layer_class(main_model)(_layer_config(text_config), 0)])
        self.norm = ZeroCentredRMSNorm(hidden, eps)
        self.init_weights(text_config.initializer_range)

    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        """The main model's initialisation: N(0, std) matrices, zero (unit-scale) norms. A decoder layer
        built outside a PreTrainedModel would otherwise keep torch.empty's garbage in its experts."""
        with torch.no_grad():
            for param in self.parameters():
                if param.dim() >= 2:
                    param.copy_(torch.randn(param.shape, generator=generator) * std)
                else:
                    param.zero_()

    def forward(
        self,
        main_model,
        next_ids: torch.Tensor,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole sequences from an empty cache: next_ids [B, T] (token t+1 at column t), hidden [B, T, H]
        (the main model's normed h_t), position_ids [B, T], attention_mask [B, T] (1 = real token).
        Returns (the draft's normed hidden [B, T, H], logits [B, T, V])."""
        embeds = main_model.model.embed_tokens(next_ids)
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], -1))
        position_embeddings = main_model.model.rotary_emb(x, position_ids)
        mask = _additive_causal_mask(next_ids.shape, attention_mask, x.dtype)
        for layer in self.layers:
            x = layer(
                x, position_embeddings=position_embeddings, attention_mask=mask, position_ids=position_ids
            )
        h = self.norm(x)
        return h, main_model.lm_head(h)

    # --- checkpoint layout ----------------------------------------------------------------------------
    def to_checkpoint(self) -> dict[str, torch.Tensor]:
        """The layer's tensors as a checkpoint stores them: `mtp.` names, experts one per expert."""
        out: dict[str, torch.Tensor] = {}
        for name, tensor in self.state_dict().items():
            match = _STACKED.match(name)
            if match is None:
                out[PREFIX + name] = tensor.detach().clone()
                continue
            layer, part = match.groups()
            for e, weights in enumerate(tensor.detach()):
                base = f"{PREFIX}layers.{layer}.mlp.experts.{e}."
                if part == "down_proj":
                    out[base + "down_proj.weight"] = weights.clone()
                else:
                    gate, up = weights.chunk(2, dim=0)
                    out[base + "gate_proj.weight"], out[base + "up_proj.weight"] = gate.clone(), up.clone()
        return out

    def load_checkpoint_tensors(
        self, tensors: Mapping[str, torch.Tensor], source: str = "checkpoint"
    ) -> None:
        """Load `mtp.*` tensors (experts one per expert or stacked); a missing or extra tensor is named."""
        state: dict[str, torch.Tensor] = {}
        experts: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
        for name, tensor in tensors.items():
            if not name.startswith(PREFIX):
                continue
            local = name.removeprefix(PREFIX)
            match = _PER_EXPERT.match(local)
            if match is None:
                state[local] = tensor
            else:
                layer, e, part = match.groups()
                experts.setdefault((layer, part), {})[int(e)] = tensor
        for (layer, part), by_index in experts.items():
            base = f"layers.{layer}.mlp.experts."
            ordered = [by_index[e] for e in sorted(by_index)]
            if part == "down":
                state[base + "down_proj"] = torch.stack(ordered)
        for (layer, part), by_index in experts.items():
            if part == "gate":
                ups = experts.get((layer, "up"), {})
                base = f"layers.{layer}.mlp.experts."
                pairs = [torch.cat([by_index[e], ups[e]]) for e in sorted(by_index) if e in ups]
                state[base + "gate_up_proj"] = torch.stack(pairs)
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        if missing:
            raise CheckpointError(f"{source}: incomplete MTP layer: missing tensor {PREFIX}{missing[0]}")
        for name, tensor in state.items():
            if name not in expected:
                raise CheckpointError(f"{source}: unexpected MTP tensor {PREFIX}{name}")
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise CheckpointError(
                    f"{source}: MTP tensor {PREFIX}{name} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(expected[name].shape)}"
                )
        self.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


def _additive_causal_mask(shape: torch.Size, attention_mask: torch.Tensor | None, dtype) -> torch.Tensor:
    """[B, 1, T, T]: 0 where query t may see key j (j <= t, j a real token), the dtype's min elsewhere."""
    batch, length = shape
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None, None].expand(batch, 1, length, length)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def load_mtp_reference(model_dir: str | Path, main_model) -> MtpReference:
    """The MTP layer of a checkpoint folder, next to its main model (load_reference's); an FP8 checkpoint's
    weights are read dequantized by their block scales."""
    from qwen_export.exporter import fp8
    from qwen_export.exporter.checkpoint import Checkpoint
    from qwen_export.exporter.spec import read_config_json

    model_dir = Path(model_dir)
    ckpt = Checkpoint.open(model_dir, read_config_json(model_dir))
    names = [n for n in ckpt.tensors if n.startswith(PREFIX) and not n.endswith(fp8.SCALE_SUFFIX)]
    if not names:
        raise CheckpointError(f"{model_dir}: the checkpoint has no mtp.* tensors (no MTP layer)")
    arrays = ckpt.read_many(names)
    module = MtpReference(main_model).to(next(main_model.parameters()).dtype)
    module.load_checkpoint_tensors(
        {n: torch.from_numpy(np.ascontiguousarray(a)) for n, a in zip(names, arrays, strict=True)},
        str(model_dir),
    )
    return module.eval()


def reference_draft(
    main_model, mtp: MtpReference, input_ids: np.ndarray, attention_mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The main model over a prompt, then the MTP layer over its pairs (h_t, token t+1) for t < T-1.

    Returns (the main model's normed hidden states [B, T, H], the draft's hidden [B, T-1, H] and its logits
    [B, T-1, V]); positions follow HF (running count of real tokens)."""
    ids = torch.as_tensor(input_ids, dtype=torch.long)
    mask = (
        torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask, dtype=torch.long)
    )
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        out = main_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hidden = out.hidden_states[-1]  # transformers applies the final norm to the last entry
        draft_hidden, draft_logits = mtp(
            main_model, ids[:, 1:], hidden[:, :-1], positions[:, :-1], mask[:, :-1]
        )
    return hidden.float().numpy(), draft_hidden.float().numpy(), draft_logits.float().numpy()
