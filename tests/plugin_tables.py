"""Reads the plugin creators' tables from the C++ sources (plugins/<op>/<op>_core.h), for the tests.

The creators (plugins/common/trt_plugin_base.h) build their field lists, and the plugins their I/O types,
from these constexpr tables, so parsing them checks the lowering against what TensorRT will be given.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

PLUGINS_DIR = Path(__file__).resolve().parents[1] / "plugins"
OP_FOLDERS = {
    "RMSNorm": "rms_norm",
    "GatedRMSNorm": "gated_rms_norm",
    "GatedAttention": "gated_attention",
    "GatedDeltaNet": "gated_deltanet",
    "MoE": "moe",
}
_IO_CLASS = {"Act": "act", "F32": "f32", "I32": "i32"}
_FIELD_TYPE = {"Int32": "int32", "Float32": "float32"}


@dataclass(frozen=True)
class CreatorTable:
    name: str
    version: str
    namespace: str
    fields: tuple[tuple[str, str, float], ...]
    inputs: tuple[tuple[str, str], ...]
    outputs: tuple[tuple[str, str], ...]
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
