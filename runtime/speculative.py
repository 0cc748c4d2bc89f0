"""Lossless greedy speculative decoding with the checkpoint's own MTP layer (the draft graph, mtp.onnx).

Each round drafts k tokens with the MTP layer, verifies them in one multi-token step of the main graph and
keeps the longest accepted prefix plus the main model's own next token, so the tokens are exactly those of
plain greedy decoding. A batch advances by the shortest accepted prefix over its live rows (a row whose
draft ran further gets the same tokens: its next token equals the draft it accepted).

The prompt and every verify step run the verify graph (runtime/verify_graph.py): the main graph and the MTP
layer in one ONNX Runtime run, which also drafts the next round's first token. A round of k = 1 is thus one
run; k > 1 adds k - 1 steps of mtp.onnx, each drafting from the one before.

Rolling back a rejected draft: the KV cache could be cut, but the DeltaNet conv and recurrent states cannot
be rewound. Three ways are kept, measured by scripts/bench_speculative.py (benchmarks/speculative.md):
- "snapshot" (the default where the verify graph allows it): the verify step's DeltaNet ops also output their
  states after every column (qwen.cpu GatedDeltaRule, runtime/verify_graph.py), and a round that rejects
  part of its draft copies those after its last accepted column into the verify step's state buffers,
  which it then keeps as a round that accepts everything does. Every verify step is k + 1 wide.
- "refeed" (the default elsewhere): a round that rejects part of its draft keeps the states from before
  its verify step, and the accepted tokens ride along at the front of the next verify step. Nothing runs
  twice as a separate step; a verify step just grows by the re-fed tokens. After a round that accepts
  everything, the verify step's states are kept.
- "recompute": a round that rejects part of its draft runs the verify graph again on the accepted tokens.
A verify or recompute step stays under STEP_TOKENS wide (refeed gives way to a recompute before that): on the
qwen.cpu graphs such a step gives each token the bits of a one-token step, so even on ort-cpu-int4, whose
int8 activations can turn a last-bit difference into a flipped near-tie, the tokens are plain decoding's.

The MTP layer's KV cache is a state of the verify graph like the main graph's, kept or rolled back with
them: its valid rows are the pairs (main hidden state at column t, token t+1) of the decided columns, the
prompt's first. The draft steps beyond the first run on a copy of it (cut to the valid rows where a re-fed
round left rows past them), or, where the graphs update their KV caches in place, on rows past the valid
ones, which the next verify run rewrites.

On graphs whose ops update states in place (runtime/in_place.py) nothing is copied: the verify step writes
its KV rows over the caches and its DeltaNet states into a second set of buffers, swapped in when every
draft is accepted.
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

from qwen_export.cpu_kernels import STEP_TOKENS
from qwen_export.errors import QwenExportError
from qwen_export.exporter.model import HIDDEN_STATES
from qwen_export.exporter.mtp import DRAFT_HIDDEN_STATES
from qwen_export.runtime.ort_decoder import OrtDecoder, positions_from_mask
from qwen_export.runtime.verify_graph import (
    DRAFT_LOGITS,
    MTP_STATES,
    NEXT_IDS,
    POSITION_PREFIX,
    PREDICTED_IDS,
)

MAX_SPECULATIVE = 8
REFEED_ROUNDS = 3  # re-fed tokens past this many rounds' worth are committed by a recompute step
# The qwen.cpu kernels compute each token of a call narrower than STEP_TOKENS as a one-token call would, bit
# for bit (plugins/ort_cpu/common/step_tokens.h): verify and recompute steps stay under it, so on those graphs
# the tokens are exactly plain decoding's even where a near-tie would flip on the last bit.
ROLLBACKS = ("snapshot", "refeed", "recompute")


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
    """Greedy decoding checked against k MTP drafts a round: the prompt and every round run through
    `verify` (runtime/verify_graph.py: the main graph and the MTP layer in one run), and, for k > 1, k - 1
    further steps of `draft` (mtp.onnx)."""

    def __init__(self, verify: OrtDecoder, draft: OrtDecoder, k: int, rollback: str | None = None):
        """`rollback`: one of ROLLBACKS; None: "snapshot" where the verify graph allows it, else "refeed"."""
        check_speculative(k)
        if rollback is not None and rollback not in ROLLBACKS:
            raise QwenExportError(f"rollback {rollback!r} is not one of {', '.join(ROLLBACKS)}")
        # the fixed-size states (DeltaNet's) -> the verify graph's output of them after every column
        self._position_states = {
            s: POSITION_PREFIX + s for s in verify.state_suffixes if verify.in_place.get(s) is not True
        }
        # the draft steps run in place only where every draft state is a KV cache (runtime/in_place.py) that
        # the verify graph updates in place too (both come from one target's passes); a snapshot rollback
        # needs that for k > 1, since a kept verify step's MTP cache holds rejected columns' rows at its end
        self._draft_in_place = bool(draft.in_place) and all(
            draft.in_place.get(s) and verify.in_place.get(MTP_STATES + s) for s in draft.state_suffixes
        )
        snapshots = (
            bool(verify.in_place)
            and all(s in verify.in_place for s in verify.state_suffixes)
            and all(name in verify.output_names for name in self._position_states.values())
            and (k == 1 or self._draft_in_place)
        )
        if rollback == "snapshot" and not snapshots:
            raise QwenExportError(
                "rollback 'snapshot' needs a verify graph whose DeltaNet ops give their states after every "
                "token and update them in place (qwen.cpu GatedDeltaRule, domain version 3: an ort-cpu or "
                "ort-cpu-int4 artifact built by this version); use 'refeed'"
            )
        rollback = rollback or ("snapshot" if snapshots else "refeed")
        self.verify, self.draft, self.k, self.rollback = verify, draft, k, rollback
        # ONNX Runtime's GroupQueryAttention takes several new tokens over a cache at batch 1 only.
        self.row_by_row = _runs_op(verify.model_path, "GroupQueryAttention")
        self._caches_in_place: list[str] = []  # the KV caches a verify step writes in place (per loop)

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
        # the token after each column where it is decided (the MTP pairs' tokens); -1: not yet
        next_ids = np.full((batch, columns), -1, np.int64)
        next_ids[:, : width - 1] = ids[:, 1:]

        # The prompt through the verify graph: the first token, and the MTP layer's pairs of the prompt,
        # (hidden c, token c+1) at column c, which give the first draft. Only the last position's
        # vocabulary projections are needed (the pairs' tokens are the prompt's).
        feeds = {**_feeds(ids, mask, positions), NEXT_IDS: next_ids[:, :width]}
        if self.verify.keeps_logits:
            feeds["logits_to_keep"] = np.array(1, np.int64)
        outs, states = self.verify.step_all_bound(feeds, self.verify.empty_bound_states(batch))
        last = outs[PREDICTED_IDS][:, -1]
        tokens[:, width] = last
        next_ids[:, width - 1] = last
        emitted = 1
        if timings is not None:
            timings["time_to_first_token_s"] = time.perf_counter() - start
            timings["decode_start"] = time.perf_counter()
        done |= np.isin(last, stops)
        live = (~done).tolist()  # changes only where a row meets a stop token (below)
        yield last
        first_draft, draft_hidden = outs[DRAFT_LOGITS][:, -1].argmax(-1), outs[DRAFT_HIDDEN_STATES][:, -1:]
        draft_suffixes = self.draft.state_suffixes
        run_draft = self.draft.run_in_place if self._draft_in_place else self.draft.step_all_bound
        run_verify, scratch = self._verify_runner(states)
        committed = width  # columns inside the main graph's states
        last_column = width  # the newest decided token, not yet fed to the main graph
        pairs = None  # where the MTP cache in `states` lacks decided pairs: one that holds exactly those
        while emitted < max_new_tokens and any(live):
            t0 = time.perf_counter()
            tokens[:, last_column + 1] = first_draft
            spec_states = pairs or {s: states[MTP_STATES + s] for s in draft_suffixes}
            for j in range(1, k):  # draft j+1 from draft j, at draft j's column - 1 (as a pair sits)
                column = last_column + j
                spec, spec_states = run_draft(
                    {
                        "input_ids": tokens[:, column : column + 1],
                        HIDDEN_STATES: draft_hidden,
                        "attention_mask": full_mask[:, :column],
                        "position_ids": column_positions[:, column - 1 : column],
                    },
                    spec_states,
                )
                draft_hidden = spec[DRAFT_HIDDEN_STATES]
                tokens[:, column + 1] = spec["logits"][:, -1].argmax(-1)
            if self._draft_in_place:  # the same buffers, perhaps regrown; the rows they wrote past the
                states.update({MTP_STATES + s: v for s, v in spec_states.items()})  # valid ones are
            stats.draft_steps += k - 1  # rewritten by the verify run
            t1 = time.perf_counter()
            stats.draft_s += t1 - t0

            end = last_column + k + 1  # verify columns: re-fed ones, the last token, the drafts
            outs, verify_states = run_verify(
                {
                    "input_ids": tokens[:, committed:end],
                    "attention_mask": full_mask[:, :end],
                    "position_ids": column_positions[:, committed:end],
                    NEXT_IDS: next_ids[:, committed:end],
                },
                states,
                scratch,
            )
            stats.verify_steps += 1
            stats.verify_s += time.perf_counter() - t1
            offset = last_column - committed
            predicted = outs[PREDICTED_IDS][:, offset:]  # [B, k + 1]: after last, d_1, ..., d_k
            accepted, per_position = _accepted(tokens[:, last_column + 1 : end], predicted[:, :-1], live)
            stats.rounds += 1
            stats.row_rounds += sum(live)
            for j, count in enumerate(per_position):
                stats.accepted[j] += count
            tokens[:, last_column + accepted + 1] = predicted[:, accepted]
            next_ids[:, last_column : last_column + accepted + 1] = predicted[:, : accepted + 1]
            # the MTP pair at the last decided column: (its hidden state, the token just decided)
            first_draft = outs[DRAFT_LOGITS][:, offset + accepted].argmax(-1)
            draft_hidden = outs[DRAFT_HIDDEN_STATES][:, offset + accepted : offset + accepted + 1].copy()

            for column in range(last_column + 1, last_column + accepted + 2):
                if emitted >= max_new_tokens or not any(live):
                    break
                token = tokens[:, column].copy()  # not a view: a caller may keep or change it
                if stops.size:
                    token = np.where(done, stops[0], token)
                    done |= np.isin(token, stops)
                    live = (~done).tolist()
                emitted += 1
                yield token

            kept = offset + accepted + 1  # verify columns now decided: re-fed, last, accepted drafts
            pairs = None
            if accepted < k and self.rollback == "snapshot":
                # the states after the last decided column, into the buffers the verify step wrote
                for suffix, name in self._position_states.items():
                    np.copyto(verify_states[suffix].numpy(), outs[name][:, kept - 1])
            if accepted == k or self.rollback == "snapshot":
                scratch = {s: states[s] for s in scratch}  # the verify step's buffers hold the states now
                states, committed = verify_states, committed + kept
            elif self.rollback == "recompute" or kept > max_refeed(k):
                states = self._before_verify(states, verify_states)
                t2 = time.perf_counter()
                _, states = run_verify(
                    {
                        "input_ids": tokens[:, committed : committed + kept],
                        "attention_mask": full_mask[:, : committed + kept],
                        "position_ids": column_positions[:, committed : committed + kept],
                        NEXT_IDS: next_ids[:, committed : committed + kept],
                    },
                    states,
                )
                committed += kept
                stats.recompute_steps += 1
                stats.recompute_s += time.perf_counter() - t2
            else:  # refeed: the decided columns ride along at the front of the next verify step
                states = self._before_verify(states, verify_states)
                if k > 1 and not self._draft_in_place:  # the draft steps read the re-fed columns' pairs
                    pairs = {
                        s: _first_rows(verify_states[MTP_STATES + s], last_column + accepted + 1)
                        for s in draft_suffixes
                    }
            last_column += accepted + 1
        if timings is not None:
            timings["decode_end"] = time.perf_counter()

    def _verify_runner(self, states: dict[str, Any]) -> tuple[Callable, dict[str, ort.OrtValue]]:
        """The verify graph's step function, and its second buffers.

        Where the graph updates states in place (runtime/in_place.py), the verify step writes the DeltaNet
        states into the second buffers (swapped in when every draft is accepted) and its KV rows, the MTP
        layer's included, over the caches."""
        verify = self.verify
        verify.forget_bindings()  # a previous loop's, which hold its buffers
        self._caches_in_place = [s for s, grows in verify.in_place.items() if grows]
        scratch = {
            s: ort.OrtValue.ortvalue_from_shape_and_type(v.shape(), v.numpy().dtype.type, "cpu")
            for s, v in states.items()
            if verify.in_place.get(s) is False
        }
        if verify.in_place:  # its outputs are read before its next run: no copies of them
            return functools.partial(verify.run_in_place, copy_outputs=False), scratch
        return (lambda feeds, past, into=None: verify.step_all_bound(feeds, past)), scratch

    def _before_verify(self, states: dict[str, Any], verify_states: dict[str, Any]) -> dict[str, Any]:
        """The states from before a verify step whose drafts were not all accepted: the DeltaNet states as
        they were (the verify step wrote its own elsewhere), the KV caches as the verify step left them
        where it wrote them in place (the buffer may have been regrown; the rows it added past the
        accepted ones are rewritten by the next step, whose bias says how many rows are valid). Updates
        and returns `states`, which the verify step did not keep."""
        for suffix in self._caches_in_place:
            states[suffix] = verify_states[suffix]
        return states


def _accepted(drafted: np.ndarray, predicted: np.ndarray, live: list[bool]) -> tuple[int, list[int]]:
    """The shortest run of leading drafts equal to the main graph's predictions over the live rows, and per
    draft position how many live rows accepted it (in Python: a round's few tokens cost less so than
    through numpy's calls, a few microseconds each)."""
    k = drafted.shape[1]
    shortest, per_position = k, [0] * k
    for row_drafts, row_predicted, alive in zip(drafted.tolist(), predicted.tolist(), live, strict=True):
        if alive:
            run = 0
            while run < k and row_drafts[run] == row_predicted[run]:
                per_position[run] += 1
                run += 1
            shortest = min(shortest, run)
    return shortest, per_position


def _first_rows(cache: ort.OrtValue, rows: int) -> ort.OrtValue:
    """A copy of a KV cache [B, kv, S, hd] cut to its first `rows` rows (on the copying path a verify step's
    cache holds its rejected drafts' rows at the end)."""
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(cache.numpy()[:, :, :rows]))


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
