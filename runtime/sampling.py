"""Next-token selection: greedy, temperature, top-k and top-p (nucleus) sampling with a seeded generator."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingConfig:
    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1.0 = no nucleus filter
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (use greedy for deterministic decoding)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")


GREEDY = SamplingConfig()  # the default of every decode loop


class Sampler:
    def __init__(self, config: SamplingConfig):
        self.config = config
        self.rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """logits [B, V] -> token ids [B]."""
        if self.config.greedy:
            return logits.argmax(-1)
        scores = logits.astype(np.float64) / self.config.temperature
        if self.config.top_k:
            kth = np.sort(scores, axis=-1)[:, -min(self.config.top_k, scores.shape[-1])][:, None]
            scores = np.where(scores < kth, -np.inf, scores)
        probs = _softmax(scores)
        if self.config.top_p < 1.0:
            order = np.argsort(-probs, axis=-1)
            sorted_probs = np.take_along_axis(probs, order, axis=-1)
            # keep the smallest prefix whose mass reaches top_p (the most likely token always stays)
            drop_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs >= self.config.top_p
            drop = np.zeros_like(drop_sorted)
            np.put_along_axis(drop, order, drop_sorted, axis=-1)
            probs = _renormalise(np.where(drop, 0.0, probs))
        return np.array([self.rng.choice(p.size, p=p) for p in probs], dtype=np.int64)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _renormalise(p: np.ndarray) -> np.ndarray:
    return p / p.sum(-1, keepdims=True)
