"""The decode loop every backend shares (text sessions, multimodal batches), and what is read off it."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from qwen_export.runtime.sampling import GREEDY, Sampler, SamplingConfig

# One decode step: (new tokens [B, 1], attention mask [B, T] with them, their positions [B, 1] (the count of
# real tokens before them), states) -> (logits [B, V], states)
StepFn = Callable[[np.ndarray, np.ndarray, np.ndarray, Any], tuple[np.ndarray, Any]]


def sample_stream(
    prefill: Callable[[], tuple[np.ndarray, Any]],
    step: StepFn,
    mask: np.ndarray,
    max_new_tokens: int,
    sampling: SamplingConfig = GREEDY,
    stop_tokens: Sequence[int] = (),
    timings: dict[str, float] | None = None,
) -> Iterator[np.ndarray]:
    """The decode loop every backend shares: `prefill()` gives the last-position logits [B, V] and states,
    then each step samples a token per row ([B], yielded) and feeds it back with the mask grown by one.
    Rows that hit a stop token repeat it until all rows are done.

    Every step's mask is a view of one buffer and the positions count on from the prompt's, so a step's own
    cost does not grow with the context (a concatenated mask and its cumsum took 1 ms a step at 64K tokens,
    4.4 ms at 256K)."""
    batch, width = mask.shape
    columns = np.ones((batch, width + max_new_tokens), np.int64)
    columns[:, :width] = mask
    positions = mask.sum(axis=1, keepdims=True) - 1  # the last real token's, per row (left padding)
    sampler = Sampler(sampling)
    stops = np.array(list(stop_tokens), np.int64)
    done = np.zeros(batch, bool)
    start = time.perf_counter()
    logits, states = prefill()
    for index in range(max_new_tokens):
        token = sampler(logits)
        if stops.size:  # (np.isin costs a few microseconds a step even against no stop tokens)
            token = np.where(done, stops[0], token)
            done |= np.isin(token, stops)
        if timings is not None and index == 0:
            timings["time_to_first_token_s"] = time.perf_counter() - start
            timings["decode_start"] = time.perf_counter()
        yield token
        if done.all() or index == max_new_tokens - 1:
            break
        positions = positions + 1
        logits, states = step(token[:, None], columns[:, : width + index + 1], positions, states)
    if timings is not None:
        timings["decode_end"] = time.perf_counter()


def tokens_per_row(steps: Sequence[np.ndarray], batch: int, stop_tokens: Sequence[int]) -> list[list[int]]:
    """The streamed [B] tokens as one list per row, each cut after its first stop token."""
    table = np.stack(steps, axis=1) if steps else np.zeros((batch, 0), np.int64)
    tokens = []
    for row in table.tolist():
        hit = next((i for i, t in enumerate(row) if t in stop_tokens), None)
        tokens.append(row if hit is None else row[: hit + 1])
    return tokens


def decode_tokens_per_s(timings: dict[str, float], steps: int, batch: int = 1) -> float:
    """Tokens per second over the decode steps `stream` timed (the first token comes from the prefill)."""
    decode_s = timings["decode_end"] - timings["decode_start"]
    decode_steps = max(steps - 1, 0)
    return decode_steps * batch / decode_s if decode_s > 0 and decode_steps else 0.0
