"""`qwen-export kernels check`: every Triton kernel of the plugins, run by Triton's interpreter on a model's
own shapes and weights (one layer of each kind, prefill and decode, carried state), against the
transformers module's math. What a user runs before spending GPU hours."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from qwen_export.errors import QwenExportError
from qwen_export.passes.op_table import OP_TABLE

if TYPE_CHECKING:
    from rich.console import Console

    from qwen_export.plugins.triton_support import CheckRow

DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class KernelReport:
    source: str
    rows: list[CheckRow] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # ops without Triton kernels yet

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows) and not self.missing

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "passed": self.passed,
            "kernels": [r.to_json() for r in self.rows],
            "missing": self.missing,
        }

    def render(self, console: Console) -> None:
        from rich.table import Table

        table = Table("kernel", "case", "max |Δ|", "tolerance", "", title=f"Triton kernels on {self.source}")
        for r in self.rows:
            verdict = "[green]pass[/green]" if r.passed else "[red]FAIL[/red]"
            if not r.guards_ok:
                verdict += " [red](wrote outside its buffers)[/red]"
            bound = f"{r.tolerance:.0e}" + (" rel" if r.relative else "")
            table.add_row(r.kernel, r.case, f"{r.max_abs:.2e}", bound, verdict)
        console.print(table)
        for op in self.missing:
            folder = OP_TABLE[op].folder if op in OP_TABLE else op
            console.print(f"[red]no Triton kernels for {op} (plugins/{folder}/kernels.py)[/red]")


def text_view(model: Any) -> SimpleNamespace:
    """What the op checks read, for a CausalLM and a multimodal wrapper alike: `.model` is the text
    decoder (`.layers`, `.rotary_emb`) and `.config` its config."""
    inner = model.model
    text = getattr(inner, "language_model", inner)
    config = getattr(model.config, "text_config", None) or model.config
    return SimpleNamespace(model=text, config=config)


def check_kernels(
    preset: str | None = None,
    model_dir: str | os.PathLike | None = None,
    dtypes: tuple[str, ...] = DTYPES,
) -> KernelReport:
    """Each op's kernels on the first layer that has the op, in every precision of `dtypes`."""
    from qwen_export.plugins.triton_support import interpreter, upcast_bf16_dots

    try:  # before any kernel module is imported: triton.jit decides at decoration
        on = interpreter()
    except RuntimeError as e:
        raise QwenExportError(str(e)) from None
    if not on:
        raise QwenExportError("TRITON_INTERPRET is set to something other than 1; unset it to check kernels")
    import torch

    from qwen_export.exporter.export import resolve_source
    from qwen_export.golden.reference import load_reference

    upcast_bf16_dots()
    source_dir, source = resolve_source(preset, model_dir)
    view = text_view(load_reference(Path(source_dir)))
    report = KernelReport(source)
    # The shared kernels (plugins/common: the projections' GEMM) first, then each op's own.
    for name, folder in [("common", "common"), *((op.name, op.folder) for op in OP_TABLE.values())]:
        try:
            module = importlib.import_module(f"qwen_export.plugins.{folder}.kernels")
        except ModuleNotFoundError:
            report.missing.append(name)
            continue
        for index in range(len(view.model.layers)):
            rows = [r for dtype in dtypes for r in module.check_layer(view, index, getattr(torch, dtype))]
            if rows:
                report.rows += rows
                break
    return report
