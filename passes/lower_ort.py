"""ONNX Runtime lowering: qwen ops -> com.microsoft contrib ops (CPU kernels) and standard ops.

Per op (one module each; docs/ort-lowering.md has the semantics measured for every contrib op):

| qwen op        | lowered to                                                                          |
|----------------|-------------------------------------------------------------------------------------|
| RMSNorm        | SkipSimplifiedLayerNormalization (absorbing the residual Add) or RMSNormalization   |
| GatedRMSNorm   | GatedRMSNorm                                                                        |
| GatedAttention | MatMul, RMSNormalization, RotaryEmbedding, GroupQueryAttention (or opset-23         |
|                | Attention: `attention="onnx"`), Sigmoid, Mul, MatMul                                |
| GatedDeltaNet  | MatMul, CausalConvWithState, RMSNormalization (l2norm), LinearAttentionGate,        |
|                | LinearAttention, GatedRMSNorm, MatMul                                               |
| MoE            | MatMul, MoE (routed experts), QuickGelu + Mul + MatMul (shared expert), Sigmoid,    |
|                | GatedAdd                                                                            |

Weights move into the layouts the contrib ops want as new, lazily computed initializers (projections
concatenated into one GEMM, MoE fc1 interleaved); the old ones are left to dead-code removal. A qwen node
that does not fit (non-constant weights, attributes the kernels reject) stays a qwen op, and the
portable lowering that follows in the `ort` pipeline inlines it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import onnx_ir as ir

from qwen_export.cpu_kernels import DOMAIN_VERSION
from qwen_export.passes.base import PassStats, QwenPass
from qwen_export.passes.lower_cpu_deltanet import CPU_DOMAIN, lower_gated_deltanet_cpu
from qwen_export.passes.lower_ort_attention import lower_gated_attention
from qwen_export.passes.lower_ort_deltanet import lower_gated_deltanet
from qwen_export.passes.lower_ort_emit import MS_DOMAIN, Emitter, GraphContext, NotLowered
from qwen_export.passes.lower_ort_moe import lower_moe
from qwen_export.passes.lower_ort_norm import lower_gated_rms_norm, lower_rms_norm

QWEN_DOMAIN = "qwen"

Lowering = Callable[[Emitter, ir.Node], list[ir.Value]]

LOWERINGS: dict[str, Lowering] = {
    "RMSNorm": lower_rms_norm,
    "GatedRMSNorm": lower_gated_rms_norm,
    "GatedAttention": lower_gated_attention,
    "GatedDeltaNet": lower_gated_deltanet,
    "MoE": lower_moe,
}


class LowerToOrt(QwenPass):
    """Lower qwen ops to ONNX Runtime com.microsoft contrib ops (CPU kernels) and standard ONNX ops.

    RMSNorm (with the residual Add) -> SkipSimplifiedLayerNormalization; GatedAttention -> RotaryEmbedding +
    GroupQueryAttention; GatedDeltaNet -> CausalConvWithState + LinearAttentionGate + LinearAttention +
    GatedRMSNorm; MoE -> MoE + MatMul shared expert + GatedAdd. Ops that do not fit are left for the
    portable lowering.
    """

    name = "lower-ort"

    def __init__(self, attention: str = "gqa", deltanet: str = "contrib") -> None:
        """`attention`: "gqa" (com.microsoft GroupQueryAttention, as onnxruntime-genai does) or "onnx"
        (opset-23 Attention: also takes prompts with past tokens at batch > 1, which GQA's CPU kernel
        rejects). `deltanet`: "contrib" (the com.microsoft chain) or "qwen-cpu" (one qwen.cpu
        GatedDeltaRule node on qwen-export's CPU kernels)."""
        super().__init__()
        if attention not in ("gqa", "onnx"):
            raise ValueError(f"attention must be 'gqa' or 'onnx', not {attention!r}")
        if deltanet not in ("contrib", "qwen-cpu"):
            raise ValueError(f"deltanet must be 'contrib' or 'qwen-cpu', not {deltanet!r}")
        self.attention, self.deltanet = attention, deltanet
        self.lowerings = dict(LOWERINGS)
        if deltanet == "qwen-cpu":
            self.lowerings["GatedDeltaNet"] = lower_gated_deltanet_cpu

    def __repr__(self) -> str:
        return f"{type(self).__name__}(attention={self.attention!r}, deltanet={self.deltanet!r})"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        ctx = GraphContext(graph, self.attention)
        lowered: Counter = Counter()
        kept: dict[str, str] = {}
        emitted = 0
        for node in [n for n in graph if n.domain == QWEN_DOMAIN]:
            lowering = self.lowerings.get(node.op_type)
            if lowering is None:
                kept[node.name or node.op_type] = "no ORT lowering for this op"
                continue
            emitter = Emitter(ctx, node, node.name or f"/{node.op_type}")
            try:
                outputs = lowering(emitter, node)
            except NotLowered as reason:
                _nothing_emitted(emitter)
                kept[node.name or node.op_type] = str(reason)
                continue
            _replace(graph, node, outputs)
            lowered[node.op_type] += 1
            emitted += emitter.count
        if lowered:
            graph.opset_imports[MS_DOMAIN] = 1
            if self.deltanet == "qwen-cpu" and lowered["GatedDeltaNet"]:
                graph.opset_imports[CPU_DOMAIN] = DOMAIN_VERSION
        if not any(n.domain == QWEN_DOMAIN for n in graph):
            for key in [k for k in model.functions if k[0] == QWEN_DOMAIN]:
                del model.functions[key]
            graph.opset_imports.pop(QWEN_DOMAIN, None)
        self.stats = PassStats(
            fired=dict(lowered),
            kept=dict(Counter(kept.values())),
            extras={"kept_as_qwen": kept, "nodes_emitted": emitted, "shared_nodes": ctx.shared_nodes},
        )
        return ir.passes.PassResult(model, bool(lowered))


def _replace(graph: ir.Graph, node: ir.Node, outputs: list[ir.Value]) -> None:
    """Point the readers of `node`'s outputs (graph outputs too) at `outputs`, keep the names, drop `node`."""
    for old, new in zip(node.outputs, outputs, strict=True):
        name = old.name
        new.type = old.type if old.type is not None else new.type
        new.shape = old.shape if old.shape is not None else new.shape
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        if name:
            old.name = None
            new.name = name
    graph.remove(node, safe=True)


def _nothing_emitted(emitter: Emitter) -> None:
    """A lowering that gives up must do so before emitting nodes (they check their inputs first)."""
    if emitter.count:
        raise RuntimeError(f"{emitter.prefix}: a lowering emitted nodes and then gave up")
