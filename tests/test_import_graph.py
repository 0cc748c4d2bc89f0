"""The project's modules import each other without cycles. The graph is read from the source (ast), not by
importing anything: every import of a `qwen_export.*` module counts, at module level or inside a function
(a cycle through a lazy import is still a cycle of design); imports under `if TYPE_CHECKING:` do not (they
never run)."""

from __future__ import annotations

import ast
import sys
from collections import deque
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT = "qwen_export"

# Package -> folder, as pyproject.toml's [tool.setuptools] package-dir / packages install them.
# The plugin op folders that hold Triton kernels (Python packages beside the C++ sources).
OPS = ("rms_norm", "gated_rms_norm", "gated_attention", "gated_deltanet", "moe")
PACKAGES = {
    "qwen_export": "qwen_export",
    "qwen_export.engines": "qwen_export/engines",
    "qwen_export.exporter": "exporter",
    "qwen_export.passes": "passes",
    "qwen_export.runtime": "runtime",
    "qwen_export.golden": "golden",
    "qwen_export.plugins": "plugins",
    "qwen_export.plugins.common": "plugins/common",  # the kernels the ops share (the projections' GEMM)
    **{f"qwen_export.plugins.{op}": f"plugins/{op}" for op in OPS},
}


def module_files(root: Path, packages: dict[str, str]) -> dict[str, Path]:
    """Module name -> file; a package's `__init__.py` is the package itself."""
    modules = {}
    for package, folder in packages.items():
        for path in sorted((root / folder).glob("*.py")):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Imports(ast.NodeVisitor):
    """(module, name or None, line) for every import that can run: `import m` is (m, None), `from m import n`
    is (m, n); relative imports are made absolute."""

    def __init__(self, package: str):
        self.package = package  # the package relative imports start from
        self.found: list[tuple[str, str | None, int]] = []

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for stmt in node.orelse:  # the `else:` of `if TYPE_CHECKING:` does run
                self.visit(stmt)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.found += [(alias.name, None, node.lineno) for alias in node.names]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            parts = self.package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        self.found += [(base, alias.name, node.lineno) for alias in node.names]


def _resolve(module: str, name: str | None, modules: dict[str, Path]) -> str | None:
    """`from a import b` is module a.b if there is one, else a (b is a name in a). A module that does not
    exist (gone, or a name inside a module) counts as its closest existing package, which the import runs."""
    if name is not None and f"{module}.{name}" in modules:
        return f"{module}.{name}"
    while module and module not in modules:
        module = module.rpartition(".")[0]
    return module or None


def import_graph(root: Path, packages: dict[str, str]) -> dict[str, dict[str, list[str]]]:
    """module -> {imported project module -> ["file:line", ...]}, self-imports left out."""
    modules = module_files(root, packages)
    graph: dict[str, dict[str, list[str]]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        visitor = _Imports(module if is_package else module.rpartition(".")[0])
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        edges = graph.setdefault(module, {})
        for imported, name, line in visitor.found:
            if imported.split(".")[0] != PROJECT:
                continue
            target = _resolve(imported, name, modules)
            where = f"{path.relative_to(root)}:{line}"
            if target and target != module and where not in edges.setdefault(target, []):
                edges[target].append(where)
    return graph


def strongly_connected(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return sorted(components)


def cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """For every import edge inside a strongly connected component, the shortest cycle through it, as
    [a, b, ..., a] (rotated to start at its smallest module, duplicates dropped). Every edge that takes part
    in a cycle shows up in at least one of them."""
    found = set()
    for component in strongly_connected(graph):
        members = set(component)
        for a in component:
            for b in sorted(set(graph[a]) & members):
                # Shortest path b -> ... -> a inside the component closes the cycle a -> b -> ... -> a.
                previous = {b: None}
                queue = deque([b])
                while a not in previous:
                    node = queue.popleft()
                    for nxt in sorted(set(graph[node]) & members):
                        if nxt not in previous:
                            previous[nxt] = node
                            queue.append(nxt)
                path = [a]
                while path[-1] != b:
                    path.append(previous[path[-1]])
                ring = [a, *reversed(path[1:])]  # a, b, ..., (node before a)
                first = ring.index(min(ring))
                found.add(tuple(ring[first:] + ring[:first]))
    return [[*ring, ring[0]] for ring in sorted(found, key=lambda r: (len(r), r))]


def describe(graph: dict[str, dict[str, list[str]]], found: list[list[str]]) -> str:
    lines = [f"{len(found)} import cycle(s) among the project's modules:"]
    lines += ["  " + " -> ".join(ring) for ring in found]
    edges = sorted({(a, b) for ring in found for a, b in zip(ring[:-1], ring[1:], strict=True)})
    lines.append("where each of those imports is:")
    lines += [f"  {a} -> {b}: {', '.join(graph[a][b])}" for a, b in edges]
    return "\n".join(lines)


def test_no_import_cycles_among_project_modules():
    graph = import_graph(ROOT, PACKAGES)
    assert set(PACKAGES) <= set(graph) and len(graph) > 50  # the walk sees the whole project
    found = cycles(graph)
    assert not found, describe(graph, found)


@pytest.mark.skipif(
    sys.version_info < (3, 11), reason="reads pyproject.toml with tomllib; runs on Python 3.11+ (CI's venv)"
)
def test_walked_packages_are_the_installed_ones():
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {p: setuptools["package-dir"].get(p) for p in setuptools["packages"]}
    # A package not named in package-dir lives under its parent's folder.
    for package in sorted(folders, key=len):
        if folders[package] is None:
            parent, _, leaf = package.rpartition(".")
            folders[package] = f"{folders[parent]}/{leaf}"
    # Data-only packages (family_configs: published config.json files) hold no module to walk.
    code = {p: f for p, f in folders.items() if any((ROOT / f).glob("*.py"))}
    assert code == PACKAGES


def test_walker_finds_cycles_in_a_synthetic_package(tmp_path):
    files = {
        "a/__init__.py": "import os\nfrom qwen_export.a import b  # the package imports its module b\n",
        "a/b.py": "import qwen_export.a.c\n",
        "a/c.py": "def lazy():\n    from qwen_export.a import VALUE  # lazy, a name in the package: a\n",
        "a/d.py": (
            "from typing import TYPE_CHECKING\n"
            "from . import e\n"
            "if TYPE_CHECKING:\n"
            "    from qwen_export.a import b  # never runs: no edge\n"
        ),
        "a/e.py": "from .d import NAME  # relative: module d\nfrom ..a import c\n",
        "f/__init__.py": "",
        "f/g.py": "from qwen_export import a  # the package a, i.e. its __init__\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path, {"qwen_export.a": "a", "qwen_export.f": "f"})
    assert graph["qwen_export.f.g"] == {"qwen_export.a": ["f/g.py:1"]}
    assert graph["qwen_export.a.d"] == {"qwen_export.a.e": ["a/d.py:2"]}  # not the TYPE_CHECKING import
    assert set(graph["qwen_export.a.e"]) == {"qwen_export.a.d", "qwen_export.a.c"}
    assert strongly_connected(graph) == [
        ["qwen_export.a", "qwen_export.a.b", "qwen_export.a.c"],
        ["qwen_export.a.d", "qwen_export.a.e"],
    ]
    found = cycles(graph)
    assert found == [
        ["qwen_export.a.d", "qwen_export.a.e", "qwen_export.a.d"],
        ["qwen_export.a", "qwen_export.a.b", "qwen_export.a.c", "qwen_export.a"],
    ]
    assert "qwen_export.a.c -> qwen_export.a: a/c.py:2" in describe(graph, found)
