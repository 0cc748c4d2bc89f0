"""ONNX Runtime execution of an exported decoder graph: explicit state feeding, prefill and greedy decode."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from qwen_export.runtime import huge_pages, prefault
from qwen_export.runtime.emulation import EmulatedCopy, needs_emulation
from qwen_export.runtime.in_place import (
    GrowingCache,
    SteadyStep,
    StepBinding,
    in_place_states,
    with_room,
)

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."


def session_options(
    optimize: bool = False, threads: int | None = None, model_path: str | Path | None = None
) -> ort.SessionOptions:
    """ORT options; with `model_path`, a model that runs qwen.cpu ops gets their custom-op library."""
    so = ort.SessionOptions()
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if threads:
        so.intra_op_num_threads = threads
    so.log_severity_level = 3
    if model_path is not None:
        from qwen_export import cpu_kernels

        if cpu_kernels.uses_cpu_kernels(model_path):
            library = cpu_kernels.library_for(model_path)
            so.register_custom_ops_library(str(library))
            cpu_kernels.warn_if_portable(library)
    return so


def _stores_low_precision(model: str | Path | ir.Model) -> bool:
    return needs_emulation(model if isinstance(model, ir.Model) else ir.load(model))


@dataclass
class StepOutput:
    logits: np.ndarray  # [B, T, V]
    states: dict[str, np.ndarray]  # suffix -> present state
    extra: dict[str, np.ndarray]  # any other graph outputs (debug hidden states)


class OrtDecoder:
    """A loaded decoder graph. States are dicts keyed by suffix (`3.key`, `0.conv_state`, ...)."""

    name = "onnxruntime"

    def __init__(
        self,
        model_path: str | Path,
        optimize: bool = False,
        providers: list[str] | None = None,
        threads: int | None = None,
        graph: ir.Model | None = None,
    ):
        """`graph`: a model held in memory that stands for `model_path`, its weights in the .data files
        beside that path (the verify graph of speculative decoding, runtime/verify_graph.py)."""
        providers = providers or ["CPUExecutionProvider"]
        self.model_path = Path(model_path)
        # ONNX Runtime's CPU provider has no bf16 kernels (and fp16 ones for some ops only): a bf16/fp16
        # graph runs emulated in fp32, each low-precision result rounded through its dtype
        # (runtime/emulation.py). `emulated` says so to every report.
        on_cpu = providers == ["CPUExecutionProvider"]
        # before emulation, which loads the graph's weights into it: the proto keeps them as file references
        proto = ir.to_proto(graph) if graph is not None else None
        self.emulated = on_cpu and _stores_low_precision(graph or model_path)
        copy = EmulatedCopy(graph or model_path) if self.emulated else None
        options = session_options(optimize, threads, model_path)
        source: str | bytes = str(copy.path if copy else model_path)
        if proto is not None and copy is None:
            source = proto.SerializeToString()
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path", str(self.model_path.parent)
            )
        before = huge_pages.snapshot()
        try:
            self.session = ort.InferenceSession(source, options, providers=providers)
        finally:
            if copy is not None:
                copy.close()
        # QWEN_EXPORT_HUGE_PAGES=1: what ONNX Runtime prepacked, into 2 MiB pages (runtime/huge_pages.py)
        self.huge_page_bytes = huge_pages.collapse_new_regions(before) if on_cpu else 0
        # the weights it reads from the mapped data files, mapped in now rather than by the first prompt's
        # page faults (runtime/prefault.py)
        self.prefaulted_bytes = prefault.populate(self.model_path.parent) if on_cpu else 0
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        # passes/logits_to_keep.py: the graph can skip the vocabulary projection of all but the last rows
        overridable = {i.name for i in self.session.get_overridable_initializers()}
        self.keeps_logits = "logits_to_keep" in overridable
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.state_suffixes = [n.removeprefix(PAST_PREFIX) for n in self.inputs if n.startswith(PAST_PREFIX)]
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        # the last dim of the logits (the verify graph's are draft_logits: its first output is token ids)
        outputs = self.session.get_outputs()
        logits = next((o for o in outputs if o.name.endswith("logits")), outputs[0])
        self.vocab_size = logits.shape[-1]
        # states the graph's ops update in place (runtime/in_place.py): suffix -> grows (a KV cache)
        self.in_place = (
            in_place_states(proto or self.model_path, PAST_PREFIX, PRESENT_PREFIX)
            if self.device == "cpu"
            else {}
        )
        # kept across in-place steps (run_in_place), one per buffer set the fixed-size states are written
        # into: a speculative verify step alternates two, and re-binding its states cost 20-40 us a step
        # (forget_bindings drops them when a loop ends)
        self._bindings: dict[int | None, StepBinding] = {}
        # suffix -> (updated in place: None / False / True if it grows, past input, present output)
        self._state_names = {
            s: (self.in_place.get(s), PAST_PREFIX + s, PRESENT_PREFIX + s) for s in self.state_suffixes
        }
        self._other_outputs = [n for n in self.output_names if not n.startswith(PRESENT_PREFIX)]

    def empty_states(self, batch: int) -> dict[str, np.ndarray]:
        states = {}
        for suffix in self.state_suffixes:
            dims = self.inputs[PAST_PREFIX + suffix].shape
            shape = [batch if d == "batch" else 0 if isinstance(d, str) else d for d in dims]
            # float16 where the graph keeps a state so (a KV cache our CPU attention kernel stores in fp16)
            dtype = np.float16 if self.inputs[PAST_PREFIX + suffix].type == "tensor(float16)" else np.float32
            states[suffix] = np.zeros(shape, dtype)
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
        return self.run_feeds(feeds, states)

    def run_feeds(self, feeds: dict[str, np.ndarray], states: Mapping[str, np.ndarray]) -> StepOutput:
        """One run of the graph on `feeds` plus the past states; the outputs split into logits, present
        states and anything else (debug outputs)."""
        feeds = {**feeds, **{PAST_PREFIX + k: v for k, v in states.items()}}
        outs = dict(zip(self.output_names, self.session.run(None, feeds), strict=True))
        present = {n.removeprefix(PRESENT_PREFIX): v for n, v in outs.items() if n.startswith(PRESENT_PREFIX)}
        extra = {n: v for n, v in outs.items() if n != "logits" and not n.startswith(PRESENT_PREFIX)}
        return StepOutput(outs["logits"], present, extra)

    def whole_states(self, states: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """States as the unsharded model holds them, keyed by suffix (here: as they are)."""
        return dict(states)

    # --- bound execution: states stay ONNX Runtime values between steps (no numpy round trips) ---------
    def empty_bound_states(self, batch: int) -> dict[str, ort.OrtValue]:
        return {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in self.empty_states(batch).items()}

    def _run_bound(
        self, feeds: Mapping[str, np.ndarray], states: Mapping[str, ort.OrtValue]
    ) -> dict[str, ort.OrtValue]:
        """Every output as an ONNX Runtime value, through IOBinding (states never round-trip through numpy;
        on a GPU they stay on the device)."""
        if any(name not in self.inputs for name in feeds):
            # An overridable initializer (logits_to_keep) takes a value through run's feeds only: IOBinding
            # knows the graph inputs alone. On the CPU the two paths run at the same speed.
            # np.require, not ascontiguousarray: that one makes a scalar 1-D
            values = {
                n: ort.OrtValue.ortvalue_from_numpy(np.require(a, requirements="C")) for n, a in feeds.items()
            }
            values |= {PAST_PREFIX + suffix: value for suffix, value in states.items()}
            outputs = self.session.run_with_ort_values(self.output_names, values)
            return dict(zip(self.output_names, outputs, strict=True))
        binding = self.session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for suffix, value in states.items():
            binding.bind_ortvalue_input(PAST_PREFIX + suffix, value)
        for name in self.output_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.get_outputs(), strict=True))

    def step_bound(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        states: Mapping[str, ort.OrtValue | GrowingCache],
    ) -> tuple[np.ndarray, dict[str, ort.OrtValue | GrowingCache]]:
        """One step: returns (logits of the last position [B, V], present states).

        A one-token step on a graph whose ops update states in place (`self.in_place`) writes the present
        states over the past ones it is given: the states passed in are consumed."""
        feeds = {
            "input_ids": np.asarray(input_ids, np.int64),
            "attention_mask": np.asarray(attention_mask, np.int64),
            "position_ids": np.asarray(position_ids, np.int64),
        }
        if self.in_place and feeds["input_ids"].shape[1] == 1:
            return self._step_in_place(feeds, states)
        if self.keeps_logits and self.device == "cpu":
            feeds["logits_to_keep"] = np.array(1, np.int64)
        # a buffer with spare rows feeds a multi-token step as it is (the kernel reads P off the bias)
        values = {k: v.value if isinstance(v, GrowingCache) else v for k, v in states.items()}
        outputs = self._run_bound(feeds, values)
        logits = outputs["logits"].numpy()[:, -1]
        present = {
            n.removeprefix(PRESENT_PREFIX): v for n, v in outputs.items() if n.startswith(PRESENT_PREFIX)
        }
        return logits, present

    def _step_in_place(
        self, feeds: Mapping[str, np.ndarray], states: Mapping[str, ort.OrtValue | GrowingCache]
    ) -> tuple[np.ndarray, dict[str, ort.OrtValue | GrowingCache]]:
        """A one-token step with each in-place state bound to one buffer as past and present (the KV caches
        as GrowingCache buffers with spare rows). No logits_to_keep: one token has one row of logits."""
        outputs, present = self.run_in_place(feeds, states)
        return outputs["logits"][:, -1], present

    def forget_bindings(self) -> None:
        """Drop the kept IOBindings and the buffers they hold (a finished loop's): the next step binds."""
        self._bindings.clear()

    def run_in_place(
        self,
        feeds: Mapping[str, np.ndarray],
        states: Mapping[str, ort.OrtValue | GrowingCache],
        into: Mapping[str, ort.OrtValue] | None = None,
        copy_outputs: bool = True,
    ) -> tuple[dict[str, np.ndarray], dict[str, ort.OrtValue | GrowingCache]]:
        """A step of any width through the kept binding (runtime/in_place.py), with the states of
        `self.in_place` updated in place: each KV cache in a buffer grown to fit, bound as past and present;
        each fixed-size state bound as past and present, or, where `into` has it, written into that buffer
        and the past left as it was. Other states are copied as on the copying path.

        Returns every output that is not a state, as numpy arrays of their own (`copy_outputs` False: as
        the binding's buffers, which its next run overwrites), and the present states (the states passed
        in are consumed, except those written `into` other buffers)."""
        key = id(next(iter(into.values()))) if into else None
        binding = self._bindings.get(key)
        if binding is None:
            binding = self._bindings[key] = StepBinding(self.session)
        for name, array in feeds.items():
            binding.input(name, array)
        batch, tokens = feeds["input_ids"].shape
        total = feeds["attention_mask"].shape[1]  # valid rows after this step
        passed = (*states.values(), *(into.values() if into else ()))
        steady = binding.steady
        if steady is not None and steady.holds(passed, total):
            # the states this binding bound last step, with room: nothing to bind again (on the trained
            # model the walk over them cost about 10 us of a 300 us step)
            present = dict(steady.present)
        else:
            present = self._bind_states(binding, states, into, passed, tokens, total)
        kept = binding.buffer_outputs(self._other_outputs, batch, tokens)  # the outputs that are not states
        allocated = binding.run()
        outputs = {name: array.copy() for name, array in kept.items()} if copy_outputs else dict(kept)
        for name, value in allocated.items():
            if name.startswith(PRESENT_PREFIX):
                present[name.removeprefix(PRESENT_PREFIX)] = value
            else:
                outputs[name] = value.numpy()
        return outputs, present

    def _bind_states(
        self,
        binding: StepBinding,
        states: Mapping[str, ort.OrtValue | GrowingCache],
        into: Mapping[str, ort.OrtValue] | None,
        passed: tuple[Any, ...],
        tokens: int,
        total: int,
    ) -> dict[str, ort.OrtValue | GrowingCache]:
        """Bind every state of an in-place step (what changed since the binding's last step); returns the
        present states, and records them on the binding as its steady step unless a state's present is
        allocated anew each run."""
        present: dict[str, ort.OrtValue | GrowingCache] = {}
        steady = True
        for suffix, value in states.items():
            grows, past_name, present_name = self._state_names[suffix]
            if grows:
                present[suffix] = cache = with_room(value, total - tokens, total)
                value = cache.value
                binding.value_output(present_name, value)
            elif grows is False:
                present[suffix] = target = into.get(suffix, value) if into else value
                binding.value_output(present_name, target)
            else:  # a state not updated in place: a new buffer each step
                binding.allocated_output(present_name)
                steady = False
            binding.value_input(past_name, value)
        if steady:
            caches = [c.capacity for c in present.values() if isinstance(c, GrowingCache)]
            binding.steady = SteadyStep(passed, min(caches, default=sys.maxsize), dict(present))
        else:
            binding.steady = None
        return present

    def step_all_bound(
        self, feeds: Mapping[str, np.ndarray], states: Mapping[str, ort.OrtValue]
    ) -> tuple[dict[str, np.ndarray], dict[str, ort.OrtValue]]:
        """One step that returns every position's outputs (logits [B, T, V], hidden states) as numpy, and
        the present states as ONNX Runtime values (what speculative decoding verifies with)."""
        outputs = self._run_bound(feeds, states)
        present = {
            n.removeprefix(PRESENT_PREFIX): v for n, v in outputs.items() if n.startswith(PRESENT_PREFIX)
        }
        rest = {n: v.numpy() for n, v in outputs.items() if not n.startswith(PRESENT_PREFIX)}
        return rest, present

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
    """Position ids of a left-padded batch: running count of real tokens (padding gets 1, as in HF)."""
    positions = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, positions).astype(np.int64)
