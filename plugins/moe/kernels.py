"""The MoE op's Triton kernels: their specs for the ahead-of-time build, the launch sequence of one sparse MoE
block, and `check_layer`, which runs a model's own MoE layer through them against transformers' module.

Launch sequence (`moe_block`): router logits + softmax/top-k (router_topk_triton.py) -> routed experts
(grouped_gemm_triton.py: align_triton.py then the grouped gate_up/SwiGLU and down GEMMs; or, for a handful
of tokens, the decode GEMVs with no alignment) -> the shared expert through the same GEMM kernels as one
dense expert (ROUTED=False) -> combine (combine_triton.py: weighted top-k sum + sigmoid-gated shared
expert). Nothing in it is torch math: torch only allocates.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from qwen_export.plugins.triton_support import (
    INT_SENTINEL,
    CheckRow,
    Guarded,
    KernelSpec,
    compare,
    guard_problems,
)

from . import align_triton, combine_triton, grouped_gemm_triton, router_topk_triton
from .combine_triton import moe_combine
from .grouped_gemm_triton import choose_path, experts_swiglu
from .router_topk_triton import router_topk

KERNELS: list[KernelSpec] = [
    *router_topk_triton.SPECS,
    *align_triton.SPECS,
    *grouped_gemm_triton.SPECS,
    *combine_triton.SPECS,
]


@dataclass
class MoEWeights:
    """One sparse MoE block's weights as transformers keeps them (contiguous along the reduced dimension)."""

    router: Any  # [E, H] gate.weight
    gate_up: Any  # [E, 2I, H] experts.gate_up_proj (gate rows, then up rows)
    down: Any  # [E, H, I] experts.down_proj
    shared_gate: Any  # [Is, H] shared_expert.gate_proj.weight
    shared_up: Any  # [Is, H] shared_expert.up_proj.weight
    shared_down: Any  # [H, Is] shared_expert.down_proj.weight
    shared_expert_gate: Any  # [1, H] shared_expert_gate.weight
    top_k: int
    normalize: bool


def block_settings(block) -> tuple[int, bool]:
    """(top_k, normalize) of a transformers sparse MoE block (Qwen3.5-MoE always renormalises)."""
    act = getattr(block.experts, "act_fn", None)
    if act is not None and type(act).__name__ not in ("SiLU", "SiLUActivation"):
        raise ValueError(f"the experts' activation is {type(act).__name__}; the kernels implement SiLU")
    return int(block.gate.top_k), bool(getattr(block.gate, "norm_topk_prob", True))


def moe_block(x, w: MoEWeights, path: str | None = None, alloc=None, sm: str | None = None) -> dict[str, Any]:
    """Run one block on x [T, H] through the kernels; every buffer comes from `alloc(name, shape, dtype)`.

    path: "decode" or "grouped" for the experts (None: decode for up to DECODE_MAX_PAIRS token-expert pairs).
    Returns the output ("out" [T, H]) and every intermediate, by name."""
    T = x.shape[0]
    path = path or choose_path(T, w.top_k)
    logits, weights, ids = router_topk(x, w.router, w.top_k, w.normalize, alloc=alloc, sm=sm)
    inter = w.gate_up.shape[1] // 2
    y, h, align = experts_swiglu(
        x, w.gate_up[:, :inter], w.gate_up[:, inter:], w.down, ids, path=path, alloc=alloc, sm=sm
    )
    shared_y, shared_h, _ = experts_swiglu(
        x, w.shared_gate[None], w.shared_up[None], w.shared_down[None], None, path=path, alloc=alloc, sm=sm
    )
    out = moe_combine(x, y, weights, shared_y, w.shared_expert_gate, alloc=alloc, sm=sm)
    return {
        "path": path, "logits": logits, "weights": weights, "ids": ids, "align": align, "h": h, "y": y,
        "shared_h": shared_h, "shared_y": shared_y, "out": out,
    }  # fmt: skip


def _rounded_copy(block, dtype):
    """The block with every parameter rounded to `dtype` and back to fp32: the reference sees the weights the
    kernels see."""
    import torch

    if dtype == torch.float32:
        return block
    return copy.deepcopy(block).to(dtype).float()


def _align_errors(align, ids, num_experts: int) -> int:
    """Mismatches of the alignment against torch's bincount/cumsum: offsets, every pair once inside its
    expert's group, the sentinel everywhere else, the block -> expert map."""
    import torch

    sorted_ids, expert_ids, offsets = (t.long() for t in align)
    flat = ids.reshape(-1).long()
    pairs = flat.numel()
    block_m = sorted_ids.numel() // expert_ids.numel()
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    ref_offsets = torch.cat([torch.zeros(1, dtype=torch.long), padded.cumsum(0)])
    errors = int((offsets != ref_offsets).sum())
    real = (sorted_ids < pairs).nonzero().reshape(-1)
    pair_at = sorted_ids[real]
    errors += int((sorted_ids[sorted_ids >= pairs] != pairs).sum())
    if pair_at.numel() != pairs or not torch.equal(pair_at.sort().values, torch.arange(pairs)):
        errors += pairs
    else:
        expert = flat[pair_at]
        inside = (real >= ref_offsets[expert]) & (real < ref_offsets[expert] + counts[expert])
        errors += int((~inside).sum())
    ref_blocks = torch.full((expert_ids.numel(),), -1, dtype=torch.long)
    owners = torch.repeat_interleave(torch.arange(num_experts), padded // block_m)
    ref_blocks[: owners.numel()] = owners
    return errors + int((expert_ids != ref_blocks).sum())


def check_block(
    block,
    x,
    dtype,
    path: str | None = None,
    label: str = "",
    experts: tuple[Any, Any] | None = None,
    sm: str | None = None,
) -> list[CheckRow]:
    """A transformers sparse MoE block (fp32, eval) on x [T, H] through the kernels at `dtype`, against the
    module's own fp32 forward on the same (dtype-rounded) input and weights: one row per kernel group.

    Every input and every buffer the kernels write is Guarded. `experts` = (gate_up, down) already in
    `dtype`, for widths too large to copy: then they are used unguarded, and the block's own parameters
    must already be representable in `dtype` (the reference is the block itself). `sm` picks whose frozen
    tile sizes run (default: the device's; sm_90a on the CPU)."""
    import torch

    guards: dict[str, Guarded] = {}

    def guard(name: str, tensor):
        guards[name] = Guarded(tensor.detach().to(dtype))
        return guards[name].tensor

    def alloc(name: str, shape, dt):
        fill = float("nan") if dt.is_floating_point else INT_SENTINEL
        guards[name] = Guarded(torch.full(tuple(shape), fill, dtype=dt))
        return guards[name].tensor

    top_k, normalize = block_settings(block)
    ref = block if experts is not None else _rounded_copy(block, dtype)
    gate_up, down = experts or (
        guard("gate_up", block.experts.gate_up_proj),
        guard("down", block.experts.down_proj),
    )
    w = MoEWeights(
        router=guard("router", block.gate.weight),
        gate_up=gate_up,
        down=down,
        shared_gate=guard("shared_gate", block.shared_expert.gate_proj.weight),
        shared_up=guard("shared_up", block.shared_expert.up_proj.weight),
        shared_down=guard("shared_down", block.shared_expert.down_proj.weight),
        shared_expert_gate=guard("shared_expert_gate", block.shared_expert_gate.weight),
        top_k=top_k,
        normalize=normalize,
    )
    xq = guard("x", x)
    res = moe_block(xq, w, path=path, alloc=alloc, sm=sm)
    ok = not guard_problems(**guards)
    T, E = x.shape[0], block.gate.weight.shape[0]
    xr = xq.float()
    name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    case = f"{label}{T} token{'s' if T > 1 else ''}, top-{top_k}/{E}{'' if normalize else ' unnormalised'}, "
    case += f"{res['path']} path, {name}"
    with torch.no_grad():
        _, ref_scores, ref_idx = ref.gate(xr)
        dense_ref = torch.zeros(T, E).scatter(1, ref_idx, ref_scores.float())
        dense = torch.zeros(T, E).scatter(1, res["ids"].long(), res["weights"].float())
        ids = res["ids"].long().reshape(-1, 1)
        ref_y = ref.experts(xr.repeat_interleave(top_k, dim=0), ids, torch.ones(ids.shape))
        ref_shared = ref.shared_expert(xr)
        ref_out = ref(xr[None])[0]
    rows = [compare("moe.router_topk", case, dense, dense_ref, dtype, ok)]
    if res["align"] is not None:
        errors = float(_align_errors(res["align"], res["ids"], E))
        rows.append(compare("moe.align", case, torch.tensor([errors]), torch.zeros(1), torch.float32, ok))
    rows.append(compare("moe.grouped_gemm", case + ", routed experts", res["y"], ref_y, dtype, ok))
    rows.append(compare("moe.grouped_gemm", case + ", shared expert", res["shared_y"], ref_shared, dtype, ok))
    rows.append(compare("moe.combine", case + ", block output", res["out"], ref_out, dtype, ok))
    return rows


def check_layer(model, layer_index: int, dtype) -> list[CheckRow]:
    """Layer `layer_index`'s MoE block of a transformers CausalLM (fp32, eval; or kernel_check's text view)
    through the kernels for 7 tokens (grouped path) and 1 token (decode path), against the module's forward.
    [] when that layer's MLP is dense."""
    import torch

    inner = model.model
    layers = getattr(inner, "language_model", inner).layers
    layer = layers[layer_index]
    block = layer.mlp
    if not (hasattr(block, "experts") and hasattr(block, "gate") and hasattr(block, "shared_expert")):
        return []
    hidden = block.gate.weight.shape[1]
    gen = torch.Generator().manual_seed(20260216 + layer_index)
    rows = []
    for tokens, path in ((7, "grouped"), (1, "decode")):
        with torch.no_grad():  # what the block sees: the post-attention RMSNorm of a hidden state
            x = layer.post_attention_layernorm(torch.randn(1, tokens, hidden, generator=gen))[0]
        rows += check_block(block, x, dtype, path=path, label=f"layer {layer_index}, ")
    return rows
