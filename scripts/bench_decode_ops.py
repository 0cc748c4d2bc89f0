"""The qwen.cpu decode ops alone, this tree's kernel library against a baseline commit's, in the same run:
GatedDeltaRule's recurrence (one token, and a 3-token speculative verify step) at the shapes of the trained
reference model (golden/trained-qwen3.5-moe) and of the small preset, FloatMoE for one token at the small
preset's shape (64 experts, top 4, fresh router logits every call, so the chosen experts are read from memory
as in decode), beside NumPy summing as many bytes (k random experts) as the memory peer, and one token of
Attention over a 64K-key cache at the small preset's shape on two threads, its caches bound in place as the
runtime binds them.

Each side builds its library with its own code (`qwen_export.cpu_kernels.library_path()`, run by that side's
Python: a clone at the baseline installed into a venv that borrows this venv's packages), then each case runs
as a one-node ONNX Runtime session (one thread; the attention case two), the sides taking turns in fresh
processes (this machine is shared: only ratios measured side by side mean much). Writes decode_ops.{json,md}
in --out (benchmarks/; the AVX2 machine's results are kept as benchmarks/decode_ops_avx2_machine.*).

    python scripts/bench_decode_ops.py [--baseline REV] [--rounds 5] [--out DIR]
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

BASELINE = "7a2106d"  # before the decode recurrence kept its sums in registers and FloatMoE read 8 rows
# One measurement, run by each side's Python: per case, the median of `calls` timed calls after 20 warm ones.
MEASURE = """
import itertools, json, sys, time
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from qwen_export import cpu_kernels

calls = int(sys.argv[1])
rng = np.random.default_rng(0)
library = str(cpu_kernels.library_path())


def session(node, inputs, weights, outputs, threads=1, version=1):
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(v, n) for n, v in weights.items()],
    )
    model = helper.make_model(graph, ir_version=10, opset_imports=[
        helper.make_opsetid("", 21), helper.make_opsetid("qwen.cpu", version)])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(library)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def timed(run, n=None):
    for _ in range(20):
        run()
    times = []
    for _ in range(n or calls):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e6


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
    s = session(node, list(feeds), weights, ["y", "present_conv", "present_state"])
    return timed(lambda: s.run(None, feeds))


def float_moe(experts, hidden, inter, k):
    fc1 = (rng.standard_normal((experts, 2 * inter, hidden)) * 0.02).astype(np.float32)
    fc2 = (rng.standard_normal((experts, hidden, inter)) * 0.02).astype(np.float32)
    node = helper.make_node("FloatMoE", ["x", "r", "w1", "w2"], ["y"], domain="qwen.cpu", k=k,
                            normalize_routing_weights=1)
    s = session(node, ["x", "r"], {"w1": fc1, "w2": fc2}, ["y"])
    x = rng.standard_normal((1, hidden)).astype(np.float32)
    logits = [rng.standard_normal((1, experts)).astype(np.float32) for _ in range(64)]
    turn = itertools.count()  # which of the 64 prepared router logits (and peer picks) a call takes
    us = timed(lambda: s.run(None, {"x": x, "r": logits[next(turn) % 64]}))
    read = fc1[:k].nbytes + fc2[:k].nbytes  # the bytes of k experts
    picks = [rng.choice(experts, k, replace=False) for _ in range(64)]  # the peer reads k random experts too
    peer = timed(lambda: [fc1[e].sum() + fc2[e].sum() for e in picks[next(turn) % 64]])
    return us, read / us / 1e3, read / peer / 1e3


# One token over `context` past keys, the caches [1, kv, rows, hd] bound as past and present (the op writes
# the new row in place, as runtime/in_place.py binds them): us, and the GB/s of the past keys and values read.
def attention_decode(context, kv, group, hd, threads=2):
    f = np.float32
    rows = context + 1024  # room to grow, as the runtime's buffers have
    names = ["q", "k", "v", "past_k", "past_v", "bias"]
    node = helper.make_node("Attention", names, ["y", "present_k", "present_v"], domain="qwen.cpu",
                            num_heads=kv * group, kv_num_heads=kv, scale=hd ** -0.5)
    s = session(node, names, {}, ["y", "present_k", "present_v"], threads=threads, version=4)
    caches = {n: (rng.standard_normal((1, kv, rows, hd)) * 0.1).astype(f) for n in ("k", "v")}
    feeds = {
        "q": rng.standard_normal((1, 1, kv * group * hd)).astype(f),
        "k": rng.standard_normal((1, 1, kv * hd)).astype(f),
        "v": rng.standard_normal((1, 1, kv * hd)).astype(f),
        "bias": np.zeros((1, 1, 1, context + 1), f),
    }
    binding = s.io_binding()
    for name, array in feeds.items():
        binding.bind_cpu_input(name, array)
    for name, cache in caches.items():
        value = ort.OrtValue.ortvalue_from_numpy(cache)
        binding.bind_ortvalue_input("past_" + name, value)
        binding.bind_ortvalue_output("present_" + name, value)
    binding.bind_output("y", "cpu")
    us = timed(lambda: s.run_with_iobinding(binding), n=max(calls // 20, 50))
    read = 2 * kv * context * hd * 4  # the past keys and values
    return us, read / us / 1e3


cases = {
    "GatedDeltaRule trained model, 1 token": delta_rule(2, 4, 32, 32, 1),
    "GatedDeltaRule trained model, 3 tokens": delta_rule(2, 4, 32, 32, 3),
    "GatedDeltaRule small preset, 1 token": delta_rule(8, 16, 64, 64, 1),
    "GatedDeltaRule small preset, 3 tokens": delta_rule(8, 16, 64, 64, 3),
}
moe_us, moe_gbs, peer_gbs = float_moe(64, 1024, 256, 4)
cases["FloatMoE small preset, 1 token"] = moe_us
att_us, att_gbs = attention_decode(65536, 2, 4, 128)
cases["Attention small preset, 1 token over 64K keys (2 threads)"] = att_us
print(json.dumps({"us": cases, "float_moe_gb_s": moe_gbs, "numpy_read_gb_s": peer_gbs,
                  "attention_gb_s": att_gbs}))
"""


def measure(python: Path, calls: int, folder: Path) -> dict:
    """Run in `folder`, outside the repository: `python -c` puts the working directory first on sys.path, and
    the repository's own qwen_export there would stand in for the baseline's."""
    out = subprocess.run([str(python), "-c", MEASURE, str(calls)], capture_output=True, text=True, cwd=folder)
    if out.returncode:
        raise SystemExit(f"measurement failed ({python}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def render(result: dict) -> str:
    lines = [
        "# qwen.cpu decode ops: this tree against a baseline",
        "",
        produced_by(result),
        "",
        f"One-node ONNX Runtime sessions on one thread, median of {result['calls']} calls per process, "
        f"{result['rounds']} alternating rounds of fresh processes. Before: the kernel library at commit "
        f"{result['baseline']}; after: this commit's. GatedDeltaRule at the trained reference model's "
        "shapes (2 key and 4 value heads of 32) and the small preset's (8 and 16 heads of 64); FloatMoE at "
        "the small preset's (64 experts, H 1024, I 256, top 4), new router logits every call; Attention at "
        "the small preset's (8 query and 2 kv heads of 128) over 65536 past keys, on two threads, the "
        f"caches bound as past and present (median of {max(result['calls'] // 20, 50)} calls).",
        "",
        "| case | before (us) | after (us) | after / before (median of rounds) |",
        "|---|---:|---:|---:|",
    ]
    for case, row in result["cases"].items():
        lines.append(f"| {case} | {row['before_us']:.1f} | {row['after_us']:.1f} | {row['ratio']:.2f} |")
    moe = result["float_moe"]
    lines += [
        "",
        f"FloatMoE, one token: the 4 experts' weights read at {moe['before_gb_s']:.1f} GB/s before and "
        f"{moe['after_gb_s']:.1f} after; NumPy reads as many bytes at {moe['numpy_read_gb_s']:.1f} GB/s "
        "(one thread, the memory peer).",
    ]
    if "attention" in result:
        att = result["attention"]
        lines += [
            "",
            f"Attention over 64K keys: the past keys and values read at {att['before_gb_s']:.1f} GB/s "
            f"before and {att['after_gb_s']:.1f} after (the floor against this machine's bandwidth: "
            "scripts/bench_long_context.py).",
        ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = baseline_parser(__doc__, BASELINE)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-decode-ops-") as tmp:
        sides = baseline_sides(args.baseline, Path(tmp))
        folder = Path(tmp)
        rounds = alternating_rounds(sides, args.rounds, lambda _, python: measure(python, args.calls, folder))
    cases = {}
    for case in rounds["after"][0]["us"]:
        before = [r["us"][case] for r in rounds["before"]]
        after = [r["us"][case] for r in rounds["after"]]
        cases[case] = {
            "before_us": statistics.median(before),
            "after_us": statistics.median(after),
            "ratio": statistics.median(a / b for a, b in zip(after, before, strict=True)),
        }
    result = {
        **provenance(),
        "baseline": args.baseline,
        "rounds": args.rounds,
        "calls": args.calls,
        "cases": cases,
        "float_moe": {
            "before_gb_s": statistics.median(r["float_moe_gb_s"] for r in rounds["before"]),
            "after_gb_s": statistics.median(r["float_moe_gb_s"] for r in rounds["after"]),
            "numpy_read_gb_s": statistics.median(
                r["numpy_read_gb_s"] for r in rounds["after"] + rounds["before"]
            ),
        },
        **(
            {
                "attention": {
                    side: statistics.median(r["attention_gb_s"] for r in rounds[key])
                    for side, key in (("before_gb_s", "before"), ("after_gb_s", "after"))
                }
            }
            if all("attention_gb_s" in r for r in rounds["before"] + rounds["after"])
            else {}
        ),
        "rounds_us": rounds,
    }
    write_results(args.out, "decode_ops", result, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
