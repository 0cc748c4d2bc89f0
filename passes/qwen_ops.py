"""The qwen op set's signatures (docs/ops.md) and the shape rules a qwen node must satisfy.

The signatures are generated from the op table (passes/op_table.py, one declaration per op). The fusion
passes build nodes from them and check every node they emit against `problems`; tests check them against
the tables in docs/ops.md.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import onnx_ir as ir

from qwen_export.passes.op_table import DOMAIN, OP_TABLE, VERSION

__all__ = ["DOMAIN", "OPS", "VERSION", "OpSignature", "is_qwen", "problems"]


@dataclass(frozen=True)
class OpSignature:
    """A qwen op's ONNX interface: input and output names in order, attribute names by type."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    int_attributes: tuple[str, ...] = ()
    float_attributes: tuple[str, ...] = ()

    @property
    def attributes(self) -> tuple[str, ...]:
        return self.int_attributes + self.float_attributes


# Generated from the op table (passes/op_table.py); docs/ops.md's tables are checked against these.
OPS: dict[str, OpSignature] = {
    op.name: OpSignature(op.name, op.input_names, op.output_names, op.int_attributes, op.float_attributes)
    for op in OP_TABLE.values()
}


def is_qwen(node: ir.Node) -> bool:
    return node.domain == DOMAIN


def _dims(value: ir.Value | None) -> tuple | None:
    if value is None or value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in value.shape)


def _expect(problems: list[str], node: ir.Node, index: int, expected: Sequence[int | None]) -> None:
    """Input `index` must have the given dims (None: any); unknown shapes are not held against it."""
    actual = _dims(node.inputs[index])
    if actual is None:
        return
    name = OPS[node.op_type].inputs[index]
    ok = len(actual) == len(expected) and all(
        e is None or a is None or a == e for a, e in zip(actual, expected, strict=True)
    )
    if not ok:
        problems.append(
            f"{name} has shape {list(actual)}, expected {[e if e is not None else '?' for e in expected]}"
        )


def _dim(node: ir.Node, index: int, axis: int) -> int | None:
    dims = _dims(node.inputs[index])
    if dims is None or not -len(dims) <= axis < len(dims):
        return None
    return dims[axis]


def _norm(node: ir.Node, a: dict, problems: list[str]) -> None:
    if not a["epsilon"] > 0:
        problems.append(f"epsilon must be positive, got {a['epsilon']}")
    scale_index = len(OPS[node.op_type].inputs) - 1
    _expect(problems, node, scale_index, [_dim(node, 0, -1)])


def _attention(node: ir.Node, a: dict, problems: list[str]) -> None:
    nh, kv, hd, rot = a["num_heads"], a["num_kv_heads"], a["head_dim"], a["rotary_dim"]
    if kv <= 0 or nh % kv:
        problems.append(f"num_heads {nh} is not a multiple of num_kv_heads {kv}")
    if rot % 2 or not 0 < rot <= hd:
        problems.append(f"rotary_dim {rot} must be even and within head_dim {hd}")
    if not a["scale"] > 0 or not a["epsilon"] > 0:
        problems.append("scale and epsilon must be positive")
    h = _dim(node, 6, 0)
    for index, shape in [
        (6, [h, nh * 2 * hd]),
        (7, [h, kv * hd]),
        (8, [h, kv * hd]),
        (9, [nh * hd, h]),
        (10, [hd]),
        (11, [hd]),
    ]:
        _expect(problems, node, index, shape)


def _deltanet(node: ir.Node, a: dict, problems: list[str]) -> None:
    nk, nv, dk, dv, k = (
        a[n] for n in ("num_k_heads", "num_v_heads", "head_k_dim", "head_v_dim", "conv_kernel")
    )
    if nk <= 0 or nv % nk:
        problems.append(f"num_v_heads {nv} is not a multiple of num_k_heads {nk}")
    c, h = 2 * nk * dk + nv * dv, _dim(node, 4, 0)
    for index, shape in [
        (4, [h, c]),
        (5, [h, nv * dv]),
        (6, [h, nv]),
        (7, [h, nv]),
        (8, [c, 1, k]),
        (9, [nv]),
        (10, [nv]),
        (11, [dv]),
        (12, [nv * dv, h]),
    ]:
        _expect(problems, node, index, shape)


def _moe(node: ir.Node, a: dict, problems: list[str]) -> None:
    h, e = _dim(node, 1, 0), _dim(node, 1, 1)
    inter, shared = _dim(node, 3, 1), _dim(node, 4, 1)
    if e is not None and not 1 <= a["top_k"] <= e:
        problems.append(f"top_k {a['top_k']} outside 1..{e} experts")
    if a["normalize"] not in (0, 1):
        problems.append(f"normalize must be 0 or 1, got {a['normalize']}")
    for index, shape in [
        (2, [e, h, None if inter is None else 2 * inter]),
        (3, [e, inter, h]),
        (4, [h, shared]),
        (5, [h, shared]),
        (6, [shared, h]),
        (7, [h, 1]),
    ]:
        _expect(problems, node, index, shape)


_RULES: dict[str, Callable[[ir.Node, dict, list[str]], None]] = {
    "RMSNorm": _norm,
    "GatedRMSNorm": _norm,
    "GatedAttention": _attention,
    "GatedDeltaNet": _deltanet,
    "MoE": _moe,
}


def problems(node: ir.Node) -> list[str]:
    """Why `node` is not a valid qwen op (empty when it is): signature, attributes, and input shapes."""
    sig = OPS.get(node.op_type)
    if sig is None:
        return [f"qwen.{node.op_type} is not in the qwen op set ({', '.join(OPS)})"]
    found: list[str] = []
    if len(node.inputs) != len(sig.inputs) or len(node.outputs) != len(sig.outputs):
        found.append(
            f"has {len(node.inputs)} inputs / {len(node.outputs)} outputs, expected "
            f"{len(sig.inputs)} / {len(sig.outputs)}"
        )
    attrs: dict = {}
    for name in sig.attributes:
        attr = node.attributes.get(name)
        if attr is None or attr.is_ref():
            found.append(f"attribute {name} missing")
            continue
        attrs[name] = attr.value
    if set(node.attributes) - set(sig.attributes):
        found.append(f"unexpected attributes {sorted(set(node.attributes) - set(sig.attributes))}")
    if not found:
        _RULES[node.op_type](node, attrs, found)
    return [f"{node.name or node.op_type}: {p}" for p in found]
