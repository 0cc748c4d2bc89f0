"""Accuracy metrics between our logits and the reference's, per next-token distribution."""

from __future__ import annotations

import numpy as np


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def compare_logits(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Max/mean |Δ|, cosine similarity, top-1 / top-5 agreement and KL(ref || ours) over [..., vocab]."""
    if ours.shape != ref.shape:
        raise ValueError(f"shape mismatch: {ours.shape} vs {ref.shape}")
    a = ours.reshape(-1, ours.shape[-1]).astype(np.float64)
    b = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    diff = np.abs(a - b)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)
    k = min(5, a.shape[-1])
    top_a, top_b = np.argsort(-a, axis=-1)[:, :k], np.argsort(-b, axis=-1)[:, :k]
    top5 = np.mean([len(set(x) & set(y)) / k for x, y in zip(top_a, top_b, strict=True)])
    log_p, log_q = log_softmax(b), log_softmax(a)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "cosine_min": float(cos.min()),
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
        "top5_agreement": float(top5),
        "kl_mean": float(max(kl.mean(), 0.0)),
        "kl_max": float(max(kl.max(), 0.0)),
    }


def agreement_length(ours: np.ndarray, ref: np.ndarray) -> int:
    """Number of leading tokens that agree (1-D sequences)."""
    same = np.asarray(ours) == np.asarray(ref)
    return int(same.size if same.all() else same.argmin())
