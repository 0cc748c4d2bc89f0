"""Sharded-build benchmark: the CPU loopback run of a tp-way ranks artifact against the unsharded build of
the same checkpoint, in the same process, alternating rounds (this machine is shared and noisy).

Both are built for the `onnx` target. Measured: prefill latency at 64 and 256 tokens and the decode step
(batch 1, 32 steps after a 64-token prompt), median of the rounds; the ratio ranks / unsharded is the
loopback's overhead (thread hand-offs at every collective, one intra-op thread per rank against the
unsharded session's N threads). Writes benchmarks/ranks.json and benchmarks/ranks.md.

    .venv/bin/python scripts/bench_ranks.py [--preset small-qwen3.5-moe] [--tp 2] [--ep 1] [--rounds 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def vector_isa() -> str:
    flags = next(
        (line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), ""
    )
    return next((f for f in ("avx512_vnni", "avx512f", "avx2") if f in flags.split()), "none of avx2/avx512")


def cpu_model() -> str:
    line = next((x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("model name")), "")
    return line.split(":", 1)[-1].strip() or platform.processor()


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def measure(decoder, vocab: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    out = {}
    for length in (64, 256):
        ids = rng.integers(0, vocab, (1, length))
        out[f"prefill_{length}_ms"] = 1000 * timed(decoder.prefill, ids)
    ids = rng.integers(0, vocab, (1, 64))
    prefill = timed(decoder.prefill, ids)
    total = timed(decoder.greedy, ids, 32)
    out["decode_step_ms"] = 1000 * (total - prefill) / 32
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small-qwen3.5-moe")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks")
    args = parser.parse_args()

    from qwen_export.build import BuildRequest, build_artifact
    from qwen_export.runtime.ort_decoder import OrtDecoder
    from qwen_export.runtime.ranks import open_decoder
    from qwen_export.runtime.session import Artifact

    threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench-ranks-") as work:
        whole_dir, ranks_dir = Path(work) / "whole", Path(work) / "ranks"
        build_artifact(BuildRequest(out=whole_dir, preset=args.preset))
        build_artifact(BuildRequest(out=ranks_dir, preset=args.preset, tp=args.tp, ep=args.ep))
        whole = OrtDecoder(whole_dir / "model.onnx", threads=threads)
        ranks = open_decoder(Artifact.open(ranks_dir).model_path)
        vocab = whole.vocab_size
        measure(whole, vocab), measure(ranks, vocab)  # warm-up
        rounds = {"unsharded": [], "ranks": []}
        for _ in range(args.rounds):
            rounds["unsharded"].append(measure(whole, vocab))
            rounds["ranks"].append(measure(ranks, vocab))
        ranks.close()
    median = {k: {m: float(np.median([r[m] for r in v])) for m in v[0]} for k, v in rounds.items()}
    ratio = {m: median["ranks"][m] / median["unsharded"][m] for m in median["ranks"]}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    result = {
        "command": f"python scripts/bench_ranks.py --preset {args.preset} --tp {args.tp} --ep {args.ep} "
        f"--rounds {args.rounds}",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git": commit.stdout.strip(),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "vector_isa": vector_isa()},
        "threads": {"unsharded": threads, "ranks": f"{args.tp} sessions x 1 intra-op thread"},
        "rounds": rounds,
        "median": median,
        "ratio_ranks_over_unsharded": ratio,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "ranks.json").write_text(json.dumps(result, indent=2))
    lines = [
        f"# Sharded build on the CPU: tp {args.tp} (ep {args.ep}) loopback against unsharded",
        "",
        f"Produced by `{result['command']}` on {result['date']} (commit {result['git']}). Machine: "
        f"{result['machine']['cpu']}, {result['machine']['cores']} cores, vector ISA "
        f"{result['machine']['vector_isa']}. Target `onnx`, fp32, ONNX Runtime CPU with optimizations off "
        f"(the runtime's default for checks), batch 1; median of {args.rounds} alternating rounds. The "
        f"unsharded session uses {threads} intra-op threads; the ranks run {args.tp} sessions of one thread "
        "each, one "
        "Python thread per rank, meeting at the loopback DistCollective (plugins/ort_cpu/dist_collective).",
        "",
        "| measure | unsharded ms | ranks ms | ranks / unsharded |",
        "|---|---|---|---|",
    ]
    for m in median["ranks"]:
        lines.append(
            f"| {m.removesuffix('_ms')} | {median['unsharded'][m]:.2f} | {median['ranks'][m]:.2f} | "
            f"{ratio[m]:.2f} |"
        )
    lines += [
        "",
        "What the ratio includes: per step, each rank's collectives (2 per layer + embedding + logits) wait "
        "for the slowest rank and copy the partial sums; the ranks' graphs are narrower (fewer heads, a "
        "slice of each weight), and the portable lowering of each rank is the unsharded one's. The loopback "
        "exists to prove sharded graphs correct on a CPU, not to speed them up.",
    ]
    (args.results / "ranks.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
