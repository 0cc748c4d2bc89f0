"""Numeric check of a pipeline stage: run it in ONNX Runtime (graph optimizations off) on fixed inputs and
compare logits and states with the previous stage and with the Hugging Face golden reference."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qwen_export.golden.store import Golden, make_prompt
from qwen_export.tolerances import tolerance_for

TOLERANCE = tolerance_for("fp32")["logits_max_abs"]  # max |Δ| in fp32, logits and states


@contextlib.contextmanager
def saved_model(model: ir.Model) -> Iterator[Path]:
    """The model written to a temporary folder (weights as external data); the model itself is unchanged."""
    with tempfile.TemporaryDirectory(prefix="qwen-export-stage-") as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data")
        yield path


@dataclass
class CaseOutputs:
    logits: np.ndarray
    states: dict[str, np.ndarray]


@dataclass
class CaseResult:
    """max |Δ| per comparison; None where there is nothing to compare with."""

    logits_vs_previous: float | None = None
    states_vs_previous: float | None = None
    logits_vs_golden: float | None = None
    states_vs_golden: float | None = None

    def to_json(self) -> dict[str, float | None]:
        return {k: (None if v is None else float(v)) for k, v in self.__dict__.items()}


@dataclass
class StageNumerics:
    cases: dict[str, CaseResult]
    tolerance: float
    outputs: dict[str, CaseOutputs] = field(repr=False, default_factory=dict)

    def _max(self, suffix: str) -> float | None:
        values = [
            v
            for c in self.cases.values()
            for k, v in c.__dict__.items()
            if k.endswith(suffix) and v is not None
        ]
        return max(values) if values else None

    @property
    def max_vs_previous(self) -> float | None:
        return self._max("_vs_previous")

    @property
    def max_vs_golden(self) -> float | None:
        return self._max("_vs_golden")

    @property
    def within_tolerance(self) -> bool:
        return all(v is None or v <= self.tolerance for v in (self.max_vs_previous, self.max_vs_golden))

    def to_json(self) -> dict[str, Any]:
        return {
            "tolerance": self.tolerance,
            "max_vs_previous": self.max_vs_previous,
            "max_vs_golden": self.max_vs_golden,
            "within_tolerance": self.within_tolerance,
            "cases": {k: c.to_json() for k, c in self.cases.items()},
        }


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) if a.size else 0.0


def _max_states(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float | None:
    if not b:
        return None
    if set(a) != set(b):
        return float("inf")
    return max(_max_abs(a[k], b[k]) for k in b)


class NumericCheck:
    """Fixed cases, each from empty states:

    - `prefill_65`: the golden 65-token prompt; logits against the golden;
    - `decode_step`: the golden greedy prompt, then one decode step with the first golden greedy token;
      the step's logits against the golden step logits;
    - `prefill_200`: the golden 200-token prompt; logits and the final states against the golden.

    Every case's logits and states are also compared with the previous stage. Without a golden the same
    prompts are drawn from `make_prompt` and only stage-to-stage differences are recorded.
    """

    def __init__(self, golden: Golden | None, vocab_size: int | None = None, tolerance: float = TOLERANCE):
        if golden is None and vocab_size is None:
            raise ValueError("a numeric check needs a golden reference or the vocabulary size")
        self.golden = golden
        self.vocab_size = vocab_size
        self.tolerance = tolerance

    def _prompt(self, length: int) -> np.ndarray:
        if self.golden is not None:
            return self.golden.prefill(length)[0]
        return make_prompt(self.vocab_size, length)

    def _greedy(self) -> tuple[np.ndarray, np.ndarray]:
        if self.golden is not None:
            return self.golden.greedy_prompt, self.golden.greedy_tokens[:, :1]
        return make_prompt(self.vocab_size, 16, seed=1), make_prompt(self.vocab_size, 1, seed=2)

    def decoder(self, path: Path) -> Any:
        """What runs a stage (a text graph on token ids): an OrtDecoder, optimizations off."""
        from qwen_export.runtime.ort_decoder import OrtDecoder

        return OrtDecoder(path)

    def run(self, model: ir.Model) -> dict[str, CaseOutputs]:
        with saved_model(model) as path:
            decoder = self.decoder(path)
            outputs = {}
            for length in (65, 200):
                out = decoder.prefill(self._prompt(length))
                outputs[f"prefill_{length}"] = CaseOutputs(out.logits, out.states)
            prompt, token = self._greedy()
            first = decoder.prefill(prompt)
            n = prompt.shape[1]
            step = decoder.step(token, np.ones((1, n + 1), np.int64), np.array([[n]]), first.states)
            outputs["decode_step"] = CaseOutputs(step.logits, step.states)
            del decoder
        return outputs

    def _golden(self, case: str) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
        g = self.golden
        if g is None:
            return None, {}
        if case == "decode_step":
            return g.greedy_logits[:, 1:2], {}
        length = int(case.rsplit("_", 1)[1])
        return g.prefill(length)[1], (g.final_states() if length == 200 else {})

    def measure(
        self, model: ir.Model, previous: StageNumerics | None = None, tolerance: float | None = None
    ) -> StageNumerics:
        """`tolerance` (max |Δ|) overrides the check's own for this stage (a stage at another precision)."""
        outputs = self.run(model)
        cases = {}
        for name, out in outputs.items():
            result = CaseResult()
            ref_logits, ref_states = self._golden(name)
            if ref_logits is not None:
                result.logits_vs_golden = _max_abs(out.logits, ref_logits)
            result.states_vs_golden = _max_states(out.states, ref_states)
            if previous is not None and name in previous.outputs:
                before = previous.outputs[name]
                result.logits_vs_previous = _max_abs(out.logits, before.logits)
                result.states_vs_previous = _max_states(out.states, before.states)
            cases[name] = result
        return StageNumerics(cases, self.tolerance if tolerance is None else tolerance, outputs)
