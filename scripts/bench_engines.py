"""Engine benchmark: TensorRT-RTX build time per stage and engine size per GPU target, the cached rebuild,
the MoE lowering's cost on ONNX Runtime CPU, and the precision policy's accuracy against the golden.

    .venv/bin/python scripts/bench_engines.py                 # tiny presets, bf16+fp16, sm80/sm89/sm120
    .venv/bin/python scripts/bench_engines.py --small         # also small-qwen3.5-moe (bf16, ~5 min)

Writes benchmarks/engines.json and benchmarks/engines.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qwen_export.engines.accuracy import RUNTIMES, emulate_in_fp32, evaluate
from qwen_export.engines.builder import build_engines
from qwen_export.engines.spec import DeploySpec
from qwen_export.engines.toolchain import TensorRTRtx
from qwen_export.exporter.export import export_model
from qwen_export.golden.store import load_golden, make_prompt, repo_golden_dir
from qwen_export.passes.lower_trt_rtx import LowerToTrtRtx
from qwen_export.passes.precision import Precision
from qwen_export.runtime.ort_decoder import OrtDecoder, positions_from_mask

ROOT = Path(__file__).resolve().parents[1]
TINY = ["tiny-qwen3.5-moe", "tiny-qwen3-next", "tiny-qwen3.5"]
SMALL = "small-qwen3.5-moe"
LIMITS = dict(max_batch=2, max_prompt=256, max_context=1024)
MOE_FORMS = ("dense", "gather", "hybrid")


def bench_builds(
    model: Path, preset: str, precisions: list[str], gpus: str, work: Path
) -> list[dict[str, Any]]:
    rows = []
    for precision in precisions:
        spec = DeploySpec.create(gpus, precision, **LIMITS)
        cache = work / f"cache-{preset}-{precision}"
        start = time.perf_counter()
        cold = build_engines(model, spec, work / f"out-{preset}-{precision}", cache_dir=cache)
        cold_s = time.perf_counter() - start
        start = time.perf_counter()
        warm = build_engines(model, spec, work / f"out-{preset}-{precision}-again", cache_dir=cache)
        warm_s = time.perf_counter() - start
        shared = {k: v for k, v in cold.timings_s.items() if not k.startswith("sm") and k != "total"}
        rows.append(
            {
                "preset": preset,
                "precision": precision,
                "limits": LIMITS,
                "shared_stages_s": shared,
                "engines": {
                    r.sm: {"bytes": r.bytes, "sha256": r.sha256[:16], "timings_s": r.timings_s}
                    for r in cold.engines
                },
                "cold_s": round(cold_s, 2),
                "cached_rebuild_s": round(warm_s, 3),
                "cached_rebuild_ratio": round(warm_s / cold_s, 4),
                "rebuilt_on_second_run": warm.built,
            }
        )
        print(f"{preset} {precision}: cold {cold_s:.1f} s, cached {warm_s:.2f} s", flush=True)
    return rows


def _best(fn, repeats: int) -> float:
    """Fastest of `repeats` runs after a warm-up: on a shared machine the minimum is the least noisy."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _latency(decoder: OrtDecoder, prompt: int) -> dict[str, float]:
    ids = make_prompt(decoder.vocab_size, prompt)
    mask = np.ones_like(ids)
    first = decoder.prefill(ids, mask)
    nxt = first.logits[:, -1].argmax(-1)[:, None]
    mask2 = np.concatenate([mask, np.ones_like(nxt)], axis=1)
    position = positions_from_mask(mask)[:, -1:] + 1
    return {
        "prefill_s": round(_best(lambda: decoder.prefill(ids, mask), 5), 4),
        "decode_step_s": round(_best(lambda: decoder.step(nxt, mask2, position, first.states), 30), 5),
    }


def bench_moe(model: Path, preset: str, work: Path, prompt: int = 200) -> dict[str, Any]:
    """ORT CPU (2 threads, fp32) latency of the MoE forms: dense (all experts), gathered top-k, hybrid."""
    out: dict[str, Any] = {"preset": preset, "runtime": "onnxruntime CPU fp32, 2 threads", "prompt": prompt}
    for moe in MOE_FORMS:
        graph = ir.load(model)
        lowering = LowerToTrtRtx(moe=moe)
        lowering(graph)
        path = work / f"moe-{preset}-{moe}" / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        ir.save(graph, path, external_data="model.onnx.data")
        out[moe] = {
            **_latency(OrtDecoder(path, optimize=True, threads=2), prompt),
            "gather_max_tokens": lowering.stats.get("gather_max_tokens") if moe == "hybrid" else None,
        }
        print(f"moe {preset} {moe}: {out[moe]}", flush=True)
    return out


def bench_accuracy(model: Path, preset: str, work: Path) -> list[dict[str, Any]]:
    rows = []
    golden = load_golden(repo_golden_dir(preset))
    for precision, runtime in (("fp16", RUNTIMES[0]), ("fp16", RUNTIMES[1]), ("bf16", RUNTIMES[1])):
        graph = ir.load(model)
        LowerToTrtRtx()(graph)
        Precision(precision)(graph)
        if runtime == "ort-cpu-emulated":
            emulate_in_fp32(graph)
        path = work / f"acc-{preset}-{precision}-{runtime}" / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        ir.save(graph, path, external_data="model.onnx.data")
        result = evaluate(path, golden, runtime, precision)
        rows.append({"preset": preset, **result.to_json()})
        print(f"accuracy {preset} {precision} {runtime}: top1 {result.top1_agreement:.4f}, "
              f"greedy {result.greedy_matching}/{result.greedy_tokens}", flush=True)  # fmt: skip
    return rows


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Engine builds (TensorRT-RTX, ahead of time on CPU)",
        "",
        f"Machine: {report['machine']}. TensorRT-RTX {report['trt_rtx']}. Limits: max_batch "
        f"{LIMITS['max_batch']}, max_prompt {LIMITS['max_prompt']}, max_context {LIMITS['max_context']}; "
        "two optimization profiles (prefill, decode). Produced by `scripts/bench_engines.py`.",
        "",
        "## Build time per stage and engine size per GPU target",
        "",
        "| preset | precision | passes s | save graph s | gpu | parse s | build s | engine MiB "
        "| cold total s | cached rebuild s (ratio) |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in report["builds"]:
        shared = row["shared_stages_s"]
        passes = sum(v for k, v in shared.items() if k.startswith("pass "))
        for i, (sm, e) in enumerate(row["engines"].items()):
            head = (
                [row["preset"], row["precision"], f"{passes:.2f}", f"{shared.get('save graph', 0):.2f}"]
                if i == 0
                else ["", "", "", ""]
            )
            tail = (
                [f"{row['cold_s']:.1f}", f"{row['cached_rebuild_s']:.2f} ({row['cached_rebuild_ratio']:.1%})"]
                if i == 0
                else ["", ""]
            )
            t = e["timings_s"]
            lines.append(
                "| "
                + " | ".join(
                    [*head, sm, f"{t['parse']:.2f}", f"{t['build']:.2f}", f"{e['bytes'] / 2**20:.1f}", *tail]
                )
                + " |"
            )
    lines += [
        "",
        "A cached rebuild checks the recorded digests of the model and engines (re-reading only changed",
        "files) and restores every engine from the engine cache (hard links);",
        "it runs no pass and no builder.",
        "",
        "## MoE lowering cost (ONNX Runtime CPU, fp32, 2 threads)",
        "",
        "`dense`: every expert on every token, unselected ones weighted by zero (the exporter's form). "
        "`gather`: each token's top-k experts' weights gathered and run as a batched matmul (only selected "
        "experts' work). `hybrid`: `If(tokens <= gather_max_tokens)` gather, else dense. The trt-rtx "
        "default (`auto`) is `gather` when max_batch x max_prompt tokens fit the gather budget (256 MiB), "
        "else `hybrid`.",
        "",
        "| preset | prompt | form | prefill s (best of 5) | decode step s (best of 30) | gather_max_tokens |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for row in report["moe"]:
        for form in MOE_FORMS:
            m = row[form]
            lines.append(
                f"| {row['preset']} | {row['prompt']} | {form} | {m['prefill_s']:.4f} "
                f"| {m['decode_step_s']:.5f} "
                f"| {m['gather_max_tokens'] or ''} |"
            )
    lines += [
        "",
        "## Precision policy against the golden (HF fp32 reference)",
        "",
        "| preset | precision | runtime | top-1 agreement | positions | max abs logit diff | greedy tokens |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in report["accuracy"]:
        lines.append(
            f"| {row['preset']} | {row['precision']} | {row['runtime']} | {row['top1_agreement']:.4f} "
            f"| {row['positions']} | {row['max_abs_logit_diff']:.4f} "
            f"| {row['greedy_matching']}/{row['greedy_tokens']} |"
        )
    lines += [
        "",
        "`ort-cpu-native`: the fp16 graph on ORT's CPU kernels. `ort-cpu-emulated`: ORT CPU has no bf16 "
        "kernels; every low-precision tensor is rounded through the low dtype and computed on in fp32 "
        "(qwen_export/engines/accuracy.py).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(TINY))
    parser.add_argument("--small", action="store_true", help=f"also {SMALL} (bf16 builds only)")
    parser.add_argument("--gpus", default="sm80,sm89,sm120")
    parser.add_argument("--precisions", default="bf16,fp16")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    args = parser.parse_args()
    ready, version = TensorRTRtx().available()
    if not ready:
        raise SystemExit(version)
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "trt_rtx": version,
        "builds": [],
        "moe": [],
        "accuracy": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as folder:
        work = Path(folder)
        presets = [p for p in args.presets.split(",") if p]
        for preset in presets + ([SMALL] if args.small else []):
            start = time.perf_counter()
            model = export_model(work / preset, preset=preset).model_path
            print(f"exported {preset} in {time.perf_counter() - start:.1f} s", flush=True)
            precisions = ["bf16"] if preset == SMALL else args.precisions.split(",")
            report["builds"] += bench_builds(model, preset, precisions, args.gpus, work)
            if "moe" in preset:
                report["moe"].append(bench_moe(model, preset, work))
            if preset in TINY:
                report["accuracy"] += bench_accuracy(model, preset, work)
            for child in work.glob(f"out-{preset}*"):  # engines of a finished preset: free the disk
                for f in child.rglob("*.engine"):
                    f.unlink()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "engines.json").write_text(json.dumps(report, indent=2))
    (args.out / "engines.md").write_text(markdown(report))
    print(f"wrote {args.out / 'engines.json'} and {args.out / 'engines.md'}")


if __name__ == "__main__":
    main()
