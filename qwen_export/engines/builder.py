"""Build per-GPU engines from an exported graph and a deployment spec, through the engine cache.

    OUT/engines/<sm>/model.engine   one engine per GPU target
    OUT/manifest.json               everything that went in (fingerprinted), per-stage timings, sizes, hashes
    OUT/graph/model.onnx(+.data)    the prepared graph the engines were built from (with keep_graph)

The output folder appears only when complete. Every check that can fail on the user's input (spec,
options, model file, toolchain, GPU targets) runs before any work.
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
from rich.console import Console
from rich.table import Table

from qwen_export import __version__
from qwen_export.artifact import BUILD_FORMAT, MANIFEST_FILE, BuildResult, engine_file, sha256_file
from qwen_export.engines import cache as cache_mod
from qwen_export.engines import toolchain as toolchain_mod
from qwen_export.engines.cache import EngineCache, code_digest, fingerprint, model_digest, place
from qwen_export.engines.graph import (
    engine_passes,
    op_counts,
    pass_modules,
    run_passes,
    save_graph,
)
from qwen_export.engines.progress import Stages
from qwen_export.engines.spec import DeploySpec, DeploySpecError, Profile
from qwen_export.engines.toolchain import BuildOptions, Toolchain, toolchain_for
from qwen_export.engines.worker import build_engine
from qwen_export.errors import QwenExportError
from qwen_export.fsutil import atomic_output_dir, check_writable_parent
from qwen_export.passes.base import pass_name
from qwen_export.targets import engine_traits

TIMING_CACHE_RTX_NOTE = (
    "not used: TensorRT-RTX does not time tactics at build time; its timing cache is a deprecated no-op "
    "that would query a GPU (its runtime cache, for JIT kernels, lives with the application)"
)


@dataclass(frozen=True)
class TargetPlan:
    sm: str
    label: str
    fingerprint: str
    cached: bool
    path: str  # relative to the output folder


@dataclass(frozen=True)
class BuildPlan:
    """What a build would do: per target, its fingerprint and whether the cache already holds it."""

    target: str
    toolchain: str
    toolchain_ready: bool
    model: str
    model_sha256: str
    out_dir: str
    cache_dir: str | None
    spec: dict[str, Any]
    options: dict[str, Any]
    passes: list[str]
    profiles: list[dict[str, Any]]
    targets: list[TargetPlan]
    timing_cache: dict[str, Any]

    @property
    def to_build(self) -> list[str]:
        return [t.sm for t in self.targets if not t.cached]

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["to_build"] = self.to_build
        return data

    def render(self, console: Console) -> None:
        console.print(
            f"[bold]{self.target}[/] engines from {self.model} -> {self.out_dir}  ({self.toolchain})"
        )
        console.print(f"passes: {' -> '.join(self.passes)}")
        table = Table("gpu", "action", "engine", "fingerprint", title="build plan")
        for t in self.targets:
            action = "reuse (cache)" if t.cached else "parse + build"
            table.add_row(t.label, action, t.path, t.fingerprint[:16])
        console.print(table)
        for profile in self.profiles:
            name, shape = next(iter(profile["shapes"].items()))  # input_ids, inputs_embeds, pixel_values
            console.print(f"profile {profile['name']}: {name} min/opt/max {shape}")


@dataclass(frozen=True)
class EngineJob:
    """What building the plan needs beyond the plan itself (planning computed it once)."""

    passes: list[Any]  # the target's pipeline, as objects
    profiles: list[Profile]
    fingerprint_inputs: dict[str, Any]  # every engine's fingerprint is these plus its GPU
    export_info: dict[str, Any]  # the source export's export.json
    toolchain: Toolchain
    digests: Any  # the engine cache's file-digest memo (cache.FileDigests)


@dataclass
class EngineRecord:
    sm: str
    label: str
    path: str
    bytes: int
    sha256: str
    fingerprint: str
    from_cache: bool
    timings_s: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def graph_inputs(onnx_path: Path) -> list[tuple[str, list[int | str | None]]]:
    """(name, dims) of the graph's inputs, symbolic dimensions by name, without loading weights."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {t.name for t in proto.graph.initializer}
    out = []
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        dims: list[int | str | None] = []
        for d in value.type.tensor_type.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
        out.append((value.name, dims))
    return out


def export_info(onnx_path: Path) -> dict[str, Any]:
    """The exporter's export.json next to the graph, when there is one."""
    path = onnx_path.parent / "export.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _pass_identity(p: ir.passes.PassBase) -> dict[str, Any]:
    options = {
        k: v for k, v in sorted(vars(p).items())
        if not k.startswith("_") and k != "stats" and isinstance(v, (str, int, float, bool, type(None), dict))
    }  # fmt: skip
    return {
        "name": pass_name(p),
        "class": f"{type(p).__module__}.{type(p).__qualname__}",
        "options": options,
    }


def plan_engines(
    onnx_path: str | Path,
    spec: DeploySpec,
    out_dir: str | Path,
    *,
    options: BuildOptions | None = None,
    cache: EngineCache | None = None,
    toolchain: Toolchain | None = None,
    moe: str = "auto",
    stages: Stages | None = None,
    require_toolchain: bool = True,
    dry_run: bool = False,
    timing_cache_file: Path | None = None,
    tower: str = "text",
) -> tuple[BuildPlan, EngineJob]:
    """Validate everything and fingerprint every target; returns the plan and what the build needs.
    `tower`: which graph of a multimodal export `onnx_path` is (text, vision or embed)."""
    onnx_path = Path(onnx_path).expanduser().resolve()
    options = options or BuildOptions(workspace_mib=spec.workspace_mib)
    cache = cache if cache is not None else EngineCache()
    toolchain = toolchain or toolchain_for(spec.target)
    stages = stages or Stages()

    problems = spec.problems() + options.problems(spec.target)
    if not onnx_path.is_file():
        problems.append(f"{onnx_path}: no such ONNX file (export the model first: qwen-export export)")
    if problems:
        raise DeploySpecError("; ".join(problems))
    ready, toolchain_text = toolchain.available()
    if require_toolchain and not ready:
        raise toolchain_mod.ToolchainUnavailable(toolchain_text)
    if ready:
        problems += toolchain.target_problems(spec.gpus, options)
    info = export_info(onnx_path)
    max_positions = (info.get("spec") or {}).get("max_position_embeddings")
    if isinstance(max_positions, int) and spec.max_context > max_positions:
        problems.append(
            f"max_context {spec.max_context} exceeds the model's max_position_embeddings {max_positions}"
        )
    if problems:
        raise DeploySpecError("; ".join(problems))
    out_dir = check_writable_parent(Path(out_dir))
    try:
        inputs = graph_inputs(onnx_path)
    except Exception as e:  # a truncated or foreign file
        raise QwenExportError(f"{onnx_path}: not a readable ONNX model ({e})") from None
    if tower == "vision":
        from qwen_export.engines.vision import VisionLimits

        profiles = VisionLimits.from_spec(spec, info["multimodal"]["vision_spec"]).profiles(inputs)
    else:
        profiles = spec.profiles(inputs)
    passes = engine_passes(spec, moe, tower)

    with stages.stage("fingerprint", "model bytes, passes, spec, tools") as stage:
        digests = cache.digests()
        model_sha = model_digest(onnx_path, digests)
        versions = tool_versions(toolchain) if ready else {"qwen_export": __version__}
        common = {
            "model_sha256": model_sha,
            "passes": [_pass_identity(p) for p in passes],
            "code_sha256": code_digest([*pass_modules(passes), toolchain_mod, cache_mod]),
            "spec": spec.fingerprint_json(),
            "profiles": [p.to_json() for p in profiles],
            "options": options.to_json(),
            "versions": versions,
            "target": spec.target,
            **(toolchain.extra_fingerprint() if ready else {}),
        }
        targets = []
        for sm in spec.gpus:
            key = fingerprint({**common, "gpu": sm})
            entry = cache.lookup(key, verify=True, digests=digests)
            targets.append(TargetPlan(sm, spec.label(sm), key, entry is not None, engine_file(sm)))
        stage.detail = f"{sum(t.cached for t in targets)}/{len(targets)} engines cached"
        if not dry_run:
            digests.save()
    if not engine_traits(spec.target).timing_cache:
        timing_cache = {
            "path": str(timing_cache_file) if timing_cache_file else None, "used": False,
            "note": TIMING_CACHE_RTX_NOTE,
        }  # fmt: skip
    elif getattr(toolchain, "timing_cache", None) is None:
        timing_cache = {"path": None, "used": False}
    else:
        timing_cache = {"path": str(toolchain.timing_cache), "used": True}  # type: ignore[attr-defined]
    plan = BuildPlan(
        target=spec.target,
        toolchain=toolchain_text,
        toolchain_ready=ready,
        model=str(onnx_path),
        model_sha256=model_sha,
        out_dir=str(out_dir),
        cache_dir=str(cache.root) if cache.enabled else None,
        spec=spec.to_json(),
        options=options.to_json(),
        passes=[repr(p) for p in passes],
        profiles=[p.to_json() for p in profiles],
        targets=targets,
        timing_cache=timing_cache,
    )
    return plan, EngineJob(passes, profiles, common, info, toolchain, digests)


def tool_versions(toolchain: Toolchain) -> dict[str, str]:
    import onnxruntime

    return {
        "qwen_export": __version__,
        "python": platform.python_version(),
        "onnx": onnx.__version__,
        "onnx_ir": ir.__version__,
        "onnxruntime": onnxruntime.__version__,
        **toolchain.versions(),
    }


def build_engines(
    onnx_path: str | Path,
    spec: DeploySpec,
    out_dir: str | Path,
    *,
    timing_cache: str | Path | None = None,
    opt_level: int = 3,
    version_compatible: bool = False,
    hardware_compatibility: str = "none",
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    plugin_library: str | Path | None = None,
    moe: str = "auto",
    keep_graph: bool = False,
    dry_run: bool = False,
    console: Console | None = None,
    isolate: bool = True,
    tower: str = "text",
) -> BuildResult | BuildPlan:
    """Build (or reuse from the cache) one engine per GPU target of `spec`; with `dry_run`, the plan only.

    `timing_cache` is a file shared between builds (TensorRT reads and extends it; TensorRT-RTX has none
    and records why). `cache_dir` is the engine cache (default: the qwen-export cache folder). With
    `isolate` (the default) each engine builds in a child process, so a builder crash is an error message.
    """
    start = time.perf_counter()
    stages = Stages(console)
    options = BuildOptions(opt_level, version_compatible, hardware_compatibility, spec.workspace_mib)
    cache = EngineCache(Path(cache_dir) if cache_dir is not None else None, enabled=use_cache)
    toolchain = toolchain_for(
        spec.target,
        Path(plugin_library) if plugin_library else None,
        Path(timing_cache) if timing_cache else None,
    )
    plan, job = plan_engines(
        onnx_path,
        spec,
        out_dir,
        options=options,
        cache=cache,
        toolchain=toolchain,
        moe=moe,
        stages=stages,
        require_toolchain=not dry_run,
        dry_run=dry_run,
        timing_cache_file=Path(timing_cache) if timing_cache else None,
        tower=tower,
    )
    if dry_run:
        if console is not None:
            plan.render(console)
        return plan

    records: list[EngineRecord] = []
    with (
        atomic_output_dir(Path(plan.out_dir)) as tmp,
        tempfile.TemporaryDirectory(prefix="qwen-graph-") as scratch,
    ):
        graph = _PreparedGraph(
            Path(plan.model), job.passes, stages, (tmp / "graph") if keep_graph else Path(scratch)
        )
        if keep_graph:
            graph.path()
        for target in plan.targets:
            records.append(_engine(target, tmp, graph, job, options, cache, stages, isolate))
        if not graph.records:  # everything came from the cache: report the passes the engines were built with
            cached = cache.lookup(plan.targets[0].fingerprint)
            graph.records = (cached.meta.get("passes") if cached else None) or []
            graph.summary = (cached.meta.get("graph") if cached else None) or {}
        job.digests.save()
        plugin = _ship_plugin_library(job.toolchain, tmp)
        timings = stages.timings()
        timings["total"] = round(time.perf_counter() - start, 4)
        manifest = _manifest(plan, job, records, graph.records, graph.summary, timings, keep_graph)
        manifest["plugin_library"] = plugin
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    result = BuildResult(
        Path(plan.out_dir), plan.target, manifest, engines=records, plan=plan, timings_s=timings
    )
    if console is not None:
        result.render(console)
    return result


class _PreparedGraph:
    """The graph the engines are built from, prepared on first need (never, when every engine is cached)."""

    def __init__(self, model: Path, passes: list[Any], stages: Stages, folder: Path):
        self.model, self.passes, self.stages, self.folder = model, passes, stages, folder
        self.records: list[dict[str, Any]] = []
        self.summary: dict[str, Any] = {}
        self._path: Path | None = None

    def path(self) -> Path:
        if self._path is None:
            with self.stages.stage("load model", self.model.name):
                model = ir.load(self.model)
            model, self.records = run_passes(model, self.passes, self.stages)
            self.summary = {"ops": op_counts(model), "initializers": len(model.graph.initializers)}
            with self.stages.stage("save graph"):
                self._path = save_graph(model, self.folder)
        return self._path


def _engine(
    target: TargetPlan,
    out: Path,
    graph: _PreparedGraph,
    job: EngineJob,
    options: BuildOptions,
    cache: EngineCache,
    stages: Stages,
    isolate: bool = True,
) -> EngineRecord:
    destination = out / target.path
    entry = cache.lookup(target.fingerprint) if target.cached else None
    if entry is not None:
        with stages.stage(f"{target.sm} restore", "from the engine cache") as stage:
            place(entry.engine, destination)
        return EngineRecord(
            target.sm,
            target.label,
            target.path,
            entry.bytes,
            entry.sha256,
            target.fingerprint,
            True,
            {"restore": round(stage.wall_s, 4)},
            entry.meta.get("info", {}),
        )
    # Never cached, or evicted since planning.
    graph_path = graph.path()
    toolchain = job.toolchain
    staging = cache.staging(target.fingerprint) if cache.enabled else destination
    with stages.stage(f"{target.sm} build", f"{toolchain.target}, {len(job.profiles)} profiles") as stage:
        built = build_engine(toolchain, graph_path, job.profiles, target.sm, options, staging, isolate)
        stage.detail = f"parse {built.timings_s['parse']:.2f} s, build {built.timings_s['build']:.2f} s"
    with stages.stage(f"{target.sm} store") as store:
        if cache.enabled:
            meta = {
                "gpu": target.sm,
                "fingerprint_inputs": job.fingerprint_inputs,
                "passes": graph.records,
                "graph": graph.summary,
                "builder_warnings": built.warnings,
                "info": built.info,
            }
            entry = cache.store(target.fingerprint, built.engine, meta)
            job.digests.remember(entry.engine, entry.sha256)
            place(entry.engine, destination)
            sha, size = entry.sha256, entry.bytes
        else:
            sha, size = sha256_file(destination), destination.stat().st_size
    timings = {k: round(v, 4) for k, v in built.timings_s.items()}
    timings["store"] = round(store.wall_s, 4)
    return EngineRecord(
        target.sm, target.label, target.path, size, sha, target.fingerprint, False, timings, built.info
    )


def _ship_plugin_library(toolchain: Toolchain, out: Path) -> str | None:
    """The trt target's engines need our plugin library at runtime: it travels in the artifact."""
    library = getattr(toolchain, "plugin_library", None)
    if library is None or not Path(library).is_file():
        return None
    destination = out / "plugins" / Path(library).name
    destination.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(library, destination)
    return str(destination.relative_to(out))


def _manifest(
    plan: BuildPlan,
    job: EngineJob,
    records: list[EngineRecord],
    pass_records: list[dict[str, Any]],
    graph_summary: dict[str, Any],
    timings: dict[str, float],
    keep_graph: bool,
) -> dict[str, Any]:
    info = job.export_info
    common = job.fingerprint_inputs
    return {
        "format": BUILD_FORMAT,
        "target": plan.target,
        "source": info.get("source"),
        "source_dir": info.get("source_dir"),
        "architecture": info.get("architecture"),
        "model": {"path": plan.model, "sha256": plan.model_sha256},
        "graph": ({"path": "graph/model.onnx"} if keep_graph else {}) | graph_summary,
        "deploy": {**plan.spec, "profiles": plan.profiles},
        "options": plan.options,
        "timing_cache": plan.timing_cache,
        "passes": pass_records,
        "precision": next((p["stats"]["extras"] for p in pass_records if p["name"] == "precision"), {}),
        "engines": {r.sm: r.to_json() for r in records},
        "plugin_library": None,
        "fingerprint": {k: v for k, v in common.items() if k not in ("profiles",)},
        "versions": common["versions"],
        "cache_dir": plan.cache_dir,
        "built": [r.sm for r in records if not r.from_cache],
        "reused": [r.sm for r in records if r.from_cache],
        "timings_s": timings,
    }


def load_profiles(manifest: dict[str, Any]) -> list[Profile]:
    """The optimization profiles a manifest records (for runtimes that pick one per step)."""
    out = []
    for p in manifest["deploy"]["profiles"]:
        shapes = {k: tuple(tuple(d) for d in v) for k, v in p["shapes"].items()}
        out.append(Profile(p["name"], shapes))  # type: ignore[arg-type]
    return out
