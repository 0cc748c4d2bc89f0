"""Hand the int4 products to qwen-export's CPU kernels: MatMulNBits -> qwen.cpu Int4Linear, QMoE ->
qwen.cpu Int4MoE (the custom-op library built from plugins/ort_cpu).

    MatMulNBits(X, q, s; K, N, bits=4, block_size=B)  -> Int4Linear(X, pack(q), pack(s); K, N, block_size=B)
    QMoE(X, logits, q1, s1, -, q2, s2; k, normalize_routing_weights, swiglu_fusion=1, alpha=1, beta=0)
        -> Int4MoE(X, logits, pack(q1), pack(s1), pack(q2), pack(s2); k, normalize_routing_weights,
                   fc1_block_size, fc2_block_size)

The same codes and scales in the kernels' layout (passes/int4_layout.py; scales as float16, exact when
QuantizeWeights(fp16_scales=True) made them), so the arithmetic is MatMulNBits' at accuracy_level 4: int8
activations per block, int32 dot products, fp32 scaling. Why: on
a CPU with AVX-512 VNNI the kernels read each 16-row weight group once for up to 8 activation rows, where
MLAS's int8 path is compute-bound at batch 8 (docs/ort-lowering.md, "CPU kernels").
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from qwen_export.cpu_kernels import DOMAIN as CPU_DOMAIN
from qwen_export.cpu_kernels import DOMAIN_VERSION
from qwen_export.passes.base import PassStats, QwenPass
from qwen_export.passes.int4_layout import pack_codes, pack_scales, packed_shapes
from qwen_export.passes.names import UniqueNames

MS_DOMAIN = "com.microsoft"


def _int(node: ir.Node, name: str, default: int = 0) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.value)


def _float(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.value)


class UseCpuKernels(QwenPass):
    """Int4 MatMulNBits and QMoE nodes become qwen.cpu Int4Linear and Int4MoE, which run on qwen-export's
    CPU kernels (ONNX Runtime custom-op library, plugins/ort_cpu).

    A node the kernels do not cover stays as it is and `stats.kept` says why (zero points, biases, a
    block that is not a multiple of 32, an activation other than Qwen's SwiGLU).
    """

    name = "use-cpu-kernels"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = self._graph = model.graph
        self._unique = UniqueNames.of_graph(graph)
        self._packed: dict[int, ir.Value] = {}
        fired = {"Int4Linear": 0, "Int4MoE": 0}
        self.stats = PassStats(fired=fired)
        for node in list(graph):
            if node.domain != MS_DOMAIN or node.op_type not in ("MatMulNBits", "QMoE"):
                continue
            why_not = self._why_not_linear(node) if node.op_type == "MatMulNBits" else self._why_not_moe(node)
            if why_not:
                self.stats.keep(why_not)
                continue
            new = self._linear(node) if node.op_type == "MatMulNBits" else self._moe(node)
            ir.convenience.replace_nodes_and_values(
                graph, node, [node], [new], list(node.outputs), list(new.outputs)
            )
            fired[new.op_type] += 1
        modified = any(fired.values())
        if modified:
            model.opset_imports[CPU_DOMAIN] = DOMAIN_VERSION
        return ir.passes.PassResult(model, modified)

    # --- what the kernels cover ------------------------------------------------------------------------
    @staticmethod
    def _why_not_linear(node: ir.Node) -> str:
        block, k = _int(node, "block_size"), _int(node, "K")
        if _int(node, "bits", 4) != 4:
            return "MatMulNBits with bits != 4"
        if len(node.inputs) > 3 and any(v is not None for v in node.inputs[3:]):
            return "MatMulNBits with zero points, g_idx or bias"
        if block % 32 or k % block:
            return "MatMulNBits block not a multiple of 32 or not dividing K"
        if any(v is None or v.const_value is None for v in node.inputs[1:3]):
            return "MatMulNBits weights not constant"
        return ""

    @staticmethod
    def _why_not_moe(node: ir.Node) -> str:
        inputs = list(node.inputs)
        if _int(node, "expert_weight_bits", 4) != 4:
            return "QMoE with expert_weight_bits != 4"
        attr = node.attributes.get("activation_type")
        if attr is None or attr.value != "swiglu" or _int(node, "swiglu_fusion") != 1:
            return "QMoE activation other than interleaved SwiGLU"
        if _float(node, "activation_alpha", 1.0) != 1.0 or _float(node, "activation_beta", 0.0) != 0.0:
            return "QMoE SwiGLU with alpha != 1 or beta != 0"
        if "swiglu_limit" in node.attributes or _int(node, "weights_prepacked") != 0:
            return "QMoE with swiglu_limit or prepacked weights"
        if len(inputs) != 7 or inputs[4] is not None:
            return "QMoE with biases, fc3 or zero points"
        if any(v is None or v.const_value is None for v in (inputs[2], inputs[3], inputs[5], inputs[6])):
            return "QMoE expert weights not constant"
        if _int(node, "block_size") % 32:
            return "QMoE block not a multiple of 32"
        return ""

    # --- rewrites --------------------------------------------------------------------------------------
    def _linear(self, node: ir.Node) -> ir.Node:
        x, q, s = node.inputs[:3]
        block, k, n = _int(node, "block_size"), _int(node, "K"), _int(node, "N")
        codes_shape, scales_shape = packed_shapes(n, k, block)
        return self._node(
            node,
            "Int4Linear",
            [
                x,
                self._pack(q, lambda a: pack_codes(a, block), codes_shape),
                self._pack(s, pack_scales, scales_shape),
            ],
            K=k,
            N=n,
            block_size=block,
        )

    def _moe(self, node: ir.Node) -> ir.Node:
        x, logits, q1, s1, _, q2, s2 = node.inputs
        experts, n1, half1 = (int(d) for d in q1.const_value.shape)
        _, n2, half2 = (int(d) for d in q2.const_value.shape)
        fc1_block = half1 * 2 // int(s1.const_value.shape[-1])
        fc2_block = half2 * 2 // int(s2.const_value.shape[-1])
        fc1_shapes = packed_shapes(n1, half1 * 2, fc1_block, (experts,))
        fc2_shapes = packed_shapes(n2, half2 * 2, fc2_block, (experts,))

        # QMoE stores codes per expert row unblocked: [E, N, K/2]; view them as [E, N, K/B, B/2]
        def codes(block: int) -> Callable[[np.ndarray], np.ndarray]:
            return lambda a: pack_codes(a.reshape(*a.shape[:-1], -1, block // 2), block)

        return self._node(
            node,
            "Int4MoE",
            [
                x,
                logits,
                self._pack(q1, codes(fc1_block), fc1_shapes[0]),
                self._pack(s1, pack_scales, fc1_shapes[1]),
                self._pack(q2, codes(fc2_block), fc2_shapes[0]),
                self._pack(s2, pack_scales, fc2_shapes[1]),
            ],
            k=_int(node, "k", 1),
            normalize_routing_weights=_int(node, "normalize_routing_weights"),
            fc1_block_size=fc1_block,
            fc2_block_size=fc2_block,
        )

    def _node(self, old: ir.Node, op_type: str, inputs: list, **attrs: int) -> ir.Node:
        return ir.Node(
            CPU_DOMAIN,
            op_type,
            inputs,
            attributes=ir.convenience.convert_attributes(attrs),
            num_outputs=1,
            name=old.name,
        )

    def _pack(
        self, value: ir.Value, pack: Callable[[np.ndarray], np.ndarray], shape: tuple[int, ...]
    ) -> ir.Value:
        """A lazy initializer holding `pack(value)`, one per source initializer."""
        key = id(value)
        if key not in self._packed:
            source = value.const_value
            name = self._unique(f"{value.name}.cpu")
            dtype = ir.DataType.FLOAT16 if source.dtype == ir.DataType.FLOAT else source.dtype  # scales

            def read() -> ir.TensorProtocol:
                return ir.tensor(pack(source.numpy()), name=name)

            tensor = ir.LazyTensor(read, dtype, ir.Shape(list(shape)), name=name)
            packed = ir.Value(name=name, shape=ir.Shape(list(shape)), type=ir.TensorType(dtype))
            packed.const_value = tensor
            self._graph.register_initializer(packed)
            self._packed[key] = packed
        return self._packed[key]
