"""The two engine builders behind one interface: TensorRT-RTX (ahead of time, on a CPU) and TensorRT.

Both run the same steps: parse the prepared ONNX into a strongly typed network, add the spec's
optimization profiles, configure, build a serialized engine. They differ only where the libraries do:

- TensorRT-RTX compiles for compute capabilities named in the config, with no GPU present; it has no
  plugins, no timing cache (a deprecated no-op that would query a GPU) and no hardware-compatibility level.
- TensorRT builds for the GPU it runs on (or, with a hardware-compatibility level, for a family of GPUs),
  loads our plugin library, and reads/writes a timing cache.
"""

from __future__ import annotations

import importlib
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_export.artifact import sha256_file
from qwen_export.engines.spec import DeploySpecError, Profile, sm_number
from qwen_export.errors import QwenExportError
from qwen_export.targets import engine_traits

HARDWARE_COMPATIBILITY = ("none", "ampere_plus", "same_compute_capability")
TRT_RTX_MODULES = ("tensorrt_rtx_bindings", "tensorrt_rtx")
PLUGIN_LIBRARY_ENV = "QWEN_EXPORT_TRT_PLUGINS"
PLUGIN_LIBRARY_NAME = "libqwen_trt_plugins.so"


class ToolchainUnavailable(QwenExportError):
    """The engine builder's Python package cannot be imported here."""


class EngineBuildError(QwenExportError):
    """The parser or builder refused the graph; the message carries their errors."""


@dataclass(frozen=True)
class BuildOptions:
    """Builder settings a deployer chooses; all of them go into the engine fingerprint."""

    opt_level: int = 3
    version_compatible: bool = False
    hardware_compatibility: str = "none"
    workspace_mib: int | None = None

    def problems(self, target: str) -> list[str]:
        out = []
        if not isinstance(self.opt_level, int) or not 0 <= self.opt_level <= 5:
            out.append(f"builder optimization level must be 0..5, got {self.opt_level!r}")
        if self.hardware_compatibility not in HARDWARE_COMPATIBILITY:
            out.append(
                f"unknown hardware compatibility {self.hardware_compatibility!r}: use one of "
                f"{', '.join(HARDWARE_COMPATIBILITY)}"
            )
        elif not engine_traits(target).hardware_compatibility and self.hardware_compatibility != "none":
            out.append(
                f"{engine_traits(target).builder} has no hardware-compatibility level: its engines run on "
                "the compute capabilities they are built for; list every GPU with --gpu instead"
            )
        return out

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class EngineBuild:
    """One serialized engine (a file) and where its time went."""

    engine: Path
    timings_s: dict[str, float]
    warnings: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def _collecting_logger(trt: Any) -> Any:
    """A TensorRT logger that keeps warnings and errors for the manifest and for error messages."""

    class Collector(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(msg)
            elif severity == trt.ILogger.Severity.WARNING:
                self.warnings.append(msg)

    return Collector()


class Toolchain(ABC):
    """Shared orchestration; subclasses say how to import the library and how to aim it at a GPU."""

    target: str = ""
    package_hint: str = ""

    def __init__(self) -> None:
        self._trt: Any = None

    @classmethod
    def create(cls, plugin_library: Path | None = None, timing_cache: Path | None = None) -> Toolchain:
        """This toolchain for a build; a builder without plugins or a timing cache ignores them."""
        return cls()

    # --- what the library is --------------------------------------------------------------------------
    @abstractmethod
    def load(self) -> Any:
        """The library's Python module."""

    def available(self) -> tuple[bool, str]:
        try:
            trt = self.load()
        except ToolchainUnavailable as e:
            return False, str(e)
        return True, f"{trt.__name__} {trt.__version__}"

    def versions(self) -> dict[str, str]:
        trt = self.load()
        return {trt.__name__: trt.__version__}

    def target_problems(self, sms: Sequence[str], options: BuildOptions) -> list[str]:
        return []

    def extra_fingerprint(self) -> dict[str, Any]:
        """Inputs beyond the graph and options that change the engine (a plugin library)."""
        return {}

    # --- building -------------------------------------------------------------------------------------
    def spawn_args(self) -> dict[str, Any]:
        """What a worker process needs to recreate this toolchain."""
        return {"target": self.target}

    def build_here(
        self, onnx_path: Path, profiles: Sequence[Profile], sm: str, options: BuildOptions, engine_path: Path
    ) -> EngineBuild:
        trt = self.load()
        logger = _collecting_logger(trt)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        builder = trt.Builder(logger)
        self._prepare_builder(trt, builder, logger)
        network = builder.create_network(_strongly_typed_flags(trt))
        parser = trt.OnnxParser(network, logger)
        ok = parser.parse_from_file(str(onnx_path))
        timings["parse"] = time.perf_counter() - start
        if not ok:
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors
            raise EngineBuildError(
                f"{self.target}: the ONNX parser refused {onnx_path.name}: " + " | ".join(errors[:5])
            )

        attention_layers = _allow_decomposed_attention(trt, network)
        dequantize_layers = _count_layers(trt, network, "DEQUANTIZE")

        start = time.perf_counter()
        config = builder.create_builder_config()
        config.builder_optimization_level = options.opt_level
        if dequantize_layers:
            # FP8 weights: TensorRT-RTX 1.7 dequantizes each into a bf16 scratch buffer per run; auxiliary
            # streams keep those buffers apart, so the engine would need more memory than a bf16 one
            # (measured: 23.9 MiB of activations for 8 layers of 1024x1024, 10.1 MiB with none, bf16 8.1).
            config.max_aux_streams = 0
        if options.workspace_mib:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
        if options.version_compatible:
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
            # The lean runtime is not in the pip wheels; the deployment ships it next to the engine.
            config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
        for profile in profiles:
            trt_profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in profile.shapes.items():
                trt_profile.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(trt_profile)
        self._aim(trt, config, sm, options)
        engine = builder.build_serialized_network(network, config)
        timings["build"] = time.perf_counter() - start
        if engine is None:
            raise EngineBuildError(
                f"{self.target}: building the {sm} engine failed: " + " | ".join(logger.errors[-5:])
            )
        self._after_build(trt, config)
        start = time.perf_counter()
        engine_path.parent.mkdir(parents=True, exist_ok=True)
        with open(engine_path, "wb") as f:
            f.write(memoryview(engine))
        timings["serialize"] = time.perf_counter() - start
        info = {"attention_layers_decomposable": attention_layers, "dequantize_layers": dequantize_layers}
        return EngineBuild(engine_path, timings, logger.warnings[-50:], info)

    def _prepare_builder(self, trt: Any, builder: Any, logger: Any) -> None:  # noqa: B027 (optional hook)
        """Hook before the network is created (plugin registration, for instance); nothing by default."""

    @abstractmethod
    def _aim(self, trt: Any, config: Any, sm: str, options: BuildOptions) -> None:
        """Point the builder config at one GPU target (and apply target-specific options)."""

    def _after_build(self, trt: Any, config: Any) -> None:  # noqa: B027 (optional hook)
        """Hook after the engine is serialized (timing-cache write-back, for instance); nothing by default."""


def _allow_decomposed_attention(trt: Any, network: Any) -> int:
    """Let every attention layer fall back to separate kernels where no fused kernel fits its shapes.

    The parser makes opset-23 Attention non-decomposable, and TensorRT-RTX 1.7 then refuses some builds
    ("Attention operation was not supported by a dedicated kernel") depending on the rest of the graph;
    a fused kernel is still used wherever one fits.
    """
    kind = getattr(trt.LayerType, "ATTENTION_INPUT", None)
    if kind is None:
        return 0
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == kind:
            layer.__class__ = trt.IAttentionInputLayer  # the bindings return the base class
            layer.attention.decomposable = True
            count += 1
    return count


def _count_layers(trt: Any, network: Any, kind: str) -> int:
    layer_type = getattr(trt.LayerType, kind, None)
    if layer_type is None:
        return 0
    return sum(1 for i in range(network.num_layers) if network.get_layer(i).type == layer_type)


def _strongly_typed_flags(trt: Any) -> int:
    # TensorRT 11 networks are always strongly typed and drop the flag; 10.x and TensorRT-RTX take it.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


class TensorRTRtx(Toolchain):
    """TensorRT-RTX: ahead-of-time builds on a CPU for SM80/86/89/120/121."""

    target = "trt-rtx"
    package_hint = "pip install 'qwen-export[trt-rtx]' (tensorrt-rtx-cu13-libs + tensorrt-rtx-cu13-bindings)"

    def load(self) -> Any:
        if self._trt is None:
            self._trt = import_trt_rtx()
        return self._trt

    def target_problems(self, sms: Sequence[str], options: BuildOptions) -> list[str]:
        out = []
        trt = self.load()
        for sm in sms:
            aot = engine_traits(self.target).aot_sms or ()
            if sm not in aot or not hasattr(trt.ComputeCapability, sm.upper()):
                out.append(f"{sm}: this TensorRT-RTX ({trt.__version__}) cannot build for it ahead of time")
        return out

    def _aim(self, trt: Any, config: Any, sm: str, options: BuildOptions) -> None:
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(trt.ComputeCapability, sm.upper()), 0)


def import_trt_rtx() -> Any:
    """The TensorRT-RTX Python module: the pip wheels install `tensorrt_rtx_bindings`."""
    errors = []
    for name in TRT_RTX_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
    raise ToolchainUnavailable(
        f"the trt-rtx target needs TensorRT-RTX, which is not installed ({'; '.join(errors)}); "
        f"{TensorRTRtx.package_hint}"
    )


class TensorRT(Toolchain):
    """Full TensorRT with our plugin library: builds on the GPU it targets."""

    target = "trt"
    package_hint = "install TensorRT (its Python wheel and libraries) from NVIDIA's index on the GPU machine"

    def __init__(self, plugin_library: Path | None = None, timing_cache: Path | None = None) -> None:
        super().__init__()
        self.plugin_library = plugin_library or default_plugin_library()
        self.timing_cache = timing_cache
        self._cache_obj: Any = None

    @classmethod
    def create(cls, plugin_library: Path | None = None, timing_cache: Path | None = None) -> Toolchain:
        return cls(plugin_library, timing_cache)

    def spawn_args(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "plugin_library": str(self.plugin_library) if self.plugin_library else None,
            "timing_cache": str(self.timing_cache) if self.timing_cache else None,
        }

    def load(self) -> Any:
        if self._trt is None:
            try:
                self._trt = importlib.import_module("tensorrt")
            except ImportError as e:
                raise ToolchainUnavailable(
                    f"the trt target needs a GPU and TensorRT: `import tensorrt` failed ({e}); "
                    + self.package_hint
                ) from None
        return self._trt

    def versions(self) -> dict[str, str]:
        versions = super().versions()
        try:
            import torch

            if torch.cuda.is_available():
                versions["cuda"] = str(torch.version.cuda)
                versions["gpu"] = torch.cuda.get_device_name(0)
        except ImportError:
            pass
        return versions

    def extra_fingerprint(self) -> dict[str, Any]:
        path = self.plugin_library
        return {"plugin_library_sha256": sha256_file(path) if path and path.is_file() else None}

    def target_problems(self, sms: Sequence[str], options: BuildOptions) -> list[str]:
        out = []
        if self.plugin_library is None or not self.plugin_library.is_file():
            out.append(
                f"the trt target loads our plugin library ({PLUGIN_LIBRARY_NAME}); build it (plugins/) "
                f"and pass its path or set {PLUGIN_LIBRARY_ENV}"
            )
        current = current_sm()
        if current is None:
            out.append("the trt target builds on the GPU it targets, and this machine has no usable CUDA GPU")
            return out
        for sm in sms:
            if sm == current:
                continue
            if (
                options.hardware_compatibility == "ampere_plus"
                and sm_number(sm) >= 80
                and sm_number(current) >= 80
            ):
                continue
            out.append(
                f"{sm}: TensorRT builds for the GPU it runs on ({current} here); build {sm} on that GPU, or "
                "pass --hardware-compatibility ampere_plus for an engine that runs on any SM80+ GPU"
            )
        return out

    def _prepare_builder(self, trt: Any, builder: Any, logger: Any) -> None:
        if self.plugin_library is not None:
            builder.get_plugin_registry().load_library(str(self.plugin_library))

    def _aim(self, trt: Any, config: Any, sm: str, options: BuildOptions) -> None:
        levels = {
            "none": trt.HardwareCompatibilityLevel.NONE,
            "ampere_plus": trt.HardwareCompatibilityLevel.AMPERE_PLUS,
            "same_compute_capability": getattr(
                trt.HardwareCompatibilityLevel, "SAME_COMPUTE_CAPABILITY", None
            ),
        }
        if options.hardware_compatibility != "none":
            level = levels[options.hardware_compatibility]
            if level is None:
                raise DeploySpecError(
                    f"this TensorRT has no {options.hardware_compatibility} compatibility level"
                )
            config.hardware_compatibility_level = level
        if options.version_compatible and self.plugin_library is not None:
            config.plugins_to_serialize = [str(self.plugin_library)]
        if self.timing_cache is not None:
            data = self.timing_cache.read_bytes() if self.timing_cache.is_file() else b""
            self._cache_obj = config.create_timing_cache(data)
            config.set_timing_cache(self._cache_obj, ignore_mismatch=False)

    def _after_build(self, trt: Any, config: Any) -> None:
        if self.timing_cache is None or self._cache_obj is None:
            return
        data = bytes(config.get_timing_cache().serialize())
        tmp = self.timing_cache.with_name(f".{self.timing_cache.name}.{os.getpid()}.tmp")
        self.timing_cache.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, self.timing_cache)  # several builds may share the file: each write is whole


def default_plugin_library() -> Path | None:
    env = os.environ.get(PLUGIN_LIBRARY_ENV)
    if env:
        return Path(env)
    candidate = Path(__file__).resolve().parents[2] / "plugins" / "build" / PLUGIN_LIBRARY_NAME
    return candidate if candidate.is_file() else None


def current_sm() -> str | None:
    """Compute capability of CUDA device 0 ('sm90'), or None without a usable GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return f"sm{major}{minor}"


def toolchain_for(
    target: str, plugin_library: Path | None = None, timing_cache: Path | None = None
) -> Toolchain:
    return globals()[engine_traits(target).toolchain].create(plugin_library, timing_cache)
