"""Triton kernels of this op (qwen_export.plugins.gated_deltanet); see the README beside them."""
