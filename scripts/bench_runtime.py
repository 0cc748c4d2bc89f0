"""Runtime benchmark (issue 6): decode speed and time to first token, and state memory against context.

Part 1, speed, for one checkpoint at batch 1 and 8 (same prompts, greedy, same thread count):
  - ours: `qwen_export.runtime.Session` over an artifact (an export or a build folder);
  - Hugging Face eager on the CPU (`generate`, fp32);
  - onnxruntime-genai running its own builder's model of the same checkpoint (in its own Python, since it
    pins its own onnxruntime), when `--genai-python` is given (its model is built now, or `--genai-model`).
Part 2, state memory and decode-step time against context length (1K .. 256K), for the hybrid model and a
same-size config whose every layer is full attention: memory is computed from the config for every
length; the step time is measured (random states of that length) up to `--measure-up-to`.

Writes benchmarks/runtime.json and benchmarks/runtime.md. Usage:
    .venv/bin/python scripts/bench_runtime.py --artifact out/small-ort [--genai-python P --genai-model DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from genai_peer import multimodal_copy, patch_for_ort, run_builder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONTEXTS = [1024, 4096, 16384, 65536, 262144]

GENAI_CHILD = r"""
import json, sys, time
import numpy as np
import onnxruntime_genai as og
model_dir = sys.argv[1]
batch, prompt_len, new_tokens, seed = (int(a) for a in sys.argv[2:6])
model = og.Model(model_dir)
rng = np.random.default_rng(seed)
ids = rng.integers(0, int(sys.argv[6]), size=(batch, prompt_len)).astype(np.int32)
def run():
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt_len + new_tokens, do_sample=False, batch_size=batch)
    gen = og.Generator(model, params)
    start = time.perf_counter()
    gen.append_tokens(ids)
    gen.generate_next_token()
    first = time.perf_counter()
    steps = 1
    while not gen.is_done() and steps < new_tokens:
        gen.generate_next_token()
        steps += 1
    end = time.perf_counter()
    return first - start, (steps - 1) * batch / (end - first)
run()
ttft, rate = run()
print(json.dumps({"time_to_first_token_s": ttft, "decode_tokens_per_s": rate}))
"""


def prompts(vocab: int, batch: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, size=(batch, length)).tolist()


def bench_ours(
    artifact: Path, batch: int, prompt_len: int, new_tokens: int, threads: int
) -> dict[str, float]:
    from qwen_export.runtime.session import Session

    session = Session.load(artifact, threads=threads)
    ids = prompts(session.backend.vocab_size, batch, prompt_len, seed=batch)
    session.generate(ids, 4)  # warm-up
    result = session.generate(ids, new_tokens)
    return {
        "time_to_first_token_s": result.time_to_first_token_s,
        "decode_tokens_per_s": result.decode_tokens_per_s,
    }


def isolated(bench: str, *args: Any) -> dict[str, float]:
    """Run `bench_ours` or `bench_hf` in a fresh Python process: runtimes in one process share its threads
    (PyTorch's OpenMP pool keeps spinning after HF eager and slows the ONNX Runtime run that follows)."""
    proc = subprocess.run(
        [sys.executable, __file__, "--child", bench, json.dumps([str(a) for a in args])],
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(bench: str, encoded: str) -> None:
    path, batch, prompt_len, new_tokens, threads = json.loads(encoded)
    fn = {"ours": bench_ours, "hf": bench_hf}[bench]
    print(json.dumps(fn(Path(path), int(batch), int(prompt_len), int(new_tokens), int(threads))))


def median_round(rounds: list[dict]) -> dict:
    """The round with the median decode rate (errors propagate when every round failed)."""
    ok = sorted((r for r in rounds if "decode_tokens_per_s" in r), key=lambda r: r["decode_tokens_per_s"])
    return {**ok[len(ok) // 2], "rounds": len(ok)} if ok else rounds[-1]


def bench_hf(model_dir: Path, batch: int, prompt_len: int, new_tokens: int, threads: int) -> dict[str, float]:
    import torch

    from qwen_export.golden.reference import load_reference

    torch.set_num_threads(threads)
    model = load_reference(model_dir)
    ids = torch.tensor(prompts(model.config.get_text_config().vocab_size, batch, prompt_len, seed=batch))
    kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
        start = time.perf_counter()
        model(input_ids=ids, use_cache=True)
        ttft = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        total = time.perf_counter() - start
    return {"time_to_first_token_s": ttft, "decode_tokens_per_s": (new_tokens - 1) * batch / (total - ttft)}


def bench_genai(
    python: str, model_dir: Path, batch: int, prompt_len: int, new_tokens: int, vocab: int
) -> dict:
    out = subprocess.run(
        [
            python,
            "-c",
            GENAI_CHILD,
            str(model_dir),
            str(batch),
            str(prompt_len),
            str(new_tokens),
            str(batch),
            str(vocab),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def state_bytes(spec, context: int, batch: int = 1, kv_bytes: int = 4) -> int:
    """Bytes of carried state at a context length: KV grows with context, DeltaNet state does not."""
    total = 0
    for kind in spec.layer_types:
        if kind == "full_attention":
            total += 2 * batch * spec.num_key_value_heads * context * spec.head_dim * kv_bytes
        else:
            total += batch * spec.conv_dim * (spec.linear_conv_kernel_dim - 1) * 4
            total += (
                batch
                * spec.linear_num_value_heads
                * spec.linear_key_head_dim
                * spec.linear_value_head_dim
                * 4
            )
    return total


def all_attention_folder(model_dir: Path, work: Path) -> Path:
    """The same config with every layer full attention (random weights): the dense-attention baseline."""
    import torch
    import transformers

    config = json.loads((model_dir / "config.json").read_text())
    config["layer_types"] = ["full_attention"] * config["num_hidden_layers"]
    cfg = transformers.AutoConfig.for_model(**config)
    torch.manual_seed(0)
    model = getattr(transformers, config["architectures"][0])(cfg)
    folder = work / "all-attention"
    model.save_pretrained(folder)
    return folder


def step_time_ms(model_path: Path, context: int, threads: int, repeats: int = 3) -> float:
    from qwen_export.runtime.ort_decoder import OrtDecoder

    decoder = OrtDecoder(model_path, optimize=True, threads=threads)
    states = decoder.empty_states(1)
    rng = np.random.default_rng(0)
    for k, v in states.items():
        shape = [
            context if d == 0 and i == 2 and k.endswith((".key", ".value")) else d
            for i, d in enumerate(v.shape)
        ]
        states[k] = rng.standard_normal(shape).astype(np.float32) * 0.1
    mask = np.ones((1, context + 1), np.int64)
    args = (np.array([[1]]), mask, np.array([[context]]), states)
    decoder.step(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        decoder.step(*args)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small-qwen3.5-moe")
    parser.add_argument("--artifact", type=Path, help="our artifact (default: export the preset now)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--genai-python")
    parser.add_argument("--genai-model", type=Path)
    parser.add_argument(
        "--int4-artifact",
        type=Path,
        help="our weight-only int4 artifact (`build --target ort-int4`), benched in the same rounds; with "
        "--genai-python, genai's own int4 model (`-p int4`) is built and benched too",
    )
    parser.add_argument(
        "--cpu-int4-artifact",
        type=Path,
        help="our int4 artifact on qwen-export's CPU kernels (`build --target ort-cpu-int4`), benched in the "
        "same rounds (genai's int4 model is its peer)",
    )
    parser.add_argument("--genai-int4-model", type=Path, help="an existing genai int4 model folder")
    parser.add_argument("--measure-up-to", type=int, default=65536)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of ours and genai")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "runtime.json")
    args = parser.parse_args()

    from qwen_export.exporter.export import export_model, load_model_source
    from qwen_export.presets import materialize

    model_dir = materialize(args.preset)
    _, spec, _ = load_model_source(model_dir)
    results: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "preset": args.preset,
        "threads": args.threads,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "speed": [],
        "context": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        artifact = args.artifact or export_model(work / "ours", preset=args.preset).out_dir
        results["artifact"] = str(artifact)
        genai_model = args.genai_model
        if args.genai_python and genai_model is None and not args.skip_speed:
            genai_model = work / "genai"
            built = run_builder(args.genai_python, multimodal_copy(args.preset, work / "mm"), genai_model)
            if "error" in built:
                raise SystemExit(f"onnxruntime-genai builder failed: {built['error']}")
            patch_for_ort(genai_model)
            results["genai_model"] = (
                "built now by onnxruntime_genai.models.builder (fp32, cpu); position_ids "
                "re-declared [B, T] so ONNX Runtime 1.31 loads it (see scripts/genai_peer.py)"
            )
        genai_int4 = args.genai_int4_model
        int4_ours = args.int4_artifact or args.cpu_int4_artifact
        if args.genai_python and int4_ours and genai_int4 is None and not args.skip_speed:
            genai_int4 = work / "genai-int4"
            built = run_builder(
                args.genai_python, multimodal_copy(args.preset, work / "mm"), genai_int4, precision="int4"
            )
            if "error" in built:
                raise SystemExit(f"onnxruntime-genai int4 builder failed: {built['error']}")
            patch_for_ort(genai_int4)
            results["genai_int4_model"] = "built now by onnxruntime_genai.models.builder (-p int4 -e cpu)"
        if args.int4_artifact:
            results["int4_artifact"] = str(args.int4_artifact)
        if args.cpu_int4_artifact:
            results["cpu_int4_artifact"] = str(args.cpu_int4_artifact)
        if not args.skip_speed:
            for batch in args.batches:
                row: dict[str, Any] = {"batch": batch}
                # Ours, genai and HF eager alternate over rounds (this machine is shared), each in its own
                # process; each keeps its median round.
                ours_models = {
                    "ours": artifact,
                    "ours_int4": args.int4_artifact,
                    "ours_cpu_int4": args.cpu_int4_artifact,
                }
                genai_models = {"genai": genai_model, "genai_int4": genai_int4}
                rounds: dict[str, list[dict[str, float]]] = {}
                for _ in range(args.rounds):
                    for name, path in ours_models.items():
                        if path:
                            rounds.setdefault(name, []).append(
                                isolated("ours", path, batch, args.prompt_len, args.new_tokens, args.threads)
                            )
                    for name, path in genai_models.items():
                        if args.genai_python and path:
                            rounds.setdefault(name, []).append(
                                bench_genai(
                                    args.genai_python,
                                    path,
                                    batch,
                                    args.prompt_len,
                                    args.new_tokens,
                                    spec.vocab_size,
                                )
                            )
                    rounds.setdefault("hf_eager", []).append(
                        isolated("hf", model_dir, batch, args.prompt_len, args.new_tokens, args.threads)
                    )
                for name, measured in rounds.items():
                    row[name] = median_round(measured)
                for ours_name, peer_name, key in (
                    ("ours", "hf_eager", "ours_vs_hf_decode"),
                    ("ours", "genai", "ours_vs_genai_decode"),
                    ("ours_int4", "hf_eager", "ours_int4_vs_hf_decode"),
                    ("ours_int4", "genai_int4", "ours_int4_vs_genai_int4_decode"),
                    ("ours_int4", "genai", "ours_int4_vs_genai_fp32_decode"),
                    ("ours_cpu_int4", "hf_eager", "ours_cpu_int4_vs_hf_decode"),
                    ("ours_cpu_int4", "genai_int4", "ours_cpu_int4_vs_genai_int4_decode"),
                    ("ours_cpu_int4", "genai", "ours_cpu_int4_vs_genai_fp32_decode"),
                ):
                    a, b = row.get(ours_name, {}), row.get(peer_name, {})
                    if "decode_tokens_per_s" in a and "decode_tokens_per_s" in b:
                        row[key] = a["decode_tokens_per_s"] / b["decode_tokens_per_s"]
                print(json.dumps(row), flush=True)
                results["speed"].append(row)

        dense_dir = all_attention_folder(model_dir, work)
        _, dense_spec, _ = load_model_source(dense_dir)
        hybrid_model = Path(artifact) / "model.onnx"
        dense_model = export_model(work / "dense", model_dir=dense_dir).model_path
        for context in CONTEXTS:
            row = {
                "context": context,
                "hybrid_state_mib": state_bytes(spec, context) / 2**20,
                "all_attention_state_mib": state_bytes(dense_spec, context) / 2**20,
            }
            row["state_ratio"] = row["all_attention_state_mib"] / row["hybrid_state_mib"]
            if context <= args.measure_up_to:
                row["hybrid_step_ms"] = step_time_ms(hybrid_model, context, args.threads)
                row["all_attention_step_ms"] = step_time_ms(dense_model, context, args.threads)
                row["step_speedup"] = row["all_attention_step_ms"] / row["hybrid_step_ms"]
            print(json.dumps(row), flush=True)
            results["context"].append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    args.out.with_suffix(".md").write_text(render_markdown(results))


def render_markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# Runtime benchmark: {r['preset']}",
        "",
        f"Command: `{r['command']}`  ",
        f"Date: {r['date']}, "
        f"{r['machine']['cpus']} CPUs, {r['threads']} threads, prompt {r['prompt_len']} tokens, "
        f"{r['new_tokens']} new tokens, greedy; fp32 unless the runtime says int4 "
        "(weight-only, block 32, int8 activations on CPU: ours `ort-int4` on ONNX Runtime's kernels, ours "
        "`ort-cpu-int4` on qwen-export's CPU kernels (plugins/ort_cpu), genai `-p int4`).",
        "",
    ]
    if r["speed"]:
        lines += ["| batch | runtime | time to first token (ms) | decode tokens/s |", "|---|---|---|---|"]
        for row in r["speed"]:
            for name in ("ours", "ours_int4", "ours_cpu_int4", "hf_eager", "genai", "genai_int4"):
                m = row.get(name)
                if not m:
                    continue
                if "error" in m:
                    lines.append(f"| {row['batch']} | {name} | failed: {m['error']} | |")
                    continue
                lines.append(
                    f"| {row['batch']} | {name} | {m['time_to_first_token_s'] * 1e3:.1f} | "
                    f"{m['decode_tokens_per_s']:.1f} |"
                )
            labels = {
                "ours_vs_hf_decode": "ours / HF eager",
                "ours_vs_genai_decode": "ours / onnxruntime-genai (fp32)",
                "ours_int4_vs_hf_decode": "ours int4 / HF eager",
                "ours_int4_vs_genai_int4_decode": "ours int4 / genai int4",
                "ours_int4_vs_genai_fp32_decode": "ours int4 / genai fp32",
                "ours_cpu_int4_vs_hf_decode": "ours cpu-int4 / HF eager",
                "ours_cpu_int4_vs_genai_int4_decode": "ours cpu-int4 / genai int4",
                "ours_cpu_int4_vs_genai_fp32_decode": "ours cpu-int4 / genai fp32",
            }
            ratio = "; ".join(f"{label}: {row[key]:.2f}x" for key, label in labels.items() if key in row)
            lines.append(f"| {row['batch']} | decode ratio | | {ratio} |")
        lines.append("")
    lines += [
        "| context | hybrid state (MiB) | all-attention state (MiB) | ratio | hybrid step (ms) | "
        "all-attention step (ms) | speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["context"]:
        measured = (
            f"{row['hybrid_step_ms']:.2f} | {row['all_attention_step_ms']:.2f} | {row['step_speedup']:.2f}x"
            if "hybrid_step_ms" in row
            else "not measured (computed only) | | "
        )
        lines.append(
            f"| {row['context']} | {row['hybrid_state_mib']:.1f} | {row['all_attention_state_mib']:.1f} | "
            f"{row['state_ratio']:.2f}x | {measured} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3])
        raise SystemExit(0)
    main()
