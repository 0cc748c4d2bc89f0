"""Triton kernels of this op (qwen_export.plugins.gated_rms_norm); see the README beside them."""
