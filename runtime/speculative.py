"""Lossless greedy speculative decoding with the checkpoint's own MTP layer (the draft graph, mtp.onnx).

Each round drafts k tokens with the MTP layer, verifies them in one multi-token step of the main graph and
keeps the longest accepted prefix plus the main model's own next token, so the tokens are exactly those of
plain greedy decoding. A batch advances by the shortest accepted prefix over its live rows (a row whose
draft ran further gets the same tokens: its next token equals the draft it accepted).

Rolling back a rejected draft: the KV cache could be cut, but the DeltaNet conv and recurrent states cannot
be rewound. Two ways are kept, measured by scripts/bench_speculative.py (benchmarks/speculative.md):
- "refeed" (the default, the faster): a round that rejects part of its draft keeps the states from before
  its verify step, and the accepted tokens ride along at the front of the next verify step. Nothing runs
  twice as a separate step; a verify step just grows by the re-fed tokens. After a round that accepts
  everything, the verify step's states are kept.
- "recompute": a round that rejects part of its draft runs the main graph again on the accepted tokens.
A verify or recompute step stays under STEP_TOKENS wide (refeed gives way to a recompute before that): on the
qwen.cpu graphs such a step gives each token the bits of a one-token step, so even on ort-cpu-int4, whose
int8 activations can turn a last-bit difference into a flipped near-tie, the tokens are plain decoding's.

The MTP layer's own KV cache always holds the pairs (main hidden state at position t, token t+1) of the
accepted tokens only: each round first feeds the previous round's accepted pairs (true main hidden states
from the verify step) and keeps that cache; the draft steps beyond the first run on a copy, or, where the
graph updates its KV cache in place, on rows past the accepted ones that the next round rewrites.

On graphs whose ops update states in place (runtime/in_place.py) nothing is copied: the verify step writes
its KV rows over the cache and its DeltaNet states into a second set of buffers, swapped in when every
draft is accepted. On the trained model (ort-cpu-int4, batch 1, k = 2) the in-place steps and a loop that
slices its masks, positions and tokens out of per-column buffers took speculative decoding from 1.00x to
1.11-1.15x plain decoding, which got faster too (benchmarks/speculative.md).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from qwen_export.errors import QwenExportError
from qwen_export.exporter.model import HIDDEN_STATES
from qwen_export.exporter.mtp import DRAFT_HIDDEN_STATES
from qwen_export.runtime.ort_decoder import OrtDecoder, positions_from_mask

MAX_SPECULATIVE = 8
REFEED_ROUNDS = 3  # re-fed tokens past this many rounds' worth are committed by a recompute step
# The qwen.cpu kernels compute each token of a call narrower than this as a one-token call would, bit for bit
# (plugins/ort_cpu/common/step_tokens.h): verify and recompute steps stay under it, so on those graphs the
# tokens are exactly plain decoding's even where a near-tie would flip on the last bit.
STEP_TOKENS = 16
ROLLBACKS = ("refeed", "recompute")


def max_refeed(k: int) -> int:
    """The most decided tokens a round may leave to ride along with the next verify step (k + 1 wide)."""
    return min(REFEED_ROUNDS * (k + 1), STEP_TOKENS - 1 - (k + 1))


def check_speculative(k: int) -> None:
    if not 1 <= k <= MAX_SPECULATIVE:
        raise QwenExportError(f"--speculative {k}: draft between 1 and {MAX_SPECULATIVE} tokens per step")


@dataclass
class SpeculativeStats:
    """Per-row acceptance: `accepted[j]` counts the rounds (summed over live rows) whose draft token j+1
    was accepted; acceptance per position is that over `row_rounds` (vLLM's definition)."""

    k: int
    rounds: int = 0
    row_rounds: int = 0
    accepted: list[int] = field(default_factory=list)
    draft_steps: int = 0
    verify_steps: int = 0
    recompute_steps: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    recompute_s: float = 0.0

    def __post_init__(self) -> None:
        self.accepted = self.accepted or [0] * self.k

    def acceptance(self) -> list[float]:
        return [a / self.row_rounds if self.row_rounds else 0.0 for a in self.accepted]

    def to_json(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "rounds": self.rounds,
            "acceptance_per_position": [round(a, 4) for a in self.acceptance()],
            "mean_accepted_per_round": round(sum(self.accepted) / self.row_rounds, 4)
            if self.row_rounds
            else 0,
            "draft_step_ms": round(1e3 * self.draft_s / self.draft_steps, 3) if self.draft_steps else None,
            "verify_step_ms": round(1e3 * self.verify_s / self.verify_steps, 3)
            if self.verify_steps
            else None,
            "recompute_steps": self.recompute_steps,
        }


class SpeculativeDecoder:
    """Greedy decoding of a main graph (with a `hidden_states` output) checked against k MTP drafts."""

    def __init__(self, main: OrtDecoder, draft: OrtDecoder, k: int, rollback: str = "refeed"):
        check_speculative(k)
        if rollback not in ROLLBACKS:
            raise QwenExportError(f"rollback {rollback!r} is not one of {', '.join(ROLLBACKS)}")
        if HIDDEN_STATES not in main.output_names:
            raise QwenExportError("the main graph has no hidden_states output; re-export the checkpoint")
        self.main, self.draft, self.k, self.rollback = main, draft, k, rollback
        # the draft steps run in place only where every draft state is a KV cache (runtime/in_place.py)
        self._draft_in_place = bool(draft.in_place) and all(draft.in_place.values())
        # ONNX Runtime's GroupQueryAttention takes several new tokens over a cache at batch 1 only.
        self.row_by_row = _runs_op(main.model_path, "GroupQueryAttention")

    def stream(
        self,
        ids: np.ndarray,
        mask: np.ndarray,
        max_new_tokens: int,
        stop_tokens: Sequence[int] = (),
        timings: dict[str, float] | None = None,
        stats: SpeculativeStats | None = None,
    ) -> Iterator[np.ndarray]:
        """Yield every row's next token ([B] int64) as plain greedy decoding would, a round at a time (a
        graph that verifies at batch 1 only decodes its rows one after another, then yields them)."""
        stats = stats if stats is not None else SpeculativeStats(self.k)
        if not self.row_by_row or ids.shape[0] == 1:
            yield from self._stream(ids, mask, max_new_tokens, stop_tokens, timings, stats)
            return
        rows = []
        for row in range(ids.shape[0]):
            real = mask[row].astype(bool)
            steps = self._stream(ids[row : row + 1, real], mask[row : row + 1, real], max_new_tokens,
                                 stop_tokens, timings if row == 0 else None, stats)  # fmt: skip
            rows.append([int(t[0]) for t in steps])
        if timings is not None:
            timings["decode_end"] = time.perf_counter()
        stop = stop_tokens[0] if stop_tokens else None
        for step in range(max(map(len, rows))):
            yield np.array([r[step] if step < len(r) else stop for r in rows], np.int64)

    def _stream(
        self,
        ids: np.ndarray,
        mask: np.ndarray,
        max_new_tokens: int,
        stop_tokens: Sequence[int],
        timings: dict[str, float] | None,
        stats: SpeculativeStats,
    ) -> Iterator[np.ndarray]:
        batch, width = ids.shape
        k = self.k
        stops = np.array(list(stop_tokens), np.int64)
        done = np.zeros(batch, bool)
        start = time.perf_counter()
        positions = positions_from_mask(mask)
        outs, states = self.main.step_all_bound(
            _feeds(ids, mask, positions), self.main.empty_bound_states(batch)
        )
        run_main, run_draft, scratch = self._runners(states)
        # Every token by its column: the prompt's, then one per decoded token (drafts are written ahead of
        # their verification and overwritten when rejected). Rows advance together, so past the prompt a
        # column's mask is 1 and each row's position is its last prompt position plus the columns since;
        # every mask, position and token feed below is a slice of these three.
        columns = width + max_new_tokens + k + 2
        tokens = np.zeros((batch, columns), np.int64)
        tokens[:, :width] = ids
        full_mask = np.ones((batch, columns), np.int64)
        full_mask[:, :width] = mask
        column_positions = np.empty((batch, columns), np.int64)
        column_positions[:, :width] = positions
        column_positions[:, width:] = positions[:, -1:] + np.arange(1, columns - width + 1)[None]

        last = outs["logits"][:, -1].argmax(-1)
        tokens[:, width] = last
        emitted = 1
        if timings is not None:
            timings["time_to_first_token_s"] = time.perf_counter() - start
            timings["decode_start"] = time.perf_counter()
        done |= np.isin(last, stops)
        yield last
        committed = width  # columns inside the main graph's states
        last_column = width  # the newest decided token, not yet fed to the main graph
        draft_rows = 0  # columns inside the MTP layer's cache: its pair at column c is (hidden c, token c+1)
        pair_hidden = outs[HIDDEN_STATES]  # the main hidden states of columns draft_rows .. last_column - 1
        draft_states = self.draft.empty_bound_states(batch)
        accepted_sum = np.zeros(k, np.int64)
        try:
            while emitted < max_new_tokens and not done.all():
                t0 = time.perf_counter()
                out, draft_states = run_draft(
                    {
                        "input_ids": tokens[:, draft_rows + 1 : last_column + 1],
                        HIDDEN_STATES: pair_hidden,
                        "attention_mask": full_mask[:, :last_column],
                        "position_ids": column_positions[:, draft_rows:last_column],
                    },
                    draft_states,
                )
                draft_rows = last_column
                tokens[:, last_column + 1] = out["logits"][:, -1].argmax(-1)
                spec_states, spec_hidden = draft_states, out[DRAFT_HIDDEN_STATES][:, -1:]
                for j in range(1, k):  # draft j+1 from draft j, at draft j's column - 1 (as a pair sits)
                    column = last_column + j
                    spec, spec_states = run_draft(
                        {
                            "input_ids": tokens[:, column : column + 1],
                            HIDDEN_STATES: spec_hidden,
                            "attention_mask": full_mask[:, :column],
                            "position_ids": column_positions[:, column - 1 : column],
                        },
                        spec_states,
                    )
                    spec_hidden = spec[DRAFT_HIDDEN_STATES]
                    tokens[:, column + 1] = spec["logits"][:, -1].argmax(-1)
                if self._draft_in_place:  # the same buffers, perhaps regrown; the rows past draft_rows
                    draft_states = spec_states  # are rewritten by the next round's first draft step
                stats.draft_steps += k
                t1 = time.perf_counter()
                stats.draft_s += t1 - t0

                end = last_column + k + 1  # verify columns: re-fed ones, the last token, the drafts
                outs, verify_states = run_main(
                    {
                        "input_ids": tokens[:, committed:end],
                        "attention_mask": full_mask[:, :end],
                        "position_ids": column_positions[:, committed:end],
                    },
                    states,
                    scratch,
                )
                stats.verify_steps += 1
                stats.verify_s += time.perf_counter() - t1
                offset = last_column - committed
                predicted = outs["logits"][:, offset:].argmax(-1)  # [B, k + 1]: after last, d_1, ..., d_k
                drafted = tokens[:, last_column + 1 : end]
                matches = np.cumprod(drafted == predicted[:, :-1], axis=1)  # leading run of accepted drafts
                live = ~done
                accepted = int(matches[live].sum(1).min())
                stats.rounds += 1
                stats.row_rounds += int(live.sum())
                accepted_sum += matches[live].sum(0)
                tokens[:, last_column + accepted + 1] = predicted[:, accepted]

                for column in range(last_column + 1, last_column + accepted + 2):
                    if emitted >= max_new_tokens or done.all():
                        break
                    token = tokens[:, column].copy()  # not a view: a caller may keep or change it
                    if stops.size:
                        token = np.where(done, stops[0], token)
                        done |= np.isin(token, stops)
                    emitted += 1
                    yield token

                kept = offset + accepted + 1  # verify columns now decided: re-fed, last, accepted drafts
                if accepted == k:
                    scratch = {s: states[s] for s in scratch}  # the verify step's buffers hold the states now
                    states, committed = verify_states, committed + kept
                elif self.rollback == "recompute" or kept > max_refeed(k):
                    states = self._before_verify(states, verify_states)
                    t2 = time.perf_counter()
                    _, states = run_main(
                        {
                            "input_ids": tokens[:, committed : committed + kept],
                            "attention_mask": full_mask[:, : committed + kept],
                            "position_ids": column_positions[:, committed : committed + kept],
                        },
                        states,
                    )
                    committed += kept
                    stats.recompute_steps += 1
                    stats.recompute_s += time.perf_counter() - t2
                else:  # refeed: the decided columns ride along at the front of the next verify step
                    states = self._before_verify(states, verify_states)
                pair_hidden = outs[HIDDEN_STATES][:, offset:kept]
                last_column += accepted + 1
        finally:
            for j in range(k):
                stats.accepted[j] += int(accepted_sum[j])
        if timings is not None:
            timings["decode_end"] = time.perf_counter()

    def _runners(self, states: dict[str, Any]) -> tuple[Callable, Callable, dict[str, ort.OrtValue]]:
        """The step functions of the main and draft graphs, and the verify step's second buffers.

        Where the graphs update states in place (runtime/in_place.py), the verify step writes the DeltaNet
        states into the second buffers (swapped in when every draft is accepted) and its KV rows over the
        cache; the draft steps write the MTP layer's KV cache in place (so only where every draft state is
        a KV cache: the drafts beyond the first run on rows the next round rewrites)."""
        main, draft = self.main, self.draft
        scratch = {
            s: ort.OrtValue.ortvalue_from_shape_and_type(v.shape(), v.numpy().dtype.type, "cpu")
            for s, v in states.items()
            if main.in_place.get(s) is False
        }
        run_main = (
            main.run_in_place
            if main.in_place
            else lambda feeds, past, into=None: main.step_all_bound(feeds, past)
        )
        run_draft = draft.run_in_place if self._draft_in_place else draft.step_all_bound
        return run_main, run_draft, scratch

    def _before_verify(self, states: dict[str, Any], verify_states: dict[str, Any]) -> dict[str, Any]:
        """The states from before a verify step whose drafts were not all accepted: the DeltaNet states as
        they were (the verify step wrote its own elsewhere), the KV caches as the verify step left them
        where it wrote them in place (the buffer may have been regrown; the rows it added past the
        accepted ones are rewritten by the next step, whose bias says how many rows are valid)."""
        return {s: verify_states[s] if self.main.in_place.get(s) else v for s, v in states.items()}


def _feeds(ids: np.ndarray, mask: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "input_ids": np.asarray(ids, np.int64),
        "attention_mask": np.asarray(mask, np.int64),
        "position_ids": np.asarray(positions, np.int64),
    }


@functools.cache  # a decoder is made per generate call; the graph is read once per path
def _runs_op(model_path: Path, op_type: str) -> bool:
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    return any(node.op_type == op_type for node in model.graph.node)
