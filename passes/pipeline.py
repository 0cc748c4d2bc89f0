"""Pass pipelines per target. A function builds a fresh list each call; nothing is registered at import."""

from __future__ import annotations

import onnx_ir as ir

from qwen_export.errors import QwenExportError
from qwen_export.passes.cse import EliminateCommonSubexpressions
from qwen_export.passes.dedup_initializers import DeduplicateInitializers
from qwen_export.passes.fuse_gated_attention import FuseGatedAttention
from qwen_export.passes.fuse_gated_deltanet import FuseGatedDeltaNet
from qwen_export.passes.fuse_gated_rms_norm import FuseGatedRMSNorm
from qwen_export.passes.fuse_moe import FuseMoE
from qwen_export.passes.fuse_rms_norm import FuseRMSNorm
from qwen_export.passes.lift_constants import LiftConstants
from qwen_export.passes.lower_ort import LowerToOrt
from qwen_export.passes.lower_portable import LowerPortable
from qwen_export.passes.lower_trt_plugins import LowerTrtPlugins
from qwen_export.passes.quantize_weights import QuantizeWeights
from qwen_export.passes.remove_unused import RemoveUnused
from qwen_export.passes.shape_inference import InferShapes
from qwen_export.passes.targets import QUANTIZED_ORT_TARGETS, TARGETS
from qwen_export.passes.use_cpu_kernels import UseCpuKernels

__all__ = ["TARGETS", "catalog", "cleanup", "finish", "fusions", "pipeline"]


def cleanup() -> list[ir.passes.PassBase]:
    return [RemoveUnused(), EliminateCommonSubexpressions(), DeduplicateInitializers()]


def fusions() -> list[ir.passes.PassBase]:
    """Order matters: gated norm before plain norm (which would take its inner norm); norms before the
    blocks that nest them (DeltaNet nests GatedRMSNorm, attention nests the q/k RMSNorms)."""
    return [
        FuseGatedRMSNorm(),
        FuseRMSNorm(),
        FuseGatedDeltaNet(),
        FuseGatedAttention(),
        FuseMoE(),
        RemoveUnused(),
    ]


def finish() -> list[ir.passes.PassBase]:
    """After lowering: inlined bodies bring their own copies of constants and mask arithmetic; merge them."""
    return [LiftConstants(), DeduplicateInitializers(), EliminateCommonSubexpressions(), RemoveUnused()]


def pipeline(target: str) -> list[ir.passes.PassBase]:
    """The passes that turn the exporter's graph into `target`'s graph."""
    if target == "onnx":
        return [*cleanup(), *fusions(), LowerPortable(), *finish()]
    if target == "ort":
        # Whatever the ORT lowering leaves as qwen ops still runs: the portable lowering takes it.
        return [*cleanup(), *fusions(), LowerToOrt(), LowerPortable(), *finish()]
    if target == "ort-cpu-int4":
        ort_cpu = [*cleanup(), *fusions(), LowerToOrt(deltanet="qwen-cpu"), LowerPortable(), *finish()]
        quantize = QuantizeWeights(bits=4, fp16_scales=True)  # scales the kernels keep in float16, exactly
        return [*ort_cpu, quantize, RemoveUnused(), UseCpuKernels(), RemoveUnused()]
    if target in QUANTIZED_ORT_TARGETS:
        bits = QUANTIZED_ORT_TARGETS[target]
        return [*pipeline("ort"), QuantizeWeights(bits=bits), RemoveUnused()]
    if target == "fused":
        return [*cleanup(), *fusions()]
    if target == "trt-plugins":
        return [*cleanup(), *fusions(), LowerTrtPlugins(), *finish()]
    raise QwenExportError(f"unknown target {target!r}; choose one of: {', '.join(TARGETS)}")


def catalog() -> list[type[ir.passes.PassBase]]:
    """Every pass class a pipeline may use, in pipeline order, plus optional ones (shape inference)."""
    classes: list[type[ir.passes.PassBase]] = []
    lowerings = [LowerToOrt(), LowerTrtPlugins(), LowerPortable()]
    precision = [QuantizeWeights(), UseCpuKernels()]
    for p in [*cleanup(), *fusions(), *lowerings, *finish(), *precision, InferShapes()]:
        if type(p) not in classes:
            classes.append(type(p))
    return classes
