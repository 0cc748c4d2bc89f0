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
    help="Export Qwen3.5-family hybrid-attention MoE models to ONNX, checked against the PyTorch reference.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)

PresetOpt = Annotated[
    str | None,
    typer.Option("--preset", "-p", help="Built-in model with seeded random weights (see `presets`)."),
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
    multimodal: Annotated[
        bool,
        typer.Option(
            help="Also export the vision tower (vision.onnx) and embeddings (embed.onnx); the text graph "
            "then takes inputs_embeds and mRoPE position_ids [3, batch, sequence]. Multimodal checkpoints."
        ),
    ] = False,
) -> None:
    """Export the text tower to OUT/model.onnx (+ model.onnx.data) and OUT/export.json.

    One graph serves prefill and decode: inputs input_ids, attention_mask, position_ids and every
    past_key_values.* state; outputs logits and the matching present.* states. Batch, sequence and past
    length are dynamic.
    """
    from qwen_export.exporter.export import export_model

    with err.status("exporting…"):
        result = export_model(
            out,
            preset=preset,
            model_dir=model,
            debug_hidden_states=debug_hidden_states,
            multimodal=multimodal,
            log=_log,
        )
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
    artifact: Annotated[
        Path, typer.Argument(help="An export or build folder (holding model.onnx) or a .onnx file.")
    ],
    golden_dir: Annotated[
        Path, typer.Option("--golden", "-g", help="Golden folder from `qwen-export golden`.")
    ],
    tolerance: Annotated[float, typer.Option(help="Max |Δ| allowed on logits and states (fp32).")] = 2e-4,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Run the artifact on ONNX Runtime CPU against golden outputs; exit 1 if anything is out of tolerance."""
    from qwen_export.golden.store import load_golden
    from qwen_export.validate import render, validate_onnx

    model_path = artifact / "model.onnx" if artifact.is_dir() else artifact
    if not model_path.is_file():
        raise QwenExportError(f"{model_path}: no such model; pass a folder written by `qwen-export export`")
    manifest = artifact / "manifest.json"
    if manifest.is_file():
        from qwen_export.tolerances import artifact_precision

        precision = artifact_precision(json.loads(manifest.read_text()))
        if precision != "fp32":
            raise QwenExportError(
                f"{artifact}: a {precision} artifact; validate holds fp32 artifacts to 2e-4 and identical "
                f"greedy tokens. Use `qwen-export diff {artifact}`, which applies the {precision} tolerances"
            )
    golden_data = load_golden(golden_dir)
    with err.status("validating…"):
        report = validate_onnx(model_path, golden_data, tolerance)
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        render(report)
    raise typer.Exit(0 if report.passed else 1)


@app.command()
@user_errors
def run(
    artifact: Annotated[Path, typer.Argument(help="An artifact folder from `export` or `build`.")],
    prompt: Annotated[
        str | None, typer.Option(help="Text prompt (needs the checkpoint's tokenizer.json).")
    ] = None,
    ids: Annotated[str | None, typer.Option(help="Comma-separated token ids, e.g. 1,2,3.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate.")] = 32,
    greedy: Annotated[bool, typer.Option("--greedy/--sample", help="Greedy decoding or sampling.")] = True,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k most likely tokens (0 = all).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1.0 = off).")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    stop: Annotated[str | None, typer.Option(help="Comma-separated stop token ids.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print ids, text and timings as JSON.")] = False,
    image: Annotated[
        list[Path] | None, typer.Option(help="Image file (repeatable); needs a multimodal export.")
    ] = None,
    video: Annotated[
        list[str] | None, typer.Option(help="A short video as comma-separated frame files (repeatable).")
    ] = None,
) -> None:
    """Generate from an artifact, streaming tokens as they come (text, or images/video with a prompt)."""
    from qwen_export.runtime.sampling import SamplingConfig
    from qwen_export.runtime.session import Session

    if (prompt is None) == (ids is None):
        raise QwenExportError("pass exactly one of --prompt TEXT or --ids 1,2,3")
    try:
        sampling = SamplingConfig(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        token_ids = [int(t) for t in ids.split(",")] if ids is not None else None
        stop_ids = [int(t) for t in stop.split(",")] if stop else []
    except ValueError as e:
        raise QwenExportError(str(e)) from None
    if image or video:
        if prompt is None:
            raise QwenExportError("images and videos go with --prompt TEXT (the processor places them)")
        # No --stop means the tokenizer's end-of-sequence token (None), not "never stop".
        _run_multimodal(
            artifact,
            prompt,
            image or [],
            video or [],
            max_new_tokens,
            sampling,
            stop_ids if stop else None,
            as_json,
        )
        return
    session = Session.load(artifact)
    token_ids = token_ids if token_ids is not None else session.encode(prompt)
    timings: dict[str, float] = {}
    generated: list[int] = []
    for step in session.stream([token_ids], max_new_tokens, sampling, stop_ids, timings):
        generated.append(int(step[0]))
        if not as_json:
            piece = session.tokenizer.decode([generated[-1]]) if session.tokenizer else f"{generated[-1]} "
            print(piece, end="", flush=True)
    decode_s = timings["decode_end"] - timings["decode_start"]
    rate = (len(generated) - 1) / decode_s if decode_s > 0 and len(generated) > 1 else 0.0
    if as_json:
        text = session.tokenizer.decode(generated) if session.tokenizer else None
        print(
            json.dumps(
                {
                    "prompt_ids": token_ids,
                    "ids": generated,
                    "text": text,
                    "backend": session.backend.name,
                    "time_to_first_token_s": round(timings["time_to_first_token_s"], 6),
                    "decode_tokens_per_s": round(rate, 2),
                }
            )
        )
    else:
        print()
        err.print(
            f"[dim]{len(generated)} tokens · first token {timings['time_to_first_token_s'] * 1e3:.1f} ms · "
            f"decode {rate:.1f} tokens/s · {session.backend.name}[/dim]"
        )


def _run_multimodal(artifact, prompt, images, videos, max_new_tokens, sampling, stop_ids, as_json) -> None:
    from qwen_export.runtime.multimodal import run_multimodal

    frames = [[Path(f) for f in v.split(",")] for v in videos]
    with err.status("running…"):
        result = run_multimodal(
            artifact,
            prompt,
            images=images,
            videos=frames,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            stop_tokens=stop_ids,
        )
    if as_json:
        print(
            json.dumps(
                {
                    "ids": result.tokens,
                    "text": result.text,
                    "prompt_tokens": result.prompt_tokens,
                    "time_to_first_token_s": round(result.time_to_first_token_s, 6),
                    "decode_tokens_per_s": round(result.decode_tokens_per_s, 2),
                }
            )
        )
    else:
        print(result.text)
        err.print(
            f"[dim]{len(result.tokens)} tokens · first token {result.time_to_first_token_s * 1e3:.1f} ms · "
            f"decode {result.decode_tokens_per_s:.1f} tokens/s[/dim]"
        )


@app.command()
@user_errors
def diff(
    artifact: Annotated[Path, typer.Argument(help="An ONNX artifact folder from `export` or `build`.")],
    against: Annotated[
        Path | None,
        typer.Option(
            help="A golden folder, or a checkpoint folder to run the reference on (default: the source)."
        ),
    ] = None,
    per_layer: Annotated[
        bool, typer.Option(help="Compare every decoder layer's output; name the first bad one.")
    ] = False,
    per_pass: Annotated[
        bool,
        typer.Option(help="Rebuild with a check after every pass; name the first pass out of tolerance."),
    ] = False,
    report: Annotated[Path | None, typer.Option(help="Write the JSON report here.")] = None,
    save_outputs: Annotated[
        Path | None,
        typer.Option(
            help="Write our outputs as Polygraphy RunResults (for `polygraphy run --load-outputs`)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Accuracy against the reference: max/mean |Δ|, cosine, top-1/top-5 agreement, KL, greedy agreement.

    Exit code 1 when the artifact is out of its precision's tolerance (the report states which were used).
    """
    from qwen_export.diff import diff_artifact, save_polygraphy_outputs

    with err.status("comparing with the reference…"):
        result = diff_artifact(artifact, against, per_layer=per_layer, per_pass=per_pass)
    payload = result.to_json()
    if report is not None:
        report.write_text(json.dumps(payload, indent=2))
    if save_outputs is not None:
        save_polygraphy_outputs(artifact, save_outputs)
    if as_json:
        print(json.dumps(payload, indent=2))
    else:
        table = Table(
            "check",
            "max |Δ|",
            "mean |Δ|",
            "cos min",
            "top-1",
            "top-5",
            "KL mean",
            title=f"{artifact} vs {result.against} ({result.precision}: {result.tolerances})",
        )
        for name, m in result.prefill.items():
            table.add_row(
                name,
                f"{m['max_abs']:.2e}",
                f"{m['mean_abs']:.2e}",
                f"{m['cosine_min']:.6f}",
                f"{m['top1_agreement']:.1%}",
                f"{m['top5_agreement']:.1%}",
                f"{m['kl_mean']:.2e}",
            )
        Console().print(table)
        Console().print(f"greedy agreement: {result.greedy_agreement}/{result.greedy_tokens} tokens")
        for layer in result.layers:
            mark = "ok" if layer["ok"] else "[red]OUT OF TOLERANCE[/red]"
            Console().print(
                f"layer {layer['layer']:>3}: max |Δ| {layer['max_abs']:.2e} (rel {layer['rel']:.1e}) {mark}"
            )
        for stage in result.passes:
            mark = "ok" if stage["ok"] else "[red]OUT OF TOLERANCE[/red]"
            Console().print(
                f"pass {stage['stage']:<28} vs reference {stage['max_vs_reference'] or 0:.2e} {mark}"
            )
        if result.first_bad_layer is not None:
            Console().print(f"[bold red]first layer out of tolerance: {result.first_bad_layer}[/bold red]")
        if result.first_bad_pass is not None:
            Console().print(f"[bold red]first pass out of tolerance: {result.first_bad_pass}[/bold red]")
    raise typer.Exit(0 if result.passed else 1)


@app.command()
@user_errors
def profile(
    artifact: Annotated[Path, typer.Argument(help="An ONNX artifact folder from `export` or `build`.")],
    prompt_tokens: Annotated[int, typer.Option(min=1, help="Prompt length for the prefill phase.")] = 65,
    decode_steps: Annotated[int, typer.Option(min=1, help="Decode steps to time.")] = 16,
    report: Annotated[Path | None, typer.Option(help="Write the JSON report here.")] = None,
    chart: Annotated[Path | None, typer.Option(help="Write a PNG chart of time per layer here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Latency per decoder layer and per op type for prefill and decode (p50/p90 step), and per build pass."""
    from qwen_export.profile import profile_artifact, render_chart

    with err.status("profiling…"):
        result = profile_artifact(artifact, prompt_tokens, decode_steps)
    payload = result.to_json()
    if report is not None:
        report.write_text(json.dumps(payload, indent=2))
    if chart is not None:
        render_chart(result, chart)
    if as_json:
        print(json.dumps(payload, indent=2))
        return
    console = Console()
    for name, phase in result.phases.items():
        console.print(
            f"[bold]{name}[/bold]: step p50 {phase.step_ms_p50:.2f} ms, p90 {phase.step_ms_p90:.2f} ms "
            f"({result.runtime})"
        )
        table = Table("part", "ms / step", "share")
        for part, ms in phase.per_layer_ms.items():
            table.add_row(part, f"{ms:.3f}", f"{ms / phase.attributed_ms_mean:.0%}")
        console.print(table)
        top = ", ".join(f"{op} {ms:.2f}" for op, ms in list(phase.per_op_type_ms.items())[:6])
        console.print(f"[dim]by op type (ms): {top}[/dim]")
    if result.passes:
        table = Table("pass", "wall s", "peak RSS rise (MiB)", "top-level nodes", title="build passes")
        for rec in result.passes:
            before, after = rec.get("nodes_before", {}), rec.get("nodes_after", {})
            table.add_row(
                str(rec.get("name")),
                f"{rec.get('wall_s', 0):.3f}",
                f"{rec.get('peak_rss_rise_mib', 0):.1f}",
                f"{before.get('graph', '?')} → {after.get('graph', '?')}",
            )
        console.print(table)


TargetOpt = Annotated[
    str,
    typer.Option(
        "--target",
        "-t",
        help="onnx (standard ops), ort (ORT contrib ops), ort-int4 / ort-int8 (ort with weight-only "
        "MatMulNBits/QMoE), ort-cpu-int4 (int4 on qwen-export's CPU kernels; the fastest CPU decode), "
        "fused (qwen ops), trt-plugins (ONNX with our "
        "TensorRT plugin nodes); engines: trt-rtx (TensorRT-RTX, built here for sm80/86/89/120) or trt "
        "(full TensorRT + plugins, built on the GPU).",
    ),
]
CheckOpt = Annotated[
    bool,
    typer.Option(help="Run every stage in ONNX Runtime against the golden reference and the previous stage."),
]
GoldenOpt = Annotated[
    Path | None, typer.Option("--golden", help="Golden folder for --check (default: the preset's).")
]


def _fmt_delta(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def _top_changes(delta: dict[str, int], n: int = 2) -> str:
    items = list(delta.items())
    text = ", ".join(f"{op} {count:+d}" for op, count in items[:n])
    return text + (f" (+{len(items) - n})" if len(items) > n else "")


def _pass_table(records) -> Table:
    headers = ["#", "pass", "time", "nodes", "in fns", "op changes", "fired", "|Δ| prev", "|Δ| golden"]
    table = Table(*headers, "", title="passes")
    for column in table.columns:
        column.no_wrap = True
    for i, r in enumerate(records, 1):
        fired = ", ".join(f"{op}×{n}" for op, n in r.stats.get("fired", {}).items() if n)
        num = r.numerics
        verdict = "" if num is None else ("[green]ok[/green]" if num.within_tolerance else "[red]FAIL[/red]")
        table.add_row(
            str(i),
            r.name,
            f"{r.wall_s:.2f}s",
            f"{r.nodes_before['graph']}→{r.nodes_after['graph']}",
            str(r.nodes_after["functions"]),
            _top_changes(r.ops_delta),
            fired,
            _fmt_delta(num.max_vs_previous if num else None),
            _fmt_delta(num.max_vs_golden if num else None),
            verdict,
        )
    return table


def _stage_tolerances(report) -> str:
    """'2e-4' or, where a pass changed the precision, '2e-4, then 1 from quantize-weights on'."""
    parts, current = [], None
    for record in [r for r in report.records if r.numerics is not None]:
        if record.numerics.tolerance != current:
            current = record.numerics.tolerance
            parts.append(f"{current:g}" if not parts else f"then {current:g} from {record.name} on")
    return ", ".join(parts) or f"{report.tolerance:g}"


@app.command()
@user_errors
def build(
    out: OutOpt,
    preset: PresetOpt = None,
    model: ModelOpt = None,
    target: TargetOpt = "onnx",
    check: CheckOpt = False,
    golden: GoldenOpt = None,
    gpu: Annotated[
        str | None,
        typer.Option(
            help="Engine targets: sm80, sm86, sm89, sm90, sm100, sm120 or names (a100, h100, h200, ...)."
        ),
    ] = None,
    precision: Annotated[str | None, typer.Option(help="Engine precision: bf16 (default) or fp16.")] = None,
    max_batch: Annotated[int | None, typer.Option(help="Engine profiles: largest batch.")] = None,
    max_prompt: Annotated[int | None, typer.Option(help="Engine profiles: longest prompt (prefill).")] = None,
    max_context: Annotated[
        int | None, typer.Option(help="Engine profiles: longest context (decode).")
    ] = None,
    spec: Annotated[
        Path | None, typer.Option(help="Deployment spec file (JSON or TOML); flags override.")
    ] = None,
    workspace: Annotated[int | None, typer.Option(help="Builder workspace limit in MiB.")] = None,
    opt_level: Annotated[int, typer.Option(min=0, max=5, help="Builder optimization level.")] = 3,
    version_compatible: Annotated[
        bool, typer.Option(help="Version-compatible engines (lean runtime).")
    ] = False,
    hardware_compatibility: Annotated[
        str, typer.Option(help="trt only: none, ampere_plus or same_compute_capability.")
    ] = "none",
    timing_cache: Annotated[
        Path | None, typer.Option(help="Timing cache file shared between builds.")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the engine build plan and stop.")] = False,
) -> None:
    """Export, run the pass pipeline for TARGET and write OUT/model.onnx (+ data), manifest.json, passes.json;
    for engine targets, OUT/engines/<gpu>/model.engine and a manifest fingerprinting everything that went in.

    With --check, each stage runs in ONNX Runtime (optimizations off) on fixed prompts; the command names
    the first pass whose logits or states leave tolerance (2e-4) and exits with code 1. Unchanged engine
    rebuilds come from the engine cache.
    """
    if target in ENGINE_TARGETS:
        _build_engines(
            out,
            preset,
            model,
            target,
            gpu,
            precision,
            max_batch,
            max_prompt,
            max_context,
            spec,
            workspace,
            opt_level,
            version_compatible,
            hardware_compatibility,
            timing_cache,
            dry_run,
        )
        return
    if gpu or precision or dry_run:
        raise QwenExportError(
            f"--gpu, --precision and --dry-run are for engine targets ({', '.join(ENGINE_TARGETS)})"
        )
    from rich import progress as rp

    from qwen_export.build import build as build_artifact
    from qwen_export.passes.base import pass_name
    from qwen_export.passes.pipeline import pipeline

    total = len(pipeline(target))
    columns = (
        rp.SpinnerColumn(),
        rp.TextColumn("{task.description}"),
        rp.BarColumn(),
        rp.MofNCompleteColumn(),
        rp.TimeElapsedColumn(),
    )
    with rp.Progress(*columns, console=err, transient=True) as progress:
        task = progress.add_task("exporting", total=total)

        def on_start(i: int, p) -> None:
            progress.update(task, description=f"{pass_name(p)}" + (" (+ check)" if check else ""))

        def on_end(i: int, record) -> None:
            progress.advance(task)

        result = build_artifact(
            out,
            preset=preset,
            model_dir=model,
            target=target,
            check=check,
            golden_dir=golden,
            on_pass_start=on_start,
            on_pass_end=on_end,
            log=_log,
        )
    # Piped output gets a wide table rather than one squeezed to 80 columns.
    (err if err.is_terminal else Console(stderr=True, width=160)).print(_pass_table(result.report.records))
    m = result.manifest
    err.print(
        f"[green]wrote[/green] {result.model_path} (target {target}, {m['graph']['nodes']['graph']} nodes, "
        f"{m['timings_s']['total']:.1f} s, peak RSS {m['peak_rss_mib']:.0f} MiB)",
        highlight=False,
    )
    report = result.report
    if result.check_passed is False:
        err.print(
            f"[bold red]check failed:[/bold red] first stage out of tolerance: {report.first_failure} "
            f"(see {result.out_dir / 'passes.json'})",
            highlight=False,
        )
        raise typer.Exit(1)
    if result.check_passed:
        err.print(
            "[green]check passed[/green]: every stage within its tolerance "
            f"({_stage_tolerances(report)}) of the golden reference and of the previous stage",
            highlight=False,
        )


ENGINE_TARGETS = ("trt-rtx", "trt")


def _build_engines(
    out,
    preset,
    model,
    target,
    gpu,
    precision,
    max_batch,
    max_prompt,
    max_context,
    spec_file,
    workspace,
    opt_level,
    version_compatible,
    hardware_compatibility,
    timing_cache,
    dry_run,
) -> None:
    from qwen_export.engines.api import build_engine_artifact, deploy_spec
    from qwen_export.exporter.export import cached_export
    from qwen_export.fsutil import check_writable_parent

    # Everything that can be wrong with the request is reported before any work.
    deploy = deploy_spec(
        gpu=gpu,
        precision=precision,
        max_batch=max_batch,
        max_prompt=max_prompt,
        max_context=max_context,
        target=target,
        workspace_mib=workspace,
        spec_file=spec_file,
    )
    check_writable_parent(Path(out))
    with err.status("exporting…"):
        exported = cached_export(preset=preset, model_dir=model, log=_log)
    build_engine_artifact(
        exported,
        deploy,
        out,
        dry_run=dry_run,
        console=err,
        opt_level=opt_level,
        version_compatible=version_compatible,
        hardware_compatibility=hardware_compatibility,
        timing_cache=timing_cache,
    )


@app.command("passes")
def list_passes(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List the graph passes, what each does, and which targets' pipelines use it."""
    from qwen_export.errors import QwenExportError as _Err
    from qwen_export.passes.base import pass_name, pass_summary
    from qwen_export.passes.pipeline import TARGETS, catalog, pipeline

    used: dict[str, list[str]] = {}
    for target in TARGETS:
        try:
            names = {pass_name(p) for p in pipeline(target)}
        except _Err:
            continue
        for name in names:
            used.setdefault(name, []).append(target)
    rows = [(pass_name(cls), pass_summary(cls), used.get(pass_name(cls), [])) for cls in catalog()]
    if as_json:
        print(json.dumps([{"name": n, "summary": s, "targets": t} for n, s, t in rows]))
        return
    table = Table("pass", "what it does", "targets")
    for name, summary, targets in rows:
        table.add_row(name, summary, ", ".join(targets) or "(optional)")
    Console().print(table)


@app.command()
def presets(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List the built-in presets."""
    from qwen_export.presets import PRESETS

    if as_json:
        print(
            json.dumps(
                {
                    n: {"architecture": p.architecture, "description": p.description}
                    for n, p in PRESETS.items()
                }
            )
        )
        return
    table = Table("preset", "architecture", "description")
    for name, p in PRESETS.items():
        table.add_row(name, p.architecture, p.description)
    Console().print(table)


@app.command()
@user_errors
def cache(
    area: Annotated[
        list[str] | None,
        typer.Option("--area", help="presets, exports or engines (repeatable); default: all three."),
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
    from qwen_export import cache as cache_lib

    areas = area or list(cache_lib.AREAS)
    found = cache_lib.entries(areas)
    pruning = clear or prune_older_than is not None or max_size is not None
    if clear and (prune_older_than is not None or max_size is not None):
        raise QwenExportError("--clear removes everything; drop --prune-older-than/--max-size, or --clear")
    chosen = []
    if pruning:
        max_bytes = None if max_size is None else int(max_size * 1e9)
        chosen = cache_lib.select_for_removal(found, prune_older_than, max_bytes) if not clear else found
    freed = 0 if dry_run else cache_lib.remove(chosen)
    if as_json:
        print(
            json.dumps(
                {
                    "root": str(cache_lib.cache_root()),
                    "entries": [e.to_json() for e in found],
                    "removed" if not dry_run else "would_remove": [e.to_json() for e in chosen],
                    "freed_bytes": freed,
                },
                indent=2,
            )
        )
        return
    table = Table("area", "entries", "size", "least recently used", title=str(cache_lib.cache_root()))
    now = time.time()
    for name in areas:
        mine = [e for e in found if e.area == name]
        oldest = f"{(now - mine[0].last_used) / 86400:.1f} days ago" if mine else ""
        table.add_row(name, str(len(mine)), f"{sum(e.bytes for e in mine) / 1e9:.2f} GB", oldest)
    Console().print(table)
    if pruning:
        verb = "would remove" if dry_run else "removed"
        size = sum(e.bytes for e in chosen) / 1e9
        err.print(f"{verb} {len(chosen)} entries ({size:.2f} GB)", highlight=False)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
