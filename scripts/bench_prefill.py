"""Time to first token of a 2048-token prompt on ort-cpu-int4 (small preset), this tree against a baseline
commit (default: the one issue #19 measured, before the CPU prefill work), in the same run and in
alternating rounds, each in a fresh process (this machine is shared: only ratios measured side by side mean
much).

Each side builds its own artifact with its own code (the graph and the kernel library both changed: the
chunked delta rule, the large-M int4 paths, the qwen.cpu attention, logits-to-keep) and runs it as a user
does: `Session.load(ARTIFACT).generate([prompt], 1)`, ONNX Runtime's optimizations on, 2 threads. The
baseline runs from a clone at that commit installed into a venv that borrows this venv's packages. Per-op
prefill times come from each side's `qwen-export profile` (optimizations off, every position's logits).
Writes benchmarks/prefill.{json,md}.

    python scripts/bench_prefill.py [--baseline REV] [--tokens 2048] [--rounds 5]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_common import (
    alternating_rounds,
    baseline_parser,
    baseline_sides,
    produced_by,
    provenance,
    write_results,
)

PRESET = "small-qwen3.5-moe"
TARGET = "ort-cpu-int4"
BASELINE = "9dadabe"  # the commit #19's "current time" is measured at
ACCEPT = 0.5  # after / before
# One measurement, run by each side's Python: the medians of the last `repeats` of repeats + 1 runs (the
# first warms the session) of time to first token and of decode speed (64-token prompt, 32 new tokens: that
# the prefill work cost decode nothing).
MEASURE = """
import json, sys, time
import numpy as np
from qwen_export.runtime.session import Session
artifact, tokens, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
session = Session.load(artifact, threads=2)
prompt = (np.arange(tokens) * 7919 % (session.backend.vocab_size - 1) + 1).tolist()
ttft, decode = [], []
for _ in range(repeats + 1):
    start = time.perf_counter()
    session.generate([prompt], 1)
    ttft.append((time.perf_counter() - start) * 1000)
    decode.append(session.generate([prompt[:64]], 33).decode_tokens_per_s)
median = lambda xs: sorted(xs[1:])[len(xs[1:]) // 2]
print(json.dumps({"ttft_ms": median(ttft), "decode_tok_s": median(decode)}))
"""


def build(python: Path, out: Path) -> Path:
    cmd = [
        str(python),
        "-m",
        "qwen_export.cli",
        "build",
        "--preset",
        PRESET,
        "--target",
        TARGET,
        "-o",
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True, cwd=out.parent)
    return out


def measure(python: Path, artifact: Path, tokens: int, repeats: int) -> dict[str, float]:
    out = subprocess.run(
        [str(python), "-c", MEASURE, str(artifact), str(tokens), str(repeats)],
        check=True, capture_output=True, text=True, cwd=artifact.parent,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def per_op(python: Path, artifact: Path, tokens: int) -> dict[str, float]:
    cmd = [str(python), "-m", "qwen_export.cli", "profile", str(artifact), "--prompt-tokens", str(tokens)]
    out = subprocess.run(
        [*cmd, "--decode-steps", "2", "--json"],
        check=True,
        capture_output=True,
        text=True,
        cwd=artifact.parent,
    )
    prefill = json.loads(out.stdout)["phases"]["prefill"]
    return {"step_ms": prefill["step_ms_p50"], **prefill["per_op_type_ms"]}


def render(result: dict) -> str:
    before, after = result["before"], result["after"]
    lines = [
        f"# Prefill of {result['tokens']} tokens: {result['target']}, {result['preset']}",
        "",
        produced_by(result),
        "",
        f"Time to first token through `Session.generate` (ONNX Runtime optimizations on, 2 threads), median "
        f"of "
        f"{result['repeats']} per process, {result['rounds']} alternating rounds of fresh processes. Before: "
        f"commit {result['baseline']} (its graph and kernels); after: this commit.",
        "",
        "| | before (ms) | after (ms) | after / before |",
        "|---|---:|---:|---:|",
        f"| time to first token | {before['ttft_ms']:.0f} | {after['ttft_ms']:.0f} | {result['ratio']:.2f} |",
        f"| decode (tokens/s, 64-token prompt) | {before['decode_tok_s']:.0f} | "
        f"{after['decode_tok_s']:.0f} | "
        f"{result['decode_ratio']:.2f} |",
        "",
        f"Per round (after / before, measured back to back): "
        f"{', '.join(f'{r:.2f}' for r in result['round_ratios'])}. Accepted (≤ {ACCEPT}): "
        f"**{'yes' if result['accepted'] else 'no'}**.",
        "",
        "Where the prefill goes (`qwen-export profile`, optimizations off, every position's logits), ms:",
        "",
        "| op type | before | after |",
        "|---|---:|---:|",
    ]
    ops = sorted(
        set(before["per_op_ms"]) | set(after["per_op_ms"]), key=lambda o: -before["per_op_ms"].get(o, 0)
    )
    for op in ops:
        b, a = before["per_op_ms"].get(op), after["per_op_ms"].get(op)
        lines.append(f"| {op} | {'' if b is None else f'{b:.0f}'} | {'' if a is None else f'{a:.0f}'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = baseline_parser(__doc__, BASELINE)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-prefill-") as tmp:
        tmp = Path(tmp)
        sides = baseline_sides(args.baseline, tmp)
        artifacts = {name: build(python, tmp / f"{name}-int4") for name, python in sides.items()}

        def measure_side(name: str, python: Path) -> dict[str, float]:
            return measure(python, artifacts[name], args.tokens, args.repeats)

        rounds = alternating_rounds(sides, args.rounds, measure_side)
        ops = {name: per_op(python, artifacts[name], args.tokens) for name, python in sides.items()}
    pairs = list(zip(rounds["after"], rounds["before"], strict=True))
    paired = [a["ttft_ms"] / b["ttft_ms"] for a, b in pairs]
    decode = [a["decode_tok_s"] / b["decode_tok_s"] for a, b in pairs]
    result = {
        **provenance(),
        "preset": PRESET, "target": TARGET, "tokens": args.tokens, "rounds": args.rounds,
        "repeats": args.repeats, "baseline": args.baseline,
        **{
            name: {
                "ttft_ms": statistics.median(r["ttft_ms"] for r in runs),
                "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
                "rounds": runs, "per_op_ms": ops[name],
            }
            for name, runs in rounds.items()
        },
        "round_ratios": paired, "ratio": statistics.median(paired),
        "decode_round_ratios": decode, "decode_ratio": statistics.median(decode),
    }  # fmt: skip
    result["accepted"] = result["ratio"] <= ACCEPT
    write_results(args.out, "prefill", result, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
