"""Hand the ORT lowering's fp32 experts to qwen-export's CPU kernel: com.microsoft MoE -> qwen.cpu FloatMoE
(target ort-cpu).

    y = MoE(x, logits, fc1, -, fc2; k, normalize_routing_weights, activation_type="swiglu", swiglu_fusion=1,
            activation_alpha=1, activation_beta=0)
 -> y = FloatMoE(x, logits, fc1, fc2; k, normalize_routing_weights)

The same weights in the same layout (fc1 [E, 2I, H] with interleaved gate/up rows, fc2 [E, H, I]) and the
same routing; only the kernel changes. Why: at decode ONNX Runtime's MoE reads the chosen experts at about
half the memory bandwidth; FloatMoE reads each chosen expert once for all the tokens that chose it, one
weight row at a time against up to six tokens, four against four beyond (plugins/ort_cpu/float_moe/README.md
has the measurements, including the long prompts where ORT's MoE is faster).
"""

from __future__ import annotations

import onnx_ir as ir

from qwen_export.cpu_kernels import DOMAIN as CPU_DOMAIN
from qwen_export.cpu_kernels import DOMAIN_VERSION
from qwen_export.passes.base import PassStats, QwenPass

MS_DOMAIN = "com.microsoft"


class UseCpuFloatMoe(QwenPass):
    """fp32 com.microsoft MoE nodes become qwen.cpu FloatMoE. A node the kernel does not cover stays as it
    is and `stats.kept` says why (biases, fc3, an activation other than Qwen's interleaved SwiGLU)."""

    name = "use-cpu-float-moe"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.stats = PassStats(fired={})
        for node in list(graph):
            if node.domain != MS_DOMAIN or node.op_type != "MoE":
                continue
            why_not = _why_not(node)
            if why_not:
                self.stats.keep(why_not)
                continue
            x, logits, fc1, _, fc2 = node.inputs
            attrs = [node.attributes[a] for a in ("k", "normalize_routing_weights") if a in node.attributes]
            new = ir.Node(CPU_DOMAIN, "FloatMoE", [x, logits, fc1, fc2], attributes=attrs, name=node.name)
            ir.convenience.replace_nodes_and_values(
                graph, node, [node], [new], list(node.outputs), list(new.outputs)
            )
            self.stats.fire("FloatMoE")
        modified = bool(self.stats.fired)
        if modified:
            model.opset_imports[CPU_DOMAIN] = DOMAIN_VERSION
        return ir.passes.PassResult(model, modified)


def _why_not(node: ir.Node) -> str:
    def attribute(name: str, default: float | str) -> float | str:
        attr = node.attributes.get(name)
        return default if attr is None else attr.value

    if attribute("activation_type", "relu") != "swiglu" or attribute("swiglu_fusion", 0) != 1:
        return "MoE activation other than interleaved SwiGLU"
    if attribute("activation_alpha", 1.0) != 1.0 or attribute("activation_beta", 0.0) != 0.0:
        return "MoE SwiGLU with alpha != 1 or beta != 0"
    if "swiglu_limit" in node.attributes or attribute("use_sparse_mixer", 0) != 0:
        return "MoE with swiglu_limit or a sparse mixer"
    inputs = list(node.inputs)
    if len(inputs) != 5 or inputs[3] is not None or any(v is None for v in (inputs[2], inputs[4])):
        return "MoE with biases or fc3"
    # the expert weights say the precision (an intermediate's dtype may not be inferred; the kernel checks)
    if any(v.dtype != ir.DataType.FLOAT for v in (inputs[2], inputs[4])):
        return "MoE expert weights not fp32"
    return ""
