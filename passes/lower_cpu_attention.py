"""Hand the ORT lowering's attention core to qwen-export's CPU kernel: com.microsoft GroupQueryAttention ->
qwen.cpu Attention (targets ort-cpu, ort-cpu-int4), or AttentionKv16 with a float16 KV cache
(ort-cpu-int4-kv16).

    o, present_k, present_v = GroupQueryAttention(q, k, v, past_k, past_v, seqlens_k, total, -, -, -, bias;
                                                  num_heads, kv_num_heads, scale)
 -> o, present_k, present_v = Attention(q, k, v, past_k, past_v, bias; num_heads, kv_num_heads, scale)

Everything around the core stays as lower_ort_attention emits it (the fused q|k|gate|v GEMM, q/k RMSNorm,
partial RotaryEmbedding, the sigmoid gate, o_proj); the caches keep GQA's layout [B, kv, S, hd] and the
concat(past, new) semantics, and padding still comes in through the [B, 1, T, S] bias. seqlens_k and
total_sequence_length are dropped (the kernel reads S off the bias, so the runtime may bind a cache buffer
with spare rows as both past and present: runtime/in_place.py).

Why: at long context the decode step is the read of the KV cache. GQA's CPU kernel reads it once per query
head and runs its heads on few threads; the kernel reads each kv head's keys once for the G query heads
that share them, splits the keys across threads (flash decoding), and copies past into present in the same
pass (docs/ort-lowering.md, "CPU kernels"; benchmarks/long_context.md).

With `kv_cache="float16"` the graph's past/present key and value inputs and outputs become float16 (half the
bytes per step; the arithmetic stays fp32), which needs the past caches to be graph inputs and the present
ones graph outputs.
"""

from __future__ import annotations

import onnx_ir as ir

from qwen_export.cpu_kernels import DOMAIN as CPU_DOMAIN
from qwen_export.cpu_kernels import DOMAIN_VERSION
from qwen_export.passes.base import PassStats, QwenPass

MS_DOMAIN = "com.microsoft"
# GQA attributes whose default is the only value the kernel implements
_DEFAULTS = {
    "do_rotary": 0,
    "rotary_interleaved": 0,
    "local_window_size": -1,
    "smooth_softmax": 0,
    "qk_output": 0,
}


class UseCpuAttention(QwenPass):
    """GroupQueryAttention nodes become qwen.cpu Attention (float KV cache) or AttentionKv16 (float16 KV
    cache: the graph's past/present key/value I/O retyped), which run on qwen-export's CPU kernels.

    A node the kernel does not cover stays as it is and `stats.kept` says why (rotary inside the op,
    softcap, a local window, rotary caches or head sinks as inputs, no bias).
    """

    name = "use-cpu-attention"

    def __init__(self, kv_cache: str = "float32") -> None:
        super().__init__()
        if kv_cache not in ("float32", "float16"):
            raise ValueError(f"kv_cache must be 'float32' or 'float16', not {kv_cache!r}")
        self.kv_cache = kv_cache

    def __repr__(self) -> str:
        return f"{type(self).__name__}(kv_cache={self.kv_cache!r})"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.stats = PassStats(fired={})
        for node in list(graph):
            if node.domain != MS_DOMAIN or node.op_type != "GroupQueryAttention":
                continue
            why_not = self._why_not(node)
            half = self.kv_cache == "float16"
            if not why_not and half:
                why_not = _why_not_retypable(graph, node)
            if why_not:
                self.stats.keep(why_not)
                continue
            new = self._replace(graph, node, "AttentionKv16" if half else "Attention")
            if half:
                for value in [*new.inputs[3:5], *new.outputs[1:]]:
                    value.type = ir.TensorType(ir.DataType.FLOAT16)
            self.stats.fire(new.op_type)
        modified = bool(self.stats.fired)
        if modified:
            model.opset_imports[CPU_DOMAIN] = DOMAIN_VERSION
        return ir.passes.PassResult(model, modified)

    @staticmethod
    def _why_not(node: ir.Node) -> str:
        inputs = list(node.inputs) + [None] * (11 - len(node.inputs))
        for name, default in _DEFAULTS.items():
            attr = node.attributes.get(name)
            if attr is not None and int(attr.value) != default:
                return f"GroupQueryAttention with {name}={attr.value}"
        softcap = node.attributes.get("softcap")
        if softcap is not None and float(softcap.value) != 0.0:
            return "GroupQueryAttention with softcap"
        if any(v is not None for v in inputs[7:10]) or any(v is not None for v in inputs[11:]):
            return "GroupQueryAttention with rotary caches, position ids or head sinks as inputs"
        if any(v is None for v in inputs[:5]) or inputs[10] is None:
            return "GroupQueryAttention without packed-free q, k, v, past caches and attention_bias"
        return ""

    @staticmethod
    def _replace(graph: ir.Graph, node: ir.Node, op_type: str) -> ir.Node:
        attrs = {
            a: node.attributes[a] for a in ("num_heads", "kv_num_heads", "scale") if a in node.attributes
        }
        new = ir.Node(
            CPU_DOMAIN,
            op_type,
            [*node.inputs[:5], node.inputs[10]],
            attributes=list(attrs.values()),
            num_outputs=3,
            name=node.name,
        )
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], [new], list(node.outputs[:3]), list(new.outputs)
        )
        return new


def _why_not_retypable(graph: ir.Graph, node: ir.Node) -> str:
    """A float16 cache must be the graph's own state I/O, read and written by this node alone."""
    inputs, outputs = set(map(id, graph.inputs)), set(map(id, graph.outputs))
    for past in node.inputs[3:5]:
        if id(past) not in inputs or any(use.node is not node for use in past.uses()):
            return "past cache not a graph input read by attention alone: kept float32"
    for present in node.outputs[1:3]:
        if id(present) not in outputs or list(present.uses()):
            return "present cache not a graph output read by nothing else: kept float32"
    return ""
