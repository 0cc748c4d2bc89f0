"""A 2048-token prefill on ort-cpu-int4 (small preset): the qwen.cpu kernels at git HEAD against the working
tree's, in the same run, in alternating rounds (this machine is shared: only ratios measured side by side
mean much). Both run the same artifact; only the custom-op library beside model.onnx differs (the HEAD one
is compiled from `git show HEAD:plugins/ort_cpu/...` into a temporary folder). Per-op times are ONNX
Runtime's profile (qwen_export.profile). Writes benchmarks/prefill.{json,md}.

    python scripts/bench_prefill.py [--tokens 2048] [--rounds 3] [--artifact DIR]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_common import REPO, produced_by, provenance, write_results

from qwen_export import cpu_kernels
from qwen_export.profile import profile_artifact

PRESET = "small-qwen3.5-moe"
TARGET = "ort-cpu-int4"
OPS = ("Int4Linear", "Int4MoE", "GatedDeltaRule", "GroupQueryAttention")


def head_library(folder: Path) -> Path:
    """libqwen_ort_cpu.so compiled from the sources at git HEAD, with the current compiler flags."""
    src = folder / "src"
    listed = subprocess.run(
        ["git", "ls-tree", "-r", "--name-only", "HEAD", "plugins/ort_cpu"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout.split()
    for name in listed:
        target = src / Path(name).relative_to("plugins/ort_cpu")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(
            subprocess.run(["git", "show", f"HEAD:{name}"], capture_output=True, check=True, cwd=REPO).stdout
        )
    cxx = cpu_kernels._compiler()
    objects = []
    for source, flags in cpu_kernels.sources(not cpu_kernels.x86()).items():
        if not (src / source).is_file():
            continue
        obj = folder / (source.replace("/", "_") + ".o")
        cpu_kernels._run(
            [cxx, *cpu_kernels.COMMON_FLAGS, f"-I{src}", *flags, "-c", str(src / source), "-o", str(obj)]
        )
        objects.append(str(obj))
    library = folder / cpu_kernels.LIBRARY_NAME
    cpu_kernels._run([cxx, "-shared", "-o", str(library), *objects, "-lpthread"])
    return library


def artifact_with(artifact: Path, library: Path, folder: Path) -> Path:
    """The artifact's files (linked) with another kernel library beside model.onnx."""
    folder.mkdir(parents=True)
    for item in artifact.iterdir():
        if item.name != cpu_kernels.LIBRARY_NAME:
            (folder / item.name).symlink_to(item.resolve())
    shutil.copy(library, folder / cpu_kernels.LIBRARY_NAME)
    return folder


def measure(artifact: Path, tokens: int) -> dict:
    report = profile_artifact(artifact, prompt_tokens=tokens, decode_steps=2, repeats=2)
    prefill = report.phases["prefill"]
    return {
        "prefill_ms": prefill.step_ms_p50,
        "per_op_ms": dict(prefill.per_op_type_ms),
        "decode_ms": report.phases["decode"].step_ms_p50,
    }


def render(result: dict) -> str:
    b, a = result["before"], result["after"]
    lines = [
        "# 2048-token prefill on ort-cpu-int4 (small-qwen3.5-moe)",
        "",
        produced_by(result),
        "",
        f"Before: the qwen.cpu kernels at git HEAD ({result['commit']}); after: the working tree's. Same "
        f"artifact, same process, {result['rounds']} alternating rounds of 2 timed prefills each (after one "
        "warm-up); the medians of the rounds' medians. The machine is shared with other jobs: compare the "
        "ratio, not the absolute times.",
        "",
        "| | before ms | after ms | after / before |",
        "|---|---|---|---|",
        f"| prefill ({result['tokens']} tokens) | {b['prefill_ms']:.0f} | {a['prefill_ms']:.0f} | "
        f"{a['prefill_ms'] / b['prefill_ms']:.2f} |",
    ]
    for op in OPS:
        before, after = b["per_op_ms"].get(op, 0.0), a["per_op_ms"].get(op, 0.0)
        ratio = f"{after / before:.2f}" if before else "-"
        lines.append(f"| {op} | {before:.0f} | {after:.0f} | {ratio} |")
    lines.append(
        f"| decode step (batch 1) | {b['decode_ms']:.2f} | {a['decode_ms']:.2f} | "
        f"{a['decode_ms'] / b['decode_ms']:.2f} |"
    )
    ratios = ", ".join(f"{r:.2f}" for r in result["round_ratios"])
    lines += [
        "",
        f"Prefill after / before per round: {ratios}; median {result['ratio']:.2f}. "
        f"Acceptance (after <= 0.5 x before): {'met' if result['accepted'] else 'NOT met'}.",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--artifact", type=Path, help="an ort-cpu-int4 build of the small preset (else built)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-prefill-") as tmp:
        tmp = Path(tmp)
        artifact = args.artifact
        if artifact is None:
            artifact = tmp / "small-int4"
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "qwen_export.cli",
                    "build",
                    "--preset",
                    PRESET,
                    "--target",
                    TARGET,
                    "-o",
                    str(artifact),
                ],
                check=True,
                capture_output=True,
            )
        before = artifact_with(artifact, head_library(tmp / "head"), tmp / "before")
        after = artifact_with(artifact, cpu_kernels.library_path(), tmp / "after")
        rounds: dict[str, list[dict]] = {"before": [], "after": []}
        for _ in range(args.rounds):
            for name, folder in (("before", before), ("after", after)):
                rounds[name].append(measure(folder, args.tokens))
                print(name, f"{rounds[name][-1]['prefill_ms']:.0f} ms", file=sys.stderr)

    def median(runs: list[dict]) -> dict:
        ops = {op for r in runs for op in r["per_op_ms"]}
        return {
            "prefill_ms": statistics.median(r["prefill_ms"] for r in runs),
            "decode_ms": statistics.median(r["decode_ms"] for r in runs),
            "per_op_ms": {
                op: statistics.median(r["per_op_ms"].get(op, 0.0) for r in runs) for op in sorted(ops)
            },
            "rounds_prefill_ms": [r["prefill_ms"] for r in runs],
        }

    result = {
        **provenance(),
        "preset": PRESET,
        "target": TARGET,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "before": median(rounds["before"]),
        "after": median(rounds["after"]),
    }
    # each round's after / before (measured back to back), then their median: steadier than a ratio of medians
    paired = [
        a["prefill_ms"] / b["prefill_ms"] for a, b in zip(rounds["after"], rounds["before"], strict=True)
    ]
    result["round_ratios"] = paired
    result["ratio"] = statistics.median(paired)
    result["accepted"] = result["ratio"] <= 0.5
    write_results(args.out, "prefill", result, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
