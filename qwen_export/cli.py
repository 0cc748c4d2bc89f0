"""`qwen-export` command line: each command parses its options, calls the library, and hands the result to
the renderer that lives with the result type."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from qwen_export import cli_build_options as build_opts
from qwen_export.cli_kernels import kernels_app
from qwen_export.cli_plan import plan
from qwen_export.cli_support import (
    AgainstOpt,
    DtypeOpt,
    EngineWeightsOpt,
    EpOpt,
    ImageOpt,
    JsonOpt,
    ListJsonOpt,
    ModelOpt,
    OutOpt,
    PerLayerOpt,
    PerPassOpt,
    PresetOpt,
    ProfileImageOpt,
    PromptOpt,
    ReportOpt,
    SaveOutputsOpt,
    SpeculativeOpt,
    TextOpt,
    TpOpt,
    VideoOpt,
    WindowsOpt,
    emit,
    err,
    log,
    user_errors,
)  # fmt: skip
from qwen_export.errors import QwenExportError
from qwen_export.targets import help_text
from qwen_export.tolerances import tolerance_for

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # checkpoints are local folders; never reach for the network

app = typer.Typer(
    name="qwen-export",
    help="Export Qwen3.5-family hybrid-attention MoE models to ONNX, checked against the PyTorch reference.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _targets_from_the_registry(ctx: typer.Context) -> None:
    # A target registered after this module was imported (another package, a test) reaches `build --help`:
    # the group's callback runs before a subcommand parses its options.
    build_command = getattr(ctx.command, "commands", {}).get("build")
    for param in getattr(build_command, "params", []):
        if param.name == "target":
            param.help = help_text()


@app.command()
@user_errors
def export(
    out: OutOpt,
    preset: PresetOpt = None,
    model: ModelOpt = None,
    debug_hidden_states: Annotated[
        bool, typer.Option(help="Also output every decoder layer's hidden states (for per-layer diff).")
    ] = False,
    multimodal: Annotated[
        bool,
        typer.Option(
            help="Also export the vision tower (vision.onnx) and embeddings (embed.onnx); the text graph "
            "then takes inputs_embeds and mRoPE position_ids [3, batch, sequence]. Multimodal checkpoints."
        ),
    ] = False,
    dtype: DtypeOpt = None,
    weights: Annotated[
        str | None,
        typer.Option(
            help="FP8 checkpoints: fp8 (default) keeps the e4m3 weights with their 128x128 block scales "
            "(blocked DequantizeLinear feeding the MatMuls and experts); dequant dequantizes them into "
            "--dtype."
        ),
    ] = None,
) -> None:
    """Export the text tower to OUT/model.onnx (+ model.onnx.data) and OUT/export.json.

    One graph serves prefill and decode: inputs input_ids, attention_mask, position_ids and every
    past_key_values.* state; outputs logits and the matching present.* states. Batch, sequence and past
    length are dynamic. The export keeps the checkpoint's precision (a bf16 checkpoint: bf16 weights and
    activations, fp32 for norm statistics, softmax and the router, DeltaNet gates and recurrent state, and
    the logits); --dtype overrides it.
    """
    from qwen_export.exporter.export import export_model

    with err.status("exporting…"):
        result = export_model(
            out, preset=preset, model_dir=model, debug_hidden_states=debug_hidden_states,
            multimodal=multimodal, log=log, dtype=dtype, weights=weights,
        )  # fmt: skip
    result.render(err)


@app.command()
@user_errors
def golden(out: OutOpt, preset: PresetOpt = None, model: ModelOpt = None, dtype: DtypeOpt = None) -> None:
    """Run the PyTorch reference and store golden outputs: prefill logits (lengths 1..200), 32 greedy tokens,
    final states, with a manifest of versions, seed, prompts, shapes and sha256. The reference runs in the
    checkpoint's precision unless --dtype says otherwise (an FP8 checkpoint: on its dequantized weights).
    A multimodal checkpoint's golden adds an image and a video prompt: seeded PNGs in OUT/media, the
    processor's arrays, vision features, prefill logits and 16 greedy tokens."""
    from qwen_export.exporter.export import resolve_source
    from qwen_export.golden.store import generate_golden

    start = time.perf_counter()
    source_dir, source = resolve_source(preset, model)
    with err.status("running the reference…"):
        generate_golden(source_dir, out, source, log=log, dtype=dtype)
    err.print(f"[green]wrote[/green] {out} in {time.perf_counter() - start:.1f} s", highlight=False)


FP32_MAX_ABS = tolerance_for("fp32")["logits_max_abs"]


@app.command()
@user_errors
def validate(
    artifact: Annotated[
        Path, typer.Argument(help="An export or build folder (holding model.onnx) or a .onnx file.")
    ],
    golden_dir: Annotated[
        Path, typer.Option("--golden", "-g", help="Golden folder from `qwen-export golden`.")
    ],
    tolerance: Annotated[
        float | None,
        typer.Option(
            help="Max |Δ| allowed on logits and states (default: the artifact's precision's, "
            f"{FP32_MAX_ABS:g} for fp32, {tolerance_for('bf16')['logits_max_abs']:g} for bf16)."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the artifact on ONNX Runtime CPU against golden outputs; exit 1 if anything is out of tolerance.

    A bf16/fp16 export runs emulated in fp32 (each low-precision result rounded through its dtype: ONNX
    Runtime's CPU provider has no bf16 kernels) and is held to its precision's tolerance. A multimodal
    artifact runs the golden's image and video prompts: preprocessing, vision features, prefill logits and
    greedy tokens per prompt."""
    from qwen_export.validate import validate_artifact

    with err.status("validating…"):
        report = validate_artifact(artifact, golden_dir, tolerance)
    emit(report, as_json)
    raise typer.Exit(0 if report.passed else 1)


@app.command()
@user_errors
def run(
    artifact: Annotated[Path, typer.Argument(help="An artifact folder from `export` or `build`.")],
    prompt: PromptOpt = None,
    ids: Annotated[str | None, typer.Option(help="Comma-separated token ids, e.g. 1,2,3.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate.")] = 32,
    greedy: Annotated[bool, typer.Option("--greedy/--sample", help="Greedy decoding or sampling.")] = True,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k most likely tokens (0 = all).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1.0 = off).")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    stop: Annotated[str | None, typer.Option(help="Comma-separated stop token ids.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print ids, text and timings as JSON.")] = False,
    image: ImageOpt = None,
    video: VideoOpt = None,
    speculative: SpeculativeOpt = None,
) -> None:
    """Generate from an artifact, streaming tokens as they come (text, or images/video with a prompt)."""
    from qwen_export.runtime.run import RunRequest, run_multimodal_request, stream_text

    if (prompt is None) == (ids is None):
        raise QwenExportError("pass exactly one of --prompt TEXT or --ids 1,2,3")
    request = RunRequest.parse(
        artifact, prompt=prompt, ids=ids, max_new_tokens=max_new_tokens, greedy=greedy,
        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop,
        images=image or [], videos=video or [], speculative=speculative,
    )  # fmt: skip
    if request.images or request.videos:
        with err.status("running…"):
            result = run_multimodal_request(request)
    else:
        result = stream_text(request, None if as_json else lambda piece: print(piece, end="", flush=True))
    if as_json:
        print(json.dumps(result.to_json()))
    else:
        result.render(err)


@app.command()
@user_errors
def diff(
    artifact: Annotated[Path, typer.Argument(help="An ONNX artifact folder from `export` or `build`.")],
    against: AgainstOpt = None,
    per_layer: PerLayerOpt = False,
    per_pass: PerPassOpt = False,
    report: ReportOpt = None,
    save_outputs: SaveOutputsOpt = None,
    as_json: JsonOpt = False,
    text: TextOpt = None,
    windows: WindowsOpt = None,
) -> None:
    """Accuracy against the reference: max/mean |Δ|, cosine, top-1/top-5 agreement, KL, greedy agreement.

    Exit code 1 when the artifact is out of its precision's tolerance (the report states which were used).
    A multimodal artifact adds an image and a video prompt (vision features, logits, greedy tokens) and,
    with --per-layer, every vision block's output; it names the first vision block out of tolerance.
    With --text, the quality on real text instead: top-1 agreement and mean KL against the precision's
    bounds (exit code 1 when outside them), with the held-out perplexity of both.
    """
    from qwen_export.diff import diff_artifact, save_polygraphy_outputs

    if text is not None:  # quality on real text instead (qwen_export/quality.py)
        from qwen_export.quality import text_quality

        with err.status("scoring the text…"):
            quality = text_quality(artifact, text, windows, against)
        emit(quality, as_json, report)
        raise typer.Exit(0 if quality.passed else 1)

    with err.status("comparing with the reference…"):
        result = diff_artifact(artifact, against, per_layer=per_layer, per_pass=per_pass)
    if save_outputs is not None:
        save_polygraphy_outputs(artifact, save_outputs)
    emit(result, as_json, report)
    raise typer.Exit(0 if result.passed else 1)


@app.command()
@user_errors
def profile(
    artifact: Annotated[Path, typer.Argument(help="An ONNX artifact folder from `export` or `build`.")],
    prompt_tokens: Annotated[int, typer.Option(min=1, help="Prompt length for the prefill phase.")] = 65,
    decode_steps: Annotated[int, typer.Option(min=1, help="Decode steps to time.")] = 16,
    report: ReportOpt = None,
    chart: Annotated[Path | None, typer.Option(help="Write a PNG chart of time per layer here.")] = None,
    as_json: JsonOpt = False,
    image: ProfileImageOpt = None,
) -> None:
    """Latency per decoder layer and per op type for prefill and decode (p50/p90 step), and per build pass;
    a multimodal artifact adds the vision graph on one image, per vision block."""
    from qwen_export.profile import profile_artifact, render_chart

    with err.status("profiling…"):
        result = profile_artifact(artifact, prompt_tokens, decode_steps, image=image)
    if chart is not None:
        render_chart(result, chart)
    emit(result, as_json, report)


@app.command()
@user_errors
def build(
    out: OutOpt,
    preset: PresetOpt = None,
    model: ModelOpt = None,
    target: Annotated[str, typer.Option("--target", "-t", help=help_text())] = "onnx",
    check: build_opts.CheckOpt = False,
    golden: build_opts.GoldenOpt = None,
    multimodal: build_opts.MultimodalOpt = False,
    gpu: build_opts.GpuOpt = None,
    precision: build_opts.PrecisionOpt = None,
    max_batch: build_opts.MaxBatchOpt = None,
    max_prompt: build_opts.MaxPromptOpt = None,
    max_context: build_opts.MaxContextOpt = None,
    max_image_pixels: build_opts.MaxImagePixelsOpt = None,
    max_video_frames: build_opts.MaxVideoFramesOpt = None,
    spec: build_opts.SpecOpt = None,
    workspace: build_opts.WorkspaceOpt = None,
    opt_level: build_opts.OptLevelOpt = 3,
    version_compatible: build_opts.VersionCompatibleOpt = False,
    hardware_compatibility: build_opts.HardwareCompatibilityOpt = "none",
    timing_cache: build_opts.TimingCacheOpt = None,
    dry_run: build_opts.DryRunOpt = False,
    weights: EngineWeightsOpt = None,
    tp: TpOpt = 1,
    ep: EpOpt = 1,
) -> None:
    """Export, run the pass pipeline for TARGET and write OUT/model.onnx (+ data), manifest.json, passes.json;
    for engine targets, OUT/engines/<gpu>/model.engine and a manifest fingerprinting everything that went in.

    With --check, each stage runs in ONNX Runtime (optimizations off) on fixed prompts; the command names
    the first pass whose logits or states leave tolerance and exits with code 1. Unchanged engine
    rebuilds come from the engine cache. Each target takes only its own options (`qwen-export targets`).
    """
    from qwen_export.build import BuildRequest, build_artifact
    from qwen_export.progress import pass_progress

    request = BuildRequest(
        out=out, target=target, preset=preset, model_dir=model, check=check, golden_dir=golden, gpu=gpu,
        precision=precision, max_batch=max_batch, max_prompt=max_prompt, max_context=max_context,
        spec_file=spec, workspace_mib=workspace, opt_level=opt_level, version_compatible=version_compatible,
        hardware_compatibility=hardware_compatibility, timing_cache=timing_cache, dry_run=dry_run,
        weights=weights, tp=tp, ep=ep, multimodal=multimodal, max_image_pixels=max_image_pixels,
        max_video_frames=max_video_frames,
    )  # fmt: skip
    request.check_options()
    with pass_progress(request, err) as hooks:
        result = build_artifact(request, hooks.on_start, hooks.on_end, log=log, console=err)
    if getattr(result, "report", None) is not None:
        # Piped output gets a wide table rather than one squeezed to 80 columns.
        result.render(err if err.is_terminal else Console(stderr=True, width=160))
        if result.check_passed is False:
            raise typer.Exit(1)


@app.command("passes")
def list_passes(as_json: ListJsonOpt = False) -> None:
    """List the graph passes, what each does, and which targets' pipelines use it."""
    from qwen_export.targets import pass_table

    emit(pass_table(), as_json)


@app.command("targets")
def list_targets(as_json: ListJsonOpt = False) -> None:
    """List the build targets: kind, what runs the artifact, the options each takes."""
    from qwen_export.targets import target_table

    emit(target_table(), as_json)


@app.command()
def presets(as_json: ListJsonOpt = False) -> None:
    """List the built-in presets."""
    from qwen_export.presets import preset_table

    emit(preset_table(), as_json)


@app.command()
@user_errors
def cache(
    area: Annotated[
        list[str] | None,
        typer.Option("--area", help="presets, exports, engines or kernels (repeatable); default: all."),
    ] = None,
    prune_older_than: Annotated[
        float | None, typer.Option(min=0, help="Remove entries unused for more than this many days.")
    ] = None,
    max_size: Annotated[
        float | None,
        typer.Option(
            min=0, help="Then remove the least recently used entries until the areas fit in this many GB."
        ),
    ] = None,
    clear: Annotated[bool, typer.Option(help="Remove every entry of the areas.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Say what would be removed; remove nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show what the cache holds (QWEN_EXPORT_CACHE, default ~/.cache/qwen-export) and free space.

    Without --clear, --prune-older-than or --max-size it only reports. Removed entries are rebuilt on
    next use."""
    from qwen_export.cache import prune

    result = prune(area, prune_older_than, max_size, clear, dry_run)
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        result.render(Console(), err)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


app.command()(plan)
app.add_typer(kernels_app, name="kernels")

if __name__ == "__main__":
    main()
