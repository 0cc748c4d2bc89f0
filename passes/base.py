"""The pass base: an onnx-ir in-place pass with a stable name, a one-line summary and per-run statistics."""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import onnx_ir as ir


class QwenPass(ir.passes.InPlacePass):
    """Base of every qwen-export pass.

    Subclasses set `name` (kebab-case, as listed by `qwen-export passes`) and implement `call`. The first
    paragraph of the class docstring is the pass's summary. `stats` holds what the last run did beyond
    the graph diff (for example how many times a fusion fired); the pass manager records it.
    """

    name: ClassVar[str] = ""
    # Set by a pass that changes the graph's precision on purpose (weight quantization): the numeric check
    # holds that stage and the later ones to this precision's tolerance (qwen_export/tolerances.py).
    precision: str | None = None

    def __init__(self) -> None:
        self.stats: dict[str, Any] = {}

    @classmethod
    def summary(cls) -> str:
        return pass_summary(cls)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def pass_name(p: ir.passes.PassBase | type) -> str:
    """The name a pass is listed and recorded under (class name for passes from other libraries)."""
    cls = p if isinstance(p, type) else type(p)
    return getattr(cls, "name", "") or cls.__name__


def pass_summary(p: ir.passes.PassBase | type) -> str:
    """First paragraph of the pass's docstring, on one line."""
    cls = p if isinstance(p, type) else type(p)
    doc = inspect.getdoc(cls) or ""
    return " ".join(doc.split("\n\n", 1)[0].split())


def pass_stats(p: ir.passes.PassBase) -> dict[str, Any]:
    return dict(getattr(p, "stats", {}) or {})
