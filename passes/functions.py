"""Fused blocks as model-local ONNX functions in domain `qwen`.

A fusion replaces a matched block by one call node; the call's function body is a copy of the matched
standard ops, so ONNX Runtime (which inlines local functions) still runs the fused graph, and the portable
lowering is inlining. Design decisions:

- Function inputs are the op's inputs in docs/ops.md order; constants the block used become Constant
  nodes in the body. A body may read an outer value only through a declared alias (the exporter takes the
  sequence length from `Shape(input_ids)`, the body from `Shape(X)`: same batch and sequence dims).
- Float attributes are live: the body's epsilon/scale constants are `Constant(value_float=@epsilon)`, and
  nested qwen calls pass `epsilon=@epsilon` on, so changing an attribute changes the numbers.
- Blocks whose bodies are identical up to names share one function (one definition per op and shape
  family), so a 60-layer model holds a handful of functions, not hundreds.
- Node names in a body are relative to the block's module scope (`conv/Conv_0`); a call is named
  `<scope><Op>_<n>`, and inlining names each node `<call name>/<body name>`, which keeps the HF scope.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from qwen_export.passes.qwen_ops import DOMAIN, OPS, VERSION

MAX_BODY_CONSTANT = 4096  # elements; anything larger is a weight that must be an op input


class FusionError(RuntimeError):
    """A matched block could not be turned into a function (the rule forgot an input, or similar)."""


def scope_of(name: str | None) -> str:
    """`/layers.3/self_attn/MatMul_2` -> `/layers.3/self_attn/`."""
    if not name or "/" not in name:
        return "/"
    return name.rsplit("/", 1)[0] + "/"


def relative_name(name: str | None, scope: str) -> str | None:
    if name is None:
        return None
    return name[len(scope) :] if name.startswith(scope) else name.lstrip("/")


def _constant_node(value: ir.Value, name: str | None) -> ir.Node:
    tensor = value.const_value
    assert tensor is not None
    if tensor.size > MAX_BODY_CONSTANT:
        raise FusionError(
            f"{value.name} ({tensor.size} elements) is a weight, not a body constant; "
            "the fused op must take it as an input"
        )
    node = ir.Node("", "Constant", [], [ir.AttrTensor("value", ir.tensor(tensor.numpy()))], name=name)
    node.outputs[0].name = value.name
    node.outputs[0].type = value.type
    node.outputs[0].shape = value.shape
    return node


def extract_function(
    call: ir.Node,
    nodes: Sequence[ir.Node],
    outputs: Sequence[ir.Value],
    scope: str,
    onnx_opset: int,
    aliases: Mapping[ir.Value, int] | None = None,
    attribute_uses: Iterable[tuple[ir.Node, int, str]] = (),
) -> ir.Function:
    """A function (domain/name of `call`) whose body is a copy of `nodes` (in graph order).

    `aliases` maps an outer value the block reads to the index of the call input the body reads instead.
    `attribute_uses` lists (node, input index, attribute) where the body reads the call's float attribute
    instead of the constant the block had.
    """
    sig = OPS[call.op_type]
    aliases = dict(aliases or {})
    produced = {v for n in nodes for v in n.outputs}
    outer = list(dict.fromkeys(v for n in nodes for v in n.inputs if v is not None and v not in produced))
    body = ir.GraphView(outer, outputs, nodes=nodes).clone()
    formals = [ir.Value(name=name, type=v.type) for name, v in zip(sig.inputs, call.inputs, strict=True)]
    body_nodes = list(body)
    position = {n: i for i, n in enumerate(nodes)}
    constants: list[ir.Node] = []
    for node, index, attr in attribute_uses:
        ref = ir.Node(
            "",
            "Constant",
            [],
            [ir.RefAttr("value_float", attr, ir.AttributeType.FLOAT)],
            name=f"{relative_name(node.name, scope)}/{attr}",
        )
        ref.outputs[0].name = ref.name
        constants.append(ref)
        body_nodes[position[node]].replace_input_with(index, ref.outputs[0])

    call_index = {v: i for i, v in enumerate(call.inputs) if v is not None}
    for value, cloned in zip(outer, list(body.inputs), strict=True):
        if not cloned.uses():
            continue
        if value in call_index:
            replacement = formals[call_index[value]]
        elif value in aliases:
            replacement = formals[aliases[value]]
        elif value.const_value is not None:
            constants.append(_constant_node(value, relative_name(value.name, scope)))
            replacement = constants[-1].outputs[0]
        else:
            raise FusionError(
                f"the {call.op_type} block reads {value.name}, which is neither an input of the "
                "fused op nor a constant"
            )
        ir.convenience.replace_all_uses_with(cloned, replacement)

    for node in body_nodes:
        node.name = relative_name(node.name, scope)
        for out in node.outputs:
            out.name = relative_name(out.name, scope)
        if node.domain == DOMAIN:
            _pass_attributes_on(node, call)
    for out, name in zip(body.outputs, sig.outputs, strict=True):
        out.name = name

    body_outputs = list(body.outputs)
    body.outputs.clear()
    body.inputs.clear()
    body.remove(body_nodes)
    uses_qwen = any(n.domain == DOMAIN for n in body_nodes)
    graph = ir.Graph(
        formals,
        body_outputs,
        nodes=[*constants, *body_nodes],
        opset_imports={"": onnx_opset, **({DOMAIN: VERSION} if uses_qwen else {})},
    )
    attributes = [ir.Attr(a, ir.AttributeType.INT, None) for a in sig.int_attributes]
    attributes += [ir.Attr(a, ir.AttributeType.FLOAT, None) for a in sig.float_attributes]
    return ir.Function(DOMAIN, call.op_type, "", graph=graph, attributes=attributes)


def _pass_attributes_on(nested: ir.Node, call: ir.Node) -> None:
    """A nested qwen call whose float attribute equals the outer op's takes it by reference."""
    outer_floats = OPS[call.op_type].float_attributes
    for name, attr in list(nested.attributes.items()):
        outer = call.attributes.get(name)
        if name in outer_floats and outer is not None and not attr.is_ref() and attr.value == outer.value:
            nested.attributes[name] = ir.RefAttr(name, name, ir.AttributeType.FLOAT)


def _fingerprint(function: ir.Function) -> bytes:
    """Serialized body with top-level node and value names blanked: equal bytes, same computation."""
    graph = function.graph.clone()
    for i, v in enumerate(graph.inputs):
        v.name, v.shape = f"i{i}", None
    counter = itertools.count()
    for node in graph:
        node.name = ""
        for out in node.outputs:
            out.name, out.shape = f"v{next(counter)}", None
    clone = ir.Function(
        function.domain, function.name, "", graph=graph, attributes=list(function.attributes.values())
    )
    return ir.serde.serialize_function(clone).SerializeToString(deterministic=True)


def register_function(model: ir.Model, function: ir.Function) -> ir.Function:
    """Add `function` unless an identical body exists; returns the function the call should use."""
    key = _fingerprint(function)
    same_op = [f for f in model.functions.values() if (f.domain, f.name) == (function.domain, function.name)]
    for existing in same_op:
        if _fingerprint(existing) == key:
            return existing
    function.overload = "" if not same_op else f"v{len(same_op) + 1}"
    model.functions[function.identifier()] = function
    return function


def qwen_op_counts(model: ir.Model) -> dict[str, Counter]:
    """qwen ops in the top graph, and those nested in fused bodies counted once per call (as inlined)."""
    top: Counter = Counter(n.op_type for n in model.graph if n.domain == DOMAIN)
    nested: Counter = Counter()

    def visit(function: ir.Function) -> None:
        for node in function:
            if node.domain == DOMAIN:
                nested[node.op_type] += 1
                inner = model.functions.get(node.op_identifier())
                if inner is not None:
                    visit(inner)

    for node in model.graph:
        if node.domain == DOMAIN and node.op_identifier() in model.functions:
            visit(model.functions[node.op_identifier()])
    return {"top": top, "nested": nested}


def inline_call(model: ir.Model, call: ir.Node) -> list[ir.Node]:
    """Replace `call` (a node of the top graph) by a copy of its function body, named under the call."""
    graph = call.graph
    assert isinstance(graph, ir.Graph)
    function = model.functions.get(call.op_identifier())
    if function is None:
        raise FusionError(f"{call.name}: qwen.{call.op_type} has no model-local function to lower it with")
    body = function.graph.clone()
    attrs = {a.name: a for a in function.attributes.values() if a.value is not None} | dict(call.attributes)
    for node in ir.traversal.RecursiveGraphIterator(body):
        for key, attr in list(node.attributes.items()):
            if attr.is_ref():
                if attr.ref_attr_name in attrs:
                    value = attrs[attr.ref_attr_name]
                    node.attributes[key] = ir.Attr(key, attr.type, value.value)
                else:
                    del node.attributes[key]
    actual = dict(zip(body.inputs, call.inputs, strict=False))
    for formal, value in actual.items():
        ir.convenience.replace_all_uses_with(formal, value)
    outputs = [actual.get(v, v) for v in body.outputs]
    nodes = list(body)
    body.outputs.clear()
    body.remove(nodes)
    prefix = (call.name or f"{call.op_type}") + "/"
    for node in nodes:
        node.name = prefix + (node.name or node.op_type)
        for out in node.outputs:
            if out.name is not None:
                out.name = prefix + out.name
    ir.convenience.replace_nodes_and_values(graph, call, [call], nodes, list(call.outputs), outputs)
    return nodes


def float_scalar(value: ir.Value | None) -> float | None:
    """The value of a scalar float constant, else None."""
    if value is None or value.const_value is None:
        return None
    array = value.const_value.numpy()
    if array.size != 1 or array.dtype.kind != "f":
        return None
    return float(array.reshape(()))


def int_list(value: ir.Value | None) -> list[int] | None:
    """The values of a small integer constant as a list, else None."""
    if value is None or value.const_value is None or value.const_value.size > MAX_BODY_CONSTANT:
        return None
    array = np.asarray(value.const_value.numpy())
    if array.dtype.kind not in "iu":
        return None
    return [int(x) for x in array.reshape(-1)]
