"""Long-context decode on the CPU against its bytes-moved floor (issue #19 item 1).

For each context length the decode step of one sequence is timed with the KV cache of the full-attention
layers filled with random past keys/values of that length (no 64K-token prefill needed: the step's cost
depends on the cache's size, not its content) and random DeltaNet states. Targets:

- old path: `ort` (fp32 weights) and `ort-cpu-int4` as it was (GroupQueryAttention for attention);
- new path: `ort-cpu` (fp32), `ort-cpu-int4` and `ort-cpu-int4-kv16` (qwen.cpu Attention / AttentionKv16).

The floor of a step is the bytes it must move over the memory bandwidth measured in the same run: the
weights read once (the routed experts' share k/E of theirs, one embedding row) plus the states read and
written. States are bound as ONNX Runtime values (IOBinding), as the runtime binds them, so no numpy copy
is timed: where the graph's ops update a state in place (runtime/in_place.py) one buffer is past and
present, and a KV cache's step reads the past rows and writes one new row; elsewhere the past K/V is read
and the present K/V written whole (the copying path). One session runs at a time; the targets
take turns over rounds and each keeps its best block median (the machine is shared).

    python scripts/bench_long_context.py [--contexts 1024 4096 16384 65536 262144] [--work DIR]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_common import REPO, produced_by, provenance, write_results

from qwen_export.memory import available_memory

OLD, NEW = "old (GroupQueryAttention)", "new (qwen.cpu Attention)"
TARGETS = {  # name -> (built from target, path, KV bytes per element)
    "ort": ("ort", OLD, 4),
    "ort-cpu-int4 (GQA)": ("ort-cpu-int4-gqa", OLD, 4),
    "ort-cpu": ("ort-cpu", NEW, 4),
    "ort-cpu-int4": ("ort-cpu-int4", NEW, 4),
    "ort-cpu-int4-kv16": ("ort-cpu-int4-kv16", NEW, 2),
}
EXPERT_OPS = {"MoE", "QMoE", "Int4MoE", "FloatMoE"}
ONNX_BYTES = {1: 4, 10: 2, 2: 1, 3: 1, 7: 8, 6: 4, 11: 8, 16: 2}  # TensorProto dtype -> bytes


# --- memory bandwidth ---------------------------------------------------------------------------------
def bandwidth(threads: int, mib: int = 512, repeats: int = 5) -> dict[str, float]:
    """GB/s of `threads` numpy threads (numpy releases the GIL in copies and BLAS calls), each over `mib` MiB
    arrays, best of `repeats`: a copy (read + write, counted twice) and a read, the BLAS dot product of two
    arrays (both read). The read was numpy's sum before, which its pairwise additions bound below memory:
    23 GB/s where the dot product reads 40 (2 threads, an AVX2 AMD EPYC)."""
    n = mib * 2**20 // 4
    src = [np.random.default_rng(i).random(n, np.float32) for i in range(threads)]
    dst = [np.empty_like(a) for a in src]
    for d in dst:
        d[:] = 1  # touch the pages before timing

    def timed(work) -> float:
        best = float("inf")
        for _ in range(repeats):
            jobs = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
            start = time.perf_counter()
            for j in jobs:
                j.start()
            for j in jobs:
                j.join()
            best = min(best, time.perf_counter() - start)
        return best

    copy = timed(lambda i: np.copyto(dst[i], src[i]))
    read = timed(lambda i: np.dot(src[i], dst[i]))
    size = threads * n * 4
    return {"copy_gbs": 2 * size / copy / 1e9, "read_gbs": 2 * size / read / 1e9}


# --- artifacts ----------------------------------------------------------------------------------------
def without_cpu_attention(name: str, base_name: str):
    """`base_name`'s target with GroupQueryAttention left as the ORT lowering emits it (the old path)."""
    from qwen_export.passes.lower_cpu_attention import UseCpuAttention
    from qwen_export.targets import Target, get_target

    base = get_target(base_name)

    def pipeline(options):
        return [p for p in base.passes(options) if not isinstance(p, UseCpuAttention)]

    return Target(name, f"{base_name} with GroupQueryAttention (before issue #19)", base.kind, pipeline,
                  base.backend, weight_bits=base.weight_bits, cpu_kernels=base.cpu_kernels)  # fmt: skip


# targets this benchmark registers for its own run only (the old paths it measures against)
BASELINES = {"ort-cpu-int4-gqa": ("ort-cpu-int4",)}


def built(preset: str, target: str, work: Path) -> Path:
    """The artifact's model.onnx, built once into `work` (a BASELINES target registered for the build)."""
    from contextlib import nullcontext

    from qwen_export.build import build
    from qwen_export.targets import registered

    out = work / target
    if (out / "model.onnx").is_file():
        return out / "model.onnx"
    baseline = BASELINES.get(target)
    with registered(without_cpu_attention(target, *baseline)) if baseline else nullcontext():
        build(out, preset=preset, target=target)
    return out / "model.onnx"


def weight_bytes_per_step(model_path: Path) -> int:
    """Initializer bytes a one-token decode step reads: all of them, but the routed experts' weights
    count k/E of theirs and an embedding table (a Gather's data) one row."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    readers: dict[str, list] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, i))
    total = 0.0
    for init in graph.initializer:
        size = ONNX_BYTES.get(init.data_type, 4) * int(np.prod(init.dims, dtype=np.int64))
        uses = readers.get(init.name, [])
        if uses and all(n.op_type == "Gather" and i == 0 for n, i in uses):
            size /= max(int(init.dims[0]), 1)
        elif uses and all(n.op_type in EXPERT_OPS and i >= 2 for n, i in uses):
            node = uses[0][0]
            k = next((a.i for a in node.attribute if a.name == "k"), 1)
            size *= k / int(init.dims[0])
        total += size
    return int(total)


# --- one decode step ----------------------------------------------------------------------------------
class Step:
    """A session and the bound inputs of one decode step at `context` past tokens, bound as the runtime
    binds them: states the graph's ops update in place (runtime/in_place.py) get one buffer for past and
    present (a KV cache with spare rows), the rest a fresh present output each step."""

    def __init__(self, model_path: Path, context: int, threads: int) -> None:
        import onnxruntime as ort

        from qwen_export.runtime.in_place import GrowingCache, in_place_states
        from qwen_export.runtime.ort_decoder import PAST_PREFIX, PRESENT_PREFIX, session_options

        options = session_options(optimize=True, threads=threads, model_path=model_path)
        self.session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        in_place = in_place_states(model_path, PAST_PREFIX, PRESENT_PREFIX)
        rng = np.random.default_rng(0)
        dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
        self.binding = self.session.io_binding()
        self.state_bytes = 0
        self.keep = []
        shared = {}
        for i in self.session.get_inputs():
            if not i.name.startswith(PAST_PREFIX):
                continue
            suffix = i.name.removeprefix(PAST_PREFIX)
            kv = i.name.endswith((".key", ".value"))
            shape = [1 if d == "batch" else context if kv and n == 2 else d for n, d in enumerate(i.shape)]
            array = (rng.standard_normal(shape, np.float32) * 0.1).astype(dtypes[i.type])
            per_row = array.nbytes / context if kv else 0
            if in_place.get(suffix):  # a buffer with spare rows: read the past, write the new row
                value = GrowingCache.holding(array, context + 1).value
                self.state_bytes += array.nbytes + per_row
            else:  # read the past, write the present (one row longer for K/V): a copy, or in place
                value = ort.OrtValue.ortvalue_from_numpy(array)
                self.state_bytes += array.nbytes + array.nbytes + per_row
            if suffix in in_place:
                shared[PRESENT_PREFIX + suffix] = value
            self.keep.append(value)
            self.binding.bind_ortvalue_input(i.name, value)
        feeds = {
            "input_ids": np.array([[1]], np.int64),
            "attention_mask": np.ones((1, context + 1), np.int64),
            "position_ids": np.array([[context]], np.int64),
        }
        for name, array in feeds.items():
            self.keep.append(array)
            self.binding.bind_cpu_input(name, array)
        for o in self.session.get_outputs():
            if o.name in shared:
                self.binding.bind_ortvalue_output(o.name, shared[o.name])
            else:
                self.binding.bind_output(o.name, "cpu")

    def run(self) -> float:
        start = time.perf_counter()
        self.session.run_with_iobinding(self.binding)
        return (time.perf_counter() - start) * 1e3


def run() -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small-qwen3.5-moe")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 65536, 262144])
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=list(TARGETS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", type=Path, default=None, help="keep the built artifacts here (reused)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks")
    args = parser.parse_args()

    from qwen_export import cpu_kernels
    from qwen_export.exporter.export import load_model_source
    from qwen_export.presets import materialize

    result: dict[str, Any] = {**provenance(), "preset": args.preset, "threads": args.threads}
    result["kernel_backend"] = cpu_kernels.backend()
    _, spec, _ = load_model_source(materialize(args.preset))
    work = args.work or Path(tempfile.mkdtemp(prefix="long-context-"))
    paths = {name: built(args.preset, TARGETS[name][0], work) for name in args.targets}
    weights = {name: weight_bytes_per_step(path) for name, path in paths.items()}
    # The host's bandwidth drifts (a copy at 33.5 GB/s in one run, 49.5 in another), so it is probed before
    # every context and once more at the end, and every floor uses the fastest probe: a slow moment cannot
    # flatter a ratio.
    probes = [bandwidth(args.threads)]
    rows = []
    for context in args.contexts:
        kv = (
            2
            * sum(t == "full_attention" for t in spec.layer_types)
            * spec.num_key_value_heads
            * spec.head_dim
        )
        need = 2 * context * kv * 4 * 2.5  # past and present of the largest cache, twice over, with room
        available = available_memory()
        if need > available:
            rows.append(
                {"context": context, "skipped": f"needs ~{need / 1e9:.1f} GB, {available / 1e9:.1f} free"}
            )
            continue
        # One session at a time (idle sessions' spinning threads would steal the 2 cores), in blocks of
        # `repeats` steps after two warm-up steps; the targets take turns for `rounds` rounds and each
        # keeps its best block median (the machine is shared: the least disturbed block).
        blocks: dict[str, list[float]] = {name: [] for name in paths}
        state: dict[str, int] = {}
        for _ in range(args.rounds):
            for name, path in paths.items():
                step = Step(path, context, args.threads)
                step.run(), step.run()
                blocks[name].append(float(np.median([step.run() for _ in range(args.repeats)])))
                state[name] = step.state_bytes
                del step
                gc.collect()
        rows.append({"context": context, "blocks": blocks, "state": state})
        probes.append(bandwidth(args.threads))
    gbs = max(max(p.values()) for p in probes)  # the fastest copy or read seen: the floor is not flattered
    result["bandwidth"] = max(probes, key=lambda p: max(p.values()))
    result["bandwidth_probes"] = [{k: round(v, 1) for k, v in p.items()} for p in probes]
    result["floor_bandwidth_gbs"] = gbs
    # what these cores read at most (a decode step mostly reads): how far a step is from it, beside the floor
    read_gbs = max(p["read_gbs"] for p in probes)
    result["read_bandwidth_gbs"] = read_gbs
    result["contexts"] = [r if "skipped" in r else floor_row(r, paths, weights, gbs, read_gbs) for r in rows]
    write_results(args.out, "long_context", result, render)
    return result


def probe_range(r: dict[str, Any]) -> str:
    """The spread of the run's bandwidth probes (older results carry one probe)."""
    probes = r.get("bandwidth_probes") or [r["bandwidth"]]
    fastest = [max(p.values()) for p in probes]
    return f"{len(probes)} probes, {min(fastest):.1f} to {max(fastest):.1f} GB/s"


def floor_row(
    raw: dict[str, Any], paths: dict[str, Path], weights: dict[str, int], gbs: float, read_gbs: float
) -> dict[str, Any]:
    """A context's measured steps against their floors at `gbs` GB/s, and against the same bytes at the
    fastest read probe's `read_gbs`."""
    row: dict[str, Any] = {"context": raw["context"], "targets": {}}
    for name in paths:
        blocks = raw["blocks"][name]
        moved = weights[name] + raw["state"][name]
        floor = moved / (gbs * 1e9) * 1e3
        ms = min(blocks)
        row["targets"][name] = {
            "path": TARGETS[name][1],
            "step_ms": round(ms, 2),
            "blocks_ms": [round(b, 2) for b in blocks],
            "weight_mb": round(weights[name] / 1e6, 1),
            "state_mb": round(raw["state"][name] / 1e6, 1),
            "floor_ms": round(floor, 2),
            "vs_floor": round(ms / floor, 2),
            "vs_read_rate": round(ms / (moved / (read_gbs * 1e9) * 1e3), 2),
        }
    print(row["context"], {n: t["vs_floor"] for n, t in row["targets"].items()}, flush=True)
    return row


def render(r: dict[str, Any]) -> str:
    bw = r["bandwidth"]
    lines = [
        "# Long-context decode against the bytes-moved floor (CPU)",
        "",
        produced_by(r),
        "",
        f"Preset {r['preset']}, batch 1, {r['threads']} threads, qwen.cpu loops: {r['kernel_backend']}. "
        f"Memory bandwidth measured in the same run ({r['threads']} numpy threads), before every context "
        f"and at the end: {probe_range(r)}; the fastest probe gave copy {bw['copy_gbs']:.1f} GB/s, read "
        f"{bw['read_gbs']:.1f} GB/s, and every floor uses the faster, {r['floor_bandwidth_gbs']:.1f} GB/s. "
        "The read probe is the BLAS dot product of two arrays; a decode step mostly reads, and the last "
        "column is the step against its bytes at the fastest read probe"
        + (f", {r['read_bandwidth_gbs']:.1f} GB/s." if "read_bandwidth_gbs" in r else "."),
        "",
        "floor = (weight bytes read per step + state bytes read and written per step) / bandwidth; "
        "measured = the best of the rounds' median decode steps (one session at a time, the targets taking "
        "turns). The new path updates its states in place (one buffer for past and present; a KV step reads "
        "the past rows and writes one), so its states column is about half the old path's: the floor is "
        "what that path must move.",
        "",
        "| context | target | path | step ms | weights MB | states MB | floor ms | measured / floor | "
        "measured / bytes at the read rate |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in r["contexts"]:
        if "skipped" in row:
            lines.append(f"| {row['context']} | skipped: {row['skipped']} | | | | | | | |")
            continue
        for name, t in row["targets"].items():
            lines.append(
                f"| {row['context']} | {name} | {t['path']} | {t['step_ms']} | {t['weight_mb']} | "
                f"{t['state_mb']} | {t['floor_ms']} | {t['vs_floor']}x | "
                + (f"{t['vs_read_rate']}x |" if "vs_read_rate" in t else "- |")
            )
    return "\n".join(lines)


if __name__ == "__main__":
    run()
