"""The build targets and what kind of artifact each writes (no imports: the runtime reads these too)."""

from __future__ import annotations

TARGETS = {
    "onnx": "standard ONNX: fuse into qwen ops, then lower them portably (runs on any ONNX runtime)",
    "ort": "ONNX Runtime: fuse into qwen ops, lower them to com.microsoft contrib ops where they fit",
    "ort-int4": "the ort graph with weight-only int4 block quantization (block 32, int8 compute): "
    "MatMulNBits for constant-weight MatMuls, QMoE for the routed experts",
    "ort-int8": "the ort graph with weight-only int8 block quantization (block 32, int8 compute)",
    "ort-cpu-int4": "ort-int4 on qwen-export's CPU kernels (AVX-512 VNNI or AVX2; plugins/ort_cpu): qwen.cpu "
    "Int4Linear, Int4MoE and GatedDeltaRule instead of MatMulNBits, QMoE and the DeltaNet contrib chain; "
    "the artifact carries the custom-op library",
    "fused": "the fused graph itself: qwen ops as model-local functions (input to plugin backends)",
    "trt-plugins": "ONNX for TensorRT with qwen-export's plugins: qwen ops become Qwen* plugin nodes (bf16), "
    "for trtexec --dynamicPlugins or the trt engine target",
}

# Weight-only quantized ORT targets and their bit width (passes/quantize_weights.py; tolerances per target
# in qwen_export/tolerances.py).
QUANTIZED_ORT_TARGETS = {"ort-int4": 4, "ort-int8": 8, "ort-cpu-int4": 4}
# Targets whose graph runs qwen.cpu ops; the artifact carries their library (qwen_export/cpu_kernels.py).
CPU_KERNEL_TARGETS = ("ort-cpu-int4",)
ONNX_TARGETS = ("onnx", "ort", *QUANTIZED_ORT_TARGETS)  # targets whose artifact is model.onnx (+ data)
