"""Reads the plugins' own copies of the op table (passes/op_table.py) from their sources, for the tests:
the creators' constexpr tables (plugins/<op>/<op>_core.h), the launch parameter structs
(plugins/<op>/<op>_launch.h) and the tables of the plugin READMEs (plugins/<op>/README.md).

The creators (plugins/common/trt_plugin_base.h) build their field lists, and the plugins their I/O types,
from the constexpr tables, so parsing them checks the op table against what TensorRT will be given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from qwen_export.passes.op_table import OP_TABLE

PLUGINS_DIR = Path(__file__).resolve().parents[1] / "plugins"
OP_FOLDERS = {name: op.folder for name, op in OP_TABLE.items()}
_IO_CLASS = {"Act": "act", "F32": "f32", "I32": "i32"}
_FIELD_TYPE = {"Int32": "int32", "Float32": "float32"}


@dataclass(frozen=True)
class ReadmeTable:
    """A plugin's interface as a table lists it: plugin name, version, namespace, fields, I/O classes."""

    name: str
    version: str
    namespace: str
    fields: tuple[tuple[str, str, float], ...]
    inputs: tuple[tuple[str, str], ...]
    outputs: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class CreatorTable(ReadmeTable):
    """The creator's constexpr tables, which also say which outputs alias inputs."""

    aliases: tuple[int, ...]


def _block(text: str, declaration: str, path: Path) -> str:
    match = re.search(re.escape(declaration) + r"\s*=\s*\{(.*?)\n\};", text, re.S)
    if match is None:
        raise AssertionError(f"{path}: no `{declaration} = {{...}};` table")
    return match.group(1)


def _constant(text: str, name: str, path: Path) -> str:
    match = re.search(r"constexpr char " + name + r'\[\] = "([^"]*)";', text)
    if match is None:
        raise AssertionError(f"{path}: no constexpr char {name}[]")
    return match.group(1)


def creator_table(qwen_op: str) -> CreatorTable:
    common = PLUGINS_DIR / "common" / "qwen_core.h"
    common_text = common.read_text()
    path = PLUGINS_DIR / OP_FOLDERS[qwen_op] / f"{OP_FOLDERS[qwen_op]}_core.h"
    text = path.read_text()
    fields = tuple(
        (name, _FIELD_TYPE[kind], float(default))
        for name, kind, default in re.findall(
            r'\{"(\w+)", FieldType::k(Int32|Float32), ([-+0-9.eE]+)\}',
            _block(text, "constexpr FieldSpec kFields[]", path),
        )
    )
    io = r'\{"(\w+)", IoType::k(Act|F32|I32)\}'
    inputs = tuple(
        (n, _IO_CLASS[c]) for n, c in re.findall(io, _block(text, "constexpr IoSpec kInputs[]", path))
    )
    outputs = tuple(
        (n, _IO_CLASS[c]) for n, c in re.findall(io, _block(text, "constexpr IoSpec kOutputs[]", path))
    )
    aliases = re.search(r"constexpr int32_t kAliases\[\] = \{([^}]*)\};", text)
    if aliases is None:
        raise AssertionError(f"{path}: no kAliases table")
    return CreatorTable(
        name=_constant(text, "kPluginName", path),
        version=_constant(common_text, "kPluginVersion", common),
        namespace=_constant(common_text, "kPluginNamespace", common),
        fields=fields,
        inputs=inputs,
        outputs=outputs,
        aliases=tuple(int(a) for a in aliases.group(1).split(",")),
    )


def params_struct(qwen_op: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """(struct name, ((field, C type), ...)) of the launch parameter struct in <op>_launch.h; C types are
    normalised to single spaces with `*` attached (`void const*`, `int64_t`)."""
    folder = OP_FOLDERS[qwen_op]
    path = PLUGINS_DIR / folder / f"{folder}_launch.h"
    text = path.read_text()
    match = re.search(r"typedef struct (\w+)\s*\{(.*?)\}\s*(\w+);", text, re.S)
    if match is None or match.group(1) != match.group(3):
        raise AssertionError(f"{path}: no `typedef struct X {{...}} X;`")
    fields = []
    for line in match.group(2).splitlines():
        line = line.split("//")[0].strip()
        if not line:
            continue
        decl = re.fullmatch(r"([\w\s\*]+?)\s*\b(\w+);", line)
        if decl is None:
            raise AssertionError(f"{path}: cannot read struct member `{line}` (one `type name;` per line)")
        c_type = re.sub(r"\s*\*", "*", " ".join(decl.group(1).split()))
        fields.append((decl.group(2), c_type))
    return match.group(1), tuple(fields)


_README_IO_CLASS = {"fp16 / bf16": "act", "as X": "act", "fp32": "f32", "int32": "i32"}


def readme_table(qwen_op: str) -> ReadmeTable:
    """The plugin, field and I/O tables of plugins/<op>/README.md ("0 (required)" reads as default 0)."""
    path = PLUGINS_DIR / OP_FOLDERS[qwen_op] / "README.md"
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in path.read_text().splitlines()
        if line.startswith("|") and not line.startswith("|---")
    ]
    plugin = [r for r in rows if len(r) >= 3 and re.fullmatch(r"`Qwen\w+`", r[0])]
    if len(plugin) != 1:
        raise AssertionError(f"{path}: expected one `| `Qwen<Op>` | `version` | `namespace` |` row")
    fields = tuple(
        (r[0].strip("`"), r[1], float(r[2].split()[0]))
        for r in rows
        if re.fullmatch(r"`\w+`", r[0]) and r[1] in ("int32", "float32")
    )

    def io(kind: str) -> tuple[tuple[str, str], ...]:
        found = [r for r in rows if re.fullmatch(kind + r" \d+", r[0])]
        if [int(r[0].split()[1]) for r in found] != list(range(len(found))):
            raise AssertionError(f"{path}: {kind} rows out of order")
        return tuple((r[1].split()[0], _README_IO_CLASS[r[2]]) for r in found)

    return ReadmeTable(
        name=plugin[0][0].strip("`"),
        version=plugin[0][1].strip("`"),
        namespace=plugin[0][2].strip("`"),
        fields=fields,
        inputs=io("input"),
        outputs=io("output"),
    )
