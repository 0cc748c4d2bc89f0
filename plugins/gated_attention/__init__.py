"""Triton kernels of this op (qwen_export.plugins.gated_attention); see the README beside them."""
