"""Qwen's official FP8 checkpoint format, declared once: the loader, the writer and the planner read it.

The Qwen3.5 FP8 releases store each quantized linear weight `W [out, in]` as F8_E4M3 with a companion
`<name>_scale_inv` (`...weight_scale_inv`) of shape [ceil(out/128), ceil(in/128)], F32 or BF16: block
(i, j) dequantizes as `W[128i:128i+128, 128j:128j+128] * scale_inv[i, j]` (despite its name, the tensor is
the multiplier). config.json carries

    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]}

(in `text_config` or at the top level). The routed experts are stored one per expert
(`mlp.experts.{e}.{gate,up,down}_proj.weight`), and these modules stay in bf16: embeddings, lm_head, norms,
the router `mlp.gate`, `shared_expert_gate`, and the linear-attention `in_proj_a`, `in_proj_b`, `conv1d`,
`A_log`, `dt_bias` and `norm`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from qwen_export.errors import ConfigError

QUANT_METHOD = "fp8"
FMT = "e4m3"
BLOCK = (128, 128)  # (rows of out, columns of in) per scale
SCALE_SUFFIX = "_scale_inv"  # appended to the weight's name: "...q_proj.weight_scale_inv"
FP8_DTYPE = "F8_E4M3"  # the safetensors dtype of a quantized weight
SCALE_DTYPES = ("F32", "BF16")
OFFICIAL_QUANTIZATION_CONFIG: dict[str, Any] = {
    "quant_method": QUANT_METHOD,
    "fmt": FMT,
    "activation_scheme": "dynamic",
    "weight_block_size": list(BLOCK),
}

# Linear weights the official release keeps in bf16 (their module names end like this).
KEPT_HIGH_PRECISION: tuple[str, ...] = (
    "embed_tokens",
    "lm_head",
    "mlp.gate",
    "shared_expert_gate",
    "linear_attn.in_proj_a",
    "linear_attn.in_proj_b",
    "linear_attn.in_proj_ba",  # Qwen3-Next's fused b/a projection
    "linear_attn.conv1d",
)
_QUANTIZED_PROJECTION = re.compile(r"_proj(_\w+)?\.weight$")


def is_quantized_weight(name: str, shape: Sequence[int]) -> bool:
    """Whether the official FP8 release stores this checkpoint tensor as block-scaled e4m3: every 2-D
    `*_proj.weight` of the text tower (attention, DeltaNet projections, experts, shared expert) except the
    modules kept in bf16. Norms, A_log and dt_bias are vectors; conv1d is 3-D."""
    if len(shape) != 2 or not _QUANTIZED_PROJECTION.search(name):
        return False
    module = name.removesuffix(".weight")
    return not any(module.endswith(kept) for kept in KEPT_HIGH_PRECISION)


def scale_name(weight_name: str) -> str:
    return weight_name + SCALE_SUFFIX


def scale_grid(shape: Sequence[int], block: Sequence[int] = BLOCK) -> tuple[int, int]:
    """The [ceil(out/128), ceil(in/128)] grid of a [out, in] weight's scales."""
    out_features, in_features = shape
    return math.ceil(out_features / block[0]), math.ceil(in_features / block[1])


def quantization_config(config: dict[str, Any]) -> dict[str, Any] | None:
    """config.json's quantization_config (top level, else text_config's), or None."""
    found = config.get("quantization_config")
    if found is None and isinstance(config.get("text_config"), dict):
        found = config["text_config"].get("quantization_config")
    return found


def fp8_block(config: dict[str, Any], source: str = "config.json") -> tuple[int, int] | None:
    """The block size of an FP8 checkpoint; None for an unquantized one. Any other quantization method,
    format or activation scheme is a one-line ConfigError naming the field."""
    qc = quantization_config(config)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise ConfigError(f"{source}: quantization_config must be an object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method != QUANT_METHOD:
        raise ConfigError(
            f"{source}: quantization_config.quant_method {method!r} is not supported (only 'fp8', Qwen's "
            "block-scaled e4m3 release); dequantize the checkpoint to bf16 first"
        )
    fmt = qc.get("fmt", FMT)
    if fmt != FMT:
        raise ConfigError(f"{source}: quantization_config.fmt {fmt!r} is not supported (only 'e4m3')")
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise ConfigError(
            f"{source}: quantization_config.activation_scheme {scheme!r} is not supported (only 'dynamic')"
        )
    block = qc.get("weight_block_size")
    if not isinstance(block, list) or len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise ConfigError(
            f"{source}: quantization_config.weight_block_size must be two positive integers, got {block!r}"
        )
    return block[0], block[1]


def dequantize(weight: np.ndarray, scale_inv: np.ndarray, block: Sequence[int] = BLOCK) -> np.ndarray:
    """fp32 W [out, in] from e4m3 W and its [ceil(out/b0), ceil(in/b1)] multipliers: block (i, j) is
    W[b0*i : b0*(i+1), b1*j : b1*(j+1)] * scale_inv[i, j], one fp32 multiply per weight.

    Whole blocks broadcast their scale instead of building a full-size scale array, and the e4m3 -> fp32
    conversion runs in torch (0.29 GB/s of e4m3 on one core here, numpy's ml_dtypes cast 0.21): the
    exporter dequantizes hundreds of GB this way."""
    import torch

    rows, cols = weight.shape
    grid_rows, grid_cols = scale_grid(weight.shape, block)
    scale = torch.from_numpy(np.ascontiguousarray(scale_inv, dtype=np.float32))
    if tuple(scale.shape) != (grid_rows, grid_cols):
        grid = tuple(scale.shape)
        raise ValueError(f"scale grid {grid} does not fit weight {weight.shape} in blocks of {block}")
    if weight.dtype.itemsize == 1:  # e4m3 bits
        bits = torch.from_numpy(np.ascontiguousarray(weight).view(np.uint8))
        values = bits.view(torch.float8_e4m3fn).to(torch.float32)
    else:  # already widened
        values = torch.from_numpy(np.array(weight, dtype=np.float32))
    if rows == grid_rows * block[0] and cols == grid_cols * block[1]:
        values.view(grid_rows, block[0], grid_cols, block[1]).mul_(scale[:, None, :, None])
    else:
        expanded = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]
        values.mul_(expanded)
    return values.numpy()
