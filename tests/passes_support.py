"""Shared helpers for the pass, fusion and build tests (not a test module)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qwen_export.exporter.export import load_model_source, resolve_source
from qwen_export.exporter.model import build_decoder
from qwen_export.golden.store import load_golden, repo_golden_dir
from qwen_export.tolerances import FP32_MAX_ABS

TOL = FP32_MAX_ABS
TINY_PRESETS = ["tiny-qwen3.5-moe", "tiny-qwen3-next", "tiny-qwen3.5"]

# qwen ops after fusion, per preset: top graph, and nested in fused bodies (per call, as inlined).
EXPECTED_FUSED = {
    "tiny-qwen3.5-moe": (
        {"RMSNorm": 9, "GatedDeltaNet": 3, "GatedAttention": 1, "MoE": 4},
        {"GatedRMSNorm": 3, "RMSNorm": 2},
    ),
    "tiny-qwen3-next": (
        {"RMSNorm": 9, "GatedDeltaNet": 3, "GatedAttention": 1, "MoE": 3},
        {"GatedRMSNorm": 3, "RMSNorm": 2},
    ),
    "tiny-qwen3.5": (
        {"RMSNorm": 9, "GatedDeltaNet": 3, "GatedAttention": 1},
        {"GatedRMSNorm": 3, "RMSNorm": 2},
    ),
}

# Everything left in the top graph after fusion: embedding, rotary tables, residual adds, lm_head, and the
# dense SwiGLU MLPs (not a qwen op). Any other op would be a leftover of a fused block.
_SHARED = {
    "Gather": 1,
    "Cast": 1,
    "Unsqueeze": 1,
    "Mul": 1,
    "Concat": 1,
    "Cos": 1,
    "Sin": 1,
    "Add": 8,
    "MatMul": 1,
}
_DENSE_MLP = {"MatMul": 3, "Mul": 2, "Sigmoid": 1}


def expected_top_graph(preset: str) -> dict[str, int]:
    top, _ = EXPECTED_FUSED[preset]
    dense_layers = {"tiny-qwen3.5-moe": 0, "tiny-qwen3-next": 1, "tiny-qwen3.5": 4}[preset]
    counts = dict(_SHARED)
    for op, n in _DENSE_MLP.items():
        counts[op] = counts.get(op, 0) + n * dense_layers
    counts.update({f"qwen.{op}": n for op, n in top.items()})
    return {op: n for op, n in counts.items() if n}


def exported(preset: str) -> ir.Model:
    """A fresh exporter graph for `preset` (passes change models in place)."""
    source_dir, _ = resolve_source(preset, None)
    _, spec, ckpt = load_model_source(source_dir)
    return build_decoder(spec, ckpt)


def golden(preset: str):
    return load_golden(repo_golden_dir(preset))


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
