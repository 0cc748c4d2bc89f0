"""Accuracy tolerances per precision, used by validate and diff (and stated in every report)."""

from __future__ import annotations

from qwen_export.errors import QwenExportError

# logits_max_abs: max |Δ| on logits; layer_rel: max |Δ| / max |ref| on a decoder layer's output;
# top1_min: least top-1 agreement of next-token predictions; kl_mean_max (where given): largest mean
# KL(reference || ours) of the next-token distributions, in nats.
# Weight-only int4/int8 (targets ort-int4, ort-int8; block 32, int8 activations): logits move by a fraction
# of their spread, so top-1 agreement and KL bound them rather than max |Δ|. Set from the tiny presets
# against their goldens (random weights, near-tied logits: the hardest case for top-1); the graph itself
# equals transformers run on the dequantized weights (docs/ort-lowering.md has the numbers). A trained
# checkpoint is needed to judge quantization quality; the random small preset is no judge of it.
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"logits_max_abs": 2e-4, "layer_rel": 1e-5, "top1_min": 1.0},
    "fp16": {"logits_max_abs": 5e-2, "layer_rel": 5e-3, "top1_min": 0.99},
    "bf16": {"logits_max_abs": 2e-1, "layer_rel": 3e-2, "top1_min": 0.99},
    "int8": {"logits_max_abs": 0.1, "layer_rel": 2e-2, "top1_min": 0.9, "kl_mean_max": 2e-4},
    "int4": {"logits_max_abs": 1.0, "layer_rel": 5e-2, "top1_min": 0.75, "kl_mean_max": 1e-2},
}

FP32_MAX_ABS = TOLERANCES["fp32"]["logits_max_abs"]  # logits and states of an fp32 artifact vs the reference


def artifact_precision(info: dict) -> str:
    """The precision an artifact's numbers are held to: its manifest's `precision` (engines), the weight
    width of a quantized ORT target (`ort-int4` -> int4), an export's `dtype` (bf16 | fp16 | fp32), else
    fp32."""
    if info.get("precision"):
        return str(info["precision"])
    from qwen_export.targets import TARGETS

    target = TARGETS.get(str(info.get("target", "")))
    if target is not None and target.weight_bits:
        return target.precision
    return str(info.get("dtype") or "fp32")


def tolerance_for(precision: str) -> dict[str, float]:
    if precision not in TOLERANCES:
        raise QwenExportError(f"no tolerances for precision {precision!r}; known: {', '.join(TOLERANCES)}")
    return TOLERANCES[precision]
