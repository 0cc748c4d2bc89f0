"""Gated DeltaNet's Triton kernels: the specs the AOT build compiles, and `check_layer`, which runs them
(under the interpreter on a CPU) on one linear-attention layer's real weights against the transformers
module's own reference functions (`causal_conv1d_update`, `torch_chunk_gated_delta_rule`,
`torch_recurrent_gated_delta_rule`, from the layer's modeling module).

The projections stay torch matmuls (fp32); what is checked is the conv (prefill from zero and from carried
state, decode), the chunked delta rule (prefill from zero and from carried state) and the recurrent delta
rule (decode). Each kernel is fed the reference's own input cast to the precision under test, so a row
measures that kernel alone; carried states are the reference's (fp32) states after the earlier steps.
"""

from __future__ import annotations

import sys
from typing import Any

from qwen_export.plugins.gated_deltanet import (
    causal_conv_triton,
    chunk_delta_rule_triton,
    recurrent_delta_rule_triton,
)
from qwen_export.plugins.triton_support import CheckRow, Guarded, KernelSpec, compare, guard_problems

KERNELS: list[KernelSpec] = [
    causal_conv_triton.SPEC,
    causal_conv_triton.ACT_STATE_SPEC,
    chunk_delta_rule_triton.SPEC,
    recurrent_delta_rule_triton.SPEC,
]

PREFILL_TOKENS = 65  # two chunks, the second one partial
SEED = 20260216
DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def _text_model(model: Any) -> tuple[Any, Any]:
    """(decoder with `.layers`, text config) of a CausalLM, a multimodal wrapper or kernel_check's view."""
    inner = model.model
    text = getattr(inner, "language_model", inner)
    config = getattr(model.config, "text_config", None) or model.config
    return text, config


def _project(attn: Any, hidden: Any) -> tuple[Any, Any, Any]:
    """(mixed qkv [B, T, C] before the conv, a, b [B, T, nv]) exactly as the module's forward makes them,
    for Qwen3.5's separate projections and Qwen3-Next's fused qkvz / ba ones."""
    import torch

    if hasattr(attn, "in_proj_qkv"):
        return attn.in_proj_qkv(hidden), attn.in_proj_a(hidden), attn.in_proj_b(hidden)
    q, k, v, _, b, a = attn.fix_query_key_value_ordering(attn.in_proj_qkvz(hidden), attn.in_proj_ba(hidden))
    mixed = torch.cat([x.reshape(x.shape[0], x.shape[1], -1) for x in (q, k, v)], dim=-1)
    return mixed, a, b


class DeltaNetLayer:
    """One linear-attention module: its weights, dims and the reference functions of its modeling module."""

    def __init__(self, attn: Any):
        import torch

        self.attn = attn
        self.ref = sys.modules[type(attn).__module__]
        self.nk, self.nv = attn.num_k_heads, attn.num_v_heads
        self.dk, self.dv = attn.head_k_dim, attn.head_v_dim
        self.conv_weight = attn.conv1d.weight.detach().squeeze(1).float()  # [C, K]
        self.conv_bias = None if attn.conv1d.bias is None else attn.conv1d.bias.detach().float()
        self.neg_exp_a = -attn.A_log.detach().float().exp()
        self.dt_bias = attn.dt_bias.detach().float().contiguous()
        self.activation = attn.activation
        self.torch = torch

    def ref_conv(self, mixed, state):
        """(silu(conv) [B, T, C], new state [B, C, K-1]) by the module's causal_conv1d_update; `state`
        None is zeros."""
        if state is None:
            state = self.torch.zeros(mixed.shape[0], mixed.shape[2], self.conv_weight.shape[1] - 1)
        state = state.clone()
        out = self.ref.causal_conv1d_update(
            mixed.transpose(1, 2), state, self.conv_weight, self.conv_bias, self.activation
        )
        return out.transpose(1, 2).contiguous(), state

    def ref_rule(self, qkv, a, b, state, recurrent: bool):
        """(o [B, T, nv, dv], final state) of the conv output `qkv` by the module's
        torch_recurrent_gated_delta_rule (recurrent) or torch_chunk_gated_delta_rule, with g and beta made
        as the module's forward makes them."""
        batch, tokens, _ = qkv.shape
        key_dim = self.nk * self.dk
        q, k, v = qkv.split([key_dim, key_dim, self.nv * self.dv], dim=-1)
        g = self.neg_exp_a * self.torch.nn.functional.softplus(a.float() + self.dt_bias)
        fn = self.ref.torch_recurrent_gated_delta_rule if recurrent else self.ref.torch_chunk_gated_delta_rule
        return fn(
            q.reshape(batch, tokens, self.nk, self.dk),
            k.reshape(batch, tokens, self.nk, self.dk),
            v.reshape(batch, tokens, self.nv, self.dv),
            g=g,
            beta=b.sigmoid(),
            initial_state=state,
            output_final_state=True,
            use_qk_l2norm_in_kernel=True,
        )

    def run_conv(self, mixed, state, dtype, mask=None, state_dtype=None):
        """Our conv on `mixed` cast to `dtype`, from `state` (None: zeros) held in `state_dtype` (fp32 by
        default; the activation type is the plugin's, ACT_STATE_SPEC), every buffer Guarded:
        (out, new state, guard problems)."""
        torch = self.torch
        batch, tokens, channels = mixed.shape
        mask = torch.ones(batch, tokens, dtype=torch.int32) if mask is None else mask
        g = {
            "x": Guarded(mixed, dtype),
            "weight": Guarded(self.conv_weight, dtype),
            "mask": Guarded(mask),
            "state_out": Guarded(
                torch.zeros(batch, channels, self.conv_weight.shape[1] - 1), state_dtype or torch.float32
            ),
            "out": Guarded(torch.zeros(batch, tokens, channels), dtype),
        }
        if state is not None:
            g["state_in"] = Guarded(state, state_dtype or torch.float32)
        causal_conv_triton.causal_conv(
            g["x"].tensor,
            g["weight"].tensor,
            g["state_in"].tensor if state is not None else None,
            mask=g["mask"].tensor,
            state_out=g["state_out"].tensor,
            out=g["out"].tensor,
        )
        return g["out"].tensor, g["state_out"].tensor, guard_problems(**g)

    def run_rule(self, qkv, a, b, state, dtype, recurrent: bool, mask=None):
        """Our chunked (or recurrent) delta rule on `qkv`, `a`, `b` cast to `dtype`, from `state` (None:
        zeros), every buffer Guarded: (out, final state, guard problems)."""
        torch = self.torch
        batch, tokens, _ = qkv.shape
        mask = torch.ones(batch, tokens, dtype=torch.int32) if mask is None else mask
        g = {
            "qkv": Guarded(qkv, dtype),
            "a": Guarded(a, dtype),
            "b": Guarded(b, dtype),
            "neg_exp_a": Guarded(self.neg_exp_a),
            "dt_bias": Guarded(self.dt_bias),
            "mask": Guarded(mask),
            "state_out": Guarded(torch.zeros(batch, self.nv, self.dk, self.dv)),
            "out": Guarded(torch.zeros(batch, tokens, self.nv, self.dv), dtype),
        }
        if state is not None:
            g["state_in"] = Guarded(state, torch.float32)
        run = (
            recurrent_delta_rule_triton.recurrent_delta_rule
            if recurrent
            else chunk_delta_rule_triton.chunk_delta_rule
        )
        run(
            *(g[name].tensor for name in ("qkv", "a", "b", "neg_exp_a", "dt_bias")),
            self.nk,
            self.dk,
            self.dv,
            state=g["state_in"].tensor if state is not None else None,
            mask=g["mask"].tensor,
            state_out=g["state_out"].tensor,
            out=g["out"].tensor,
        )
        return g["out"].tensor, g["state_out"].tensor, guard_problems(**g)

    def check_conv(self, mixed, state, dtype, case: str) -> tuple[list[CheckRow], Any, Any]:
        """Rows for our conv against the reference; also the reference (output, state) for the next step."""
        ref_out, ref_state = self.ref_conv(mixed, state)
        rows = []
        specs = [(causal_conv_triton.SPEC, None)]
        if dtype != self.torch.float32:  # the plugin's state, in the activation type
            specs.append((causal_conv_triton.ACT_STATE_SPEC, dtype))
        for spec, state_dtype in specs:
            out, new_state, problems = self.run_conv(mixed, state, dtype, state_dtype=state_dtype)
            rows += [
                compare(spec.name, f"{case}: output", out, ref_out, dtype, not problems),
                compare(spec.name, f"{case}: conv state", new_state, ref_state, dtype, not problems),
            ]
        return rows, ref_out, ref_state

    def check_rule(self, qkv, a, b, state, dtype, case: str, recurrent: bool) -> tuple[list[CheckRow], Any]:
        """Rows for our delta rule against the reference; also the reference final state."""
        ref_out, ref_state = self.ref_rule(qkv, a, b, state, recurrent)
        out, new_state, problems = self.run_rule(qkv, a, b, state, dtype, recurrent)
        spec = (recurrent_delta_rule_triton if recurrent else chunk_delta_rule_triton).SPEC
        rows = [
            compare(spec.name, f"{case}: output", out, ref_out, dtype, not problems),
            compare(spec.name, f"{case}: recurrent state", new_state, ref_state, dtype, not problems),
        ]
        return rows, ref_state


def check_layer(model: Any, layer_index: int, dtype: Any) -> list[CheckRow]:
    """Our kernels on layer `layer_index` of `model` (fp32, eval) in `dtype` (torch.float32 / float16 /
    bfloat16) against the reference in fp32: prefill of 65 tokens from zero state, 65 more from the carried
    state, then one decode step. [] when the layer is not a Gated DeltaNet layer."""
    import torch

    text, config = _text_model(model)
    decoder = text.layers[layer_index]
    attn = getattr(decoder, "linear_attn", None)
    if attn is None:
        return []
    layer = DeltaNetLayer(attn)
    precision = DTYPE_NAMES[str(dtype).removeprefix("torch.")]
    generator = torch.Generator().manual_seed(SEED + layer_index)
    rows: list[CheckRow] = []
    conv_state = rule_state = None
    with torch.no_grad():
        for step, tokens in enumerate((PREFILL_TOKENS, PREFILL_TOKENS, 1)):
            hidden = torch.randn(1, tokens, config.hidden_size, generator=generator)
            mixed, a, b = _project(attn, decoder.input_layernorm(hidden))
            start = "prefill" if tokens > 1 else "decode"
            carried = "zero" if step == 0 else "carried"
            case = f"{start} {tokens} token{'s' * (tokens > 1)} from {carried} state, {precision}"
            conv_rows, qkv, conv_state = layer.check_conv(mixed, conv_state, dtype, case)
            rule_rows, rule_state = layer.check_rule(
                qkv, a, b, rule_state, dtype, case, recurrent=tokens == 1
            )
            rows += conv_rows + rule_rows
    return rows
