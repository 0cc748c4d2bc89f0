"""NumPy reference of the qwen op set, written from docs/ops.md (float64 inside, float32 out).

Each function takes the op's inputs in the docs' order (as arrays) and its attributes as keywords, and
returns the op's outputs as a tuple. Used by the lowering tests as the ground truth for one op.
"""

from __future__ import annotations

import numpy as np

FLOAT32_MIN = float(np.finfo(np.float32).min)


def _f64(*arrays: np.ndarray) -> list[np.ndarray]:
    return [np.asarray(a, np.float64) for a in arrays]


def _out(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(a, np.float32) for a in arrays)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def silu(x: np.ndarray) -> np.ndarray:
    return x * sigmoid(x)


def softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def _rms(x: np.ndarray, scale: np.ndarray, epsilon: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + epsilon) * scale


def rms_norm(x: np.ndarray, scale: np.ndarray, *, epsilon: float) -> tuple[np.ndarray]:
    """Y = X / sqrt(mean(X^2) + epsilon) * scale over the last axis."""
    x, scale = _f64(x, scale)
    return _out(_rms(x, scale, epsilon))


def gated_rms_norm(x: np.ndarray, z: np.ndarray, scale: np.ndarray, *, epsilon: float) -> tuple[np.ndarray]:
    """Y = RMSNorm(X; scale) * silu(Z)."""
    x, z, scale = _f64(x, z, scale)
    return _out(_rms(x, scale, epsilon) * silu(z))


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, rotary_dim: int) -> np.ndarray:
    """x [B, T, heads, hd]; cos/sin [B, T, rotary_dim]; rotate_half on the first rotary_dim channels."""
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = np.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return np.concatenate([rot * c + rotated * s, rest], axis=-1)


def gated_attention(
    x,
    attention_mask,
    cos,
    sin,
    past_key,
    past_value,
    q_weight,
    k_weight,
    v_weight,
    o_weight,
    q_norm,
    k_norm,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    rotary_dim: int,
    epsilon: float,
    scale: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (Y [B, T, H], present_key, present_value [B, kv, S, hd])."""
    x, cos, sin, past_key, past_value, q_weight, k_weight, v_weight, o_weight, q_norm, k_norm = _f64(
        x, cos, sin, past_key, past_value, q_weight, k_weight, v_weight, o_weight, q_norm, k_norm
    )
    b, t, _ = x.shape
    nh, kv, hd = num_heads, num_kv_heads, head_dim
    qg = (x @ q_weight).reshape(b, t, nh, 2 * hd)
    q, gate = qg[..., :hd], qg[..., hd:].reshape(b, t, nh * hd)
    q = _rms(q, q_norm, epsilon)
    k = _rms((x @ k_weight).reshape(b, t, kv, hd), k_norm, epsilon)
    v = (x @ v_weight).reshape(b, t, kv, hd)
    q, k = _rope(q, cos, sin, rotary_dim), _rope(k, cos, sin, rotary_dim)
    present_key = np.concatenate([past_key, k.transpose(0, 2, 1, 3)], axis=2)
    present_value = np.concatenate([past_value, v.transpose(0, 2, 1, 3)], axis=2)
    p, s = past_key.shape[2], past_key.shape[2] + t
    visible = (np.arange(s)[None, :] <= p + np.arange(t)[:, None])[None] & (attention_mask[:, None, :] == 1)
    out = np.zeros((b, t, nh, hd))
    for h in range(nh):
        kh = h // (nh // kv)
        scores = np.einsum("btd,bsd->bts", q[:, :, h], present_key[:, kh]) * scale
        scores = np.where(visible, scores, FLOAT32_MIN)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out[:, :, h] = np.einsum("bts,bsd->btd", probs, present_value[:, kh])
    y = (out.reshape(b, t, nh * hd) * sigmoid(gate)) @ o_weight
    return _out(y, present_key, present_value)


def _l2norm(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1e-6)


def gated_deltanet(
    x,
    attention_mask,
    past_conv,
    past_recurrent,
    qkv_weight,
    z_weight,
    b_weight,
    a_weight,
    conv_weight,
    neg_exp_a,
    dt_bias,
    norm_weight,
    out_weight,
    *,
    num_k_heads: int,
    num_v_heads: int,
    head_k_dim: int,
    head_v_dim: int,
    conv_kernel: int,
    epsilon: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns (Y [B, T, H], present_conv [B, C, K-1], present_recurrent [B, nv, dk, dv])."""
    (
        x,
        past_conv,
        past_recurrent,
        qkv_weight,
        z_weight,
        b_weight,
        a_weight,
        conv_weight,
        neg_exp_a,
        dt_bias,
        norm_weight,
        out_weight,
    ) = _f64(
        x,
        past_conv,
        past_recurrent,
        qkv_weight,
        z_weight,
        b_weight,
        a_weight,
        conv_weight,
        neg_exp_a,
        dt_bias,
        norm_weight,
        out_weight,
    )
    b, t, _ = x.shape
    nk, nv, dk, dv, k_size = num_k_heads, num_v_heads, head_k_dim, head_v_dim, conv_kernel
    x = x * attention_mask[:, -t:, None]
    mixed, z = x @ qkv_weight, (x @ z_weight).reshape(b, t, nv, dv)
    beta, a = sigmoid(x @ b_weight), x @ a_weight
    window = np.concatenate([past_conv, mixed.transpose(0, 2, 1)], axis=2)  # [B, C, K-1+T]
    present_conv = window[:, :, -(k_size - 1) :]
    conv = np.stack(
        [np.sum(window[:, :, i : i + k_size] * conv_weight[None, :, 0, :], axis=-1) for i in range(t)], axis=1
    )  # [B, T, C]
    conv = silu(conv)
    key_dim = nk * dk
    q = _l2norm(conv[..., :key_dim].reshape(b, t, nk, dk))
    k = _l2norm(conv[..., key_dim : 2 * key_dim].reshape(b, t, nk, dk))
    v = conv[..., 2 * key_dim :].reshape(b, t, nv, dv)
    heads = np.arange(nv) // (nv // nk)
    q, k = q[:, :, heads] / np.sqrt(dk), k[:, :, heads]
    g = neg_exp_a * softplus(a + dt_bias)  # [B, T, nv]
    state = past_recurrent.copy()
    core = np.zeros((b, t, nv, dv))
    for i in range(t):
        state = state * np.exp(g[:, i])[:, :, None, None]
        kv_mem = np.einsum("bhk,bhkv->bhv", k[:, i], state)
        delta = (v[:, i] - kv_mem) * beta[:, i][:, :, None]
        state = state + np.einsum("bhk,bhv->bhkv", k[:, i], delta)
        core[:, i] = np.einsum("bhk,bhkv->bhv", q[:, i], state)
    gated = _rms(core, norm_weight, epsilon) * silu(z)
    return _out(gated.reshape(b, t, nv * dv) @ out_weight, present_conv, state)


def moe(
    x,
    router_weight,
    gate_up,
    down,
    shared_gate,
    shared_up,
    shared_down,
    shared_expert_gate,
    *,
    top_k: int,
    normalize: int,
) -> tuple[np.ndarray]:
    """Routed SwiGLU experts (softmax -> top-k -> optional renormalisation) plus the gated shared expert."""
    x, router_weight, gate_up, down, shared_gate, shared_up, shared_down, shared_expert_gate = _f64(
        x, router_weight, gate_up, down, shared_gate, shared_up, shared_down, shared_expert_gate
    )
    shape = x.shape
    tokens = x.reshape(-1, shape[-1])
    logits = tokens @ router_weight
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    chosen = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(probs, chosen, axis=-1)
    if normalize:
        weights = weights / weights.sum(-1, keepdims=True)
    inter = down.shape[1]
    routed = np.zeros_like(tokens)
    for n in range(tokens.shape[0]):
        for j in range(top_k):
            e = chosen[n, j]
            h = tokens[n] @ gate_up[e]
            routed[n] += weights[n, j] * ((silu(h[:inter]) * h[inter:]) @ down[e])
    shared = (silu(tokens @ shared_gate) * (tokens @ shared_up)) @ shared_down
    shared = shared * sigmoid(tokens @ shared_expert_gate)
    return _out((routed + shared).reshape(shape))


REFERENCES = {
    "RMSNorm": rms_norm,
    "GatedRMSNorm": gated_rms_norm,
    "GatedAttention": gated_attention,
    "GatedDeltaNet": gated_deltanet,
    "MoE": moe,
}
