"""The build targets: every target is declared once, here, and everything else reads this table.

The CLI's `--target` help and option checks, the pipeline a build runs, the engine builder's toolchain
and spec checks, the runtime's backend choice, the precision an artifact is held to and `qwen-export
passes` all come from `TARGETS`. Adding a target is one `register(Target(...))` call plus its tests; see
docs/adding.md for what else a new kind of target reaches.

This module is light on purpose (the runtime imports it): pass modules are imported inside the pipeline
functions, when a build asks for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from qwen_export.errors import QwenExportError
from qwen_export.listing import Listing

if TYPE_CHECKING:
    from qwen_export.passes.base import QwenPass

Kind = Literal["onnx", "ort", "engine", "plugins", "ranks"]
Backend = Literal["onnxruntime", "tensorrt-rtx", "tensorrt"]

# The build options a target may accept beyond the model source and output folder (CLI flag names).
RANK_OPTIONS = frozenset({"tp", "ep"})  # one graph per rank (qwen_export/ranks.py)
ONNX_OPTIONS = frozenset({"check", "golden"}) | RANK_OPTIONS
ENGINE_OPTIONS = frozenset(
    {
        "gpu", "precision", "max_batch", "max_prompt", "max_context", "spec", "workspace", "opt_level",
        "version_compatible", "hardware_compatibility", "timing_cache", "dry_run", "weights",
        "max_image_pixels", "max_video_frames",
    }
)  # fmt: skip


@dataclass(frozen=True)
class PipelineOptions:
    """What a pipeline may depend on besides the target: an engine build's deployment choices."""

    precision: str = "bf16"  # engine activations (fp16 | bf16)
    logits_fp32: bool = True
    max_tokens: int | None = None  # largest batch x prompt an engine serves (bounds gathered MoE weights)
    moe: str = "auto"  # trt-rtx MoE form (auto | gather | dense)
    weights: str = "dequant"  # an FP8 checkpoint's weights: dequant (in `precision`) | fp8 (e4m3 kept)


@dataclass(frozen=True)
class EngineTraits:
    """What an engine target's builder can do; the deployment spec and the builder read these."""

    builder: str  # the builder's name in messages ("TensorRT-RTX")
    toolchain: str  # class name in qwen_export.engines.toolchain
    aot_sms: tuple[str, ...] | None  # SMs it builds for on any machine (None: it builds on the GPU itself)
    builds_fp32: bool = True
    hardware_compatibility: bool = True  # accepts a hardware-compatibility level
    timing_cache: bool = True  # reads and extends a timing cache
    fp8_weights: bool = False  # builds an FP8 checkpoint's e4m3 weights behind blocked DequantizeLinear


@dataclass(frozen=True)
class Target:
    """One build target.

    name:        what `--target` takes.
    description: one line, shown in `build --help` and `qwen-export targets`.
    kind:        onnx (standard or fused ONNX), ort (ONNX Runtime graph), engine (TensorRT engines),
                 plugins (ONNX with TensorRT plugin nodes) or ranks (one graph per rank).
    pipeline:    the passes from the exporter's graph to this target's graph.
    backend:     what runs the artifact (None: another tool, such as trtexec or a plugin backend).
    options:     the build options it accepts (ONNX_OPTIONS, ENGINE_OPTIONS or a set of its own).
    weight_bits: weight-only quantization width (its tolerances are int4/int8), or None (fp32).
    cpu_kernels: the artifact carries qwen-export's ONNX Runtime CPU kernel library.
    engine:      an engine target's builder traits.
    vision:      the passes for a multimodal build's vision tower and token embedding (`build --multimodal`),
                 or None where the target does not take the vision tower.
    """

    name: str
    description: str
    kind: Kind
    pipeline: Callable[[PipelineOptions], list[QwenPass]]
    backend: Backend | None
    options: frozenset[str] = ONNX_OPTIONS
    weight_bits: int | None = None
    cpu_kernels: bool = False
    engine: EngineTraits | None = field(default=None)
    vision: Callable[[PipelineOptions], VisionPipelines] | None = None

    @property
    def precision(self) -> str:
        """The precision an artifact of this target is held to (qwen_export/tolerances.py)."""
        return f"int{self.weight_bits}" if self.weight_bits else "fp32"

    @property
    def runs_on_onnxruntime(self) -> bool:
        return self.backend == "onnxruntime"

    def passes(self, options: PipelineOptions | None = None) -> list[QwenPass]:
        return self.pipeline(options or PipelineOptions())

    def vision_passes(self, options: PipelineOptions | None = None) -> VisionPipelines:
        """The multimodal build's passes for vision.onnx and embed.onnx; a one-line error where the target
        has none."""
        if self.vision is None:
            takers = ", ".join(t.name for t in TARGETS.values() if t.vision is not None)
            raise QwenExportError(
                f"target {self.name} does not build the vision tower; --multimodal builds for {takers}"
            )
        return self.vision(options or PipelineOptions())


@dataclass(frozen=True)
class VisionPipelines:
    """A multimodal build's passes beside the text tower's: the vision tower's and the token embedding's."""

    vision: list[QwenPass]
    embed: list[QwenPass]


TARGETS: dict[str, Target] = {}


def register(target: Target) -> Target:
    if target.name in TARGETS:
        raise ValueError(f"target {target.name!r} is registered twice")
    if (target.kind == "engine") != (target.engine is not None):
        raise ValueError(f"target {target.name!r}: engine traits go with kind 'engine' only")
    TARGETS[target.name] = target
    return target


@contextmanager
def registered(target: Target) -> Iterator[Target]:
    """A target registered for the length of a `with` block (tests, plugins of other packages)."""
    register(target)
    try:
        yield target
    finally:
        TARGETS.pop(target.name, None)


def engine_traits(name: str) -> EngineTraits:
    """An engine target's traits; any other name is a one-line error listing the engine targets."""
    target = TARGETS.get(name)
    if target is None or target.engine is None:
        engines = ", ".join(names("engine"))
        raise QwenExportError(f"unknown engine target {name!r}: engines build for {engines}")
    return target.engine


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise QwenExportError(f"unknown target {name!r}; choose one of: {', '.join(TARGETS)}") from None


def names(kind: Kind | None = None) -> tuple[str, ...]:
    return tuple(t.name for t in TARGETS.values() if kind is None or t.kind == kind)


def help_text() -> str:
    """The `--target` help: every target with its one-line description."""
    return "; ".join(f"{t.name}: {t.description}" for t in TARGETS.values())


def pipeline(name: str, options: PipelineOptions | None = None) -> list[QwenPass]:
    """The passes that turn the exporter's graph into target `name`'s graph (a fresh list each call)."""
    return get_target(name).passes(options)


def pass_catalog() -> list[type[QwenPass]]:
    """Every pass class some target's pipeline runs, in first-use order, then the optional ones."""
    from qwen_export.passes.pipeline import optional

    classes: list[type[QwenPass]] = []
    for target in TARGETS.values():
        for p in [*target.passes(), *_multimodal_passes(target), *optional()]:
            if type(p) not in classes:
                classes.append(type(p))
    return classes


def _multimodal_passes(target: Target) -> list[QwenPass]:
    if target.vision is None:
        return []
    extra = target.vision_passes()
    return [*extra.vision, *extra.embed]


def pass_users() -> dict[str, list[str]]:
    """Pass name -> the targets whose pipelines run it."""
    from qwen_export.passes.base import pass_name

    used: dict[str, list[str]] = {}
    for target in TARGETS.values():
        for name in dict.fromkeys(pass_name(p) for p in [*target.passes(), *_multimodal_passes(target)]):
            used.setdefault(name, []).append(target.name)
    return used


# --- the pipelines ------------------------------------------------------------------------------------
# Each builds a fresh list of pass objects per call.


def _portable(options: PipelineOptions) -> list[QwenPass]:
    from qwen_export.passes.lower_portable import LowerPortable
    from qwen_export.passes.pipeline import cleanup, finish, fusions

    return [*cleanup(), *fusions(), LowerPortable(), *finish()]


def _ort(options: PipelineOptions, deltanet: str = "contrib") -> list[QwenPass]:
    from qwen_export.passes.lower_ort import LowerToOrt
    from qwen_export.passes.lower_portable import LowerPortable
    from qwen_export.passes.pipeline import cleanup, finish, fusions

    # Whatever the ORT lowering leaves as qwen ops still runs: the portable lowering takes it.
    return [*cleanup(), *fusions(), LowerToOrt(deltanet=deltanet), LowerPortable(), *finish()]


def _ort_quantized(bits: int) -> Callable[[PipelineOptions], list[QwenPass]]:
    def pipeline(options: PipelineOptions) -> list[QwenPass]:
        from qwen_export.passes.quantize_weights import QuantizeWeights
        from qwen_export.passes.remove_unused import RemoveUnused

        return [*_ort(options), QuantizeWeights(bits=bits), RemoveUnused()]

    return pipeline


def _ort_cpu(options: PipelineOptions) -> list[QwenPass]:
    from qwen_export.passes.fold_cpu_shared_expert import FoldCpuSharedExpert
    from qwen_export.passes.logits_to_keep import LogitsToKeep
    from qwen_export.passes.lower_cpu_attention import UseCpuAttention
    from qwen_export.passes.lower_cpu_moe import UseCpuFloatMoe
    from qwen_export.passes.remove_unused import RemoveUnused

    kernels = [UseCpuFloatMoe(), FoldCpuSharedExpert(), UseCpuAttention(), RemoveUnused(), LogitsToKeep()]
    return [*_ort(options, deltanet="qwen-cpu"), *kernels]


def _ort_cpu_int4(kv_cache: str = "float32") -> Callable[[PipelineOptions], list[QwenPass]]:
    def pipeline(options: PipelineOptions) -> list[QwenPass]:
        from qwen_export.passes.fold_cpu_shared_expert import FoldCpuSharedExpert
        from qwen_export.passes.logits_to_keep import LogitsToKeep
        from qwen_export.passes.lower_cpu_attention import UseCpuAttention
        from qwen_export.passes.quantize_weights import QuantizeWeights
        from qwen_export.passes.remove_unused import RemoveUnused
        from qwen_export.passes.use_cpu_kernels import UseCpuKernels

        quantize = QuantizeWeights(bits=4, fp16_scales=True)  # scales the kernels keep in float16, exactly
        kernels = [
            UseCpuKernels(),
            FoldCpuSharedExpert(),
            UseCpuAttention(kv_cache),
            RemoveUnused(),
            LogitsToKeep(),
        ]
        return [*_ort(options, deltanet="qwen-cpu"), quantize, RemoveUnused(), *kernels]

    return pipeline


def _fused(options: PipelineOptions) -> list[QwenPass]:
    from qwen_export.passes.pipeline import cleanup, fusions

    return [*cleanup(), *fusions()]


def _trt_plugins(options: PipelineOptions) -> list[QwenPass]:
    from qwen_export.passes.lower_trt_plugins import LowerTrtPlugins
    from qwen_export.passes.pipeline import finish

    return [*_fused(options), LowerTrtPlugins(), *finish()]


def _trt_rtx_engine(options: PipelineOptions) -> list[QwenPass]:
    from qwen_export.passes.lower_trt_rtx import LowerToTrtRtx
    from qwen_export.passes.precision import Precision
    from qwen_export.passes.widen import WidenToFp32

    # Engines start from the cached export, which keeps its checkpoint's precision: widened first.
    lower = LowerToTrtRtx(moe=options.moe, max_tokens=options.max_tokens)
    passes = [WidenToFp32(), lower, Precision(options.precision, logits_fp32=options.logits_fp32)]
    if options.weights == "fp8":
        from qwen_export.passes.fp8_weights import Fp8Weights

        passes.append(Fp8Weights())
    return passes


def _trt_engine(options: PipelineOptions) -> list[QwenPass]:
    from qwen_export.passes.lower_trt_plugins import LowerTrtPlugins
    from qwen_export.passes.pipeline import finish
    from qwen_export.passes.precision import Precision
    from qwen_export.passes.widen import WidenToFp32

    # Fused qwen ops become plugin nodes, which TensorRT's parser looks up in the plugin registry; the
    # precision pass runs first (it keeps qwen ops' I/O fp32) and the plugin lowering casts around them.
    precision = Precision(options.precision, logits_fp32=options.logits_fp32)
    return [WidenToFp32(), *_fused(options), precision, LowerTrtPlugins(dtype=options.precision), *finish()]


def _vision_portable(options: PipelineOptions) -> VisionPipelines:
    from qwen_export.passes.fuse_vision_attention import FuseVisionAttention
    from qwen_export.passes.pipeline import cleanup, finish

    return VisionPipelines([*cleanup(), FuseVisionAttention(), *finish()], cleanup())


def _vision_ort(options: PipelineOptions) -> VisionPipelines:
    from qwen_export.passes.fuse_vision_attention import FuseVisionAttention
    from qwen_export.passes.lower_ort_vision import LowerVisionToOrt
    from qwen_export.passes.pipeline import cleanup, finish

    # The vision tower stays fp32 on the weight-quantized targets too: it is a small share of the weights
    # and its features feed every image token.
    return VisionPipelines([*cleanup(), FuseVisionAttention(), LowerVisionToOrt(), *finish()], cleanup())


def _vision_trt_rtx(options: PipelineOptions) -> VisionPipelines:
    from qwen_export.passes.fuse_vision_attention import FuseVisionAttention
    from qwen_export.passes.pipeline import cleanup, finish
    from qwen_export.passes.precision import Precision
    from qwen_export.passes.widen import WidenToFp32

    def precision() -> QwenPass:
        return Precision(options.precision, logits_fp32=True)

    vision = [WidenToFp32(), *cleanup(), FuseVisionAttention(), precision(), *finish()]
    return VisionPipelines(vision, [WidenToFp32(), *cleanup(), precision()])


# --- the table ----------------------------------------------------------------------------------------
# TensorRT-RTX 1.7 compiles ahead of time, on a CPU, for these (its ComputeCapability enum). It also lists
# SM75, but has no fp32 GEMM for Turing, and the delta rule keeps its recurrent state in fp32.
TRT_RTX_AOT_SMS = ("sm80", "sm86", "sm89", "sm120", "sm121")

register(Target(
    "onnx", "standard ONNX: fuse into qwen ops, then lower them portably (runs on any ONNX runtime)",
    "onnx", _portable, "onnxruntime", vision=_vision_portable,
))  # fmt: skip
register(Target(
    "ort", "ONNX Runtime: fuse into qwen ops, lower them to com.microsoft contrib ops where they fit",
    "ort", _ort, "onnxruntime", vision=_vision_ort,
))  # fmt: skip
register(Target(
    "ort-int4",
    "the ort graph with weight-only int4 block quantization (block 32, int8 compute): MatMulNBits for "
    "constant-weight MatMuls, QMoE for the routed experts",
    "ort", _ort_quantized(4), "onnxruntime", weight_bits=4, vision=_vision_ort,
))  # fmt: skip
register(Target(
    "ort-int8", "the ort graph with weight-only int8 block quantization (block 32, int8 compute)",
    "ort", _ort_quantized(8), "onnxruntime", weight_bits=8, vision=_vision_ort,
))  # fmt: skip
register(Target(
    "ort-cpu",
    "the ort graph (fp32 weights) with qwen.cpu GatedDeltaRule, Attention (flash-decoding KV cache "
    "reads) and FloatMoE instead of the DeltaNet contrib chain, GroupQueryAttention and MoE; the "
    "artifact carries the custom-op library",
    "ort", _ort_cpu, "onnxruntime", cpu_kernels=True, vision=_vision_ort,
))  # fmt: skip
register(Target(
    "ort-cpu-int4",
    "ort-int4 on qwen-export's CPU kernels (AVX-512 VNNI or AVX2; plugins/ort_cpu): qwen.cpu Int4Linear, "
    "Int4MoE, GatedDeltaRule and Attention instead of MatMulNBits, QMoE, the DeltaNet contrib chain and "
    "GroupQueryAttention; the artifact carries the custom-op library (the fastest CPU decode)",
    "ort", _ort_cpu_int4(), "onnxruntime", weight_bits=4, cpu_kernels=True, vision=_vision_ort,
))  # fmt: skip
register(Target(
    "ort-cpu-int4-kv16",
    "ort-cpu-int4 with a float16 KV cache (qwen.cpu AttentionKv16: past/present key and value are float16 "
    "state I/O, fp32 arithmetic): half the cache bytes per decode step",
    "ort", _ort_cpu_int4("float16"), "onnxruntime", weight_bits=4, cpu_kernels=True, vision=_vision_ort,
))  # fmt: skip
register(Target(
    "fused", "the fused graph itself: qwen ops as model-local functions (input to plugin backends)",
    "onnx", _fused, None,
))  # fmt: skip
register(Target(
    "trt-plugins",
    "ONNX for TensorRT with qwen-export's plugins: qwen ops become Qwen* plugin nodes (bf16), for trtexec "
    "--dynamicPlugins or the trt engine target",
    "plugins", _trt_plugins, None,
))  # fmt: skip
register(Target(
    "trt-rtx",
    "engines per GPU built here with TensorRT-RTX (sm80/86/89/120, no GPU needed): attention as opset-23 "
    "Attention, MoE over the selected experts, bf16/fp16 with fp32 islands",
    "engine", _trt_rtx_engine, "tensorrt-rtx", options=ENGINE_OPTIONS,
    engine=EngineTraits(
        "TensorRT-RTX", "TensorRTRtx", TRT_RTX_AOT_SMS, builds_fp32=False, hardware_compatibility=False,
        timing_cache=False, fp8_weights=True,
    ),
    vision=_vision_trt_rtx,
))  # fmt: skip
register(Target(
    "trt",
    "engines built on the target GPU with full TensorRT and libqwen_trt_plugins.so (qwen ops as plugins)",
    "engine", _trt_engine, "tensorrt", options=ENGINE_OPTIONS | RANK_OPTIONS,
    engine=EngineTraits("TensorRT", "TensorRT", None),
))  # fmt: skip


# --- listings (the `targets` and `passes` commands) ---------------------------------------------------


def target_table() -> Listing:
    rows = [
        {
            "name": t.name, "kind": t.kind, "backend": t.backend, "precision": t.precision,
            "options": sorted(t.options), "description": t.description,
        }
        for t in TARGETS.values()
    ]  # fmt: skip
    return Listing("targets", ("target", "kind", "runs on", "precision", "options", "what"), rows)


def pass_table() -> Listing:
    from qwen_export.passes.base import pass_name, pass_summary

    used = pass_users()
    rows = [
        {"name": pass_name(c), "summary": pass_summary(c), "targets": used.get(pass_name(c), [])}
        for c in pass_catalog()
    ]
    return Listing("passes", ("pass", "what it does", "targets"), rows)
