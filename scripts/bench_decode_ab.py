"""Decode speed at batch 1, this tree against a baseline commit (default: the one before the CPU MoE kernels
took in the gated shared expert), in the same run and in alternating rounds of fresh processes (this machine
is shared: only ratios measured side by side mean much).

Each side builds its own artifacts with its own code, as a user does (`qwen-export build`), and decodes
through `Session.generate`: a 64-token prompt, 64 new tokens, the median decode rate of `--repeats`
generations after a warm one. Cases: the trained reference model (golden/trained-qwen3.5-moe) on one thread
(its plain decoding's faster count, benchmarks/speculative.md) and the small preset on two, each on ort-cpu
and ort-cpu-int4. The baseline runs from a clone at that commit installed into a venv that borrows this
venv's packages. Writes benchmarks/decode_ab.{json,md}.

    python scripts/bench_decode_ab.py [--baseline REV] [--rounds 5]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_common import (
    REPO,
    alternating_rounds,
    baseline_parser,
    baseline_sides,
    produced_by,
    provenance,
    write_results,
)

BASELINE = "f7e26a1"  # before Int4MoE and FloatMoE took in the gated shared expert (6d01427, ba1f95a)
# name -> (the build's source arguments, intra-op threads)
SOURCES = {
    "trained": (["--model", str(REPO / "golden" / "trained-qwen3.5-moe")], 1),
    "small": (["--preset", "small-qwen3.5-moe"], 2),
}
TARGETS = ("ort-cpu", "ort-cpu-int4")
MEASURE = """
import json, sys
from qwen_export.runtime.session import Session
artifact, threads, repeats = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
session = Session.load(artifact, threads=threads)
prompt = [i * 7919 % (session.backend.vocab_size - 1) + 1 for i in range(64)]
rates = [session.generate([prompt], 65).decode_tokens_per_s for _ in range(repeats + 1)][1:]
print(json.dumps(sorted(rates)[len(rates) // 2]))
"""


def cases(sources: list[str], targets: list[str]) -> list[tuple[str, str]]:
    return [(source, target) for source in sources for target in targets]


def build(python: Path, source: str, target: str, out: Path) -> Path:
    arguments, _ = SOURCES[source]
    cmd = [str(python), "-m", "qwen_export.cli", "build", *arguments, "--target", target, "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=out.parent)
    return out


def decode_rate(python: Path, artifact: Path, threads: int, repeats: int) -> float:
    out = subprocess.run(
        [str(python), "-c", MEASURE, str(artifact), str(threads), str(repeats)],
        check=True, capture_output=True, text=True, cwd=artifact.parent,
    )  # fmt: skip
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def render(result: dict) -> str:
    lines = [
        "# Decode at batch 1: this commit against a baseline",
        "",
        produced_by(result),
        "",
        f"Decode tokens/s through `Session.generate` (64-token prompt, 64 new tokens, median of "
        f"{result['repeats']} generations per process after a warm one), {result['rounds']} alternating "
        f"rounds of fresh processes. Before: commit {result['baseline']} (its graphs and kernels); after: "
        "this commit.",
        "",
        "| model | target | threads | before (tok/s) | after (tok/s) | after / before | per round |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for row in result["cases"]:
        per_round = ", ".join(f"{r:.2f}" for r in row["round_ratios"])
        lines.append(
            f"| {row['source']} | {row['target']} | {row['threads']} | {row['before']:.1f} | "
            f"{row['after']:.1f} | {row['ratio']:.3f} | {per_round} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = baseline_parser(__doc__, BASELINE)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sources", nargs="+", choices=list(SOURCES), default=list(SOURCES))
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    args = parser.parse_args()
    measured = cases(args.sources, args.targets)
    with tempfile.TemporaryDirectory(prefix="bench-decode-ab-") as tmp:
        tmp = Path(tmp)
        sides = baseline_sides(args.baseline, tmp)
        artifacts = {
            (name, source, target): build(python, source, target, tmp / f"{name}-{source}-{target}")
            for name, python in sides.items()
            for source, target in measured
        }

        def measure_side(name: str, python: Path) -> dict[str, float]:
            return {
                f"{source}/{target}": decode_rate(
                    python, artifacts[name, source, target], SOURCES[source][1], args.repeats
                )
                for source, target in measured
            }

        rounds = alternating_rounds(sides, args.rounds, measure_side)
    rows = []
    for source, target in measured:
        key = f"{source}/{target}"
        before = [r[key] for r in rounds["before"]]
        after = [r[key] for r in rounds["after"]]
        ratios = [a / b for a, b in zip(after, before, strict=True)]
        rows.append({
            "source": source, "target": target, "threads": SOURCES[source][1],
            "before": statistics.median(before), "after": statistics.median(after),
            "ratio": statistics.median(ratios), "round_ratios": ratios,
        })  # fmt: skip
    result = {
        **provenance(),
        "baseline": args.baseline, "rounds": args.rounds, "repeats": args.repeats, "cases": rows,
    }  # fmt: skip
    write_results(args.out, "decode_ab", result, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
