"""Quality benchmark on the trained reference model: what each precision costs on real held-out text.

For every precision the toolkit deploys, the trained model (golden/trained-qwen3.5-moe) is exported or built
and scored on its held-out text (golden/perplexity.py's windows) against transformers in fp32 on the same
checkpoint: held-out perplexity and its change, next-token (top-1) agreement and mean KL(reference || ours)
per token (qwen_export/quality.py, what `qwen-export diff --text` reports). Rows:

- fp32, bf16, fp16: `export --dtype` (ONNX Runtime CPU runs bf16 emulated: each bf16 result rounded);
- int8, int4: the `ort-int8`, `ort-int4` and `ort-cpu-int4` builds (weight-only, block 32);
- fp8: the checkpoint quantized to Qwen's FP8 layout (128x128 block scales), exported with its e4m3 weights
  kept (`--weights fp8`), scored against the unquantized model: the cost of the FP8 release itself;
- trt-rtx fp16 / bf16: the TensorRT-RTX lowering under the engine precision policy, emulated on the CPU as
  the engine accuracy checks run it (fp16 natively, bf16 rounded through bf16 after every op).

Writes benchmarks/quality.json and benchmarks/quality.md.

    .venv/bin/python scripts/bench_quality.py [--model golden/trained-qwen3.5-moe] [--windows 16]
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from bench_common import REPO, produced_by, provenance, shown, write_results


def _exported(model_dir: Path, work: Path, dtype: str) -> Callable[[np.ndarray], np.ndarray]:
    from qwen_export.exporter.export import export_model
    from qwen_export.runtime.ort_decoder import OrtDecoder

    decoder = OrtDecoder(export_model(work / f"export-{dtype}", model_dir=model_dir, dtype=dtype).model_path)
    return lambda ids: decoder.prefill(ids).logits


def _built(model_dir: Path, work: Path, target: str) -> Callable[[np.ndarray], np.ndarray]:
    from qwen_export.build import build
    from qwen_export.runtime.ranks import open_decoder

    result = build(work / target, model_dir=model_dir, target=target)
    decoder = open_decoder(result.out_dir / "model.onnx")
    return lambda ids: decoder.prefill(ids).logits


def _fp8(model_dir: Path, work: Path) -> Callable[[np.ndarray], np.ndarray]:
    from qwen_export.exporter.export import export_model
    from qwen_export.fp8_checkpoint import quantize_checkpoint
    from qwen_export.runtime.ort_decoder import OrtDecoder

    fp8_dir = work / "fp8-checkpoint"
    quantize_checkpoint(model_dir, fp8_dir)
    export = export_model(work / "export-fp8", model_dir=fp8_dir, dtype="fp32", weights="fp8")
    decoder = OrtDecoder(export.model_path)
    return lambda ids: decoder.prefill(ids).logits


def _engine(model_dir: Path, work: Path, precision: str) -> Callable[[np.ndarray], np.ndarray]:
    import onnx_ir as ir

    from qwen_export.engines.accuracy import LowPrecisionDecoder, emulate_in_fp32
    from qwen_export.exporter.export import export_model
    from qwen_export.passes.lower_trt_rtx import LowerToTrtRtx
    from qwen_export.passes.precision import Precision

    source = work / "export-fp32-main"
    if not source.exists():
        export_model(source, model_dir=model_dir, draft=False)
    model = ir.load(source / "model.onnx")
    LowerToTrtRtx()(model)
    Precision(precision)(model)
    if precision == "bf16":
        emulate_in_fp32(model)
    folder = work / f"trt-rtx-{precision}"
    folder.mkdir()
    ir.save(model, folder / "model.onnx", external_data="model.onnx.data")
    decoder = LowPrecisionDecoder(folder / "model.onnx")
    return lambda ids: decoder.prefill(ids)[0]


ROWS: list[tuple[str, str, Callable]] = [
    ("fp32", "export --dtype fp32", lambda m, w: _exported(m, w, "fp32")),
    ("bf16", "export --dtype bf16 (ORT CPU, emulated)", lambda m, w: _exported(m, w, "bf16")),
    ("fp16", "export --dtype fp16", lambda m, w: _exported(m, w, "fp16")),
    ("int8", "build --target ort-int8", lambda m, w: _built(m, w, "ort-int8")),
    ("int4", "build --target ort-int4", lambda m, w: _built(m, w, "ort-int4")),
    ("int4", "build --target ort-cpu-int4", lambda m, w: _built(m, w, "ort-cpu-int4")),
    ("fp8", "FP8 checkpoint, export --weights fp8", _fp8),
    ("fp16", "trt-rtx lowering + fp16 policy (ORT CPU native fp16)", lambda m, w: _engine(m, w, "fp16")),
    ("bf16", "trt-rtx lowering + bf16 policy (ORT CPU, emulated)", lambda m, w: _engine(m, w, "bf16")),
]


def render(result: dict) -> str:
    r = result
    lines = [
        "# Quality on the trained reference model, per precision",
        "",
        f"{produced_by(r)} Model: {r['model']}. Text: {r['text']}, "
        f"{r['windows']} windows of {r['window']} tokens ({r['predicted_tokens']} predicted), each from an "
        "empty cache. Reference: transformers in fp32 on the unquantized checkpoint, held-out perplexity "
        f"{r['reference_perplexity']:.4f}. ONNX Runtime CPU, graph optimizations off (the trt-rtx rows run "
        "as the engine accuracy checks do, qwen_export/engines/accuracy.py).",
        "",
        "| precision | how | perplexity | Δ perplexity | top-1 agreement | KL mean (nats) |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['precision']} | {row['how']} | {row['perplexity']:.4f} | "
            f"{row['perplexity'] / row['reference_perplexity'] - 1:+.3%} | {row['top1_agreement']:.2%} | "
            f"{row['kl_mean']:.2e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=REPO / "golden" / "trained-qwen3.5-moe")
    parser.add_argument("--text", type=Path, default=None, help="Default: the model's heldout.txt.")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks")
    args = parser.parse_args()
    text = args.text or args.model / "heldout.txt"

    from qwen_export.quality import compare_on_windows, reference_logits, text_windows

    batch, _ = text_windows(args.model, text, args.windows)
    references = reference_logits(args.model, batch)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as work:
        for precision, how, make in ROWS:
            metrics = compare_on_windows(make(args.model, Path(work)), batch, references)
            rows.append({"precision": precision, "how": how, **metrics})
            print(f"{precision:5} {how}: {metrics}", flush=True)
    result = {
        **provenance(),
        "model": shown(args.model),
        "text": shown(text),
        "windows": int(batch.shape[0]),
        "window": int(batch.shape[1]),
        "predicted_tokens": int(batch.shape[0] * (batch.shape[1] - 1)),
        "reference_perplexity": rows[0]["reference_perplexity"],
        "rows": rows,
    }
    write_results(args.results, "quality", result, render)


if __name__ == "__main__":
    main()
