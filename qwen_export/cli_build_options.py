"""The `build` command's options (typer annotations), kept out of cli.py so that it stays a short index of
commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

CheckOpt = Annotated[
    bool, typer.Option(help="Run each stage in ONNX Runtime against the golden reference and the one before.")
]
GoldenOpt = Annotated[
    Path | None, typer.Option("--golden", help="Golden folder for --check (default: the preset's).")
]
MultimodalOpt = Annotated[
    bool,
    typer.Option(
        help="Also build the vision tower and the token embedding (a *ForConditionalGeneration checkpoint); "
        "the text tower then takes inputs_embeds and mRoPE positions."
    ),
]
GpuOpt = Annotated[
    str | None,
    typer.Option(
        help="Engine targets: sm80, sm86, sm89, sm90, sm100, sm120 or names (a100, h100, h200, ...)."
    ),
]
PrecisionOpt = Annotated[str | None, typer.Option(help="Engine precision: bf16 (default) or fp16.")]
MaxBatchOpt = Annotated[int | None, typer.Option(help="Engine profiles: largest batch.")]
MaxPromptOpt = Annotated[int | None, typer.Option(help="Engine profiles: longest prompt (prefill).")]
MaxContextOpt = Annotated[int | None, typer.Option(help="Engine profiles: longest context (decode).")]
MaxImagePixelsOpt = Annotated[
    int | None,
    typer.Option(
        help="Vision engine (--multimodal): most pixels of one image or video frame after resizing."
    ),
]
MaxVideoFramesOpt = Annotated[
    int | None, typer.Option(help="Vision engine (--multimodal): most frames of one video.")
]
SpecOpt = Annotated[Path | None, typer.Option(help="Deployment spec file (JSON or TOML); flags override.")]
WorkspaceOpt = Annotated[int | None, typer.Option(help="Builder workspace limit in MiB.")]
OptLevelOpt = Annotated[int, typer.Option(min=0, max=5, help="Builder optimization level.")]
VersionCompatibleOpt = Annotated[bool, typer.Option(help="Version-compatible engines (lean runtime).")]
HardwareCompatibilityOpt = Annotated[
    str, typer.Option(help="trt only: none, ampere_plus or same_compute_capability.")
]
TimingCacheOpt = Annotated[Path | None, typer.Option(help="Timing cache file shared between builds.")]
DryRunOpt = Annotated[bool, typer.Option(help="Print the engine build plan and stop.")]
