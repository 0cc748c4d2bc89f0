"""Triton kernels of this op (qwen_export.plugins.rms_norm); see the README beside them."""
