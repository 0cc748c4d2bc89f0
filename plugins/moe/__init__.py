"""Triton kernels of this op (qwen_export.plugins.moe); see the README beside them."""
