"""Fold a MoE layer's gated shared expert into qwen.cpu Int4MoE (targets ort-cpu-int4, ort-cpu-int4-kv16).

After the ORT lowering (passes/lower_ort_moe.py) and UseCpuKernels, each MoE layer is

    m             = Int4Linear(x, [router | shared gate | shared up | shared expert gate])   one GEMM
    r, g, u, s    = Split(m, [E, I_s, I_s, 1], axis=-1)
    routed        = Int4MoE(x, Reshape(r, [-1, E]), fc1, fc2)
    shared        = Int4Linear(Mul(QuickGelu(g; alpha=1), u), down)
    y             = GatedAdd(routed, shared, Sigmoid(s))
 -> y             = Int4MoE(x, m, fc1, fc2, down; shared_expert_size=I_s, shared_block_size=B)

The op reads its router columns and the shared expert's out of `m`'s rows and runs the shared down
projection in the same hand-off to the thread pool as the experts' fc2: seven nodes a layer fewer. Why: a
decode step of a small model is bound by per-node costs (on the trained reference model at one thread, the
seven nodes took about 10% of an ort-cpu-int4 step). The arithmetic is the removed nodes' (int8 activations
per block of the down projection, silu, sigmoid), with the kernels' own silu and sigmoid.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qwen_export.cpu_kernels import DOMAIN as CPU_DOMAIN
from qwen_export.cpu_kernels import DOMAIN_VERSION
from qwen_export.passes.base import PassStats, QwenPass

MS_DOMAIN = "com.microsoft"


class FoldCpuSharedExpert(QwenPass):
    """Int4MoE takes in its MoE layer's gated shared expert (the Split, QuickGelu, Mul, down Int4Linear,
    Sigmoid and GatedAdd around it). A layer that does not have exactly that shape stays as it is and
    `stats.kept` says why."""

    name = "fold-cpu-shared-expert"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.stats = PassStats(fired={})
        for node in list(graph):
            if node.domain != MS_DOMAIN or node.op_type != "GatedAdd":
                continue
            match = _match(node)
            if isinstance(match, str):
                self.stats.keep(match)
                continue
            moe, down, removed, inter = match
            attributes = dict(moe.attributes)
            attributes["shared_expert_size"] = ir.AttrInt64("shared_expert_size", inter)
            attributes["shared_block_size"] = ir.AttrInt64("shared_block_size", _int(down, "block_size"))
            fused_logits = removed["split"].inputs[0]
            new = ir.Node(
                CPU_DOMAIN,
                "Int4MoE",
                [moe.inputs[0], fused_logits, *moe.inputs[2:6], *down.inputs[1:3]],
                attributes=list(attributes.values()),
                name=moe.name,
            )
            ir.convenience.replace_nodes_and_values(
                graph, node, list(removed.values()), [new], [node.outputs[0]], [new.outputs[0]]
            )
            self.stats.fire("Int4MoE")
        modified = bool(self.stats.fired)
        if modified:
            model.opset_imports[CPU_DOMAIN] = DOMAIN_VERSION
        return ir.passes.PassResult(model, modified)


def _int(node: ir.Node, name: str, default: int = 0) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.value)


def _producer(value: ir.Value | None, op_type: str, domain: str = "") -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != op_type or node.domain != domain:
        return None
    return node


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _match(add: ir.Node) -> tuple[ir.Node, ir.Node, dict[str, ir.Node], int] | str:
    """(the routed Int4MoE, the shared down Int4Linear, every node the fold removes, I_s), or why not."""
    routed, shared, gate = add.inputs
    moe = _producer(routed, "Int4MoE", CPU_DOMAIN)
    if moe is None or len(moe.inputs) != 6 or _int(moe, "shared_expert_size"):
        return "GatedAdd whose first input is not a routed-only qwen.cpu Int4MoE"
    down = _producer(shared, "Int4Linear", CPU_DOMAIN)
    sigmoid = _producer(gate, "Sigmoid")
    mul = _producer(down.inputs[0], "Mul") if down is not None else None
    if sigmoid is None or mul is None:
        return "GatedAdd's shared expert is not Int4Linear(Mul(...)) gated by Sigmoid"
    gelu = next(filter(None, (_producer(v, "QuickGelu", MS_DOMAIN) for v in mul.inputs)), None)
    if gelu is None or gelu.attributes.get("alpha") is None or gelu.attributes["alpha"].value != 1.0:
        return "the shared expert's activation is not QuickGelu(alpha=1) (silu)"
    up = mul.inputs[1] if mul.inputs[0] is gelu.outputs[0] else mul.inputs[0]
    reshape = _producer(moe.inputs[1], "Reshape")
    split = _producer(gelu.inputs[0], "Split")
    if reshape is None or split is None or len(split.outputs) != 4:
        return "the router and shared expert columns do not come from one Split of one GEMM"
    logits, gate_cols, up_cols, gate_col = split.outputs
    if (reshape.inputs[0], gelu.inputs[0], up, sigmoid.inputs[0]) != (logits, gate_cols, up_cols, gate_col):
        return "the Split's outputs are not router, shared gate, shared up and shared expert gate in order"
    sizes, axis = _const(split.inputs[1] if len(split.inputs) > 1 else None), _int(split, "axis", 0)
    experts, inter = int(moe.inputs[2].shape[0]), _int(down, "K")
    if sizes is None or sizes.tolist() != [experts, inter, inter, 1]:
        return "the Split's sizes are not [experts, shared size, shared size, 1]"
    rank = len(split.inputs[0].shape) if split.inputs[0].shape is not None else None
    if axis != -1 and (rank is None or axis != rank - 1):
        return "the Split is not along the last axis"
    shape = _const(reshape.inputs[1])
    if shape is None or shape.tolist() != [-1, experts]:
        return "the router logits are not reshaped to [-1, experts]"
    hidden = int(moe.inputs[4].shape[1]) * 16  # fc2 packed [E, H/16, ...]
    if _int(down, "N") != hidden:
        return "the shared expert's down projection does not give the hidden size"
    removed = {"split": split, "reshape": reshape, "moe": moe, "gelu": gelu, "mul": mul, "down": down,
               "sigmoid": sigmoid, "add": add}  # fmt: skip
    inside = set(removed.values())
    for node in removed.values():
        if node is add:
            continue
        if any(use.node not in inside for value in node.outputs for use in value.uses()):
            return "a value inside the shared expert is used outside it"
    return moe, down, removed, inter
