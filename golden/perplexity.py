"""Held-out perplexity of a transformers causal LM, as the trained reference (golden/trained-qwen3.5-moe)
logs it and its test recomputes it.

Text is scored in non-overlapping windows of `WINDOW` tokens, each from an empty cache: every window's
first token is context only, the other `length - 1` are predicted. Fixed windows (not a sliding stride)
keep the number cheap and independent of batch size, so any machine reproduces it to float rounding.
`draft_agreement` measures an MTP layer over the same windows (its greedy draft acceptance).
"""

from __future__ import annotations

import math

import numpy as np

WINDOW = 256  # the window length the logged numbers use
BATCH = 8  # windows per forward pass; the sum does not depend on it beyond float rounding


def token_windows(ids: list[int], length: int = WINDOW, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping windows [N, length] (int64) of `ids` from its start; a last partial window is
    dropped, and at most `max_windows` are kept when given."""
    if length < 2:
        raise ValueError(f"window length must be at least 2 (one context token, one target), got {length}")
    count = len(ids) // length
    if max_windows is not None:
        count = min(count, max_windows)
    return np.asarray(ids[: count * length], dtype=np.int64).reshape(count, length)


def reference_nll(model, windows: np.ndarray, batch: int = BATCH) -> tuple[float, int]:
    """The model's summed next-token negative log-likelihood (nats) over every window, and the number of
    predicted tokens (N * (length - 1)). The model must be fp32: the number is a reference, not a
    measurement of a lower precision."""
    import torch

    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise ValueError(f"reference_nll wants an fp32 model, got {dtype}")
    windows = np.asarray(windows, dtype=np.int64)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [N, length >= 2], got shape {windows.shape}")
    total = 0.0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(windows), batch):
                ids = torch.from_numpy(windows[start : start + batch])
                logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
                logp = torch.log_softmax(logits, dim=-1)
                nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
                total += float(nll.double().sum())  # fp64 accumulation: the sum is order-insensitive
    finally:
        model.train(was_training)
    return total, int(windows.shape[0] * (windows.shape[1] - 1))


def perplexity(total_nll: float, count: int) -> float:
    """exp(mean NLL)."""
    if count <= 0:
        raise ValueError("perplexity of no tokens")
    return math.exp(total_nll / count)


def draft_agreement(model, mtp, windows: np.ndarray, batch: int = BATCH) -> dict[str, float]:
    """How well an MTP layer (golden/mtp.py's MtpReference) drafts for `model` over the windows.

    At each t the draft for t+2 comes from the main model's normed h_t and the true token t+1; it agrees when
    it equals the main model's own greedy t+2 (its argmax at t+1), which is the acceptance rate of greedy
    speculative decoding with one draft token. Also both models' top-1 accuracy against the text."""
    import torch

    windows = np.asarray(windows, dtype=np.int64)
    agree = draft_hits = main_hits = 0
    with torch.no_grad():
        for start in range(0, len(windows), batch):
            ids = torch.from_numpy(windows[start : start + batch])
            rows, length = ids.shape
            out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
            positions = torch.arange(length - 1)[None].expand(rows, length - 1)
            # hidden_states[-1] is after the final norm, which is what the MTP layer reads
            _, draft = mtp(model, ids[:, 1:], out.hidden_states[-1][:, :-1], positions)
            draft_top = draft[:, :-1].argmax(-1)  # t = 0..L-3: the drafts whose t+2 is in the window
            main_top = out.logits.argmax(-1)
            agree += int((draft_top == main_top[:, 1:-1]).sum())
            draft_hits += int((draft_top == ids[:, 2:]).sum())
            main_hits += int((main_top[:, :-1] == ids[:, 1:]).sum())
    drafts = windows.shape[0] * (windows.shape[1] - 2)
    return {
        "mtp_agreement_with_main_greedy": agree / drafts,
        "mtp_top1_accuracy_t_plus_2": draft_hits / drafts,
        "main_top1_accuracy_t_plus_1": main_hits / (windows.shape[0] * (windows.shape[1] - 1)),
        "draft_positions": drafts,
    }
