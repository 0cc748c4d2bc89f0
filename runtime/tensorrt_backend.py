"""TensorRT / TensorRT-RTX engines behind the same step interface as the ONNX Runtime backend.

Engines run only on an NVIDIA GPU of the architecture they were built for. Where there is none (or the
TensorRT Python package is missing) loading says so and stops, before any compute.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np

from qwen_export.errors import QwenExportError
from qwen_export.targets import engine_traits, get_target

PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."


def _tensorrt_module(target: str):
    """tensorrt_rtx_bindings (the pip wheels) for trt-rtx engines, tensorrt for trt engines."""
    from qwen_export.engines.toolchain import import_trt_rtx

    rtx = get_target(target).backend == "tensorrt-rtx"
    try:
        return import_trt_rtx() if rtx else importlib.import_module("tensorrt")
    except Exception as e:  # ImportError, or the toolchain's own "not installed" error
        raise QwenExportError(
            f"the {target} backend needs {engine_traits(target).builder} and an NVIDIA GPU "
            f"({e}); install it on the GPU machine"
        ) from None


def current_gpu() -> tuple[str, str]:
    """(name, 'smXY') of CUDA device 0, or a clear error when there is no usable GPU."""
    import torch

    if not torch.cuda.is_available():
        raise QwenExportError(
            "no NVIDIA GPU is visible on this machine: TensorRT engines run only on the GPU "
            "they were built for; use the onnx or ort target to run on the CPU"
        )
    major, minor = torch.cuda.get_device_capability(0)
    return torch.cuda.get_device_name(0), f"sm{major}{minor}"


class TensorRTBackend:
    """Runs `engines/<sm>/model.engine` with device-resident state buffers (torch CUDA tensors)."""

    def __init__(self, engine_path: Path, target: str, plugin_library: Path | None = None):
        import torch

        trt = _tensorrt_module(target)
        self.name = target
        self.torch = torch
        logger = trt.Logger(trt.Logger.WARNING)
        if plugin_library is not None:
            trt.get_plugin_registry().load_library(str(plugin_library))
        runtime = trt.Runtime(logger)
        self.engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if self.engine is None:
            raise QwenExportError(
                f"{engine_path}: TensorRT could not deserialize the engine (wrong GPU or version?)"
            )
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: _torch_dtype(torch, self.engine.get_tensor_dtype(n)) for n in names}
        self.state_suffixes = [n.removeprefix(PAST_PREFIX) for n in self.inputs if n.startswith(PAST_PREFIX)]
        self.vocab_size = int(self.engine.get_tensor_shape("logits")[-1])
        self.static_dims = {n: list(self.engine.get_tensor_shape(n)) for n in names}

    @classmethod
    def from_artifact(cls, artifact) -> TensorRTBackend:
        _tensorrt_module(artifact.target)  # a missing package is reported before looking for a GPU
        gpu_name, sm = current_gpu()
        engines = artifact.info.get("engines", {})
        entry = engines.get(sm)
        if entry is None:
            built = ", ".join(sorted(engines)) or "none"
            raise QwenExportError(
                f"{artifact.folder}: no engine for this GPU ({gpu_name}, {sm}); built for: {built}"
            )
        plugin = artifact.info.get("plugin_library")
        return cls(
            artifact.folder / entry["path"], artifact.target, artifact.folder / plugin if plugin else None
        )

    def empty_bound_states(self, batch: int) -> dict[str, Any]:
        states = {}
        for suffix in self.state_suffixes:
            dims = [
                batch if i == 0 else (0 if d == -1 else d)
                for i, d in enumerate(self.static_dims[PAST_PREFIX + suffix])
            ]
            states[suffix] = self.torch.zeros(dims, dtype=self.dtypes[PAST_PREFIX + suffix], device="cuda")
        return states

    def step_bound(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        position_ids: np.ndarray,
        states: dict[str, Any],
    ) -> tuple[np.ndarray, dict[str, Any]]:
        torch = self.torch
        feeds = {
            "input_ids": torch.as_tensor(input_ids, dtype=torch.int64).cuda(),
            "attention_mask": torch.as_tensor(attention_mask, dtype=torch.int64).cuda(),
            "position_ids": torch.as_tensor(position_ids, dtype=torch.int64).cuda(),
        }
        feeds.update({PAST_PREFIX + k: v.contiguous() for k, v in states.items()})
        self._select_profile(input_ids.shape[1])
        for name in self.inputs:
            tensor = feeds[name].to(self.dtypes[name])
            feeds[name] = tensor
            self.context.set_input_shape(name, tuple(tensor.shape))
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise QwenExportError("TensorRT execution failed")
        self.stream.synchronize()
        logits = outputs["logits"][:, -1].float().cpu().numpy()
        present = {
            n.removeprefix(PRESENT_PREFIX): v for n, v in outputs.items() if n.startswith(PRESENT_PREFIX)
        }
        return logits, present

    def _select_profile(self, sequence: int) -> None:
        """Profile 0 serves prefill, profile 1 single-token decode (see qwen_export.engines)."""
        if self.engine.num_optimization_profiles > 1:
            profile = 1 if sequence == 1 else 0
            if self.context.active_optimization_profile != profile:
                self.context.set_optimization_profile_async(profile, self.stream.cuda_stream)


def _torch_dtype(torch, trt_dtype) -> Any:
    name = str(trt_dtype).rsplit(".", 1)[-1].upper()
    return {
        "FLOAT": torch.float32,
        "HALF": torch.float16,
        "BF16": torch.bfloat16,
        "INT64": torch.int64,
        "INT32": torch.int32,
        "BOOL": torch.bool,
    }[name]
