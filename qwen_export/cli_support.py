"""What every `qwen-export` command shares: the error console, one-line user errors, option types, and
printing a result as JSON or through its own renderer."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from qwen_export.errors import QwenExportError
from qwen_export.golden.perplexity import WINDOW
from qwen_export.quality import DEFAULT_WINDOWS

err = Console(stderr=True)


PresetOpt = Annotated[
    str | None,
    typer.Option("--preset", "-p", help="Built-in model with seeded random weights (see `presets`)."),
]
ModelOpt = Annotated[
    Path | None, typer.Option("--model", "-m", help="Local Hugging Face folder: config.json + *.safetensors.")
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder (replaced atomically when done).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the report as JSON.")]
DtypeOpt = Annotated[
    str | None,
    typer.Option(help="fp32, bf16 or fp16 (default: the checkpoint's own precision; FP8 checkpoints: bf16)."),
]


def _engine_weights_help() -> str:
    from qwen_export.engines.spec import FP8_MIN_SM, fp8_weight_targets

    targets = ", ".join(fp8_weight_targets())
    return (
        f"Engine targets, FP8 checkpoints: fp8 (default) keeps the e4m3 weights ({targets}, "
        f"sm{FP8_MIN_SM} and newer); dequant builds them in the engine's precision."
    )


EngineWeightsOpt = Annotated[str | None, typer.Option(help=_engine_weights_help())]
TpOpt = Annotated[
    int, typer.Option(min=1, help="Tensor-parallel ranks: one graph per rank in OUT/ranks/<r>/ (see `plan`).")
]
EpOpt = Annotated[
    int,
    typer.Option(min=1, help="Expert-parallel groups (divides --tp): each group holds 1/ep of the experts."),
]
ListJsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
ReportOpt = Annotated[Path | None, typer.Option(help="Write the JSON report here.")]
AgainstOpt = Annotated[
    Path | None,
    typer.Option(
        help="A golden folder, or a checkpoint folder to run the reference on (default: the source)."
    ),
]
PerLayerOpt = Annotated[
    bool, typer.Option(help="Compare every decoder layer's output; name the first bad one.")
]
PerPassOpt = Annotated[
    bool, typer.Option(help="Rebuild with a check after every pass; name the first pass out of tolerance.")
]
SaveOutputsOpt = Annotated[
    Path | None,
    typer.Option(help="Write our outputs as Polygraphy RunResults (for `polygraphy run --load-outputs`)."),
]
PromptOpt = Annotated[str | None, typer.Option(help="Text prompt (needs the checkpoint's tokenizer.json).")]
ImageOpt = Annotated[
    list[Path] | None, typer.Option(help="Image file (repeatable); needs a multimodal export.")
]
ProfileImageOpt = Annotated[
    Path | None,
    typer.Option(
        "--image", help="Multimodal artifacts: profile the vision graph on this image (default: seeded)."
    ),
]
VideoOpt = Annotated[
    list[str] | None, typer.Option(help="A short video as comma-separated frame files (repeatable).")
]
SpeculativeOpt = Annotated[
    int | None,
    typer.Option(
        metavar="K",
        help="Draft K tokens (1..8) a step with the checkpoint's MTP layer and verify them in one step of "
        "the model: the greedy tokens, faster. Needs an artifact with mtp.onnx; --json reports acceptance "
        "per draft position.",
    ),
]
TextOpt = Annotated[
    Path | None,
    typer.Option(
        help="Score this text file instead: held-out perplexity, next-token agreement and KL against the "
        f"reference, in windows of {WINDOW} tokens (needs the checkpoint's tokenizer.json)."
    ),
]
WindowsOpt = Annotated[
    int | None,
    typer.Option(
        min=1, help=f"With --text: how many windows to score, from its start (default: {DEFAULT_WINDOWS})."
    ),
]


def user_errors(fn):
    """Turn user-input errors into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except QwenExportError as e:
            err.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def log(message: str) -> None:
    err.print(f"[dim]{message}[/dim]", highlight=False, soft_wrap=True)


def emit(result: Any, as_json: bool, report: Path | None = None) -> None:
    """The result as JSON (stdout and/or a file) or through its own renderer."""
    if report is not None:
        report.write_text(json.dumps(result.to_json(), indent=2))
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        result.render(Console())
