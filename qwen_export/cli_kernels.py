"""`qwen-export kernels`: the plugins' Triton kernels, checked on the CPU before they reach a GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qwen_export.cli_support import JsonOpt, ModelOpt, PresetOpt, emit, err, user_errors

kernels_app = typer.Typer(help="The plugins' Triton kernels: check them on the CPU.", no_args_is_help=True)


@kernels_app.command("check")
@user_errors
def check(
    preset: PresetOpt = None,
    model: ModelOpt = None,
    dtype: Annotated[
        list[str] | None, typer.Option(help="float32, float16 or bfloat16 (repeatable); default: all three.")
    ] = None,
    report: Annotated[Path | None, typer.Option(help="Write the JSON report here.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run every Triton kernel under Triton's interpreter on the model's own shapes and weights (one layer
    of each kind, prefill and decode, carried state) against the transformers module's math: one row per
    kernel and case with max |Δ|, its tolerance and the verdict. Exit 1 if any kernel fails."""
    from qwen_export.kernel_check import DTYPES, check_kernels

    with err.status("running the kernels under Triton's interpreter…"):
        result = check_kernels(preset, model, tuple(dtype or DTYPES))
    emit(result, as_json, report)
    raise typer.Exit(0 if result.passed else 1)
