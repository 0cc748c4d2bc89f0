"""Accuracy tolerances per precision, used by validate and diff (and stated in every report)."""

from __future__ import annotations

import math

from qwen_export.errors import QwenExportError

# logits_max_abs: max |Δ| on logits; layer_rel: max |Δ| / max |ref| on a decoder layer's output;
# top1_min: least top-1 agreement of next-token predictions; kl_mean_max (where given): largest mean
# KL(reference || ours) of the next-token distributions, in nats.
#
# Weight-only int4/int8 (targets ort-int4, ort-int8, ort-cpu-int4; block 32, int8 activations): logits move
# by a fraction of their spread, so top-1 agreement and KL bound them rather than max |Δ|. Their top1_min
# and kl_mean_max are derived from the trained reference model (golden/trained-qwen3.5-moe) on its held-out
# text, where the distributions are as peaked as a real model's: the worst of the measured builds per
# precision, below (a copy of benchmarks/quality.json's rows, `python scripts/bench_quality.py`;
# tests/test_tolerances.py proves the copy equal), with a margin: top-1 agreement 0.03 lower, rounded down
# to 0.01; mean KL doubled, rounded up to one significant digit. Their logits_max_abs and layer_rel come
# from the tiny presets against their goldens (random weights, near-tied logits); the graph itself equals
# transformers run on the dequantized weights (docs/ort-lowering.md has the numbers).
MEASURED_ON_TRAINED: dict[str, dict[str, float]] = {
    "int8": {"top1_agreement": 0.9877450980392157, "kl_mean": 0.0004599412481235522},
    "int4": {"top1_agreement": 0.8960784313725491, "kl_mean": 0.012906266370337503},
}
TOP1_MARGIN, KL_FACTOR = 0.03, 2.0


def derived_bounds(measured: dict[str, float]) -> dict[str, float]:
    """top1_min and kl_mean_max from one precision's measurement on the trained model (the rule above)."""
    top1 = math.floor((measured["top1_agreement"] - TOP1_MARGIN) * 100) / 100
    kl = measured["kl_mean"] * KL_FACTOR
    digits = -math.floor(math.log10(kl))
    return {"top1_min": top1, "kl_mean_max": math.ceil(kl * 10**digits) / 10**digits}


TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"logits_max_abs": 2e-4, "layer_rel": 1e-5, "top1_min": 1.0},
    "fp16": {"logits_max_abs": 5e-2, "layer_rel": 5e-3, "top1_min": 0.99},
    "bf16": {"logits_max_abs": 2e-1, "layer_rel": 3e-2, "top1_min": 0.99},
    "int8": {"logits_max_abs": 0.1, "layer_rel": 2e-2, **derived_bounds(MEASURED_ON_TRAINED["int8"])},
    "int4": {"logits_max_abs": 1.0, "layer_rel": 5e-2, **derived_bounds(MEASURED_ON_TRAINED["int4"])},
}

# Random-weight presets (near-tied logits everywhere) flip more top-1 tokens under int4/int8 than a trained
# model does: their checks keep the top-1 floors measured on the tiny presets against their goldens.
RANDOM_WEIGHT_TOP1_MIN = {"int8": 0.9, "int4": 0.75}

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


def tolerance_for(precision: str, random_weights: bool = False) -> dict[str, float]:
    """The bounds an artifact of `precision` is held to; `random_weights` (a random-weight preset's
    artifact) takes the random-weight top-1 floor."""
    if precision not in TOLERANCES:
        raise QwenExportError(f"no tolerances for precision {precision!r}; known: {', '.join(TOLERANCES)}")
    if random_weights and precision in RANDOM_WEIGHT_TOP1_MIN:
        return {**TOLERANCES[precision], "top1_min": RANDOM_WEIGHT_TOP1_MIN[precision]}
    return TOLERANCES[precision]


def has_random_weights(info: dict) -> bool:
    """Whether an artifact (its manifest or export.json) comes from a random-weight preset."""
    source = str(info.get("source", ""))
    if not source.startswith("preset:"):
        return False
    from qwen_export.presets import PRESETS

    preset = PRESETS.get(source.removeprefix("preset:"))
    return preset is not None and preset.has_weights and not preset.trained
