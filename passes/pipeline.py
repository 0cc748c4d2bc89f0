"""The building blocks of the targets' pipelines (qwen_export/targets.py puts them together per target).

Each function builds a fresh list of pass objects per call; nothing is registered at import.
"""

from __future__ import annotations

from qwen_export.passes.base import QwenPass
from qwen_export.passes.cse import EliminateCommonSubexpressions
from qwen_export.passes.dedup_initializers import DeduplicateInitializers
from qwen_export.passes.fuse_gated_attention import FuseGatedAttention
from qwen_export.passes.fuse_gated_deltanet import FuseGatedDeltaNet
from qwen_export.passes.fuse_gated_rms_norm import FuseGatedRMSNorm
from qwen_export.passes.fuse_moe import FuseMoE
from qwen_export.passes.fuse_rms_norm import FuseRMSNorm
from qwen_export.passes.lift_constants import LiftConstants
from qwen_export.passes.remove_unused import RemoveUnused
from qwen_export.passes.shape_inference import InferShapes

__all__ = ["cleanup", "finish", "fusions", "optional"]


def cleanup() -> list[QwenPass]:
    return [RemoveUnused(), EliminateCommonSubexpressions(), DeduplicateInitializers()]


def fusions() -> list[QwenPass]:
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


def finish() -> list[QwenPass]:
    """After lowering: inlined bodies bring their own copies of constants and mask arithmetic; merge them."""
    return [LiftConstants(), DeduplicateInitializers(), EliminateCommonSubexpressions(), RemoveUnused()]


def optional() -> list[QwenPass]:
    """Passes no target runs by default, listed by `qwen-export passes` (shape inference, for inspection)."""
    return [InferShapes()]
