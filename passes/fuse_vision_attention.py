"""Vision attention -> ONNX Attention (opset 23): the vision tower's scaled, segment-masked softmax attention.

The vision blocks attend within each image or frame (a boolean [N, N] mask built from `cu_seqlens`), with
no KV cache and no gate, so ONNX's own Attention op expresses each block exactly, and every backend we
target runs it fused (ONNX Runtime's CPU kernel, TensorRT-RTX's attention layer).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qwen_export.passes.onnxscript_adapter import MatchResult
from qwen_export.passes.standard_rewrite import StandardRewritePass, StandardRule, scalar

# Where(allowed, scores, fill) only excludes keys when the fill is at least this negative (exp underflows
# to 0 against any real score): the exporter writes float32's lowest value.
MASK_FILL_MAX = -1e30


class VisionAttentionRule(StandardRule):
    kind = "Attention"

    def pattern(self, op, q, k_t, v, scale, allowed, fill):
        scores = op.Where(allowed, op.Mul(op.MatMul(q, k_t), scale), fill)
        return op.MatMul(op.Softmax(scores, _outputs=["probs"]), v)

    def check(self, context, q, k_t, v, scale, allowed, fill, probs, **_) -> MatchResult:
        if scalar(scale) is None:
            return self.refuse("the score scale is not a constant scalar", scale)
        fill_value = scalar(fill)
        if fill_value is None or fill_value > MASK_FILL_MAX:
            return self.refuse("masked scores are not filled with a large negative constant", fill)
        if probs.producer().attributes.get_int("axis", -1) not in (-1, 2):
            return self.refuse("softmax is not over the key axis", probs)
        if allowed.dtype not in (None, ir.DataType.BOOL):
            return self.refuse("the mask is not boolean", allowed)
        for value in (q, k_t, v):
            if value.shape is not None and value.shape.rank() != 3:
                return self.refuse("q, k, v are not [heads, patches, head_dim]", value)
        return MatchResult()

    def rewrite(self, op, q, k_t, v, scale, allowed, **_):
        batch_axis = op.Constant(value=ir.tensor(np.array([0], np.int64)))
        k = op.Transpose(k_t, perm=[0, 2, 1])  # [heads, hd, N] -> [heads, N, hd]
        q4, k4, v4 = (op.Unsqueeze(t, batch_axis) for t in (q, k, v))
        # [N, N] -> [1, 1, N, N]: the rank TensorRT's attention layer takes (ONNX also broadcasts [N, N]).
        mask = op.Unsqueeze(allowed, op.Constant(value=ir.tensor(np.array([0, 1], np.int64))))
        y = op.Attention(q4, k4, v4, mask, scale=float(scalar(scale)))
        return op.Squeeze(y, batch_axis)


class FuseVisionAttention(StandardRewritePass):
    """Fuse each vision block's attention (MatMul, scale, segment mask, Softmax, MatMul) into one ONNX
    Attention (opset 23) over [1, heads, patches, head_dim] with the boolean segment mask [1, 1, N, N]."""

    name = "fuse-vision-attention"
    rules = (VisionAttentionRule,)

    def prepare_opsets(self, model: ir.Model) -> None:
        if self.stats.fired_total and model.opset_imports.get("", 0) < 23:
            model.opset_imports[""] = 23
            model.graph.opset_imports[""] = 23
