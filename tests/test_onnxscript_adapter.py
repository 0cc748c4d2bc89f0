"""The onnxscript adapter: the installed onnxscript still has the private shape the adapter is written for,
the adapter is the only module importing private onnxscript modules, and a shape change is reported
naming the adapter and the missing piece."""

from __future__ import annotations

import ast
import importlib
import re
import sys
from pathlib import Path

import pytest

from qwen_export.passes import onnxscript_adapter as adapter
from qwen_export.passes.onnxscript_adapter import (
    ADAPTER,
    PINNED_ONNXSCRIPT,
    MatchResult,
    SimplePatternMatcher,
    check_onnxscript_shape,
)

REPO = Path(__file__).resolve().parents[1]
ADAPTER_FILE = REPO / "passes" / "onnxscript_adapter.py"
# Source folders of the project (the listed ones install under qwen_export) plus the tests and plugins.
SCANNED = ["passes", "exporter", "runtime", "golden", "qwen_export", "scripts", "tests", "plugins"]
REQUIRED = {"passes", "exporter", "runtime", "golden", "qwen_export", "scripts"}


def test_adapter_module_name():
    assert adapter.__name__ == ADAPTER
    assert Path(adapter.__file__).resolve() == ADAPTER_FILE.resolve()


def test_pinned_version_matches_pyproject():
    pin = re.search(r'"onnxscript==([^"]+)"', (REPO / "pyproject.toml").read_text())
    assert pin, "pyproject.toml no longer pins onnxscript with =="
    assert pin.group(1) == PINNED_ONNXSCRIPT, (
        f"pyproject.toml pins onnxscript=={pin.group(1)} but {ADAPTER} is written for {PINNED_ONNXSCRIPT}: "
        f"run check_onnxscript_shape() against the new pin, update {ADAPTER} and its PINNED_ONNXSCRIPT"
    )


def test_installed_onnxscript_has_the_adapters_shape():
    problems = check_onnxscript_shape()
    assert problems == [], "\n".join(problems)


# --- no private onnxscript import outside the adapter ------------------------------------------------------


def _is_private_onnxscript(dotted: str) -> bool:
    parts = dotted.split(".")
    return parts[0] == "onnxscript" and any(
        p.startswith("_") and not (p.startswith("__") and p.endswith("__")) for p in parts[1:]
    )


def private_onnxscript_imports(source: str, filename: str = "<source>") -> list[str]:
    """`line: module` for every import of a private onnxscript module (or private name of an onnxscript
    module): `import onnxscript.x._y`, `from onnxscript.x._y import z`, `from onnxscript.x import _y`,
    and `importlib.import_module("onnxscript.x._y")` / `__import__(...)` with a literal name."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names = [node.args[0].value]
        hits = [n for n in names if _is_private_onnxscript(n)]
        if hits:
            found.append(f"{node.lineno}: {hits[0]}")
    return found


@pytest.mark.parametrize(
    "source",
    [
        "from onnxscript.rewriter._rewrite_rule import Pattern",
        "from onnxscript.rewriter import _basics",
        "import onnxscript.rewriter._matcher",
        "import onnxscript.rewriter._matcher as m",
        "def f():\n    from onnxscript._internal import x",
        "import importlib\nimportlib.import_module('onnxscript.rewriter._basics')",
        "__import__('onnxscript._framework_apis')",
    ],
)
def test_scanner_finds_private_imports(source):
    assert private_onnxscript_imports(source)


@pytest.mark.parametrize(
    "source",
    [
        "from onnxscript.rewriter.pattern import OrValue, Var",
        "import onnxscript",
        "from onnxscript import __version__",
        "from qwen_export.passes._private import x",
        "from . import _local",
    ],
)
def test_scanner_leaves_public_imports(source):
    assert private_onnxscript_imports(source) == []


def test_only_the_adapter_imports_private_onnxscript():
    missing = REQUIRED - {d for d in SCANNED if (REPO / d).is_dir()}
    assert not missing, f"source folders missing, the scan would be vacuous: {sorted(missing)}"
    files = [p for d in SCANNED if (REPO / d).is_dir() for p in sorted((REPO / d).rglob("*.py"))]
    assert ADAPTER_FILE in files
    offenders = []
    for path in files:
        hits = private_onnxscript_imports(path.read_text(encoding="utf-8"), str(path))
        if path == ADAPTER_FILE:
            assert hits, "the scanner no longer sees the adapter's own private import; it is broken"
            continue
        offenders += [f"{path.relative_to(REPO)}:{hit}" for hit in hits]
    assert not offenders, (
        f"private onnxscript modules imported outside {ADAPTER} (passes/onnxscript_adapter.py); import "
        "them through the adapter instead:\n" + "\n".join(offenders)
    )


# --- a shape change is reported, naming the adapter --------------------------------------------------------


def _assert_reported(problems: list[str], piece: str) -> None:
    assert problems, f"check_onnxscript_shape() did not notice the change to {piece}"
    hits = [p for p in problems if piece in p]
    assert hits, f"no problem line names {piece}: {problems}"
    for line in problems:
        assert line.startswith(f"{ADAPTER}: "), line
        assert f"update {ADAPTER}" in line, line
        assert PINNED_ONNXSCRIPT in line, line


def test_missing_private_method_is_reported(monkeypatch):
    monkeypatch.delattr(SimplePatternMatcher, "_multi_match")
    _assert_reported(check_onnxscript_shape(), "SimplePatternMatcher._multi_match")


def test_missing_private_class_is_reported(monkeypatch):
    module = sys.modules[adapter.ReplacementSubgraph.__module__]  # onnxscript.rewriter._rewrite_rule
    monkeypatch.delattr(module, "ReplacementSubgraph")
    _assert_reported(check_onnxscript_shape(), "onnxscript.rewriter._rewrite_rule.ReplacementSubgraph")


def test_reordered_parameters_are_reported(monkeypatch):
    original = SimplePatternMatcher._match_node

    def _match_node(self, node, pattern_node):
        return original(self, pattern_node, node)

    monkeypatch.setattr(SimplePatternMatcher, "_match_node", _match_node)
    _assert_reported(check_onnxscript_shape(), "SimplePatternMatcher._match_node")


def test_changed_fail_signature_is_reported(monkeypatch):
    monkeypatch.setattr(MatchResult, "fail", lambda self, reason: self)
    _assert_reported(check_onnxscript_shape(), "MatchResult.fail")


def test_renamed_match_state_attribute_is_reported(monkeypatch):
    def _init_match(self, verbose):  # keeps the state somewhere other than self._match
        self._verbose = verbose
        self._state = MatchResult()
        self._current_node = None

    monkeypatch.setattr(SimplePatternMatcher, "_init_match", _init_match)
    _assert_reported(check_onnxscript_shape(), "attribute '_match'")


def test_changed_matching_behaviour_is_reported(monkeypatch):
    monkeypatch.setattr(
        SimplePatternMatcher, "_multi_match", lambda self, candidate, check_removable: MatchResult().fail("x")
    )
    _assert_reported(check_onnxscript_shape(), "NearbyOutputsMatcher")


def test_failed_private_import_names_adapter_and_versions(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript.rewriter._rewrite_rule", None)  # import now fails
    monkeypatch.delitem(sys.modules, ADAPTER)
    with pytest.raises(ImportError) as raised:
        importlib.import_module(ADAPTER)
    message = str(raised.value)
    assert ADAPTER in message
    assert f"onnxscript=={PINNED_ONNXSCRIPT}" in message
    assert f"installed onnxscript is {adapter.installed_onnxscript_version()}" in message
