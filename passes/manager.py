"""The pass manager: runs passes in order and records, per pass, time, memory, graph size and op changes,
and (with a numeric check) how far each stage's outputs moved from the previous stage and the golden."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir
import psutil
from rich.table import Table

from qwen_export.artifact import PASSES_FORMAT
from qwen_export.memory import peak_rss_mib
from qwen_export.passes.base import PassStats, QwenPass, as_qwen_pass, pass_name, pass_summary
from qwen_export.passes.graph_stats import histogram_delta, node_counts, op_histogram
from qwen_export.passes.numerics import NumericCheck, StageNumerics
from qwen_export.passes.verify import check_well_formed, verify_by_default
from qwen_export.tolerances import tolerance_for


def _rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


@dataclass
class PassRecord:
    name: str
    summary: str
    modified: bool
    wall_s: float
    rss_before_mib: float
    rss_after_mib: float
    peak_rss_rise_mib: float  # how much this pass raised the process's peak RSS
    python_peak_mib: float | None  # tracemalloc peak of Python allocations during the pass (trace_memory)
    nodes_before: dict[str, int]
    nodes_after: dict[str, int]
    ops_delta: dict[str, int]  # top graph
    ops_delta_all: dict[str, int]  # top graph, subgraphs and function bodies
    stats: PassStats
    options: str = ""  # the pass as constructed (its repr), e.g. "Precision('bf16', logits_fp32=True)"
    verified: bool = False
    numerics: StageNumerics | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        data = {k: v for k, v in self.__dict__.items() if k != "numerics"}
        data["stats"] = self.stats.to_json()
        data["wall_s"] = round(self.wall_s, 4)
        for k in ("rss_before_mib", "rss_after_mib", "peak_rss_rise_mib", "python_peak_mib"):
            data[k] = None if data[k] is None else round(data[k], 1)
        data["numerics"] = self.numerics.to_json() if self.numerics is not None else None
        return data


@dataclass
class PipelineReport:
    records: list[PassRecord]
    baseline: StageNumerics | None  # the input model against the golden
    tolerance: float | None
    first_failure: str | None  # first stage ("input" or a pass name) out of tolerance

    @property
    def checked(self) -> bool:
        return self.baseline is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PASSES_FORMAT,
            "checked": self.checked,
            "tolerance": self.tolerance,
            "first_failure": self.first_failure,
            "input": self.baseline.to_json() if self.baseline is not None else None,
            "passes": [r.to_json() for r in self.records],
        }

    def stage_tolerances(self) -> str:
        """'2e-4' or, where a pass changed the precision, '2e-4, then 1 from quantize-weights on'."""
        parts: list[str] = []
        current = None
        for record in [r for r in self.records if r.numerics is not None]:
            if record.numerics.tolerance != current:
                current = record.numerics.tolerance
                parts.append(f"{current:g}" if not parts else f"then {current:g} from {record.name} on")
        return ", ".join(parts) or f"{self.tolerance:g}"

    def table(self) -> Table:
        """One row per pass: time, node counts, op changes, what fired, and the check's |Δ| and verdict."""
        headers = ["#", "pass", "time", "nodes", "in fns", "op changes", "fired", "|Δ| prev", "|Δ| golden"]
        table = Table(*headers, "", title="passes")
        for column in table.columns:  # names and numbers stay whole; the lists wrap
            column.no_wrap = column.header not in ("op changes", "fired")
        for i, r in enumerate(self.records, 1):
            fired = ", ".join(f"{op}×{n}" for op, n in r.stats.fired.items() if n)
            num = r.numerics
            ok = num is not None and num.within_tolerance
            verdict = "" if num is None else ("[green]ok[/green]" if ok else "[red]FAIL[/red]")
            table.add_row(
                str(i),
                r.name,
                f"{r.wall_s:.2f}s",
                f"{r.nodes_before['graph']}→{r.nodes_after['graph']}",
                str(r.nodes_after["functions"]),
                _top_changes(r.ops_delta),
                fired,
                _fmt_delta(num.max_vs_previous if num else None),
                _fmt_delta(num.max_vs_golden if num else None),
                verdict,
            )
        return table


def _fmt_delta(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def _top_changes(delta: dict[str, int], n: int = 2) -> str:
    items = list(delta.items())
    text = ", ".join(f"{op} {count:+d}" for op, count in items[:n])
    return text + (f" (+{len(items) - n})" if len(items) > n else "")


class PassManager:
    """Runs `passes` on a model, one after another, recording a `PassRecord` for each.

    `check`: a NumericCheck run on the input and after every pass (ONNX Runtime, optimizations off); the
    report names the first stage whose outputs leave tolerance against the golden or the previous stage.
    `verify`: run the ONNX checker (full_check) after every pass and fail on the first invalid graph;
    defaults to the QWEN_EXPORT_VERIFY_PASSES environment variable.
    `around`: a context each pass runs in (the engine build's progress stages); `on_start`/`on_end` are
    called just inside it.
    """

    def __init__(
        self,
        passes: Sequence[ir.passes.PassBase],
        check: NumericCheck | None = None,
        verify: bool | None = None,
        trace_memory: bool = False,
        on_start: Callable[[int, ir.passes.PassBase], None] | None = None,
        on_end: Callable[[int, PassRecord], None] | None = None,
        around: Callable[[ir.passes.PassBase], AbstractContextManager[Any]] | None = None,
    ):
        self.passes = [as_qwen_pass(p) for p in passes]
        self.check = check
        self.verify = verify_by_default() if verify is None else verify
        self.trace_memory = trace_memory
        self.on_start = on_start
        self.on_end = on_end
        self.around = around or (lambda p: nullcontext())

    def run(self, model: ir.Model) -> tuple[ir.Model, PipelineReport]:
        baseline = previous = self.check.measure(model) if self.check else None
        first_failure = None if baseline is None or baseline.within_tolerance else "input"
        records = []
        tolerance = self.check.tolerance if self.check else None
        for i, p in enumerate(self.passes):
            with self.around(p):
                if self.on_start:
                    self.on_start(i, p)
                if p.precision:
                    tolerance = tolerance_for(p.precision)["logits_max_abs"]
                model, record = self._run_one(p, model, previous, tolerance)
                if record.numerics is not None:
                    previous = record.numerics
                    if first_failure is None and not record.numerics.within_tolerance:
                        first_failure = record.name
                records.append(record)
                if self.on_end:
                    self.on_end(i, record)
        return model, PipelineReport(records, baseline, tolerance, first_failure)

    def _run_one(
        self,
        p: QwenPass,
        model: ir.Model,
        previous: StageNumerics | None,
        tolerance: float | None = None,
    ) -> tuple[ir.Model, PassRecord]:
        nodes_before, ops_before, all_before = (
            node_counts(model),
            op_histogram(model),
            op_histogram(model, True),
        )
        rss_before, peak_before = _rss_mib(), peak_rss_mib()
        p.stats = PassStats()  # a pass that records nothing reports an empty record, not a stale one
        if self.trace_memory:
            tracemalloc.start()
        start = time.perf_counter()
        try:
            result = p(model)
        finally:
            wall = time.perf_counter() - start
            python_peak = tracemalloc.get_traced_memory()[1] / 2**20 if self.trace_memory else None
            if self.trace_memory:
                tracemalloc.stop()
        model = result.model
        record = PassRecord(
            name=pass_name(p),
            summary=pass_summary(p),
            modified=result.modified,
            wall_s=wall,
            rss_before_mib=rss_before,
            rss_after_mib=_rss_mib(),
            peak_rss_rise_mib=max(0.0, peak_rss_mib() - peak_before),
            python_peak_mib=python_peak,
            nodes_before=nodes_before.to_json(),
            nodes_after=node_counts(model).to_json(),
            ops_delta=histogram_delta(ops_before, op_histogram(model)),
            ops_delta_all=histogram_delta(all_before, op_histogram(model, True)),
            stats=p.stats,
            options=repr(p),
        )
        if self.verify:
            try:
                check_well_formed(model)
            except Exception as e:
                raise ir.passes.PassError(
                    f"the graph is not valid ONNX after pass {record.name!r}: {e}"
                ) from e
            record.verified = True
        if self.check:
            record.numerics = self.check.measure(model, previous, tolerance)
        return model, record
