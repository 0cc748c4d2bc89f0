"""`qwen-export` command line: a thin layer over the library API."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from qwen_export.errors import QwenExportError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # checkpoints are local folders; never reach for the network

app = typer.Typer(
    name="qwen-export",
    help="Export Qwen3.5-family hybrid-attention MoE models to ONNX, validated against the PyTorch reference.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)

PresetOpt = Annotated[
    str | None, typer.Option("--preset", "-p", help="Built-in model with seeded random weights (see `presets`).")
]
ModelOpt = Annotated[
    Path | None, typer.Option("--model", "-m", help="Local Hugging Face folder: config.json + *.safetensors.")
]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder (replaced atomically when done).")]


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


def _log(message: str) -> None:
    err.print(f"[dim]{message}[/dim]", highlight=False, soft_wrap=True)


@app.command()
@user_errors
def export(
    out: OutOpt,
    preset: PresetOpt = None,
    model: ModelOpt = None,
    debug_hidden_states: Annotated[
        bool, typer.Option(help="Also output every decoder layer's hidden states (for per-layer diff).")
    ] = False,
) -> None:
    """Export the text tower to OUT/model.onnx (+ model.onnx.data) and OUT/export.json.

    One graph serves prefill and decode: inputs input_ids, attention_mask, position_ids and every
    past_key_values.* state; outputs logits and the matching present.* states. Batch, sequence and past
    length are dynamic.
    """
    from qwen_export.exporter.export import export_model

    with err.status("exporting…"):
        result = export_model(out, preset=preset, model_dir=model, debug_hidden_states=debug_hidden_states, log=_log)
    info = result.info
    err.print(
        f"[green]wrote[/green] {result.model_path} ({info['graph']['nodes']} nodes, "
        f"{info['timings_s']['total']:.1f} s, peak RSS {info['peak_rss_mib']:.0f} MiB)",
        highlight=False,
    )


@app.command()
@user_errors
def golden(
    out: OutOpt,
    preset: PresetOpt = None,
    model: ModelOpt = None,
) -> None:
    """Run the PyTorch reference and store golden outputs: prefill logits (lengths 1..200), 32 greedy tokens,
    final states, with a manifest of versions, seed, prompts, shapes and sha256."""
    from qwen_export.exporter.export import resolve_source
    from qwen_export.golden.store import generate_golden

    start = time.perf_counter()
    source_dir, source = resolve_source(preset, model)
    with err.status("running the reference…"):
        generate_golden(source_dir, out, source, log=_log)
    err.print(f"[green]wrote[/green] {out} in {time.perf_counter() - start:.1f} s", highlight=False)


@app.command()
@user_errors
def validate(
    artifact: Annotated[Path, typer.Argument(help="An export or build folder (holding model.onnx) or a .onnx file.")],
    golden_dir: Annotated[Path, typer.Option("--golden", "-g", help="Golden folder from `qwen-export golden`.")],
    tolerance: Annotated[float, typer.Option(help="Max |Δ| allowed on logits and states (fp32).")] = 2e-4,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Run the artifact on ONNX Runtime CPU against golden outputs; exit 1 if anything is out of tolerance."""
    from qwen_export.golden.store import load_golden
    from qwen_export.validate import render, validate_onnx

    model_path = artifact / "model.onnx" if artifact.is_dir() else artifact
    if not model_path.is_file():
        raise QwenExportError(f"{model_path}: no such model; pass a folder written by `qwen-export export`")
    golden_data = load_golden(golden_dir)
    with err.status("validating…"):
        report = validate_onnx(model_path, golden_data, tolerance)
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        render(report)
    raise typer.Exit(0 if report.passed else 1)


@app.command()
def presets(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False) -> None:
    """List the built-in presets."""
    from qwen_export.presets import PRESETS

    if as_json:
        print(json.dumps({n: {"architecture": p.architecture, "description": p.description} for n, p in PRESETS.items()}))
        return
    table = Table("preset", "architecture", "description")
    for name, p in PRESETS.items():
        table.add_row(name, p.architecture, p.description)
    Console().print(table)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
