"""The qwen.cpu decode ops alone, this tree's kernel library against a baseline commit's, in the same run:
GatedDeltaRule's recurrence (one token, and a 3-token speculative verify step) at the shapes of the trained
reference model (golden/trained-qwen3.5-moe) and of the small preset, FloatMoE for one token at the small
preset's shape (64 experts, top 4, fresh router logits every call, so the chosen experts are read from memory
as in decode), beside NumPy summing as many bytes (k random experts) as the memory peer, and one token of
Attention and of AttentionKv16 over a 64K-key cache at the small preset's shape (and AttentionKv16 at
Qwen3.5-35B-A3B's: 16 query heads, 2 kv heads of 256, and at Qwen3.5-27B's: 24 query heads, 4 kv heads of
256) on two threads, its caches bound in place as the runtime binds them.

Each side builds its library with its own code (`qwen_export.cpu_kernels.library_path()`, run by that side's
Python: a clone at the baseline installed into a venv that borrows this venv's packages), then each case runs
as a one-node ONNX Runtime session (one thread; the attention case two), the sides taking turns in fresh
processes (this machine is shared: only ratios measured side by side mean much). With --paired, this venv's
Python loads both libraries in one process and times each case's calls in before/after pairs on the same
inputs: a change of a few percent shows there where fresh processes' placement and the host's load hide it.
Writes decode_ops.{json,md} in --out (benchmarks/; the AVX2 machine's results: decode_ops_avx2_machine.*).

    python scripts/bench_decode_ops.py [--baseline REV] [--rounds 5] [--paired] [--out DIR]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench_common import (
    alternating_rounds,
    baseline_parser,
    baseline_sides,
    produced_by,
    provenance,
    write_results,
)

BASELINE = "7a2106d"  # before the decode recurrence kept its sums in registers and FloatMoE read 8 rows
# One measurement per process. argv: calls, then the kernel libraries to time (none: this Python's own; two:
# before and after, each case's calls alternating between their sessions in pairs, the order flipping every
# pair). Per case and library, the median of `calls` timed calls after 20 warm ones.
MEASURE = """
import json, sys, time
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from qwen_export import cpu_kernels

calls = int(sys.argv[1])
libraries = sys.argv[2:] or [str(cpu_kernels.library_path())]
rng = np.random.default_rng(0)


def sessions(node, inputs, weights, outputs, threads=1, version=1, types=None):
    types = types or {}  # name -> element type where not float
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, types.get(n, TensorProto.FLOAT), None) for n in inputs],
        [helper.make_tensor_value_info(n, types.get(n, TensorProto.FLOAT), None) for n in outputs],
        [numpy_helper.from_array(v, n) for n, v in weights.items()],
    )
    model = helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", 21), helper.make_opsetid("qwen.cpu", version)]).SerializeToString()
    made = []
    for library in libraries:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = threads
        if len(libraries) > 1:  # an idle session's pool must not spin beside the other's run
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.register_custom_ops_library(library)
        made.append(ort.InferenceSession(model, options, providers=["CPUExecutionProvider"]))
    return made


def timed(runs, n=None):
    # run(i) is call i; with two runs, call i of each makes a pair
    n = n or calls
    for i in range(20):
        for run in runs:
            run(i)
    times = [[] for _ in runs]
    for i in range(n):
        for r in (range(len(runs)) if i % 2 == 0 else reversed(range(len(runs)))):
            start = time.perf_counter()
            runs[r](i)
            times[r].append(time.perf_counter() - start)
    out = {"us": [float(np.median(t)) * 1e6 for t in times]}
    if len(runs) == 2:
        ratios = np.array(times[1]) / np.array(times[0])
        out |= {"ratio": float(np.median(ratios)), "faster": int((ratios < 1).sum()), "pairs": n}
    return out


def delta_rule(nk, nv, dk, dv, tokens):
    c = 2 * nk * dk + nv * dv
    f = np.float32
    feeds = {
        "proj": rng.standard_normal((1, tokens, c + nv * dv + 2 * nv)).astype(f),
        "past_conv": rng.standard_normal((1, c, 3)).astype(f),
        "past_state": (rng.standard_normal((1, nv, dk, dv)) * 0.3).astype(f),
    }
    weights = {
        "conv_w": (rng.standard_normal((c, 1, 4)) * 0.5).astype(f),
        "dt_bias": rng.standard_normal(nv).astype(f),
        "neg_exp_a": -np.exp(rng.standard_normal(nv) * 0.5).astype(f),
        "norm_w": (1 + 0.1 * rng.standard_normal(dv)).astype(f),
    }
    node = helper.make_node(
        "GatedDeltaRule", ["proj", "conv_w", "past_conv", "past_state", "dt_bias", "neg_exp_a", "norm_w"],
        ["y", "present_conv", "present_state"], domain="qwen.cpu", num_k_heads=nk, num_v_heads=nv,
        head_k_dim=dk, head_v_dim=dv, conv_kernel=4, epsilon=1e-6,
    )
    made = sessions(node, list(feeds), weights, ["y", "present_conv", "present_state"])
    return timed([lambda i, s=s: s.run(None, feeds) for s in made])


def float_moe(experts, hidden, inter, k):
    fc1 = (rng.standard_normal((experts, 2 * inter, hidden)) * 0.02).astype(np.float32)
    fc2 = (rng.standard_normal((experts, hidden, inter)) * 0.02).astype(np.float32)
    node = helper.make_node("FloatMoE", ["x", "r", "w1", "w2"], ["y"], domain="qwen.cpu", k=k,
                            normalize_routing_weights=1)
    made = sessions(node, ["x", "r"], {"w1": fc1, "w2": fc2}, ["y"])
    x = rng.standard_normal((1, hidden)).astype(np.float32)
    logits = [rng.standard_normal((1, experts)).astype(np.float32) for _ in range(64)]  # call i takes i % 64
    out = timed([lambda i, s=s: s.run(None, {"x": x, "r": logits[i % 64]}) for s in made])
    read = fc1[:k].nbytes + fc2[:k].nbytes  # the bytes of k experts
    picks = [rng.choice(experts, k, replace=False) for _ in range(64)]  # the peer reads k random experts too
    peer = timed([lambda i: [fc1[e].sum() + fc2[e].sum() for e in picks[i % 64]]])["us"][0]
    return out, [read / us / 1e3 for us in out["us"]], read / peer / 1e3


# One token over `context` past keys, the caches [1, kv, rows, hd] bound as past and present (the op writes
# the new row in place, as runtime/in_place.py binds them; both libraries' sessions the same caches), in
# float or (`half`: AttentionKv16) float16.
def attention_decode(context, kv, group, hd, threads=2, half=False):
    f = np.float32
    rows = context + 1024  # room to grow, as the runtime's buffers have
    names = ["q", "k", "v", "past_k", "past_v", "bias"]
    node = helper.make_node("AttentionKv16" if half else "Attention", names, ["y", "present_k", "present_v"],
                            domain="qwen.cpu", num_heads=kv * group, kv_num_heads=kv, scale=hd ** -0.5)
    caches_type = TensorProto.FLOAT16 if half else TensorProto.FLOAT
    types = {n: caches_type for n in ("past_k", "past_v", "present_k", "present_v")}
    made = sessions(node, names, {}, ["y", "present_k", "present_v"], threads=threads, version=4, types=types)
    cache_dtype = np.float16 if half else f
    caches = {n: (rng.standard_normal((1, kv, rows, hd)) * 0.1).astype(cache_dtype) for n in ("k", "v")}
    values = {n: ort.OrtValue.ortvalue_from_numpy(c) for n, c in caches.items()}
    feeds = {
        "q": rng.standard_normal((1, 1, kv * group * hd)).astype(f),
        "k": rng.standard_normal((1, 1, kv * hd)).astype(f),
        "v": rng.standard_normal((1, 1, kv * hd)).astype(f),
        "bias": np.zeros((1, 1, 1, context + 1), f),
    }
    runs = []
    for s in made:
        binding = s.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, array)
        for name, value in values.items():
            binding.bind_ortvalue_input("past_" + name, value)
            binding.bind_ortvalue_output("present_" + name, value)
        binding.bind_output("y", "cpu")
        runs.append(lambda i, s=s, b=binding: s.run_with_iobinding(b))
    out = timed(runs, n=max(calls // 20, 50))
    read = 2 * kv * context * hd * np.dtype(cache_dtype).itemsize  # the past keys and values
    return out, [read / us / 1e3 for us in out["us"]]


cases = {
    "GatedDeltaRule trained model, 1 token": delta_rule(2, 4, 32, 32, 1),
    "GatedDeltaRule trained model, 3 tokens": delta_rule(2, 4, 32, 32, 3),
    "GatedDeltaRule small preset, 1 token": delta_rule(8, 16, 64, 64, 1),
    "GatedDeltaRule small preset, 3 tokens": delta_rule(8, 16, 64, 64, 3),
}
cases["FloatMoE small preset, 1 token"], moe_gbs, peer_gbs = float_moe(64, 1024, 256, 4)
attention_case = "Attention small preset, 1 token over 64K keys (2 threads)"
cases[attention_case], att_gbs = attention_decode(65536, 2, 4, 128)
kv16_case = "AttentionKv16 small preset, 1 token over 64K keys (2 threads)"
cases[kv16_case], kv16_gbs = attention_decode(65536, 2, 4, 128, half=True)
g8_case = "AttentionKv16 Qwen3.5-35B-A3B's heads (16 query, 2 kv of 256), 1 token over 64K keys (2 threads)"
cases[g8_case], g8_gbs = attention_decode(65536, 2, 8, 256, half=True)
g6_case = "AttentionKv16 Qwen3.5-27B's heads (24 query, 4 kv of 256), 1 token over 64K keys (2 threads)"
cases[g6_case], g6_gbs = attention_decode(65536, 4, 6, 256, half=True)
print(json.dumps({"cases": cases, "float_moe_gb_s": moe_gbs, "numpy_read_gb_s": peer_gbs,
                  "attention_gb_s": att_gbs, "attention_kv16_gb_s": kv16_gbs,
                  "attention_kv16_g8_gb_s": g8_gbs, "attention_kv16_g6_gb_s": g6_gbs}))
"""


# The Attention cases' read rates: the results' key (the measurement prints it + "_gb_s") and the op's label.
ATTENTION_RATES = (
    ("attention", "Attention"),
    ("attention_kv16", "AttentionKv16 (float16 caches)"),
    ("attention_kv16_g8", "AttentionKv16 at G = 8 (Qwen3.5-35B-A3B's heads)"),
    ("attention_kv16_g6", "AttentionKv16 at G = 6 (Qwen3.5-27B's heads)"),
)


def measure(python: Path, calls: int, folder: Path, libraries: Sequence[str] = ()) -> dict:
    """Run in `folder`, outside the repository: `python -c` puts the working directory first on sys.path, and
    the repository's own qwen_export there would stand in for the baseline's."""
    out = subprocess.run(
        [str(python), "-c", MEASURE, str(calls), *libraries], capture_output=True, text=True, cwd=folder
    )
    if out.returncode:
        raise SystemExit(f"measurement failed ({python}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def library_of(python: Path, folder: Path) -> str:
    """The qwen.cpu kernel library of the code `python` runs (built on first use)."""
    code = "from qwen_export import cpu_kernels; print(cpu_kernels.library_path())"
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=folder, check=True)
    return out.stdout.strip().splitlines()[-1]


def render(result: dict) -> str:
    paired = result.get("mode") == "paired"
    how = (
        "both libraries loaded in one process, each case's calls alternating between their sessions in "
        f"pairs (the order flipping every pair), median of {result['calls']} pairs per process, "
        f"{result['rounds']} processes, every other one loading the libraries the other way round; thread "
        "pools that do not spin (an idle session's would take a core from the other's run)"
        if paired
        else f"median of {result['calls']} calls per process, {result['rounds']} alternating rounds of fresh "
        "processes"
    )
    lines = [
        "# qwen.cpu decode ops: this tree against a baseline",
        "",
        produced_by(result),
        "",
        f"One-node ONNX Runtime sessions on one thread, {how}. Before: the kernel library at commit "
        f"{result['baseline']}; after: this commit's. GatedDeltaRule at the trained reference model's "
        "shapes (2 key and 4 value heads of 32) and the small preset's (8 and 16 heads of 64); FloatMoE at "
        "the small preset's (64 experts, H 1024, I 256, top 4), new router logits every call; Attention at "
        "the small preset's (8 query and 2 kv heads of 128; AttentionKv16 also at Qwen3.5-35B-A3B's 16 query "
        "and 2 kv heads of 256 and at Qwen3.5-27B's 24 query and 4 kv heads of 256) over 65536 past keys, on "
        "two threads, the caches (float, and float16 for AttentionKv16) bound as past and present "
        f"({max(result['calls'] // 20, 50)} calls).",
        "",
    ]
    if paired:
        lines += [
            "| case | before (us) | after (us) | after / before (median of pairs, median of processes) "
            "| pairs with after faster |",
            "|---|---:|---:|---:|---:|",
        ]
    else:
        lines += [
            "| case | before (us) | after (us) | after / before (median of rounds) |",
            "|---|---:|---:|---:|",
        ]
    for case, row in result["cases"].items():
        line = f"| {case} | {row['before_us']:.1f} | {row['after_us']:.1f} | {row['ratio']:.3f} |"
        lines.append(line + (f" {row['faster']} of {row['pairs']} |" if paired else ""))
    moe = result["float_moe"]
    lines += [
        "",
        f"FloatMoE, one token: the 4 experts' weights read at {moe['before_gb_s']:.1f} GB/s before and "
        f"{moe['after_gb_s']:.1f} after; NumPy reads as many bytes at {moe['numpy_read_gb_s']:.1f} GB/s "
        "(one thread, the memory peer).",
    ]
    for key, op in ATTENTION_RATES:
        if key in result:
            att = result[key]
            lines += [
                "",
                f"{op} over 64K keys: the past keys and values read at {att['before_gb_s']:.1f} GB/s "
                f"before and {att['after_gb_s']:.1f} after (the floor against this machine's bandwidth: "
                "scripts/bench_long_context.py).",
            ]
    return "\n".join(lines) + "\n"


def in_order(result: dict, swapped: int) -> dict:
    """A paired process's result with "before" first (`swapped`: it loaded "after" first)."""
    if not swapped:
        return result
    for row in result["cases"].values():
        row["us"].reverse()
        row["ratio"], row["faster"] = 1 / row["ratio"], row["pairs"] - row["faster"]
    for key in ("float_moe_gb_s", *(f"{name}_gb_s" for name, _ in ATTENTION_RATES)):
        result[key].reverse()
    return {**result, "swapped": True}


def summary(per_side: dict[str, list[dict]], paired: list[dict] | None) -> dict:
    """Cases, FloatMoE and Attention read rates across processes: `per_side` holds each side's process
    results (one library each) for the fresh-process mode; `paired` the one-process results (two each)."""
    if paired is not None:
        rows = {
            case: {
                "before_us": statistics.median(r["cases"][case]["us"][0] for r in paired),
                "after_us": statistics.median(r["cases"][case]["us"][1] for r in paired),
                "ratio": statistics.median(r["cases"][case]["ratio"] for r in paired),
                "faster": sum(r["cases"][case]["faster"] for r in paired),
                "pairs": sum(r["cases"][case]["pairs"] for r in paired),
            }
            for case in paired[0]["cases"]
        }
        side_results = {"before": [(r, 0) for r in paired], "after": [(r, 1) for r in paired]}
    else:
        before, after = per_side["before"], per_side["after"]
        rows = {}
        for case in after[0]["cases"]:
            b = [r["cases"][case]["us"][0] for r in before]
            a = [r["cases"][case]["us"][0] for r in after]
            rows[case] = {
                "before_us": statistics.median(b),
                "after_us": statistics.median(a),
                "ratio": statistics.median(x / y for x, y in zip(a, b, strict=True)),
            }
        side_results = {name: [(r, 0) for r in results] for name, results in per_side.items()}

    def rate(key: str, side: str) -> float:
        return statistics.median(r[key][i] for r, i in side_results[side])

    return {
        "cases": rows,
        "float_moe": {
            "before_gb_s": rate("float_moe_gb_s", "before"),
            "after_gb_s": rate("float_moe_gb_s", "after"),
            "numpy_read_gb_s": statistics.median(
                r["numpy_read_gb_s"] for r, _ in side_results["before"] + side_results["after"]
            ),
        },
        **{
            name: {f"{side}_gb_s": rate(f"{name}_gb_s", side) for side in ("before", "after")}
            for name, _ in ATTENTION_RATES
        },
    }


def main() -> int:
    parser = baseline_parser(__doc__, BASELINE)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument(
        "--paired",
        action="store_true",
        help="load both libraries in one process and time each case's calls in before/after pairs (this "
        "venv's Python): finer than fresh processes for changes of a few percent on a shared machine",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-decode-ops-") as tmp:
        folder = Path(tmp)
        sides = baseline_sides(args.baseline, folder)
        if args.paired:
            libraries = [library_of(sides["before"], folder), library_of(sides["after"], folder)]
            # every other process loads the libraries the other way round, so that neither holds the first
            # session (or the first-loaded code) throughout; in_order() puts "before" first again
            raw: Any = [
                in_order(
                    measure(Path(sys.executable), args.calls, folder, libraries[:: 1 - 2 * (k % 2)]), k % 2
                )
                for k in range(args.rounds)
            ]
            results = summary({}, raw)
        else:
            raw = alternating_rounds(
                sides, args.rounds, lambda _, python: measure(python, args.calls, folder)
            )
            results = summary(raw, None)
    result = {
        **provenance(),
        "baseline": args.baseline,
        "mode": "paired" if args.paired else "processes",
        "rounds": args.rounds,
        "calls": args.calls,
        **results,
        "rounds_raw": raw,
    }
    write_results(args.out, "decode_ops", result, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
