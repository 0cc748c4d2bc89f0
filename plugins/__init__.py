"""qwen-export's GPU plugins (qwen_export.plugins): per op, Triton kernels beside the TensorRT wrapper and
the header-free C++ core; `triton_support` is the harness that checks the kernels on the CPU."""
