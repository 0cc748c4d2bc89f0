"""Fold a MoE layer's gated shared expert into its qwen.cpu Int4MoE or FloatMoE (targets ort-cpu-int4,
ort-cpu-int4-kv16 and ort-cpu).

After the ORT lowering (passes/lower_ort_moe.py) and the CPU kernels' passes, each MoE layer is

    m             = Linear(x, [router | shared gate | shared up | shared expert gate])   one GEMM
    r, g, u, s    = Split(m, [E, I_s, I_s, 1], axis=-1)
    routed        = Int4MoE(x, Reshape(r, [-1, E]), fc1, fc2)       or FloatMoE(x, ..., fc1, fc2)
    shared        = Int4Linear(Mul(QuickGelu(g; alpha=1), u), down) or MatMul(..., down [I_s, H])
    y             = GatedAdd(routed, shared, Sigmoid(s))
 -> y             = Int4MoE(x, m, fc1, fc2, down; shared_expert_size=I_s, shared_block_size=B)
                    or FloatMoE(x, m, fc1, fc2, down^T [H, I_s]; shared_expert_size=I_s)

The op reads its router columns and the shared expert's out of `m`'s rows and runs the shared down
projection in the same hand-off to the thread pool as the experts' fc2: seven nodes a layer fewer. Why: a
decode step of a small model is bound by per-node costs (on the trained reference model at one thread, the
seven nodes took about 10% of an ort-cpu-int4 step). The arithmetic is the removed nodes' (int8 activations
per block of the int4 down projection; silu, sigmoid), with the kernels' own silu, sigmoid and fp32 sums.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qwen_export.cpu_kernels import DOMAIN as CPU_DOMAIN
from qwen_export.cpu_kernels import DOMAIN_VERSION
from qwen_export.passes.base import PassStats, QwenPass
from qwen_export.passes.names import UniqueNames

MS_DOMAIN = "com.microsoft"
# routed-experts op -> (its inputs without a shared expert, the op of its shared down projection)
ROUTED_OPS = {"Int4MoE": (6, "Int4Linear"), "FloatMoE": (4, "MatMul")}


class FoldCpuSharedExpert(QwenPass):
    """Int4MoE and FloatMoE take in their MoE layer's gated shared expert (the Split, QuickGelu, Mul, down
    projection, Sigmoid and GatedAdd around them). A layer that does not have exactly that shape stays as it
    is and `stats.kept` says why."""

    name = "fold-cpu-shared-expert"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        unique = UniqueNames.of_graph(graph)
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
            if moe.op_type == "Int4MoE":
                attributes["shared_block_size"] = ir.AttrInt64("shared_block_size", _int(down, "block_size"))
                shared_weights = list(down.inputs[1:3])
            else:
                shared_weights = [_transposed(graph, down.inputs[1], unique(f"{down.inputs[1].name}.cpu"))]
            required = ROUTED_OPS[moe.op_type][0]
            new = ir.Node(
                CPU_DOMAIN,
                moe.op_type,
                [moe.inputs[0], removed["split"].inputs[0], *moe.inputs[2:required], *shared_weights],
                attributes=list(attributes.values()),
                name=moe.name,
            )
            ir.convenience.replace_nodes_and_values(
                graph, node, list(removed.values()), [new], [node.outputs[0]], [new.outputs[0]]
            )
            self.stats.fire(moe.op_type)
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


def _transposed(graph: ir.Graph, weight: ir.Value, name: str) -> ir.Value:
    """A lazy initializer holding `weight` [K, N] transposed to [N, K] (FloatMoE's dot rows)."""
    source = weight.const_value
    k, n = (int(d) for d in source.shape)
    tensor = ir.LazyTensor(
        lambda: ir.tensor(np.ascontiguousarray(source.numpy().T), name=name),
        source.dtype,
        ir.Shape([n, k]),
        name=name,
    )
    value = ir.Value(name=name, shape=ir.Shape([n, k]), type=ir.TensorType(source.dtype))
    value.const_value = tensor
    graph.register_initializer(value)
    return value


def _match(add: ir.Node) -> tuple[ir.Node, ir.Node, dict[str, ir.Node], int] | str:
    """(the routed-experts op, the shared down projection, every node the fold removes, I_s), or why not."""
    routed, shared, gate = add.inputs
    moe = routed.producer() if routed is not None else None
    if moe is None or moe.domain != CPU_DOMAIN or moe.op_type not in ROUTED_OPS:
        return "GatedAdd whose first input is not a qwen.cpu Int4MoE or FloatMoE"
    required, down_op = ROUTED_OPS[moe.op_type]
    if len(moe.inputs) != required or _int(moe, "shared_expert_size"):
        return f"a {moe.op_type} that already has a shared expert"
    down = _producer(shared, down_op, CPU_DOMAIN if down_op == "Int4Linear" else "")
    sigmoid = _producer(gate, "Sigmoid")
    mul = _producer(down.inputs[0], "Mul") if down is not None else None
    if sigmoid is None or mul is None:
        return f"GatedAdd's shared expert is not {down_op}(Mul(...)) gated by Sigmoid"
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
    experts, hidden = _experts_and_hidden(moe)
    if moe.op_type == "Int4MoE":
        inter, out = _int(down, "K"), _int(down, "N")
    else:
        weight = down.inputs[1].const_value
        if weight is None or len(weight.shape) != 2 or weight.dtype != ir.DataType.FLOAT:
            return "the shared expert's down projection is not a constant fp32 matrix"
        inter, out = (int(d) for d in weight.shape)
    if out != hidden:
        return "the shared expert's down projection does not give the hidden size"
    sizes, axis = _const(split.inputs[1] if len(split.inputs) > 1 else None), _int(split, "axis", 0)
    if sizes is None or sizes.tolist() != [experts, inter, inter, 1]:
        return "the Split's sizes are not [experts, shared size, shared size, 1]"
    rank = len(split.inputs[0].shape) if split.inputs[0].shape is not None else None
    if axis != -1 and (rank is None or axis != rank - 1):
        return "the Split is not along the last axis"
    shape = _const(reshape.inputs[1])
    if shape is None or shape.tolist() != [-1, experts]:
        return "the router logits are not reshaped to [-1, experts]"
    removed = {"split": split, "reshape": reshape, "moe": moe, "gelu": gelu, "mul": mul, "down": down,
               "sigmoid": sigmoid, "add": add}  # fmt: skip
    inside = set(removed.values())
    for node in removed.values():
        if node is add:
            continue
        if any(use.node not in inside for value in node.outputs for use in value.uses()):
            return "a value inside the shared expert is used outside it"
    return moe, down, removed, inter


def _experts_and_hidden(moe: ir.Node) -> tuple[int, int]:
    """E and H from the expert weights: Int4MoE's packed fc2 [E, H/16, ...], FloatMoE's fc2 [E, H, I]."""
    fc2 = moe.inputs[4] if moe.op_type == "Int4MoE" else moe.inputs[3]
    experts, rows = int(fc2.shape[0]), int(fc2.shape[1])
    return experts, rows * 16 if moe.op_type == "Int4MoE" else rows
