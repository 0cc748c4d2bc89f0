"""GatedAttention's Triton kernels: the list the AOT build compiles, the op run through them on a
transformers `Qwen3_5MoeAttention`'s own weights, and the `kernels check` rows against that module.

Pipeline (`run_gated_attention`): q/k/v projections in torch (the activation dtype), qk_norm_rope (q/k
RMSNorm + partial RoPE, K/V appended to the cache), then flash_prefill (any T, past or not) or
split_kv_decode + combine (one token on a past), both with the sigmoid gate fused, then o_proj in torch.
Every buffer a kernel touches is `Guarded`; outputs start as NaN so anything left unwritten shows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qwen_export.plugins.triton_support import CheckRow, Guarded, KernelSpec, compare, guard_problems

from . import flash_prefill_triton, qk_norm_rope_triton, split_kv_decode_triton
from .flash_prefill_triton import flash_prefill
from .qk_norm_rope_triton import qk_norm_rope
from .split_kv_decode_triton import decode_plan, decode_workspace_shapes, split_kv_decode

KERNELS: list[KernelSpec] = [
    *qk_norm_rope_triton.SPECS,
    *flash_prefill_triton.SPECS,
    *split_kv_decode_triton.SPECS,
]

QK_NORM_ROPE = "gated_attention.qk_norm_rope"
FLASH_PREFILL = "gated_attention.flash_prefill"
SPLIT_KV_DECODE = "gated_attention.split_kv_decode"  # with its combine kernel


@dataclass
class AttentionRun:
    """What one pass through our kernels produced (all in the activation dtype)."""

    out: Any  # [B, T, hidden] after o_proj
    q: Any  # [B, T, nh, hd] normed and rotated
    key: Any  # present keys [B, kv, past + T, hd]
    value: Any  # present values [B, kv, past + T, hd]
    problems: list[str] = field(default_factory=list)  # writes outside a buffer
    num_splits: int | None = None  # decode only


def _nan(shape, dtype) -> Guarded:
    import torch

    return Guarded(torch.full(shape, float("nan")), dtype)


def run_gated_attention(
    attn, hidden, cos, sin, attention_mask, past_key=None, past_value=None, dtype=None,
    decode: bool | None = None, num_splits: int | None = None, sm: str | None = None,
) -> AttentionRun:  # fmt: skip
    """`attn` (a transformers Qwen3_5MoeAttention) through our kernels.

    hidden [B, T, H]; cos/sin [B, T, rotary_dim] (the model's rotary embedding); attention_mask [B, past + T]
    (1 = attend); past_key/past_value [B, kv, past, hd] or None. `dtype`: the activation dtype (default:
    hidden's). `decode`: use split_kv_decode (default: T == 1 with a past)."""
    import torch
    import torch.nn.functional as F

    dtype = dtype or hidden.dtype
    B, T, _ = hidden.shape
    hd = attn.head_dim
    nh, kv = attn.config.num_attention_heads, attn.config.num_key_value_heads
    past = 0 if past_key is None else past_key.shape[2]
    decode = (T == 1 and past > 0) if decode is None else decode

    def proj(linear, x):
        bias = None if linear.bias is None else linear.bias.to(dtype)
        return F.linear(x, linear.weight.to(dtype), bias)

    with torch.no_grad():
        x = hidden.to(dtype)
        g = {
            "q_proj": Guarded(proj(attn.q_proj, x).view(B, T, nh, 2 * hd)),
            "k": Guarded(proj(attn.k_proj, x).view(B, T, kv, hd)),
            "v": Guarded(proj(attn.v_proj, x).view(B, T, kv, hd)),
            "q_norm": Guarded(attn.q_norm.weight.detach(), torch.float32),
            "k_norm": Guarded(attn.k_norm.weight.detach(), torch.float32),
            "cos": Guarded(cos.contiguous(), torch.float32),
            "sin": Guarded(sin.contiguous(), torch.float32),
            "mask": Guarded(attention_mask, torch.int32),
            "q": _nan((B, T, nh, hd), dtype),
            "key": _nan((B, kv, past + T, hd), dtype),
            "value": _nan((B, kv, past + T, hd), dtype),
            "out": _nan((B, T, nh * hd), dtype),
        }
        if past:
            g["key"].tensor[:, :, :past] = past_key.to(dtype)
            g["value"].tensor[:, :, :past] = past_value.to(dtype)
        qk_norm_rope(
            g["q_proj"].tensor, g["k"].tensor, g["v"].tensor, g["q_norm"].tensor, g["k_norm"].tensor,
            g["cos"].tensor, g["sin"].tensor, g["key"].tensor, g["value"].tensor, past, attn.q_norm.eps,
            q_out=g["q"].tensor, sm=sm,
        )  # fmt: skip
        splits = None
        if decode:
            constexprs, _, _, splits, _ = decode_plan(past + T, hd, dtype, hidden.device, sm, num_splits)
            shapes = decode_workspace_shapes(B, nh, hd, constexprs["MAX_SPLITS"])
            for name, shape in zip(("acc", "m", "l"), shapes, strict=True):
                g[name] = _nan(shape, torch.float32)
            split_kv_decode(
                g["q"].tensor, g["q_proj"].tensor, g["key"].tensor, g["value"].tensor, g["mask"].tensor,
                attn.scaling, out=g["out"].tensor, workspace=(g["acc"].tensor, g["m"].tensor, g["l"].tensor),
                num_splits=num_splits, sm=sm,
            )  # fmt: skip
        else:
            flash_prefill(
                g["q"].tensor, g["q_proj"].tensor, g["key"].tensor, g["value"].tensor, g["mask"].tensor,
                past, attn.scaling, out=g["out"].tensor, sm=sm,
            )  # fmt: skip
        out = proj(attn.o_proj, g["out"].tensor)
    return AttentionRun(out, g["q"].tensor, g["key"].tensor, g["value"].tensor, guard_problems(**g), splits)


def reference_gated_attention(attn, hidden, cos, sin, attention_mask, cache=None):
    """The transformers module's forward (fp32, eager) on the same inputs: (output [B, T, hidden], the cache
    after it, q [B, T, nh, hd] normed and rotated as the module computes it). `cache`: a DynamicCache that
    holds the past (updated in place), or None for a fresh one."""
    import torch
    from transformers.cache_utils import DynamicCache
    from transformers.masking_utils import create_causal_mask
    from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import apply_rotary_pos_emb

    B, T, _ = hidden.shape
    hd = attn.head_dim
    cache = cache if cache is not None else DynamicCache(config=attn.config)
    with torch.no_grad():
        mask = create_causal_mask(
            config=attn.config, inputs_embeds=hidden, attention_mask=attention_mask, past_key_values=cache,
            layer_idx=attn.layer_idx, allow_is_causal_skip=False,
        )  # fmt: skip
        query, _ = torch.chunk(attn.q_proj(hidden).view(B, T, -1, 2 * hd), 2, dim=-1)
        key = attn.k_norm(attn.k_proj(hidden).view(B, T, -1, hd)).transpose(1, 2)
        query, _ = apply_rotary_pos_emb(attn.q_norm(query).transpose(1, 2), key, cos, sin)
        out, _ = attn(hidden, position_embeddings=(cos, sin), attention_mask=mask, past_key_values=cache)
    return out, cache, query.transpose(1, 2)


def rotary(rotary_emb, hidden, position_ids):
    """cos, sin [B, T, rotary_dim] fp32 of text positions [B, T] (every mRoPE axis the same index)."""
    import torch

    with torch.no_grad():
        cos, sin = rotary_emb(hidden, position_ids)
    return cos.float(), sin.float()


def cache_layer(cache, layer_index: int):
    """(keys, values) [B, kv, S, hd] of a DynamicCache's layer."""
    layer = cache.layers[layer_index]
    return layer.keys, layer.values


def check_rows(
    ours: AttentionRun, ref_out, ref_cache, ref_q, layer_index: int, kernel: str, case: str, dtype
):
    """CheckRows of one step: qk_norm_rope (q; the whole KV cache) and the attention kernel (layer output)."""
    import torch

    ok = not ours.problems
    ref_k, ref_v = cache_layer(ref_cache, layer_index)
    kv_ours = torch.cat([ours.key.flatten(), ours.value.flatten()])
    kv_ref = torch.cat([ref_k.flatten(), ref_v.flatten()])
    return [
        compare(QK_NORM_ROPE, f"{case}: q", ours.q, ref_q, dtype, ok),
        compare(QK_NORM_ROPE, f"{case}: KV cache", kv_ours, kv_ref, dtype, ok),
        compare(kernel, case, ours.out, ref_out, dtype, ok),
    ]


def check_layer(model, layer_index: int, dtype) -> list[CheckRow]:
    """Layer `layer_index` of a transformers CausalLM (fp32, eval; a multimodal wrapper or kernel_check's
    text view too) through our kernels, if it is a full-attention layer: a left-padded batch of two prefilled
    with 65 tokens, then one decode step on that KV cache, each against the module's own forward."""
    import torch

    from qwen_export.kernel_check import text_view

    view = text_view(model)
    if view.config.layer_types[layer_index] != "full_attention":
        return []
    attn = view.model.layers[layer_index].self_attn
    name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    B, T, pad = 2, 65, 5
    gen = torch.Generator().manual_seed(1234 + layer_index)
    hidden = torch.randn(B, T + 1, view.config.hidden_size, generator=gen)
    mask = torch.ones(B, T + 1, dtype=torch.long)
    mask[1, :pad] = 0
    positions = torch.arange(T + 1).expand(B, -1)
    cos, sin = rotary(view.model.rotary_emb, hidden, positions)

    ref_out, cache, ref_q = reference_gated_attention(
        attn, hidden[:, :T], cos[:, :T], sin[:, :T], mask[:, :T]
    )
    ours = run_gated_attention(attn, hidden[:, :T], cos[:, :T], sin[:, :T], mask[:, :T], dtype=dtype)
    case = f"layer {layer_index}, prefill {T} tokens, batch {B} (one left-padded by {pad}), {name}"
    rows = check_rows(ours, ref_out, cache, ref_q, attn.layer_idx, FLASH_PREFILL, case, dtype)

    ref_out, cache, ref_q = reference_gated_attention(
        attn, hidden[:, T:], cos[:, T:], sin[:, T:], mask, cache
    )
    step = run_gated_attention(
        attn, hidden[:, T:], cos[:, T:], sin[:, T:], mask, ours.key, ours.value, dtype=dtype
    )
    case = f"layer {layer_index}, decode 1 token on {T} cached, {step.num_splits} KV splits, {name}"
    return rows + check_rows(step, ref_out, cache, ref_q, attn.layer_idx, SPLIT_KV_DECODE, case, dtype)
