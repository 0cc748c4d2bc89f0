"""Full-width scale benchmark: export a true-width slice of Qwen3.5-397B-A17B and compare with the disk.

The slice has the flagship's real widths (hidden 4096, 512 experts top-10 with expert and shared
intermediate 1024, vocab 248,320, 32 q / 2 kv heads of 256, DeltaNet 16 k / 64 v heads of 128, conv kernel
4) and 2 to 4 layers covering both layer kinds (default 2: one Gated DeltaNet, one full attention), as a
text-only Qwen3_5MoeForCausalLM checkpoint. If qwen_export/family_configs/qwen3.5-397b-a17b.json exists,
the slice is its text_config with only num_hidden_layers and layer_types overridden.

Steps (one case after the other, so both never sit on the disk together):

1. disk: write a file of several GB (fsync), drop it from the page cache (posix_fadvise DONTNEED), read it
   back: sequential write and read throughput W and R; the copy floor is bytes / (bytes/R + bytes/W),
   what a plain file copy could reach.
2. per case (bf16: stacked experts in bf16; fp8: Qwen's official FP8 layout, per-expert, 128x128 block
   scales): write the slice as a sharded checkpoint (4 GiB shards + index), streamed tensor by tensor from
   a few random blocks (random values: they do not matter here; never NaN/inf); time a cp-like copy of it
   (shutil.copyfileobj with a 64 MiB buffer + fsync, from a cold page cache) as the peer.
3. run the export as a user would, in a subprocess (`.venv/bin/qwen-export export --model DIR -o OUT`,
   plus `--weights fp8` and `--weights dequant --dtype bf16` for the FP8 checkpoint), the checkpoint
   dropped from the page cache first; the clock stops after the output is fsynced. Measured: wall time,
   export.json's own timings, peak RSS of the child and its children (psutil every 50 ms, and the child's
   own ru_maxrss from wait4), bytes read and written (the child's block I/O from wait4, and the size of
   the output). GB/s = bytes written / wall, compared with the copy floor. Acceptance: >= 70% of the copy
   floor and peak RSS < 3 GB.
4. extrapolate to the whole 397B (60 layers; published checkpoints ~807 GB bf16, ~400 GB FP8).

Free space is checked before every step (a step that would leave < 5 GB is refused with a message) and
during each export (the child is stopped if the disk falls below that). Each checkpoint and export is
deleted after its measurement unless --keep. GB = 1e9 bytes throughout.

Writes benchmarks/scale.json and benchmarks/scale.md (atomically). Usage::

    .venv/bin/python scripts/bench_scale.py [--layers 2] [--cases fp8 bf16] [--work /tmp/qwen-scale-bench]
    # quick smoke run at reduced width:
    .venv/bin/python scripts/bench_scale.py --hidden 64 --experts 4 --vocab 1024 --disk-test-gb 0.05 \\
        --work /tmp/smoke --results /tmp/smoke-results
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qwen_export.exporter import fp8  # noqa: E402
from qwen_export.fp8_checkpoint import (  # noqa: E402
    INDEX_FILE,
    OutTensor,
    official_fp8_layout,
    write_sharded,
)

GB = 1e9
GIB = 1 << 30
FAMILY_CONFIG = REPO / "qwen_export" / "family_configs" / "qwen3.5-397b-a17b.json"
ARCHITECTURE = "Qwen3_5MoeForCausalLM"
# Qwen3.5-397B-A17B's text tower (DESIGN.md reference shapes), used when the family config is absent.
FLAGSHIP_TEXT: dict[str, Any] = dict(
    vocab_size=248320,
    hidden_size=4096,
    num_attention_heads=32,
    num_key_value_heads=2,
    head_dim=256,
    linear_num_key_heads=16,
    linear_num_value_heads=64,
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    linear_conv_kernel_dim=4,
    num_experts=512,
    num_experts_per_tok=10,
    moe_intermediate_size=1024,
    shared_expert_intermediate_size=1024,
    rms_norm_eps=1e-6,
    max_position_embeddings=262144,
    rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
    tie_word_embeddings=False,
    hidden_act="silu",
)
LAYER_TYPES = {
    2: ["linear_attention", "full_attention"],
    3: ["linear_attention", "linear_attention", "full_attention"],
    4: ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
}
FULL_LAYERS = 60
PUBLISHED_BYTES = {"bf16": 807 * GB, "fp8": 400 * GB}  # Qwen3.5-397B-A17B checkpoints as published
EXPORT_VARIANTS = {
    "bf16": [("bf16", [])],
    "fp8": [
        ("fp8", ["--weights", "fp8"]),
        ("fp8 -> dequant bf16", ["--weights", "dequant", "--dtype", "bf16"]),
    ],
}
ACCEPT_FLOOR_PCT = 70.0
ACCEPT_RSS_BYTES = 3 * GB
POLL_S = 0.05
COPY_BUFFER = 64 << 20


# --------------------------------------------------------------------------------------------------------
# machine, config, tensors
# --------------------------------------------------------------------------------------------------------


def machine_info(work: Path) -> dict[str, Any]:
    cpu_model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu_model in ("unknown", "", platform.machine()):
                cpu_model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    isa = [f for f in ("amx_tile", "avx512_bf16", "avx512_vnni", "avx512f", "avx2", "fma") if f in flags]
    vector_isa = next((f for f in ("avx512_vnni", "avx512f", "avx2") if f in flags), "none of avx2/avx512")
    device = fs = None
    try:
        best = ""
        for part in psutil.disk_partitions(all=True):
            if str(work).startswith(part.mountpoint) and len(part.mountpoint) > len(best):
                best, device, fs = part.mountpoint, part.device, part.fstype
    except OSError:
        pass
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "vector_isa": vector_isa,
        "isa_flags": isa,
        "ram_gib": round(psutil.virtual_memory().total / GIB, 1),
        "disk": {"work_dir": str(work), "device": device, "filesystem": fs},
        "python": platform.python_version(),
    }


def slice_config(layers: int, hidden: int | None, experts: int | None, vocab: int | None) -> tuple[dict, str]:
    """(config.json dict of the slice, where its fields came from)."""
    import transformers

    if FAMILY_CONFIG.is_file():
        family = json.loads(FAMILY_CONFIG.read_text())
        text = dict(family.get("text_config", family))
        source = f"{FAMILY_CONFIG.relative_to(REPO)} text_config (num_hidden_layers, layer_types overridden)"
    else:
        text = dict(FLAGSHIP_TEXT)
        source = f"built-in Qwen3.5-397B-A17B text shapes ({FAMILY_CONFIG.relative_to(REPO)} absent)"
    text.update(num_hidden_layers=layers, layer_types=LAYER_TYPES[layers])
    overrides = {
        k: v for k, v in (("hidden_size", hidden), ("num_experts", experts), ("vocab_size", vocab)) if v
    }
    text.update(overrides)
    if experts:
        text["num_experts_per_tok"] = min(text.get("num_experts_per_tok", 10), experts)
    if overrides:
        source += f"; reduced width: {overrides}"
    for key in ("model_type", "architectures", "quantization_config", "transformers_version"):
        text.pop(key, None)
    config = transformers.Qwen3_5MoeTextConfig(**text)
    config.architectures = [ARCHITECTURE]
    out = config.to_dict()
    out["dtype"] = "bfloat16"
    return out, source


def model_tensors(config: dict) -> dict[str, tuple[int, ...]]:
    """name -> shape of transformers' own model for the config (built on the meta device: no memory)."""
    import torch
    import transformers

    cfg = transformers.Qwen3_5MoeTextConfig(**{k: v for k, v in config.items() if k != "architectures"})
    with torch.device("meta"):
        model = getattr(transformers, ARCHITECTURE)(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


class RandomBlocks:
    """Tensor bytes cut from a few random blocks at random offsets: cheap to produce, finite, and not one
    repeated pattern (a disk that deduplicates or compresses would flatter us)."""

    def __init__(self, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.rng = rng
        normals = rng.standard_normal(1 << 24, dtype=np.float32)  # 16 Mi values
        self.pools = {
            "BF16": (normals * 0.02).astype(ml_dtypes.bfloat16),
            "F8_E4M3": np.clip(normals * 100.0, -448, 448).astype(ml_dtypes.float8_e4m3fn),
            "F32": rng.uniform(1e-5, 1e-3, 1 << 16).astype(np.float32),  # positive block scales
        }
        for pool in self.pools.values():
            assert np.isfinite(pool.astype(np.float32)).all()

    def producer(self, dtype: str, count: int):
        pool = self.pools[dtype]
        piece = len(pool) // 2

        def produce():
            left = count
            while left:
                n = min(left, piece)
                start = int(self.rng.integers(0, len(pool) - n + 1))
                yield pool[start : start + n]
                left -= n

        return produce


def checkpoint_plan(kind: str, shapes: dict[str, tuple[int, ...]], blocks: RandomBlocks) -> list[OutTensor]:
    """bf16: transformers' names (stacked experts) in bf16; fp8: the official FP8 layout of the same model
    (the rule quantize_checkpoint applies: per-expert F8_E4M3 weights + F32 block scales, the rest bf16)."""
    if kind == "bf16":
        layout = [(name, "BF16", shape) for name, shape in shapes.items()]
    else:
        entries = official_fp8_layout({n: ("BF16", s) for n, s in shapes.items()}, scale_dtype="F32")
        layout = [(e.name, e.dtype, e.shape) for e in entries]
    return [OutTensor(n, d, s, blocks.producer(d, math.prod(s))) for n, d, s in layout]


# --------------------------------------------------------------------------------------------------------
# disk
# --------------------------------------------------------------------------------------------------------


class DiskSpaceError(RuntimeError):
    pass


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def require_space(work: Path, need: float, min_free: float, step: str) -> None:
    free = free_bytes(work)
    if free - need < min_free:
        raise DiskSpaceError(
            f"refusing to {step}: needs {need / GB:.1f} GB, {free / GB:.1f} GB free on {work}, which would "
            f"leave {(free - need) / GB:.1f} GB (< {min_free / GB:.0f} GB); free space or lower --layers"
        )


def drop_cache(paths: list[Path]) -> None:
    """Ask the kernel to drop the files' pages from the page cache (clean pages: they were fsynced)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for folder in [root, root.parent]:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def measure_disk(work: Path, size: int, min_free: float) -> dict[str, Any]:
    """Sequential write (with fsync) then cold read of one file of `size` bytes."""
    require_space(work, size, min_free, "measure the disk")
    path = work / "disk-test.bin"
    pool = np.random.default_rng(1).integers(0, 256, 256 << 20, dtype=np.uint8)
    rng = np.random.default_rng(2)
    chunk = COPY_BUFFER
    try:
        start = time.perf_counter()
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, chunk)
                off = int(rng.integers(0, len(pool) - n + 1))
                f.write(pool[off : off + n])
                left -= n
            f.flush()
            os.fsync(f.fileno())
        write_s = time.perf_counter() - start
        drop_cache([path])
        buf = bytearray(chunk)
        start = time.perf_counter()
        got = 0
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                got += n
        read_s = time.perf_counter() - start
    finally:
        path.unlink(missing_ok=True)
    write_bps, read_bps = size / write_s, got / read_s
    floor = size / (size / read_bps + size / write_bps)
    return {
        "test_bytes": size,
        "write_s": round(write_s, 3),
        "read_s": round(read_s, 3),
        "write_gbps": round(write_bps / GB, 3),
        "read_gbps": round(read_bps / GB, 3),
        "copy_floor_gbps": round(floor / GB, 3),
        "method": "one file, 64 MiB writes + fsync; posix_fadvise(DONTNEED); 64 MiB reads",
    }


def copy_peer(src: Path, dst: Path) -> dict[str, Any]:
    """cp-like copy of a checkpoint folder from a cold cache: copyfileobj with a 64 MiB buffer + fsync."""
    files = sorted(p for p in src.iterdir() if p.is_file())
    drop_cache(files)
    dst.mkdir(parents=True)
    start = time.perf_counter()
    total = 0
    for path in files:
        with open(path, "rb") as fin, open(dst / path.name, "wb") as fout:
            shutil.copyfileobj(fin, fout, COPY_BUFFER)
            fout.flush()
            os.fsync(fout.fileno())
        total += path.stat().st_size
    fsync_tree(dst)
    wall = time.perf_counter() - start
    return {"bytes": total, "wall_s": round(wall, 3), "gbps": round(total / wall / GB, 3)}


# --------------------------------------------------------------------------------------------------------
# export in a subprocess
# --------------------------------------------------------------------------------------------------------


# The export runs under this small launcher, which forks + execs it and reports the child's own rusage. A
# child forked straight from this script would inherit the script's peak RSS in its ru_maxrss (Linux keeps
# the pre-exec memory's high-water mark), and this script holds torch, transformers and random pools.
LAUNCHER = """
import json, os, sys
report, argv = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    os.execv(argv[0], argv)
_, status, usage = os.wait4(pid, 0)
with open(report, "w") as f:
    json.dump({"maxrss_kib": usage.ru_maxrss, "inblock": usage.ru_inblock, "oublock": usage.ru_oublock}, f)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def export_cli() -> list[str]:
    exe = REPO / ".venv" / "bin" / "qwen-export"
    if exe.is_file():
        return [str(exe)]
    return [sys.executable, "-c", "from qwen_export.cli import main; main()"]  # pragma: no cover


class Poller(threading.Thread):
    """Every 50 ms: RSS of the child and its descendants (peak), free disk; stops the child past a limit."""

    def __init__(
        self, pid: int, work: Path, out: Path, min_free: float, rss_limit: float, timeout_s: float
    ) -> None:
        super().__init__(daemon=True)
        self.pid, self.work, self.out, self.min_free, self.rss_limit = pid, work, out, min_free, rss_limit
        self.start_t = time.monotonic()
        self.deadline = self.start_t + timeout_s
        self.peak_rss = 0
        self.peak_at: tuple[float, int] | None = None  # (seconds since start, output bytes written by then)
        self.timeline: list[list[float]] = []  # [s, max RSS GB in that second, output GB written], per second
        self.min_free_seen = float("inf")
        self.abort: str | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.stop.is_set():
            rss = 0
            try:
                procs = root.children(recursive=True)  # the export and its children, not the launcher
            except psutil.NoSuchProcess:
                return
            for proc in procs:
                try:
                    rss += proc.memory_info().rss
                except psutil.Error:
                    pass
            now = time.monotonic() - self.start_t
            second = int(now)
            if not self.timeline or self.timeline[-1][0] != second:
                self.timeline.append([second, 0.0, round(self._out_bytes() / GB, 3)])
            self.timeline[-1][1] = max(self.timeline[-1][1], round(rss / GB, 3))
            if rss > self.peak_rss:
                self.peak_rss = rss
                self.peak_at = (round(now, 2), self._out_bytes())
            free = free_bytes(self.work)
            self.min_free_seen = min(self.min_free_seen, free)
            reason = None
            if free < self.min_free:
                reason = f"stopped: free disk fell to {free / GB:.1f} GB (< {self.min_free / GB:.0f} GB)"
            elif rss > self.rss_limit:
                reason = f"stopped: RSS {rss / GB:.1f} GB passed the --rss-limit-gb {self.rss_limit / GB:.1f}"
            elif time.monotonic() > self.deadline:
                reason = "stopped: time limit"
            if reason:
                self.abort = reason
                for proc in [*reversed(procs), root]:
                    try:
                        proc.kill()
                    except psutil.Error:
                        pass
                return
            self.stop.wait(POLL_S)

    def _out_bytes(self) -> int:
        """Bytes the export has written so far: blocks allocated under its atomic temp folder, or the
        output once renamed (onnx_ir preallocates its data file, so sizes would say nothing)."""
        total = 0
        for folder in [self.out, *self.out.parent.glob(f".{self.out.name}.tmp-*")]:
            try:
                total += sum(f.stat().st_blocks * 512 for f in folder.rglob("*") if f.is_file())
            except OSError:
                pass
        return total


def run_export(
    ckpt: Path, out: Path, label: str, flags: list[str], work: Path, args: argparse.Namespace
) -> dict:
    """Run one export and measure it; throughput is compared with the disk afterwards (rate_export)."""
    argv = [*export_cli(), "export", "--model", str(ckpt), "-o", str(out), *flags]
    shown = ["qwen-export", *argv[len(export_cli()) :]]
    result: dict[str, Any] = {"variant": label, "command": shlex.join(shown)}
    drop_cache(sorted(p for p in ckpt.iterdir() if p.is_file()))
    log_path = work / f"export-{label.replace(' ', '_').replace('>', '')}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    report = work / "export-rusage.json"
    report.unlink(missing_ok=True)
    with open(log_path, "wb") as logf:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(report), *argv], stdout=logf, stderr=subprocess.STDOUT,
            cwd=REPO, env=env,
        )  # fmt: skip
        poller = Poller(
            proc.pid, work, out, args.min_free_gb * GB, args.rss_limit_gb * GB, args.export_timeout
        )
        poller.start()
        proc.wait()
        poller.stop.set()
        poller.join()
        ok = proc.returncode == 0 and out.is_dir()
        sync_start = time.perf_counter()
        if ok:
            fsync_tree(out)
        end = time.perf_counter()
    usage = json.loads(report.read_text()) if report.is_file() else {}
    report.unlink(missing_ok=True)
    text = log_path.read_text(errors="replace")
    log_path.unlink(missing_ok=True)
    result.update(
        rc=proc.returncode,
        status="ok" if ok else (poller.abort or "failed"),
        wall_s=round(end - start, 3),
        sync_s=round(end - sync_start, 3),
        peak_rss_bytes_polled=poller.peak_rss,
        peak_rss_bytes_rusage=usage.get("maxrss_kib", 0) * 1024,
        io_read_bytes=usage.get("inblock", 0) * 512,
        io_write_bytes=usage.get("oublock", 0) * 512,
        min_free_disk_gb=round(poller.min_free_seen / GB, 1)
        if poller.min_free_seen != float("inf")
        else None,
    )
    result["peak_rss_bytes"] = max(result["peak_rss_bytes_polled"], result["peak_rss_bytes_rusage"])
    if poller.peak_at is not None:
        result["polled_peak_at"] = {
            "s": poller.peak_at[0],
            "output_gb_written": round(poller.peak_at[1] / GB, 2),
        }
    result["rss_timeline"] = {"columns": ["s", "max RSS GB", "output GB written"], "rows": poller.timeline}
    if not ok:
        lines = [line for line in text.splitlines() if line.strip()]
        result["error"] = "\n".join(lines[-6:])[-1500:]
        if "No such option" in text:
            result["status"] = "failed: the CLI does not accept " + " ".join(flags)
        return result
    info_path = out / "export.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        result["export_json"] = {k: info.get(k) for k in ("timings_s", "peak_rss_mib", "graph", "checkpoint")}
    written = tree_bytes(out)
    result.update(bytes_written=written, gbps=round(written / result["wall_s"] / GB, 3))
    return result


# --------------------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------------------


def write_checkpoint(
    kind: str, folder: Path, config: dict, shapes: dict, blocks: RandomBlocks, shard_bytes: int
) -> dict[str, Any]:
    plan = checkpoint_plan(kind, shapes, blocks)
    total = sum(t.nbytes for t in plan)
    cfg = dict(config)
    if kind == "fp8":
        cfg["quantization_config"] = dict(fp8.OFFICIAL_QUANTIZATION_CONFIG)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    files = write_sharded(folder, plan, shard_bytes)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    fsync_tree(folder)
    wall = time.perf_counter() - start
    largest = max(plan, key=lambda t: t.nbytes)
    return {
        "kind": kind,
        "layout": "stacked experts, bf16"
        if kind == "bf16"
        else "official FP8: per-expert e4m3 + F32 block scales",
        "bytes": tree_bytes(folder),
        "tensor_bytes": total,
        "tensors": len(plan),
        "shards": len(files),
        "index": (folder / INDEX_FILE).is_file(),
        "largest_tensor": {"name": largest.name, "bytes": largest.nbytes},
        "write_s": round(wall, 3),
        "write_gbps": round(total / wall / GB, 3),
    }


def run_case(
    kind: str, work: Path, config: dict, shapes: dict, args: argparse.Namespace, samples: list[dict]
) -> dict[str, Any]:
    blocks = RandomBlocks(seed=3)
    shard_bytes = int(args.shard_gb * GIB)
    planned = sum(t.nbytes for t in checkpoint_plan(kind, shapes, blocks))
    case: dict[str, Any] = {"case": kind, "planned_checkpoint_bytes": planned, "exports": []}
    ckpt, copy = work / f"ckpt-{kind}", work / f"ckpt-{kind}-copy"
    for leftover in (ckpt, copy):
        shutil.rmtree(leftover, ignore_errors=True)
    min_free = args.min_free_gb * GB
    try:
        require_space(work, planned, min_free, f"write the {kind} checkpoint")
        log(f"[{kind}] writing the checkpoint ({planned / GB:.1f} GB) to {ckpt}")
        case["checkpoint"] = write_checkpoint(kind, ckpt, config, shapes, blocks, shard_bytes)
        ck = case["checkpoint"]
        log(f"[{kind}] checkpoint: {ck['write_s']:.1f} s ({ck['write_gbps']} GB/s)")
        if not args.skip_copy:
            require_space(work, planned, min_free, f"copy the {kind} checkpoint (peer)")
            try:
                case["peer_copy"] = copy_peer(ckpt, copy)
            finally:
                shutil.rmtree(copy, ignore_errors=True)
            log(f"[{kind}] peer copy: {case['peer_copy']['wall_s']:.1f} s ({case['peer_copy']['gbps']} GB/s)")
        around: list[tuple[dict, dict]] = []  # (export result, disk sample right before it)
        for label, flags in EXPORT_VARIANTS[kind]:
            if args.variants and label not in args.variants:
                continue
            out = work / f"export-{label.split()[0]}-{len(case['exports'])}"
            shutil.rmtree(out, ignore_errors=True)
            expect = planned if "dequant" not in label else bf16_bytes(shapes)
            try:
                require_space(work, expect, min_free, f"export {label}")
            except DiskSpaceError as e:
                case["exports"].append({"variant": label, "status": f"skipped: {e}"})
                continue
            samples.append(sample_disk(work, args, f"before {kind} / {label}"))
            log(f"[{kind}] export {label}: {' '.join(flags) or '(default flags)'}")
            try:
                result = run_export(ckpt, out, label, flags, work, args)
                around.append((result, samples[-1]))
                if "peer_copy" in case and "gbps" in result:
                    result["pct_of_peer_copy"] = round(100 * result["gbps"] / case["peer_copy"]["gbps"], 1)
            finally:
                if not args.keep:
                    shutil.rmtree(out, ignore_errors=True)
            case["exports"].append(result)
            log(
                f"[{kind}] export {label}: {result['status']}, {result['wall_s']:.1f} s, "
                f"{result.get('gbps', '-')} GB/s, peak RSS {result['peak_rss_bytes'] / GB:.2f} GB"
            )
        if around:
            samples.append(sample_disk(work, args, f"after {kind}"))
            nexts = [b for _, b in around[1:]] + [samples[-1]]
            median = disk_summary(samples)
            for (result, before), after in zip(around, nexts, strict=True):
                rate_export(result, before, after, median)
    except DiskSpaceError as e:
        case["status"] = str(e)
        log(f"[{kind}] {e}")
    finally:
        if not args.keep:
            shutil.rmtree(ckpt, ignore_errors=True)
    return case


def rate_export(result: dict[str, Any], before: dict[str, Any], after: dict[str, Any], median: dict) -> None:
    """Compare an export with the disk measured right before and right after it (this disk's speed drifts
    between runs, so the floor is the mean of those two samples); also with the run's median sample."""
    if result.get("status") != "ok":
        return
    write = (before["write_gbps"] + after["write_gbps"]) / 2
    read = (before["read_gbps"] + after["read_gbps"]) / 2
    floor = 1 / (1 / read + 1 / write)
    io_floor_s = result["io_read_bytes"] / (read * GB) + result["bytes_written"] / (write * GB)
    result.update(
        disk_around={
            "write_gbps": round(write, 3),
            "read_gbps": round(read, 3),
            "copy_floor_gbps": round(floor, 3),
        },
        pct_of_copy_floor=round(100 * result["gbps"] / floor, 1),
        pct_of_median_copy_floor=round(100 * result["gbps"] / median["copy_floor_gbps"], 1),
        io_floor_s=round(io_floor_s, 3),
        pct_of_io_floor=round(100 * io_floor_s / result["wall_s"], 1),
    )
    result["acceptance"] = {
        "throughput_ok": result["pct_of_copy_floor"] >= ACCEPT_FLOOR_PCT,
        "peak_rss_ok": result["peak_rss_bytes"] < ACCEPT_RSS_BYTES,
    }


def disk_summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float:
        return round(float(np.median([x[key] for x in samples])), 3)

    return {
        **{f"{k}_median": med(k) for k in ("write_gbps", "read_gbps", "copy_floor_gbps")},
        **{
            f"{k}_range": [min(x[k] for x in samples), max(x[k] for x in samples)]
            for k in ("write_gbps", "read_gbps")
        },
        "copy_floor_gbps": med("copy_floor_gbps"),
        "write_gbps": med("write_gbps"),
        "read_gbps": med("read_gbps"),
        "test_bytes": samples[0]["test_bytes"],
        "method": samples[0]["method"],
        "samples": samples,
    }


def sample_disk(work: Path, args: argparse.Namespace, when: str) -> dict[str, Any]:
    sample = {"when": when, **measure_disk(work, int(args.disk_test_gb * GB), args.min_free_gb * GB)}
    log(f"disk {when}: write {sample['write_gbps']} GB/s, read {sample['read_gbps']} GB/s")
    return sample


def bf16_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(2 * math.prod(s) for s in shapes.values())


# --------------------------------------------------------------------------------------------------------
# extrapolation, reports
# --------------------------------------------------------------------------------------------------------


def layer_split(shapes: dict[str, tuple[int, ...]], kind: str) -> tuple[dict[str, int], int]:
    """Bytes of each layer kind's layer and of everything outside the layers, in the case's layout."""
    if kind == "bf16":
        sizes = {n: 2 * math.prod(s) for n, s in shapes.items()}
    else:
        sizes = {}
        for e in official_fp8_layout({n: ("BF16", s) for n, s in shapes.items()}):
            sizes[e.name] = e.nbytes
    per_layer: dict[int, int] = {}
    outside = 0
    for name, size in sizes.items():
        parts = name.split(".")
        if "layers" in parts:
            idx = int(parts[parts.index("layers") + 1])
            per_layer[idx] = per_layer.get(idx, 0) + size
        else:
            outside += size
    return per_layer, outside


def extrapolate(case: dict, config: dict, shapes: dict) -> dict[str, Any] | None:
    ok = [e for e in case.get("exports", []) if e.get("status") == "ok"]
    if not ok or "checkpoint" not in case:
        return None
    per_layer, outside = layer_split(shapes, case["case"])
    types = config["layer_types"]
    by_type = {t: per_layer[i] for i, t in enumerate(types)}
    # 60 layers: 15 x (3 DeltaNet + 1 attention)
    text_only = outside + 45 * by_type["linear_attention"] + 15 * by_type["full_attention"]
    published = PUBLISHED_BYTES[case["case"]]
    ckpt_bytes = case["checkpoint"]["tensor_bytes"]
    rows = []
    for e in ok:
        ratio = e["bytes_written"] / ckpt_bytes
        out_bytes = ratio * published
        rows.append(
            {
                "variant": e["variant"],
                "export_bytes_per_checkpoint_byte": round(ratio, 4),
                "export_gb": round(out_bytes / GB, 1),
                "export_time_s": round(out_bytes / (e["gbps"] * GB), 1),
                "disk_needed_gb": round((published + out_bytes) / GB, 1),
                "peak_rss_gb": round(e["peak_rss_bytes"] / GB, 2),
            }
        )
    return {
        "checkpoint_published_gb": round(published / GB, 1),
        "checkpoint_text_only_computed_gb": round(text_only / GB, 1),
        "layers": FULL_LAYERS,
        "exports": rows,
    }


def log(msg: str) -> None:
    print(f"[bench_scale {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def git_state() -> dict[str, Any]:
    def git(*a: str) -> str:
        try:
            return subprocess.run(
                ["git", *a], cwd=REPO, capture_output=True, text=True, timeout=20
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = git("status", "--porcelain", "--", "exporter", "qwen_export/cli.py", "passes").splitlines()
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_exporter_files": [d[3:] for d in dirty],
    }


def fmt_gb(b: float | None) -> str:
    return "–" if b is None else f"{b / GB:,.2f}"


def render_md(res: dict[str, Any]) -> str:
    m, d, s = res["machine"], res["disk"], res["slice"]
    lines = [
        "# Full-width scale benchmark: a true-width slice of Qwen3.5-397B-A17B",
        "",
        f"Produced by `{res['command']}` on {res['date']}. "
        "Machine-readable numbers: [scale.json](scale.json).",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores, vector ISA {m['vector_isa']} "
        f"(flags: {', '.join(m['isa_flags']) or 'none'}), {m['ram_gib']} GiB RAM; disk {m['disk']['device']} "
        f"({m['disk']['filesystem']}) at {m['disk']['work_dir']}. Code: commit {res['git']['commit']}"
        + (
            f", with uncommitted exporter changes in {', '.join(res['git']['uncommitted_exporter_files'])}"
            if res["git"]["uncommitted_exporter_files"]
            else ""
        )
        + ".",
        "",
        f"Slice: {s['layers']} layers ({', '.join(s['layer_types'])}), hidden {s['hidden_size']}, "
        f"{s['num_experts']} experts top-{s['num_experts_per_tok']} "
        f"(intermediate {s['moe_intermediate_size']}, "
        f"shared {s['shared_expert_intermediate_size']}), vocab {s['vocab_size']:,}, attention "
        f"{s['num_attention_heads']} q / {s['num_key_value_heads']} kv x {s['head_dim']}, DeltaNet "
        f"{s['linear_num_key_heads']} k / {s['linear_num_value_heads']} v x {s['linear_key_head_dim']}; "
        f"{s['architecture']} text-only. Config source: {s['config_source']}.",
        "",
        "## Disk",
        "",
        f"Each sample: {d['method']}, {fmt_gb(d['test_bytes'])} GB, taken at the start and right before and "
        "after each export. This disk's speed drifts a lot from one sample to the next (a virtual disk), so "
        "each export is compared with the mean of the samples around it. Copy floor = bytes / (bytes/read + "
        "bytes/write). GB = 1e9 bytes.",
        "",
        "| sample | write GB/s | read GB/s | copy floor GB/s |",
        "|---|---|---|---|",
        *[
            f"| {x['when']} | {x['write_gbps']} | {x['read_gbps']} | {x['copy_floor_gbps']} |"
            for x in d["samples"]
        ],
        f"| **median** | {d['write_gbps_median']} | {d['read_gbps_median']} | "
        f"**{d['copy_floor_gbps_median']}** |",
        "",
        "## Cases",
        "",
        "GB/s = bytes written / wall (wall includes the exporter's start-up and an fsync of the output); "
        "% floor = that over the copy floor of the disk samples around the export (acceptance: >= 70%, and "
        "peak RSS < 3 GB); % median floor: over the run's median copy floor. The I/O floor is bytes read / "
        "read speed + bytes written / write speed of this export's own bytes; % I/O floor = that time over "
        "the wall time (fairer where reads and writes differ, e.g. fp8 -> bf16). Peak RSS: the export "
        "process's own ru_maxrss (forked from a small launcher) and psutil polling every 50 ms of it and its "
        "children, whichever is higher; 'at' = when the polled peak came, and how much output was written by "
        "then. Read GB: the export's block-device reads.",
        "",
        "| case | checkpoint GB (shards) | peer copy s (GB/s) | export | status | export GB | wall s | "
        "GB/s | floor around (W / R GB/s) | % copy floor | % median floor | % I/O floor | % peer copy | "
        "peak RSS GB (at) | read GB | export.json timings s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in res["cases"]:
        ck = case.get("checkpoint")
        ck_txt = f"{fmt_gb(ck['bytes'])} ({ck['shards']})" if ck else case.get("status", "–")
        peer = case.get("peer_copy")
        peer_txt = f"{peer['wall_s']:.1f} ({peer['gbps']})" if peer else "–"
        for e in case["exports"] or [{"variant": "–", "status": case.get("status", "–")}]:
            status = e["status"] if len(e["status"]) < 90 else e["status"][:87] + "..."
            timings = (e.get("export_json") or {}).get("timings_s") or {}
            da = e.get("disk_around")
            around = f"{da['copy_floor_gbps']} ({da['write_gbps']} / {da['read_gbps']})" if da else "–"
            at = e.get("polled_peak_at")
            at_txt = f" (at {at['s']} s, {at['output_gb_written']} GB out)" if at else ""
            lines.append(
                f"| {case['case']} | {ck_txt} | {peer_txt} | {e['variant']} | {status} | "
                f"{fmt_gb(e.get('bytes_written'))} | {e.get('wall_s', '–')} | {e.get('gbps', '–')} | "
                f"{around} | "
                f"{e.get('pct_of_copy_floor', '–')} | {e.get('pct_of_median_copy_floor', '–')} | "
                f"{e.get('pct_of_io_floor', '–')} | {e.get('pct_of_peer_copy', '–')} | "
                f"{fmt_gb(e.get('peak_rss_bytes'))}{at_txt} | {fmt_gb(e.get('io_read_bytes'))} | "
                f"{', '.join(f'{k} {v}' for k, v in timings.items()) or '–'} |"
            )
    verdicts = [
        f"{c['case']} / {e['variant']}: throughput {'ok' if e['acceptance']['throughput_ok'] else 'FAIL'}, "
        f"peak RSS {'ok' if e['acceptance']['peak_rss_ok'] else 'FAIL'}"
        for c in res["cases"]
        for e in c["exports"]
        if "acceptance" in e
    ]
    if verdicts:
        lines += [
            "",
            "Acceptance (>= 70% of the copy floor around it, peak RSS < 3 GB): " + "; ".join(verdicts) + ".",
        ]
    lines += ["", "Checkpoint writing (this script's streaming writer, fsync per shard):", ""]
    for case in res["cases"]:
        if ck := case.get("checkpoint"):
            lines.append(
                f"- {case['case']}: {ck['layout']}; {ck['tensors']:,} tensors, {ck['shards']} shards, "
                f"largest tensor {ck['largest_tensor']['name']} "
                f"({fmt_gb(ck['largest_tensor']['bytes'])} GB); "
                f"written in {ck['write_s']} s ({ck['write_gbps']} GB/s)."
            )
    failures = [(c["case"], e) for c in res["cases"] for e in c["exports"] if e.get("status") != "ok"]
    if failures:
        lines += ["", "## What did not work", ""]
        for kind, e in failures:
            lines.append(f"- {kind} / {e['variant']}: {e['status']}")
            if e.get("error"):
                lines += ["", "  ```", *[f"  {x}" for x in e["error"].splitlines()], "  ```", ""]
    lines += ["", "## Extrapolation to the whole Qwen3.5-397B-A17B (60 layers)", ""]
    if res["slice"]["reduced_width"]:
        lines += ["Reduced-width smoke run: the extrapolation below is not meaningful.", ""]
    any_rows = False
    for case in res["cases"]:
        ex = case.get("extrapolation_397b")
        if not ex:
            continue
        any_rows = True
        lines.append(
            f"- {case['case']} checkpoint: {ex['checkpoint_published_gb']} GB published "
            f"({ex['checkpoint_text_only_computed_gb']} GB for the text tower alone at these shapes)."
        )
        for r in ex["exports"]:
            lines.append(
                f"  - export {r['variant']}: {r['export_gb']} GB out "
                f"({r['export_bytes_per_checkpoint_byte']} bytes per checkpoint byte, as measured), "
                f"{r['export_time_s'] / 60:.1f} min at the measured rate, "
                f"disk needed {r['disk_needed_gb']} GB "
                f"(checkpoint + export), peak RSS ~{r['peak_rss_gb']} GB."
            )
    if not any_rows:
        lines.append("No export succeeded, so there is nothing to extrapolate.")
    lines += ["", rss_note(res), ""]
    return "\n".join(lines)


def rss_phases(export: dict[str, Any], share: float = 0.75) -> tuple[float, float, float] | None:
    """(max RSS GB while the first `share` of the output was written, peak RSS GB, share of the output
    written when the polled peak came) from the export's RSS timeline."""
    rows = (export.get("rss_timeline") or {}).get("rows") or []
    final = max((r[2] for r in rows), default=0.0)
    early = [r[1] for r in rows if 0 < r[2] <= share * final]
    at = export.get("polled_peak_at")
    if not early or not at or not final:
        return None
    return max(early), export["peak_rss_bytes"] / GB, at["output_gb_written"] / final


def rss_note(res: dict[str, Any]) -> str:
    phases = [
        (f"{c['case']} / {e['variant']}", ph)
        for c in res["cases"]
        for e in c["exports"]
        if e.get("status") == "ok" and (ph := rss_phases(e))
    ]
    if not phases:
        return ""
    detail = "; ".join(
        f"{name}: {early:.2f} GB, then {peak:.2f} GB with {100 * at:.0f}% written"
        for name, (early, peak, at) in phases
    )
    return (
        "Peak RSS and the layer count: the exporter streams initializers tensor by tensor, so more layers "
        "add more tensors of the sizes already in the slice, not larger ones. The RSS timelines in "
        "scale.json show where the peak comes from (max RSS while the first 75% of the output was written, "
        f"then the peak, and how much of the output was written by then): {detail}. A peak reached on the "
        "last tensors written, beyond the RSS of the layers, belongs to a tensor whose size does not depend "
        f"on the layer count (the vocabulary-sized embed_tokens and lm_head, {res['slice']['vocab_size']:,} "
        f"x {res['slice']['hidden_size']}, are the same in the slice and in the full model), so the full "
        "model's peak is expected to be the slice's."
    )


def render_only(results: Path) -> int:
    """Re-render scale.md from an existing scale.json (no measurement)."""
    res = json.loads((results / "scale.json").read_text())
    atomic_write(results / "scale.md", render_md(res))
    log(f"re-rendered {results / 'scale.md'} from {results / 'scale.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2, choices=sorted(LAYER_TYPES))
    p.add_argument("--cases", nargs="+", default=["fp8", "bf16"], choices=["fp8", "bf16"])
    p.add_argument("--work", type=Path, default=Path("/tmp/qwen-scale-bench"))
    p.add_argument(
        "--results", type=Path, default=REPO / "benchmarks", help="folder for scale.json / scale.md"
    )
    p.add_argument("--keep", action="store_true", help="keep checkpoints and exports")
    p.add_argument("--hidden", type=int, help="reduced width for a smoke run")
    p.add_argument("--experts", type=int, help="reduced expert count for a smoke run")
    p.add_argument("--vocab", type=int, help="reduced vocabulary for a smoke run")
    p.add_argument("--disk-test-gb", type=float, default=8.0, help="size of each disk throughput sample")
    p.add_argument("--variants", nargs="+", help="only these export variants (e.g. bf16, fp8)")
    p.add_argument("--shard-gb", type=float, default=4.0, help="shard size in GiB")
    p.add_argument("--min-free-gb", type=float, default=5.0)
    p.add_argument("--export-timeout", type=float, default=3600.0)
    p.add_argument(
        "--rss-limit-gb", type=float, default=round(0.8 * psutil.virtual_memory().total / GB, 1),
        help="stop an export whose RSS passes this (protects the machine)",
    )  # fmt: skip
    p.add_argument("--skip-copy", action="store_true", help="skip the peer copy")
    p.add_argument("--render-only", action="store_true", help="re-render scale.md from --results' scale.json")
    args = p.parse_args(argv)
    if args.render_only:
        return render_only(args.results)
    command = shlex.join(["python", "scripts/bench_scale.py", *(argv if argv is not None else sys.argv[1:])])

    work = args.work.expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    config, source = slice_config(args.layers, args.hidden, args.experts, args.vocab)
    shapes = model_tensors(config)
    keys = [
        "hidden_size", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
        "shared_expert_intermediate_size", "vocab_size", "num_attention_heads", "num_key_value_heads",
        "head_dim", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
        "linear_value_head_dim", "linear_conv_kernel_dim", "layer_types", "rms_norm_eps", "rope_parameters",
        "tie_word_embeddings",
    ]  # fmt: skip
    res: dict[str, Any] = {
        "command": command,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git": git_state(),
        "machine": machine_info(work),
        "slice": {
            "architecture": ARCHITECTURE,
            "layers": args.layers,
            "config_source": source,
            "reduced_width": bool(args.hidden or args.experts or args.vocab),
            "parameters": sum(math.prod(s) for s in shapes.values()),
            **{k: config.get(k) for k in keys},
        },
        "free_disk_gb_at_start": round(free_bytes(work) / GB, 1),
        "cases": [],
    }
    log(f"slice: {res['slice']['parameters'] / 1e9:.2f} B parameters; {source}")
    samples: list[dict[str, Any]] = []
    try:
        samples.append(sample_disk(work, args, "at start"))
    except DiskSpaceError as e:
        log(str(e))
        return 2
    for kind in args.cases:
        case = run_case(kind, work, config, shapes, args, samples)
        res["disk"] = disk_summary(samples)
        case["extrapolation_397b"] = extrapolate(case, config, shapes)
        res["cases"].append(case)
        res["peak_rss_bytes_of_this_script"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        atomic_write(args.results / "scale.json", json.dumps(res, indent=2) + "\n")  # after every case
        atomic_write(args.results / "scale.md", render_md(res))
    log(f"wrote {args.results / 'scale.json'} and {args.results / 'scale.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
