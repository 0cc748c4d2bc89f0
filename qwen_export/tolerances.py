"""Accuracy tolerances per precision, used by validate and diff (and stated in every report)."""

from __future__ import annotations

from qwen_export.errors import QwenExportError

# logits_max_abs: max |Δ| on logits; layer_rel: max |Δ| / max |ref| on a decoder layer's output;
# top1_min: least top-1 agreement of next-token predictions.
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"logits_max_abs": 2e-4, "layer_rel": 1e-5, "top1_min": 1.0},
    "fp16": {"logits_max_abs": 5e-2, "layer_rel": 5e-3, "top1_min": 0.99},
    "bf16": {"logits_max_abs": 2e-1, "layer_rel": 3e-2, "top1_min": 0.99},
}


def tolerance_for(precision: str) -> dict[str, float]:
    if precision not in TOLERANCES:
        raise QwenExportError(f"no tolerances for precision {precision!r}; known: {', '.join(TOLERANCES)}")
    return TOLERANCES[precision]
