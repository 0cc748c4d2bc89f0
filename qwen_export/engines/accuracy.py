"""Measure a low-precision decoder graph against the golden reference with ONNX Runtime on the CPU.

ONNX Runtime's CPU provider runs most fp16 ops but no bf16 ones. Two runtimes, named in every result:

- `ort-cpu-native`: the low-precision graph as it is (fp16; ORT's own fp16 kernels, some computing in fp32
  internally);
- `ort-cpu-emulated`: the same graph with every low-precision tensor held in fp32 after rounding through
  the low dtype (Cast to fp16/bf16 and back after each op that yields one, weights rounded the same way).
  Each op thus computes in fp32 from rounded inputs and rounds its result, as GPU kernels do when they
  accumulate in fp32 and store fp16/bf16.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from qwen_export.golden.store import GREEDY_NEW_TOKENS, PROMPT_LENGTHS, Golden
from qwen_export.runtime.emulation import LOW, emulate_in_fp32  # noqa: F401  (re-exported)
from qwen_export.runtime.ort_decoder import positions_from_mask, session_options

RUNTIMES = ("ort-cpu-native", "ort-cpu-emulated")
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(bfloat16)": ml_dtypes.bfloat16}


@dataclass
class AccuracyResult:
    runtime: str
    precision: str
    top1_agreement: float  # over every position of every golden prefill prompt
    positions: int
    per_length_top1: dict[int, float]
    max_abs_logit_diff: float
    greedy_matching: int  # leading greedy tokens equal to the reference's
    greedy_tokens: int

    @property
    def greedy_identical(self) -> bool:
        return self.greedy_matching == self.greedy_tokens

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["greedy_identical"] = self.greedy_identical
        return data


class LowPrecisionDecoder:
    """Prefill and greedy decode over a graph whose states may be fp16 (zero states in the graph's dtypes)."""

    def __init__(self, model: str | os.PathLike | bytes, threads: int | None = None):
        source = model if isinstance(model, bytes) else str(model)
        self.session = ort.InferenceSession(
            source, session_options(True, threads), providers=["CPUExecutionProvider"]
        )
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _zeros(self, batch: int) -> dict[str, np.ndarray]:
        states = {}
        for name, info in self.inputs.items():
            if not name.startswith("past_key_values."):
                continue
            shape = [
                batch if i == 0 else (0 if isinstance(d, str) or d is None else d)
                for i, d in enumerate(info.shape)
            ]
            states[name.removeprefix("past_key_values.")] = np.zeros(shape, _NP[info.type])
        return states

    def step(
        self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, states: Mapping[str, np.ndarray]
    ):
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        feeds.update({"past_key_values." + k: v for k, v in states.items()})
        outs = dict(zip(self.output_names, self.session.run(None, feeds), strict=True))
        present = {n.removeprefix("present."): v for n, v in outs.items() if n.startswith("present.")}
        return outs["logits"].astype(np.float32), present

    def prefill(self, ids: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        ids = np.asarray(ids, np.int64)
        mask = np.ones_like(ids)
        return self.step(ids, mask, positions_from_mask(mask), self._zeros(ids.shape[0]))

    def greedy(self, ids: np.ndarray, new_tokens: int) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        mask = np.ones_like(ids)
        logits, states = self.prefill(ids)
        tokens = []
        for _ in range(new_tokens):
            nxt = logits[:, -1].argmax(-1)[:, None]
            tokens.append(nxt)
            position = positions_from_mask(mask)[:, -1:] + 1
            mask = np.concatenate([mask, np.ones_like(nxt)], axis=1)
            logits, states = self.step(nxt, mask, position, states)
        return np.concatenate(tokens, axis=1)


def evaluate(
    model: str | os.PathLike | bytes,
    golden: Golden,
    runtime: str,
    precision: str,
    threads: int | None = None,
) -> AccuracyResult:
    """Top-1 agreement over the golden prefill prompts and greedy-token identity, as `runtime` runs it."""
    decoder = LowPrecisionDecoder(model, threads)
    agree = total = 0
    per_length: dict[int, float] = {}
    max_diff = 0.0
    for length in PROMPT_LENGTHS:
        ids, ref = golden.prefill(length)
        logits, _ = decoder.prefill(ids)
        hits = logits.argmax(-1) == ref.argmax(-1)
        per_length[length] = float(hits.mean())
        agree += int(hits.sum())
        total += hits.size
        max_diff = max(max_diff, float(np.abs(logits - ref).max()))
    tokens = decoder.greedy(golden.greedy_prompt, GREEDY_NEW_TOKENS)
    ref_tokens = golden.greedy_tokens
    same = tokens[0] == ref_tokens[0]
    matching = int(np.argmin(same)) if not same.all() else int(same.size)
    return AccuracyResult(
        runtime, precision, agree / total, total, per_length, max_diff, matching, int(same.size)
    )


def model_bytes(model: ir.Model) -> bytes:
    """The model as one serialized protobuf (small models only: weights inline)."""
    return ir.serde.serialize_model(model).SerializeToString()


def golden_lengths() -> tuple[int, ...]:
    return PROMPT_LENGTHS


def save_for_ort(model: ir.Model, path: Path) -> Path:
    ir.save(model, path, external_data=path.name + ".data")
    return path
