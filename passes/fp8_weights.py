"""Put an FP8 checkpoint's e4m3 weights back in front of the engine's MatMuls.

`widen-to-fp32` folded each blocked DequantizeLinear of the export into a lazy initializer that remembers
its e4m3 weight and fp32 block scales; the lowering and the precision pass then treated it like any
weight. This pass, last in the trt-rtx pipeline under `--weights fp8`, replaces each such initializer that
a MatMul reads as its weights with DequantizeLinear(e4m3 weight, fp32 scale, axis, block_size) writing the
engine's precision (`output_dtype`). Weights read otherwise stay in the engine's precision, counted by
reason: the MoE lowering gathers each token's experts, and ONNX's Gather takes no float8; and a weight
whose input dimension is not a multiple of the block (TensorRT ignores `block_size` and divides the
dimension by the number of scales).

What TensorRT-RTX 1.7 makes of it (measured ahead of time for sm89 and sm120; no GPU ran it): the weights
stay one byte each in the engine (1.05 bytes per weight with the fp32 scales, against 2.00 in bf16), and
each run dequantizes them into a bf16 buffer for a bf16 GEMM: the gain is memory, not FP8 arithmetic.
sm80 and sm86 cannot build FP8 at all ("model contains HW-specific datatypes: fp8_e4m3"), which the
deployment spec refuses up front.
"""

from __future__ import annotations

from typing import ClassVar

import onnx_ir as ir

from qwen_export.passes.base import PassStats, QwenPass


class Fp8Weights(QwenPass):
    """Feed MatMuls the e4m3 weights of an FP8 checkpoint through blocked DequantizeLinear (trt-rtx,
    --weights fp8)."""

    name: ClassVar[str] = "fp8-weights"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.stats = PassStats(extras={"fp8_bytes": 0})
        graph = model.graph
        first = next(iter(graph), None)
        for value in list(graph.initializers.values()):
            source = getattr(value.const_value, "fp8_source", None)
            if source is None:
                continue
            uses = list(value.uses())
            blocked = source.weight.shape[source.axis]
            if blocked > source.block_size and blocked % source.block_size:
                # TensorRT takes (blocked dim / number of scales) as the block and ignores block_size: a
                # ragged last block would dequantize with the wrong scales.
                self.stats.keep(f"input dimension not a multiple of {source.block_size}")
                continue
            if not uses or not all(u.node.op_type == "MatMul" and u.idx == 1 for u in uses):
                reasons = sorted({f"read by {u.node.op_type}" for u in uses if u.node.op_type != "MatMul"})
                self.stats.keep(", ".join(reasons) or "read as a MatMul's activations")
                continue
            weight = _initializer(graph, f"{value.name}.e4m3", source.weight)
            scale = _initializer(graph, f"{value.name}.scale", source.scale)
            dq = ir.Node(
                "",
                "DequantizeLinear",
                [weight, scale],
                attributes=[
                    ir.AttrInt64("axis", source.axis),
                    ir.AttrInt64("block_size", source.block_size),
                    ir.AttrInt64("output_dtype", int(value.dtype)),
                ],
                name=f"{value.name}/DequantizeLinear",
            )
            out = dq.outputs[0]
            out.name, out.shape = f"{value.name}/dequantized", value.shape
            out.type = ir.TensorType(value.dtype)
            if first is not None:
                graph.insert_before(first, dq)
            else:
                graph.append(dq)
            first = dq
            for use in uses:
                use.node.replace_input_with(use.idx, out)
            del graph.initializers[value.name]
            self.stats.fire("DequantizeLinear")
            self.stats.extras["fp8_bytes"] += source.weight.nbytes
        return ir.passes.PassResult(model, modified=self.stats.fired_total > 0)


def _initializer(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    value = ir.Value(name=name, shape=ir.Shape(list(tensor.shape)), type=ir.TensorType(tensor.dtype))
    value.const_value = tensor
    graph.register_initializer(value)
    return value
