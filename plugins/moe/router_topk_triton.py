"""MoE router: fp32 logits, softmax in fp32, top-k, optional renormalisation.

Semantics are transformers' `Qwen3_5MoeTopKRouter` / `Qwen3NextTopKRouter`:
`probs = softmax(x @ W^T, fp32)`, `(w, idx) = topk(probs, k)`, and `w /= sum(w)` when renormalising
(always for Qwen3.5-MoE, `norm_topk_prob` for Qwen3-Next).

Two kernels:
- `router_logits_kernel`: logits [T, E] fp32 = x [T, H] @ W^T with fp32 accumulation. W is the router weight
  as transformers keeps it ([E, H], H contiguous; the CUDA plugin's [H, E] is transposed once when the
  engine is built). Grid (token tiles, expert tiles); a decode tile (16 x 16) keeps E / 16 programs
  streaming the weight for one token, a prefill tile (64 x 64) reuses it across tokens.
- `router_topk_kernel`: BLOCK_T tokens per program. Softmax over the E logits in fp32 (max, then sum of
  exp), then k passes, each picking the next entry in the order (probability descending, expert index
  ascending): ties go to the lower expert index. Weights fp32 [T, k] and expert ids int32 [T, k], best
  first. E is a run-time value (looped in chunks of BLOCK_E); top_k <= MAX_TOP_K.
"""

from __future__ import annotations

import triton
import triton.language as tl

from qwen_export.plugins.triton_support import KernelSpec, device_sm

# CUDA capability -> the SM name whose frozen launch configuration applies; CPU (the interpreter) is sm_90a.
MAX_TOP_K = 32
MAX_EXPERTS = 4096
DECODE_MAX_TOKENS = 16  # up to this many tokens the router runs its decode tile


def act_of(dtype) -> str:
    """The activation name of a variant for tensors of `dtype` (fp32, checked under the interpreter only,
    runs with fp16's constexprs)."""
    import torch

    return "bf16" if dtype == torch.bfloat16 else "fp16"


def act_variants(extra: dict[str, dict] | None = None) -> dict[str, dict]:
    """fp16 / bf16 variants, times named constexpr sets (`{"": {...}, "_decode": {...}}`)."""
    extra = extra or {"": {}}
    return {
        f"{act}{suffix}": {"act": act, **values}
        for act in ("fp16", "bf16")
        for suffix, values in extra.items()
    }


def empty_alloc(like):
    """The default allocator of the launchers: torch.empty on `like`'s device."""
    import torch

    def alloc(name: str, shape: tuple[int, ...], dtype):
        return torch.empty(shape, dtype=dtype, device=like.device)

    return alloc


@triton.jit
def router_logits_kernel(
    x_ptr,  # [T, H] activations, rows stride_xt apart, contiguous within a row
    w_ptr,  # [E, H] router weight, rows stride_we apart, contiguous within a row
    logits_ptr,  # [T, E] fp32 out
    T,
    E,
    H,
    stride_xt,
    stride_we,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    t_ok = t < T
    e_ok = e < E
    h = tl.arange(0, BLOCK_H)
    a_ptrs = x_ptr + t.to(tl.int64)[:, None] * stride_xt + h[None, :]
    b_offs = tl.minimum(e, E - 1)[None, :] * stride_we + h[:, None]  # [BLOCK_H, BLOCK_E]; E * H < 2**31
    w = w_ptr
    acc = tl.full((BLOCK_T, BLOCK_E), 0, tl.float32)
    for h0 in range(0, H, BLOCK_H):
        h_ok = h < H - h0
        a = tl.load(a_ptrs, mask=t_ok[:, None] & h_ok[None, :], other=0.0)
        b = tl.load(w + b_offs, mask=h_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision="ieee")
        a_ptrs += BLOCK_H
        w += BLOCK_H
    dst = logits_ptr + t.to(tl.int64)[:, None] * E + e[None, :]
    tl.store(dst, acc, mask=t_ok[:, None] & e_ok[None, :])


@triton.jit
def router_topk_kernel(
    logits_ptr,  # [T, E] fp32
    weights_ptr,  # [T, top_k] fp32 out
    ids_ptr,  # [T, top_k] int32 out
    T,
    E,
    top_k,
    normalize,  # 1: divide the top-k probabilities by their sum
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    MAX_TOP_K: tl.constexpr,
):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    rows = logits_ptr + t.to(tl.int64)[:, None] * E
    lane = tl.arange(0, BLOCK_E)
    # softmax statistics in fp32: per-lane running max, then per-lane sums of exp(l - max)
    m_lane = tl.full((BLOCK_T, BLOCK_E), float("-inf"), tl.float32)
    for e0 in range(0, E, BLOCK_E):
        ok = t_ok[:, None] & (e0 + lane < E)[None, :]
        m_lane = tl.maximum(m_lane, tl.load(rows + e0 + lane[None, :], mask=ok, other=float("-inf")))
    m = tl.where(t_ok, tl.max(m_lane, axis=1), 0.0)
    s_lane = tl.full((BLOCK_T, BLOCK_E), 0, tl.float32)
    for e0 in range(0, E, BLOCK_E):
        ok = t_ok[:, None] & (e0 + lane < E)[None, :]
        v = tl.load(rows + e0 + lane[None, :], mask=ok, other=float("-inf"))
        s_lane += tl.where(ok, tl.exp(v - m[:, None]), 0.0)
    s = tl.where(t_ok, tl.sum(s_lane, axis=1), 1.0)

    slot = tl.arange(0, MAX_TOP_K)[None, :]
    top_w = tl.full((BLOCK_T, MAX_TOP_K), 0, tl.float32)
    top_i = tl.full((BLOCK_T, MAX_TOP_K), 0, tl.int32)
    prev_v = tl.full((BLOCK_T,), float("inf"), tl.float32)
    prev_i = tl.full((BLOCK_T,), -1, tl.int32)
    for k in range(0, top_k):
        best_v = tl.full((BLOCK_T, BLOCK_E), float("-inf"), tl.float32)
        best_i = tl.full((BLOCK_T, BLOCK_E), E, tl.int32)
        for e0 in range(0, E, BLOCK_E):
            idx = (e0 + lane)[None, :]
            ok = t_ok[:, None] & (idx < E)
            v = tl.load(rows + idx, mask=ok, other=float("-inf"))
            # later in the order (probability descending, index ascending) than the last pick
            after = (v < prev_v[:, None]) | ((v == prev_v[:, None]) & (idx > prev_i[:, None]))
            take = ok & after & ((v > best_v) | (best_i == E))
            best_v = tl.where(take, v, best_v)
            best_i = tl.where(take, idx, best_i)
        v_k = tl.max(best_v, axis=1)
        i_k = tl.min(tl.where((best_v == v_k[:, None]) & (best_i < E), best_i, E), axis=1)
        top_w = tl.where(slot == k, (tl.exp(v_k - m) / s)[:, None], top_w)
        top_i = tl.where(slot == k, i_k[:, None], top_i)
        prev_v = v_k
        prev_i = i_k
    keep = t_ok[:, None] & (slot < top_k)
    total = tl.sum(tl.where(keep, top_w, 0.0), axis=1)
    total = tl.where(t_ok, total, 1.0)
    top_w = tl.where(normalize != 0, top_w / total[:, None], top_w)
    out = t.to(tl.int64)[:, None] * top_k + slot
    tl.store(weights_ptr + out, top_w, mask=keep)
    tl.store(ids_ptr + out, top_i, mask=keep)


_LOGITS_SIGNATURE = {
    "x_ptr": "*{act}:16", "w_ptr": "*{act}:16", "logits_ptr": "*fp32", "T": "i32", "E": "i32", "H": "i32:16",
    "stride_xt": "i32:16", "stride_we": "i32:16",
    "BLOCK_T": "constexpr", "BLOCK_E": "constexpr", "BLOCK_H": "constexpr",
}  # fmt: skip

LOGITS_SPEC = KernelSpec(
    name="moe.router_logits",
    kernel=router_logits_kernel,
    signature=_LOGITS_SIGNATURE,
    constexprs={"BLOCK_H": 64},
    num_warps=4,
    num_stages=3,
    variants=act_variants(
        {
            "": {"BLOCK_T": 64, "BLOCK_E": 64},
            # one token streams the [E, H] weight: narrow expert tiles give E / 16 programs, long H steps
            "_decode": {"BLOCK_T": 16, "BLOCK_E": 16, "BLOCK_H": 256, "num_stages": 2},
        }
    ),
    per_sm={sm: {"num_stages": 2} for sm in ("sm_86", "sm_89", "sm_120a")},
)

_TOPK_SIGNATURE = {
    "logits_ptr": "*fp32", "weights_ptr": "*fp32", "ids_ptr": "*i32", "T": "i32", "E": "i32",
    "top_k": "i32", "normalize": "i32", "BLOCK_T": "constexpr", "BLOCK_E": "constexpr",
    "MAX_TOP_K": "constexpr",
}  # fmt: skip
TOPK_SPEC = KernelSpec(
    name="moe.router_topk",
    kernel=router_topk_kernel,
    signature=_TOPK_SIGNATURE,
    # a [8 tokens, 512 experts] tile: 16 values per thread per array at 8 warps; Ampere / Ada spill a few
    # registers at that size (ptxas caps them at 128 there), so they take 4 tokens per program
    constexprs={"BLOCK_T": 8, "BLOCK_E": 512, "MAX_TOP_K": MAX_TOP_K},
    num_warps=8,
    num_stages=1,
    per_sm={sm: {"BLOCK_T": 4} for sm in ("sm_80", "sm_86", "sm_89")},
    variants={"fp32": {}},  # reads fp32 logits whatever the activation type: one cubin per SM
)

SPECS: list[KernelSpec] = [LOGITS_SPEC, TOPK_SPEC]


def router_topk(x, weight, top_k: int, normalize: bool, alloc=None, sm: str | None = None):
    """Launch both kernels: (logits [T, E] fp32, weights [T, top_k] fp32, ids [T, top_k] int32).

    x: [T, H], weight: the router weight [E, H] (transformers' layout), both contiguous along H."""
    import torch

    T, H = x.shape
    E = weight.shape[0]
    if weight.shape[1] != H or x.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError(
            f"router weight {tuple(weight.shape)} does not fit x {tuple(x.shape)} (rows contiguous)"
        )
    if not 1 <= top_k <= min(E, MAX_TOP_K) or E > MAX_EXPERTS:
        raise ValueError(f"top_k {top_k} of {E} experts: need 1 <= top_k <= {MAX_TOP_K}, E <= {MAX_EXPERTS}")
    alloc = alloc or empty_alloc(x)
    logits = alloc("router_logits", (T, E), torch.float32)
    weights = alloc("topk_weights", (T, top_k), torch.float32)
    ids = alloc("topk_ids", (T, top_k), torch.int32)
    target = device_sm(x, sm)
    variant = act_of(x.dtype) + ("_decode" if T <= DECODE_MAX_TOKENS else "")
    _, c, warps, stages = LOGITS_SPEC.config(target, variant)
    grid = (triton.cdiv(T, c["BLOCK_T"]), triton.cdiv(E, c["BLOCK_E"]))
    router_logits_kernel[grid](
        x, weight, logits, T, E, H, x.stride(0), weight.stride(0),
        **c, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    _, c, warps, stages = TOPK_SPEC.config(target, "fp32")
    router_topk_kernel[(triton.cdiv(T, c["BLOCK_T"]),)](
        logits, weights, ids, T, E, top_k, int(bool(normalize)), **c, num_warps=warps, num_stages=stages
    )
    return logits, weights, ids
