"""The pass contract: every qwen-export pass is a QwenPass with a stable name, a one-line summary and a
typed record of what its last run did (`PassStats`), which the pass manager keeps per pass."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import onnx_ir as ir


@dataclass
class PassStats:
    """What one run of a pass did beyond the graph diff.

    fired:  what the pass rewrote, counted per kind of op it produced or lowered (a fusion: blocks fused
            into each qwen op; a lowering: qwen ops lowered, by op; quantization: nodes emitted, by op).
    kept:   candidates the pass looked at and left as they were, counted per reason (the reason says why).
    extras: pass-specific numbers (casts inserted, bytes saved, nodes emitted, ...).
    """

    fired: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def fire(self, kind: str, count: int = 1) -> None:
        self.fired[kind] = self.fired.get(kind, 0) + count

    def keep(self, reason: str, count: int = 1) -> None:
        self.kept[reason] = self.kept.get(reason, 0) + count

    @property
    def fired_total(self) -> int:
        return sum(self.fired.values())

    def to_json(self) -> dict[str, Any]:
        return {"fired": dict(self.fired), "kept": dict(self.kept), "extras": dict(self.extras)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> PassStats:
        data = data or {}
        return cls(dict(data.get("fired", {})), dict(data.get("kept", {})), dict(data.get("extras", {})))


class QwenPass(ir.passes.InPlacePass):
    """Base of every qwen-export pass.

    Subclasses set `name` (kebab-case, as listed by `qwen-export passes`) and implement `call`, setting
    `self.stats` to a fresh `PassStats` each run. The first paragraph of the class docstring is the
    pass's summary.
    """

    name: ClassVar[str] = ""
    # Set by a pass that changes the graph's precision on purpose (weight quantization): the numeric check
    # holds that stage and the later ones to this precision's tolerance (qwen_export/tolerances.py).
    precision: str | None = None

    def __init__(self) -> None:
        self.stats = PassStats()

    @classmethod
    def summary(cls) -> str:
        return pass_summary(cls)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LibraryPass(QwenPass):
    """A pass from another library (onnx-ir's common passes, a functional pass), run under this contract:
    listed and recorded under its own class name and summary, with an empty stats record."""

    def __init__(self, inner: ir.passes.PassBase) -> None:
        super().__init__()
        self.inner = inner

    @property
    def in_place(self) -> bool:
        return self.inner.in_place

    @property
    def changes_input(self) -> bool:
        return self.inner.changes_input

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return self.inner(model)

    def __repr__(self) -> str:
        return repr(self.inner)


def as_qwen_pass(p: ir.passes.PassBase) -> QwenPass:
    return p if isinstance(p, QwenPass) else LibraryPass(p)


def pass_name(p: ir.passes.PassBase | type) -> str:
    """The name a pass is listed and recorded under."""
    p = p.inner if isinstance(p, LibraryPass) else p
    cls = p if isinstance(p, type) else type(p)
    return getattr(cls, "name", "") or cls.__name__


def pass_summary(p: ir.passes.PassBase | type) -> str:
    """First paragraph of the pass's docstring, on one line."""
    p = p.inner if isinstance(p, LibraryPass) else p
    cls = p if isinstance(p, type) else type(p)
    doc = inspect.getdoc(cls) or ""
    return " ".join(doc.split("\n\n", 1)[0].split())
