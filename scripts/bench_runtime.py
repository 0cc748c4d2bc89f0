"""Runtime benchmark (issue 6): decode speed and time to first token, and state memory against context.

Part 1, speed, for one checkpoint at batch 1 and 8 (same prompts, greedy, same thread count):
  - ours: `qwen_export.runtime.Session` over an artifact (an export or a build folder);
  - Hugging Face eager on the CPU (`generate`, fp32);
  - onnxruntime-genai running its own builder's model of the same checkpoint (in its own Python, since it
    pins its own onnxruntime), when `--genai-python` is given (its model is built now, or `--genai-model`).
  - llama.cpp (llama-cpp-python built from source, `scripts/setup_llama_env.sh`) on the same checkpoint
    converted to GGUF f32 / Q8_0 / Q4_0, when `--llama-python` is given (batch 1 only; in its own Python,
    scripts/llama_peer.py). Then every runtime is measured cold (first generation in a fresh process) and
    warm (a second one), ours f32 / int8 / cpu-int4 against llama.cpp f32 / Q8_0 / Q4_0; the GGUF's greedy
    tokens and logits are checked against the Hugging Face reference and ours; `--profile` adds a per-op
    profile of ours (`qwen-export profile`) beside llama.cpp's (a ggml eval callback).
Part 2, state memory and decode-step time against context length (1K .. 256K), for the hybrid model and a
same-size config whose every layer is full attention: memory is computed from the config for every
length; the step time is measured (random states of that length) up to `--measure-up-to`.

Writes benchmarks/runtime.json and benchmarks/runtime.md. Usage:
    .venv/bin/python scripts/bench_runtime.py --artifact out/small-ort [--genai-python P --genai-model DIR]
    .venv/bin/python scripts/bench_runtime.py --artifact out/small-ort --int8-artifact out/small-ort-int8 \
        --cpu-int4-artifact out/small-ort-cpu-int4 --llama-python .venv-llama/bin/python --batches 1 --profile
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
from bench_common import provenance  # noqa: E402
from genai_peer import multimodal_copy, patch_for_ort, run_builder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LLAMA_PEER = REPO / "scripts" / "llama_peer.py"
LLAMA_TYPES = ("f32", "q8_0", "q4_0")
# ours vs llama.cpp at matching precision (weight-only int4 / int8, block 32, against Q4_0 / Q8_0)
LLAMA_PAIRS = (
    ("ours", "llama_f32"),
    ("ours_int8", "llama_q8_0"),
    ("ours_int4", "llama_q4_0"),
    ("ours_cpu_int4", "llama_q4_0"),
)
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
    artifact: Path, batch: int, prompt_len: int, new_tokens: int, threads: int, cold: bool = False
) -> dict[str, Any]:
    """Warm: a generation after a 4-token warm-up. With `cold`, the warm-up is the full generation, timed
    as `cold` (the first use after loading, as llama_peer.py measures llama.cpp), and greedy tokens come
    back."""
    from qwen_export.runtime.session import Session

    start = time.perf_counter()
    session = Session.load(artifact, threads=threads)
    load_s = time.perf_counter() - start
    ids = prompts(session.backend.vocab_size, batch, prompt_len, seed=batch)
    first = session.generate(ids, new_tokens if cold else 4)  # cold run, or warm-up
    result = session.generate(ids, new_tokens)
    out: dict[str, Any] = {
        "time_to_first_token_s": result.time_to_first_token_s,
        "decode_tokens_per_s": result.decode_tokens_per_s,
    }
    if cold:
        out["cold"] = {
            "time_to_first_token_s": first.time_to_first_token_s,
            "decode_tokens_per_s": first.decode_tokens_per_s,
        }
        out["tokens"] = result.tokens[0]
        out["load_s"] = load_s  # includes, with QWEN_EXPORT_HUGE_PAGES=1, the move into 2 MiB pages
        out["huge_page_mib"] = getattr(session.backend, "huge_page_bytes", 0) >> 20
    return out


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
    if bench == "reference":
        print(json.dumps(reference_outputs(*json.loads(encoded))))
        return
    path, batch, prompt_len, new_tokens, threads = json.loads(encoded)
    if bench == "ours_cold":
        print(
            json.dumps(
                bench_ours(Path(path), int(batch), int(prompt_len), int(new_tokens), int(threads), True)
            )
        )
        return
    fn = {"ours": bench_ours, "hf": bench_hf}[bench]
    print(json.dumps(fn(Path(path), int(batch), int(prompt_len), int(new_tokens), int(threads))))


def median_round(rounds: list[dict]) -> dict:
    """The round with the median decode rate (errors propagate when every round failed), its time to first
    token replaced by the median over the rounds (the two vary independently: the round whose decode was the
    median one may have had any prompt time); a round's `cold` measurement, when there is one, likewise."""
    ok = sorted((r for r in rounds if "decode_tokens_per_s" in r), key=lambda r: r["decode_tokens_per_s"])
    if not ok:
        return rounds[-1]
    in_order = [r for r in rounds if "decode_tokens_per_s" in r]
    out = {
        **ok[len(ok) // 2],
        "rounds": len(ok),
        "decode_tokens_per_s_by_round": [r["decode_tokens_per_s"] for r in in_order],
        "time_to_first_token_s_by_round": [r["time_to_first_token_s"] for r in in_order],
        "time_to_first_token_s": float(np.median([r["time_to_first_token_s"] for r in ok])),
    }
    colds = [r["cold"] for r in in_order if "decode_tokens_per_s" in r.get("cold", {})]
    out["cold_decode_tokens_per_s_by_round"] = [c["decode_tokens_per_s"] for c in colds]
    if colds:
        out["cold_time_to_first_token_s_by_round"] = [c["time_to_first_token_s"] for c in colds]
        by_rate = sorted(colds, key=lambda c: c["decode_tokens_per_s"])
        out["cold"] = {
            **by_rate[len(by_rate) // 2],
            "time_to_first_token_s": float(np.median([c["time_to_first_token_s"] for c in colds])),
        }
    return out


# --- llama.cpp (scripts/llama_peer.py, in its own Python) -------------------------------------------------
def llama_peer(python: str, *args: Any, timeout: int = 3600) -> dict:
    proc = subprocess.run(
        [python, str(LLAMA_PEER), *(str(a) for a in args)], capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_llama(python: str, gguf: str, ids: list[int], new_tokens: int, threads: int, **kw: Any) -> dict:
    """One fresh llama.cpp process: cold and warm generation, in the shape bench_ours returns."""
    extra = [a for k, v in kw.items() for a in (f"--{k.replace('_', '-')}", v)]
    r = llama_peer(
        python,
        "bench",
        gguf,
        "--ids",
        json.dumps(ids),
        "--new-tokens",
        new_tokens,
        "--threads",
        threads,
        *extra,
    )
    if "error" in r:
        return r
    keys = ("time_to_first_token_s", "decode_tokens_per_s")
    return {
        **{k: r["warm"][k] for k in keys},
        "cold": {k: r["cold"][k] for k in keys},
        "tokens": r["warm"]["tokens"],
        "load_s": r["load_s"],
        "perf_warm": r["warm"]["perf"],
    }


def reference_outputs(
    model_dir: str, artifacts: dict[str, str], prompt: list[int], new_tokens: int, threads: int, out_dir: str
) -> dict:
    """HF reference and our artifacts on one prompt: the last position's logits (saved as .npy in out_dir)
    and greedy tokens, for the GGUF check."""
    import torch

    from qwen_export.golden.reference import load_reference
    from qwen_export.runtime.session import Session

    torch.set_num_threads(threads)
    ids = torch.tensor([prompt])
    model = load_reference(Path(model_dir))
    result: dict[str, Any] = {}
    with torch.no_grad():
        np.save(Path(out_dir) / "hf.npy", model(input_ids=ids).logits[0, -1].float().numpy())
        out = model.generate(
            ids,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
            attention_mask=torch.ones_like(ids),
        )
    result["hf"] = out[0, len(prompt) :].tolist()
    for name, path in artifacts.items():
        session = Session.load(path, threads=threads)
        np.save(
            Path(out_dir) / f"{name}.npy",
            np.asarray(session.backend.prefill(np.array([prompt])).logits)[0, -1],
        )
        result[name] = session.generate([prompt], new_tokens).tokens[0]
    return result


def gguf_check(
    python: str,
    ggufs: dict[str, str],
    model_dir: Path,
    artifacts: dict[str, Path],
    prompt: list[int],
    new_tokens: int,
    threads: int,
    work: Path,
) -> dict:
    """Greedy tokens and prompt logits of every GGUF and every artifact against the HF reference (random
    weights: near-tied logits, so only an exact conversion keeps all greedy tokens)."""
    out_dir = work / "check"
    out_dir.mkdir(exist_ok=True)
    proc = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            "reference",
            json.dumps(
                [
                    str(model_dir),
                    {k: str(v) for k, v in artifacts.items()},
                    prompt,
                    new_tokens,
                    threads,
                    str(out_dir),
                ]
            ),
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    tokens = json.loads(proc.stdout.strip().splitlines()[-1])
    for kind, gguf in ggufs.items():
        r = bench_llama(python, gguf, prompt, new_tokens, threads, logits_out=out_dir / f"llama_{kind}.npy")
        tokens[f"llama_{kind}"] = r.get("tokens", [])
    hf_logits = np.load(out_dir / "hf.npy")
    top = np.sort(hf_logits)[::-1]
    check: dict[str, Any] = {
        "prompt_len": len(prompt),
        "new_tokens": new_tokens,
        "hf_top1_top2_logit_margin": float(top[0] - top[1]),
        "hf_logit_std": float(hf_logits.std()),
        "runtimes": {},
    }
    for name, toks in tokens.items():
        if name == "hf":
            continue
        row: dict[str, Any] = {
            "greedy_equal_to_hf": matching_prefix(toks, tokens["hf"]),
            "first_tokens": toks[:6],
        }
        if (out_dir / f"{name}.npy").is_file():
            logits = np.load(out_dir / f"{name}.npy")
            row["max_abs_logit_diff"] = float(np.abs(logits - hf_logits).max())
            row["logit_correlation"] = float(np.corrcoef(logits, hf_logits)[0, 1])
        check["runtimes"][name] = row
    check["hf_first_tokens"] = tokens["hf"][:6]
    return check


def matching_prefix(a: list[int], b: list[int]) -> int:
    """How many leading greedy tokens two runs share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def profile_ours(artifact: Path, prompt_len: int, steps: int, work: Path) -> dict:
    report = work / f"profile-{Path(artifact).name}.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen_export.cli",
            "profile",
            str(artifact),
            "--prompt-tokens",
            str(prompt_len),
            "--decode-steps",
            str(steps),
            "--report",
            str(report),
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    decode = json.loads(report.read_text())["phases"]["decode"]
    total = sum(decode["per_op_type_ms"].values())
    return {
        "runtime": "qwen-export profile (onnxruntime, graph optimizations off)",
        "step_ms_p50": decode["step_ms_p50"],
        "op_time_ms_per_step": total,
        "ops": {op: {"ms_per_step": ms, "share": ms / total} for op, ms in decode["per_op_type_ms"].items()},
    }


OP_GROUPS = {  # op type -> what it computes, to line the two profiles up
    "Int4MoE": "routed experts",
    "QMoE": "routed experts",
    "MoE": "routed experts",
    "FloatMoE": "routed experts",
    "MUL_MAT_ID": "routed experts",
    "Int4Linear": "dense matmuls (projections, shared expert, router, lm_head)",
    "MatMulNBits": "dense matmuls (projections, shared expert, router, lm_head)",
    "MatMul": "dense matmuls (projections, shared expert, router, lm_head)",
    "Gemm": "dense matmuls (projections, shared expert, router, lm_head)",
    "MUL_MAT": "dense matmuls (projections, shared expert, router, lm_head)",
    "GatedDeltaRule": "DeltaNet recurrence + conv",
    "GATED_DELTA_NET": "DeltaNet recurrence + conv",
    "SSM_CONV": "DeltaNet recurrence + conv",
    "GroupQueryAttention": "attention (+ RoPE)",
    "Attention": "attention (+ RoPE)",
    "AttentionKv16": "attention (+ RoPE)",
    "FLASH_ATTN_EXT": "attention (+ RoPE)",
    "SOFT_MAX": "attention (+ RoPE)",
    "ROPE": "attention (+ RoPE)",
    "RotaryEmbedding": "attention (+ RoPE)",
}


def op_groups(profile: dict) -> dict[str, float]:
    groups: dict[str, float] = {}
    for op, m in profile.get("ops", {}).items():
        group = OP_GROUPS.get(op, "everything else (norms, elementwise, copies, routing glue)")
        groups[group] = groups.get(group, 0.0) + m["ms_per_step"]
    return groups


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
    parser.add_argument(
        "--int8-artifact",
        type=Path,
        help="our weight-only int8 artifact (`build --target ort-int8`), benched in the same rounds "
        "(llama.cpp Q8_0 is its peer)",
    )
    parser.add_argument(
        "--llama-python",
        help="python of the llama.cpp peer's venv (scripts/setup_llama_env.sh): llama.cpp on the checkpoint "
        "as GGUF f32 / Q8_0 / Q4_0 in the same rounds, batch 1, cold and warm, with a greedy check",
    )
    parser.add_argument(
        "--llama-cache",
        type=Path,
        help="where GGUF files are cached (default: qwen-export's cache folder, gguf/)",
    )
    parser.add_argument("--llama-types", nargs="+", default=list(LLAMA_TYPES), choices=LLAMA_TYPES)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="with --llama-python: per-op decode profile of ours (fp32, cpu-int4) and llama.cpp (f32, Q4_0)",
    )
    parser.add_argument("--profile-steps", type=int, default=16)
    parser.add_argument("--skip-hf", action="store_true", help="leave Hugging Face eager out of the rounds")
    parser.add_argument("--measure-up-to", type=int, default=65536)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of ours and genai")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "runtime.json")
    args = parser.parse_args()

    from qwen_export import cpu_kernels
    from qwen_export.exporter.export import export_model, load_model_source
    from qwen_export.presets import materialize

    model_dir = materialize(args.preset)
    _, spec, _ = load_model_source(model_dir)
    prov = provenance()
    # settings from the environment that change what ours runs, part of its command
    knobs = ("QWEN_CPU_KERNELS", "QWEN_EXPORT_HUGE_PAGES", "GLIBC_TUNABLES")
    settings = [f"{k}={os.environ[k]}" for k in knobs if k in os.environ]
    results: dict[str, Any] = {
        "command": " ".join(settings + [Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": prov["commit"],
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "cpu": prov["machine"]["cpu"],
            "vector_isa": prov["machine"]["vector_isa"],
            "load_average_at_start": os.getloadavg()[0],
        },
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
            # the qwen.cpu loops (QWEN_CPU_KERNELS=avx2 takes the AVX2 ones on an AVX-512 machine;
            # ONNX Runtime's own kernels pick theirs by CPUID regardless)
            library = cpu_kernels.library_for(args.cpu_int4_artifact / "model.onnx")
            results["machine"]["qwen_cpu_kernels"] = cpu_kernels.backend(library)
            results["machine"]["qwen_cpu_float_moe"] = cpu_kernels.float_moe_loops(library)
            results["machine"]["qwen_cpu_delta_rule"] = cpu_kernels.delta_rule_loops(library)
        if args.int8_artifact:
            results["int8_artifact"] = str(args.int8_artifact)
        ggufs: dict[str, str] = {}
        if args.llama_python and not args.skip_speed:
            from qwen_export.presets import cache_root

            cache = args.llama_cache or cache_root() / "gguf"
            converted = llama_peer(
                args.llama_python,
                "convert",
                model_dir,
                cache,
                "--types",
                *args.llama_types,
                "--threads",
                args.threads,
            )
            if "error" in converted:
                raise SystemExit(f"GGUF conversion failed: {converted['error']}")
            ggufs = converted["files"]
            info = llama_peer(args.llama_python, "info")
            results["llama"] = {
                **info,
                "gguf": ggufs,
                "conversion": "vendored convert_hf_to_gguf.py --outtype f32 --no-mtp (synthetic byte-level "
                "vocabulary: the preset has no tokenizer), then llama_model_quantize (llama-quantize "
                "defaults) to Q8_0 / Q4_0",
                "conversion_s": converted["seconds"],
            }
            ours_for_check = {
                name: path
                for name, path in (
                    ("ours", artifact),
                    ("ours_int8", args.int8_artifact),
                    ("ours_int4", args.int4_artifact),
                    ("ours_cpu_int4", args.cpu_int4_artifact),
                )
                if path
            }
            results["gguf_check"] = gguf_check(
                args.llama_python,
                ggufs,
                model_dir,
                ours_for_check,
                prompts(spec.vocab_size, 1, args.prompt_len, seed=1)[0],
                args.new_tokens,
                args.threads,
                work,
            )
            print(json.dumps(results["gguf_check"]), flush=True)
        if not args.skip_speed:
            for batch in args.batches:
                row: dict[str, Any] = {"batch": batch}
                # Ours, genai and HF eager alternate over rounds (this machine is shared), each in its own
                # process; each keeps its median round.
                ours_models = {
                    "ours": artifact,
                    "ours_int8": args.int8_artifact,
                    "ours_int4": args.int4_artifact,
                    "ours_cpu_int4": args.cpu_int4_artifact,
                }
                with_llama = bool(ggufs) and batch == 1
                ours_bench = "ours_cold" if with_llama else "ours"
                genai_models = {"genai": genai_model, "genai_int4": genai_int4}
                rounds: dict[str, list[dict[str, float]]] = {}
                for _ in range(args.rounds):
                    for name, path in ours_models.items():
                        if path:
                            rounds.setdefault(name, []).append(
                                isolated(
                                    ours_bench, path, batch, args.prompt_len, args.new_tokens, args.threads
                                )
                            )
                    for kind, gguf in ggufs.items() if with_llama else ():
                        rounds.setdefault(f"llama_{kind}", []).append(
                            bench_llama(
                                args.llama_python,
                                gguf,
                                prompts(spec.vocab_size, batch, args.prompt_len, seed=batch)[0],
                                args.new_tokens,
                                args.threads,
                            )
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
                    if not args.skip_hf:
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
                if with_llama:
                    row["vs_llama"] = llama_ratios(row)
                print(json.dumps(row), flush=True)
                results["speed"].append(row)

        if ggufs and args.profile:
            results["profile"] = {"decode_steps": args.profile_steps, "prompt_len": args.prompt_len}
            for name, path in (("ours", artifact), ("ours_cpu_int4", args.cpu_int4_artifact)):
                if path:
                    results["profile"][name] = profile_ours(path, args.prompt_len, args.profile_steps, work)
            for kind in ("f32", "q4_0"):
                if kind in ggufs:
                    results["profile"][f"llama_{kind}"] = llama_peer(
                        args.llama_python,
                        "profile",
                        ggufs[kind],
                        "--ids",
                        json.dumps(prompts(spec.vocab_size, 1, args.prompt_len, seed=1)[0]),
                        "--decode-steps",
                        args.profile_steps,
                        "--threads",
                        1,  # one node per dispatch: at 1 thread the op times add up to the real step
                    )
            print(json.dumps(results["profile"]), flush=True)

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
    results["machine"]["load_average_at_end"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    args.out.with_suffix(".md").write_text(render_markdown(results))


def llama_ratios(row: dict) -> list[dict]:
    """Ours ÷ llama.cpp at matching precision, cold and warm: decode tokens/s ratio (ours / llama) and time
    to first token as a speed ratio (llama TTFT / ours TTFT); above 1 means ours is faster."""
    out = []
    for ours, peer in LLAMA_PAIRS:
        a, b = row.get(ours, {}), row.get(peer, {})
        if "decode_tokens_per_s" not in a or "decode_tokens_per_s" not in b:
            continue
        entry: dict[str, Any] = {"ours": ours, "llama": peer}
        for phase, (x, y) in (("warm", (a, b)), ("cold", (a.get("cold"), b.get("cold")))):
            if x and y:
                entry[f"decode_{phase}"] = x["decode_tokens_per_s"] / y["decode_tokens_per_s"]
                entry[f"ttft_{phase}"] = y["time_to_first_token_s"] / x["time_to_first_token_s"]
        out.append(entry)
    return out


def kernel_loops(machine: dict[str, Any]) -> str:
    """Which qwen.cpu loops ran, for the header; older results name fewer (the rest picked by CPUID)."""
    if "qwen_cpu_kernels" not in machine:
        return ""
    named = [f"qwen.cpu loops {machine['qwen_cpu_kernels']}"]
    by_cpuid = ["FloatMoE's", "GatedDeltaRule's", "ONNX Runtime's own"]
    for key, op in (("qwen_cpu_float_moe", "FloatMoE"), ("qwen_cpu_delta_rule", "GatedDeltaRule")):
        if key in machine:
            named.append(f"{op} {machine[key]}")
            by_cpuid.remove(f"{op}'s")
    others = " and ".join([", ".join(by_cpuid[:-1]), by_cpuid[-1]] if len(by_cpuid) > 1 else by_cpuid)
    return ", ".join(named) + f" ({others} kernels by CPUID), "


def render_markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# Runtime benchmark: {r['preset']}",
        "",
        f"Command: `{r['command']}`  ",
        f"Date: {r['date']}, "
        f"{r['machine']['cpus']} CPUs ({r['machine'].get('cpu', '?')}, vector ISA "
        f"{r['machine'].get('vector_isa', '?')}), commit {r.get('commit', '?')}, "
        + (
            f"1-minute load average {r['machine']['load_average_at_start']:.1f} at the start and "
            f"{r['machine'].get('load_average_at_end', float('nan')):.1f} at the end (a shared machine), "
            if "load_average_at_start" in r["machine"]
            else ""
        )
        + kernel_loops(r["machine"])
        + f"{r['threads']} threads, prompt {r['prompt_len']} tokens, "
        f"{r['new_tokens']} new tokens, greedy; fp32 unless the runtime says int4 "
        "(weight-only, block 32, int8 activations on CPU: ours `ort-int4` on ONNX Runtime's kernels, ours "
        "`ort-cpu-int4` on qwen-export's CPU kernels (plugins/ort_cpu), genai `-p int4`; int8: ours "
        "`ort-int8`, weight-only, block 32, int8 compute).",
        "",
    ]
    if r["speed"]:
        lines += ["| batch | runtime | time to first token (ms) | decode tokens/s |", "|---|---|---|---|"]
        for row in r["speed"]:
            for name in (
                "ours",
                "ours_int8",
                "ours_int4",
                "ours_cpu_int4",
                "hf_eager",
                "genai",
                "genai_int4",
                "llama_f32",
                "llama_q8_0",
                "llama_q4_0",
            ):
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
            if ratio:
                lines.append(f"| {row['batch']} | decode ratio | | {ratio} |")
        lines.append("")
    lines += render_llama(r)
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


def llama_isa(info: dict[str, Any], machine_isa: str) -> str:
    """How the llama.cpp peer was built, read off its own CPU features (it lists only those it was built
    with) and this machine's widest vector ISA: without AVX-512 on a machine that has it, --isa avx2."""
    if "AVX512" in info.get("system_info", "AVX512"):
        return "GGML_NATIVE=ON"
    if machine_isa.startswith("avx512"):
        return "AVX2 only (--isa avx2: GGML_NATIVE=OFF, GGML_AVX2=ON, no AVX-512)"
    return "GGML_NATIVE=ON: this machine's AVX2, no AVX-512"


def render_llama(r: dict[str, Any]) -> list[str]:
    """The llama.cpp sections: cold/warm table, ratios, the GGUF check and the profiles."""
    rows = [row for row in r["speed"] if "vs_llama" in row]
    if not rows:
        return []
    info = r.get("llama", {})
    built = llama_isa(info, r["machine"].get("vector_isa", "?"))
    lines = [
        "## Against llama.cpp (batch 1)",
        "",
        f"llama-cpp-python {info.get('llama_cpp_python')} built from source (scripts/setup_llama_env.sh: "
        f"CPU, {built}, OpenMP); its CPU features: `{info.get('system_info', '').strip()}`. GGUF: "
        f"{info.get('conversion')}. Every runtime runs in a fresh process per round, rounds alternate; "
        "cold = the first generation after loading, warm = the second; decode: the median round by decode "
        "rate; time to first token: the median over the rounds. "
        "Precisions differ in detail: llama-quantize's Q4_0 keeps output.weight (lm_head) at Q6_K and the "
        "routers in f32, Q8_0 keeps the routers in f32; ours int4 quantizes lm_head to int4 too.",
        "",
        "| runtime | cold TTFT (ms) | cold decode tok/s | warm TTFT (ms) | warm decode tok/s | load (s) | "
        "warm decode tok/s by round | cold TTFT (ms) by round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    row = rows[0]
    for name in ("ours", "ours_int8", "ours_int4", "ours_cpu_int4", "llama_f32", "llama_q8_0", "llama_q4_0"):
        m = row.get(name)
        if not m:
            continue
        if "error" in m:
            lines.append(f"| {name} | failed: {m['error']} | | | | | | |")
            continue
        c = m.get("cold", {})
        lines.append(
            f"| {name} | {c.get('time_to_first_token_s', float('nan')) * 1e3:.1f} | "
            f"{c.get('decode_tokens_per_s', float('nan')):.1f} | {m['time_to_first_token_s'] * 1e3:.1f} | "
            f"{m['decode_tokens_per_s']:.1f} | {m.get('load_s', float('nan')):.2f} | "
            + ", ".join(f"{v:.0f}" for v in m.get("decode_tokens_per_s_by_round", []))
            + " | "
            + ", ".join(f"{v * 1e3:.0f}" for v in m.get("cold_time_to_first_token_s_by_round", []))
            + " |"
        )
    lines += [
        "",
        "Ratios, ours ÷ llama.cpp at matching precision (decode: ours tok/s ÷ llama tok/s; TTFT: llama "
        "TTFT ÷ ours TTFT; above 1 = ours faster):",
        "",
        "| ours | llama.cpp | decode cold | decode warm | TTFT cold | TTFT warm |",
        "|---|---|---|---|---|---|",
    ]
    for e in row["vs_llama"]:
        lines.append(
            f"| {e['ours']} | {e['llama']} | {e.get('decode_cold', float('nan')):.2f}x | "
            f"{e.get('decode_warm', float('nan')):.2f}x | {e.get('ttft_cold', float('nan')):.2f}x | "
            f"{e.get('ttft_warm', float('nan')):.2f}x |"
        )
    check = r.get("gguf_check")
    if check and "runtimes" in check:
        lines += [
            "",
            f"GGUF check: greedy tokens ({check['new_tokens']}) and the prompt's last-position logits "
            f"against the Hugging Face reference, on the benchmark's {check['prompt_len']}-token prompt "
            f"(random weights: logit std {check['hf_logit_std']:.2f}, top-1/top-2 margin "
            f"{check['hf_top1_top2_logit_margin']:.3f}, so only a faithful conversion keeps every token).",
            "",
            "| runtime | greedy tokens equal to HF | max abs logit diff | logit correlation |",
            "|---|---|---|---|",
        ]
        for name, c in check["runtimes"].items():
            lines.append(
                f"| {name} | {c['greedy_equal_to_hf']} / {check['new_tokens']} | "
                f"{c.get('max_abs_logit_diff', float('nan')):.2e} | "
                f"{c.get('logit_correlation', float('nan')):.4f} |"
            )
    prof = r.get("profile")
    if prof:
        names = [n for n in ("ours", "llama_f32", "ours_cpu_int4", "llama_q4_0") if "ops" in prof.get(n, {})]
        groups = sorted({g for n in names for g in op_groups(prof[n])})
        lines += [
            "",
            f"Decode step profile ({prof['decode_steps']} steps after a {prof['prompt_len']}-token prompt; "
            "ms per step by what the ops compute, share of the profiled step in brackets). Ours: "
            "`qwen-export profile` (ONNX Runtime's profiler, graph optimizations off); llama.cpp: a ggml "
            "eval callback timing each graph node at 1 thread (ggml then computes one node per dispatch; at "
            "2 threads each dispatch wakes the thread pool and that overhead swamps the op times; at 1 "
            "thread the op times add up to the real 1-thread step).",
            "",
            "| work | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        totals = {n: sum(op_groups(prof[n]).values()) for n in names}
        for g in groups:
            cells = []
            for n in names:
                ms = op_groups(prof[n]).get(g, 0.0)
                cells.append(f"{ms:.2f} ({ms / totals[n]:.0%})")
            lines.append(f"| {g} | " + " | ".join(cells) + " |")
        lines.append("| profiled step | " + " | ".join(f"{totals[n]:.2f}" for n in names) + " |")
        for n in names:
            top = list(prof[n]["ops"].items())[:6]
            lines.append(
                f"\nTop ops, {n}: "
                + ", ".join(f"{op} {m['ms_per_step']:.2f} ms ({m['share']:.0%})" for op, m in top)
            )
    lines.append("")
    return lines


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3])
        raise SystemExit(0)
    main()
