"""`qwen-export plan`: what a model needs per GPU under a tensor/expert-parallel split (qwen_export.plan)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from qwen_export.cli_support import JsonOpt, ModelOpt, PresetOpt, emit, user_errors
from qwen_export.errors import QwenExportError
from qwen_export.plan import DEFAULT_CONTEXT, KV_CACHE_DTYPES, RESERVE_FRACTION


def load_model_config(preset: str | None, model: Path | None) -> tuple[dict[str, Any], str]:
    """(config.json as a dict, a label) of a preset (config only, nothing materialised) or a local folder."""
    if (preset is None) == (model is None):
        raise QwenExportError("pass exactly one of --preset NAME or --model DIR")
    if preset is not None:
        from qwen_export.presets import get_preset

        return get_preset(preset).config_dict(), preset
    from qwen_export.exporter.spec import read_config_json

    return read_config_json(model), str(model)


@user_errors
def plan(
    gpus: Annotated[
        str,
        typer.Option(help="<count>x<name>, for example 8xh200 (see qwen_export/gpus.py for the names)."),
    ],
    preset: PresetOpt = None,
    model: ModelOpt = None,
    precision: Annotated[
        str | None,
        typer.Option(
            help="Weights: bf16, fp8 (Qwen's 128x128 block-scaled release), int4 (ort-int4: 4 bits + fp16 "
            "scale per 32) or nvfp4 (4 bits + e4m3 scale per 16). Default: fp8 for an FP8 checkpoint, "
            "else bf16."
        ),
    ] = None,
    tp: Annotated[
        int | None, typer.Option(help="Tensor-parallel ranks per model copy (default: all).")
    ] = None,
    ep: Annotated[int, typer.Option(help="Expert-parallel groups among the tp ranks (divides tp).")] = 1,
    context: Annotated[int, typer.Option(help="Tokens per sequence (prompt + generated).")] = DEFAULT_CONTEXT,
    batch: Annotated[int, typer.Option(help="Sequences served together by one model copy.")] = 1,
    prompt: Annotated[
        int | None,
        typer.Option(help="Tokens each sequence prefills in one step (default: 2048, at most context)."),
    ] = None,
    kv_cache: Annotated[str, typer.Option(help=f"KV cache dtype: {' or '.join(KV_CACHE_DTYPES)}.")] = "bf16",
    reserve: Annotated[
        float, typer.Option(help="Fraction of each GPU's memory kept free (CUDA context, NCCL, allocator).")
    ] = RESERVE_FRACTION,
    as_json: JsonOpt = False,
) -> None:
    """Plan a deployment: weights per GPU (what the split replicates), KV cache per token, DeltaNet state per
    sequence, activations, whether it fits and the largest batch at the context, the decode-step floor from
    HBM bandwidth and the state saved against an all-full-attention model, each with its arithmetic. A plan
    that does not fit says what would, and exits 1."""
    from qwen_export.exporter import fp8
    from qwen_export.exporter.spec import spec_from_config
    from qwen_export.gpus import parse_gpus
    from qwen_export.plan import make_plan

    count_gpu = parse_gpus(gpus)
    config, label = load_model_config(preset, model)
    block = fp8.fp8_block(config, label)
    spec = spec_from_config(config, label)
    result = make_plan(
        spec, count_gpu, precision=precision or ("fp8" if block else "bf16"), tp=tp, ep=ep, context=context,
        batch=batch, prompt=prompt, kv_cache=kv_cache, reserve=reserve, fp8_block=block or fp8.BLOCK,
        source=label,
    )  # fmt: skip
    emit(result, as_json)
    raise typer.Exit(0 if result.fits else 1)
