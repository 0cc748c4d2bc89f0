"""ONNX Runtime execution of an exported decoder graph: explicit state feeding, prefill and greedy decode."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."


def session_options(optimize: bool = False, threads: int | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return so


@dataclass
class StepOutput:
    logits: np.ndarray  # [B, T, V]
    states: dict[str, np.ndarray]  # suffix -> present state
    extra: dict[str, np.ndarray]  # any other graph outputs (debug hidden states)


class OrtDecoder:
    """A loaded decoder graph. States are dicts keyed by suffix (`3.key`, `0.conv_state`, ...)."""

    def __init__(self, model_path: str | Path, optimize: bool = False, providers: list[str] | None = None):
        self.session = ort.InferenceSession(
            str(model_path), session_options(optimize), providers=providers or ["CPUExecutionProvider"]
        )
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.state_suffixes = [n.removeprefix(PAST_PREFIX) for n in self.inputs if n.startswith(PAST_PREFIX)]

    def empty_states(self, batch: int) -> dict[str, np.ndarray]:
        states = {}
        for suffix in self.state_suffixes:
            dims = self.inputs[PAST_PREFIX + suffix].shape
            shape = [batch if d == "batch" else 0 if isinstance(d, str) else d for d in dims]
            states[suffix] = np.zeros(shape, np.float32)
        return states

    def step(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        states: Mapping[str, np.ndarray],
    ) -> StepOutput:
        feeds = {
            "input_ids": np.asarray(input_ids, np.int64),
            "attention_mask": np.asarray(attention_mask, np.int64),
            "position_ids": np.asarray(position_ids, np.int64),
        }
        feeds.update({PAST_PREFIX + k: v for k, v in states.items()})
        outs = dict(zip(self.output_names, self.session.run(None, feeds), strict=True))
        present = {n.removeprefix(PRESENT_PREFIX): v for n, v in outs.items() if n.startswith(PRESENT_PREFIX)}
        extra = {n: v for n, v in outs.items() if n != "logits" and not n.startswith(PRESENT_PREFIX)}
        return StepOutput(outs["logits"], present, extra)

    def prefill(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> StepOutput:
        """Run a prompt from empty states. Positions follow HF: cumulative count of unmasked tokens."""
        input_ids = np.asarray(input_ids, np.int64)
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
        return self.step(input_ids, mask, positions_from_mask(mask), self.empty_states(input_ids.shape[0]))

    def greedy(
        self, input_ids: np.ndarray, max_new_tokens: int, attention_mask: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Greedy decoding through the carried states. Returns (tokens [B, N], step logits [B, N, V])."""
        input_ids = np.asarray(input_ids, np.int64)
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int64)
        out = self.prefill(input_ids, mask)
        last = out.logits[:, -1]
        tokens, logits = [], []
        states = out.states
        for _ in range(max_new_tokens):
            logits.append(last)
            nxt = last.argmax(-1)[:, None]
            tokens.append(nxt)
            position = positions_from_mask(mask)[:, -1:] + 1
            mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
            out = self.step(nxt, mask, position, states)
            states, last = out.states, out.logits[:, -1]
        return np.concatenate(tokens, axis=1), np.stack(logits, axis=1)


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """Position ids of a left-padded batch: running count of real tokens (padding gets position 1, as in HF)."""
    positions = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, positions).astype(np.int64)
