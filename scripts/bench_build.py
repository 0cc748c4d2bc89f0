"""Build benchmark (issue 3): end-to-end `qwen-export build` against onnxruntime-genai's model builder.

For each preset, in one run: wall time and top-level node count of `qwen-export build --target ort` (and
`--target onnx`), next to `python -m onnxruntime_genai.models.builder -p fp32 -e cpu` on the same weights
(copied into the multimodal layout that builder requires; the copy is not timed). Each build runs in its
own subprocess. Writes benchmarks/build.json and benchmarks/build.md.

    bash scripts/setup_genai_env.sh     # prints the genai Python
    .venv/bin/python scripts/bench_build.py --genai-python .venv-genai/bin/python
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from genai_peer import multimodal_copy, node_count, run_builder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def ours(preset: str, target: str, out: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(
        [
            str(Path(sys.executable).parent / "qwen-export"),
            "build",
            "--preset",
            preset,
            "--target",
            target,
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1], "seconds": seconds}
    return {"seconds": seconds, "nodes": node_count(out / "model.onnx")}


def median_run(rounds: list[dict]) -> dict:
    ok = sorted((r for r in rounds if "nodes" in r), key=lambda r: r["seconds"])
    return {**ok[len(ok) // 2], "rounds": [round(r["seconds"], 2) for r in ok]} if ok else rounds[-1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", nargs="+", default=["tiny-qwen3.5-moe", "small-qwen3.5-moe"])
    parser.add_argument("--genai-python", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "build.json")
    args = parser.parse_args()
    from qwen_export.presets import materialize

    results = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_at_start": os.getloadavg(),
        },
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for preset in args.presets:
            materialize(preset)
            row = {"preset": preset}
            mm = multimodal_copy(preset, work / f"{preset}-mm")
            # Builders alternate over rounds (this machine is shared); each keeps its median round.
            runs: dict[str, list[dict]] = {"ours_ort": [], "ours_onnx": [], "genai": []}
            for i in range(args.rounds):
                for target in ("ort", "onnx"):
                    runs[f"ours_{target}"].append(ours(preset, target, work / f"{preset}-{target}-{i}"))
                runs["genai"].append(run_builder(args.genai_python, mm, work / f"{preset}-genai-{i}"))
            for key, rounds in runs.items():
                row[key] = median_run(rounds)
                print(preset, key, row[key], flush=True)
            if "nodes" in row["genai"] and "nodes" in row["ours_ort"]:
                row["ours_ort_vs_genai"] = {
                    "time": row["ours_ort"]["seconds"] / row["genai"]["seconds"],
                    "nodes": row["ours_ort"]["nodes"] / row["genai"]["nodes"],
                }
            results["rows"].append(row)
    results["machine"]["load_average_at_end"] = os.getloadavg()
    args.out.write_text(json.dumps(results, indent=2))
    lines = [
        "# Build benchmark: `qwen-export build` vs onnxruntime-genai's model builder",
        "",
        f"Command: `{results['command']}`  ",
        f"Date: {results['date']}, {os.cpu_count()} CPUs, load average (1/5/15 min) "
        f"{' / '.join(f'{x:.1f}' for x in results['machine']['load_average_at_start'])} at start. "
        "Wall time of each build in its own process (imports included), median of alternating rounds; "
        "nodes = top-level nodes of model.onnx. fp32, CPU.",
        "",
        "| preset | builder | wall time (s) | nodes |",
        "|---|---|---|---|",
    ]
    for row in results["rows"]:
        for key, label in (
            ("ours_ort", "qwen-export --target ort"),
            ("ours_onnx", "qwen-export --target onnx"),
            ("genai", "onnxruntime-genai builder"),
        ):
            m = row[key]
            cell = f"failed: {m['error']}" if "error" in m else f"{m['seconds']:.1f} | {m['nodes']}"
            lines.append(f"| {row['preset']} | {label} | {cell} |")
        if "ours_ort_vs_genai" in row:
            r = row["ours_ort_vs_genai"]
            lines.append(f"| {row['preset']} | ratio ort / genai | {r['time']:.2f}x | {r['nodes']:.2f}x |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
