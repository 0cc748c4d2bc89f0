"""ORT lowering of qwen.RMSNorm and qwen.GatedRMSNorm.

- RMSNorm whose input is a residual `Add` of two activations -> com.microsoft SkipSimplifiedLayerNormalization
  (its fourth output, the sum, replaces the Add); any other RMSNorm -> RMSNormalization (opset 23).
- GatedRMSNorm -> com.microsoft GatedRMSNorm (activation silu; groups of len(scale) = the whole last axis).
"""

from __future__ import annotations

import onnx_ir as ir

from qwen_export.passes.lower_ort_emit import MS_DOMAIN, Emitter, attribute


def _residual_add(x: ir.Value, graph: ir.Graph) -> ir.Node | None:
    """The Add of `graph` producing `x` when it adds two same-shaped activations (a residual connection)."""
    add = x.producer()
    if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or add.graph is not graph:
        return None
    a, b = add.inputs
    if a is None or b is None or a.const_value is not None or b.const_value is not None:
        return None
    if a.shape is not None and b.shape is not None and a.shape != b.shape:
        return None
    if a.shape is not None and b.shape is not None and len(a.shape) not in (2, 3):
        return None
    return add


def lower_rms_norm(e: Emitter, node: ir.Node) -> list[ir.Value]:
    x, scale = node.inputs
    epsilon = float(attribute(node, "epsilon"))
    add = _residual_add(x, e.ctx.graph)
    if add is None:
        return [e.rms_norm(x, scale, epsilon)]
    y, _, _, total = e.op_multi(
        "SkipSimplifiedLayerNormalization",
        [add.inputs[0], add.inputs[1], scale],
        4,
        domain=MS_DOMAIN,
        epsilon=epsilon,
    )
    skip = y.producer()
    for unused in (1, 2):  # mean / inv_std_var: optional outputs left out
        skip.outputs[unused].name = ""
    graph = e.ctx.graph
    graph.remove(skip)
    graph.insert_after(add, skip)  # where the Add was, so every reader of the sum comes after it
    name, old = add.outputs[0].name, add.outputs[0]
    total.type, total.shape = old.type, old.shape
    old.replace_all_uses_with(total, replace_graph_outputs=True)
    graph.remove(add, safe=True)
    total.name = name  # keep the stable residual-stream name (`/layers.<i>/output`)
    return [y]


def lower_gated_rms_norm(e: Emitter, node: ir.Node) -> list[ir.Value]:
    x, z, scale = node.inputs
    epsilon = float(attribute(node, "epsilon"))
    return [e.op("GatedRMSNorm", x, scale, z, domain=MS_DOMAIN, activation="silu", epsilon=epsilon)]
