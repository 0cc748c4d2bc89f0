"""Preprocessing for multimodal prompts through transformers' own Qwen3.5 processor classes.

The checkpoint's processor (Qwen3VLProcessor: the Qwen2-VL image processor, the Qwen3-VL video processor,
the tokenizer) decides resizing (min/max pixels), normalisation, patch layout, placeholder expansion and
`mm_token_type_ids`. Images are opened here first so unreadable or absurd files fail with a clear
message. Grid-dependent vision-graph inputs come from `transformers.vision_utils`, the helpers the
reference model itself calls.

transformers' image and video processors for Qwen are written against torchvision, and with torchvision
installed AutoImageProcessor picks the torchvision image class (Qwen2VLImageProcessor), not the PIL one.
Where torchvision cannot be imported (the CPU torch build this project pins has no matching torchvision),
`TorchImageProcessor` / `TorchVideoProcessor` keep transformers' Qwen2-VL / Qwen3-VL classes and all their
code (smart_resize, patchify, frame handling, timestamps) and replace only the torchvision calls under them
with plain torch that gives the same bits: RGB conversion, resize (`tv_resize`: uint8 straight into torch's
antialiased bicubic kernel, as torchvision does on the CPU) and normalisation. With torchvision installed
the stock classes are used. tests/test_multimodal_preprocess.py checks the arrays against ones made by
transformers with torchvision (tests/data/processor_reference/).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qwen_export.errors import QwenExportError
from qwen_export.exporter.vision_spec import VisionSpec

if TYPE_CHECKING:
    import torch

MAX_ASPECT_RATIO = 200  # the Qwen2-VL / Qwen3-VL smart_resize rule
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|video_pad|>"  # the processor wraps every frame in vision start / end tokens itself
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json")


# --- files -> pixels ------------------------------------------------------------------------------------
def load_image(path: str | Path):
    """A readable image file as an RGB PIL image, or a QwenExportError saying what is wrong with it."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise QwenExportError(f"{path}: image file not found")
    if path.stat().st_size == 0:
        raise QwenExportError(f"{path}: empty file (0 bytes), not an image")
    try:
        with Image.open(path) as im:
            im.load()  # decode now, so truncated or corrupt data fails here and not inside the processor
            image = im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise QwenExportError(
            f"{path}: refused by PIL's decompression-bomb guard ({e}); downscale the image first"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise QwenExportError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    check_resolution(image.width, image.height, str(path))
    return image


def check_resolution(width: int, height: int, what: str) -> None:
    if width < 1 or height < 1:
        raise QwenExportError(f"{what}: {width}x{height} pixels has no area")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise QwenExportError(
            f"{what}: {width}x{height} pixels has aspect ratio {ratio:.0f}:1; the Qwen3.5 processor accepts "
            f"at most {MAX_ASPECT_RATIO}:1 (crop or pad the image)"
        )


def load_video_frames(paths: Sequence[str | Path], min_frames: int) -> np.ndarray:
    """Frames of one short video (image files, same size) as uint8 [T, H, W, 3]."""
    if len(paths) < min_frames:
        raise QwenExportError(
            f"a video needs at least {min_frames} frames (the vision tower's temporal patch), "
            f"got {len(paths)}"
        )
    frames = [np.asarray(load_image(p)) for p in paths]
    sizes = {f.shape for f in frames}
    if len(sizes) != 1:
        shapes = ", ".join(
            f"{Path(p).name}: {f.shape[1]}x{f.shape[0]}" for p, f in zip(paths, frames, strict=True)
        )
        raise QwenExportError(f"video frames differ in size ({shapes}); resize them to one size")
    return np.stack(frames)


# --- the checkpoint's processor -------------------------------------------------------------------------
def torchvision_available() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # a torchvision built for another torch fails at import with RuntimeError
        return False
    return True


# PIL resample ids -> torch.nn.functional.interpolate modes, as transformers' pil_torch_interpolation_mapping
# maps them to torchvision's InterpolationMode (0 NEAREST -> NEAREST_EXACT, 2 BILINEAR, 3 BICUBIC).
_INTERPOLATE_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}


def tv_resize(
    image: torch.Tensor, height: int, width: int, resample: int | None = None, antialias: bool = True
) -> torch.Tensor:
    """torchvision.transforms.v2.functional.resize_image (0.29) on a CPU tensor [..., C, H, W], in torch.

    Bit for bit what torchvision does: uint8 goes straight into the interpolation for bicubic (and nearest,
    and bilinear where torch has the AVX2 / AVX-512 uint8 kernel), so the rounding happens inside torch's
    uint8 kernel; other dtypes go through float32, then clamp (bicubic), round and cast back.
    """
    import platform

    import torch

    mode = _INTERPOLATE_MODES.get(2 if resample is None else int(resample))
    if mode is None:
        raise ValueError(
            f"resample={resample!r} is not supported without torchvision (nearest, bilinear, bicubic)"
        )
    if mode == "nearest-exact":
        antialias, align_corners = False, None
    else:
        align_corners = False
    shape = image.shape
    channels, old_height, old_width = shape[-3:]
    if (height, width) == (old_height, old_width):
        return image
    if image.numel() == 0:
        return image.reshape(*shape[:-3], channels, height, width)
    dtype = image.dtype
    native = [torch.float32, torch.float64]
    if mode == "nearest-exact":
        native.append(torch.uint8)
    elif image.device.type == "cpu":
        avx = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
        uint8_bilinear = avx or platform.machine() in ("aarch64", "arm64")
        if mode == "bicubic" or uint8_bilinear:
            native.append(torch.uint8)
    x = image.reshape(-1, channels, old_height, old_width)
    strides = x.stride()
    if x.is_contiguous(memory_format=torch.channels_last) and x.shape[0] == 1 and x.numel() != strides[0]:
        # torchvision restrides single channels-last images so interpolate keeps the memory format.
        x = x.as_strided((1, channels, old_height, old_width), [x.numel(), *strides[1:]])
    cast = dtype not in native
    if cast:
        x = x.to(torch.float32)
    x = torch.nn.functional.interpolate(
        x, size=[height, width], mode=mode, align_corners=align_corners, antialias=antialias
    )
    if cast:
        if mode == "bicubic" and dtype == torch.uint8:
            x = x.clamp_(0, 255)
        if not dtype.is_floating_point:
            x = x.round_()
        x = x.to(dtype)
    return x.reshape(*shape[:-3], channels, height, width)


def tv_normalize(image: torch.Tensor, mean: Any, std: Any, inplace: bool = False) -> torch.Tensor:
    """torchvision.transforms.v2.functional.normalize_image: (x - mean) / std in the image's float dtype."""
    import torch

    mean = torch.as_tensor(mean, dtype=image.dtype, device=image.device)
    std = torch.as_tensor(std, dtype=image.dtype, device=image.device)
    if mean.ndim == 1:
        mean = mean.view(-1, 1, 1)
    if std.ndim == 1:
        std = std.view(-1, 1, 1)
    image = image.sub_(mean) if inplace else image.sub(mean)
    return image.div_(std)


def _grayscale_to_rgb(image: torch.Tensor) -> torch.Tensor:
    if image.shape[-3] == 1:
        image = image.expand(*image.shape[:-3], 3, *image.shape[-2:])
    return image


def _resize_to(
    self: Any, image: torch.Tensor, size: Any, resample: Any = None, antialias: bool = True, **kwargs: Any
) -> torch.Tensor:
    """TorchvisionBackend.resize for the {height, width} sizes the Qwen processors pass down."""
    if not (size.height and size.width):
        raise ValueError(f"resize without torchvision takes an explicit height and width, got {size}")
    return tv_resize(image, size.height, size.width, resample, antialias)


def _normalize(
    self: Any, image: torch.Tensor, mean: Any, std: Any, inplace: bool = False, **kwargs: Any
) -> torch.Tensor:
    return tv_normalize(image, mean, std, inplace)


@functools.cache
def _torch_video_processor_class() -> type:
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_processing_utils import BaseVideoProcessor

    class _TorchOps(BaseVideoProcessor):
        """The torchvision calls under BaseVideoProcessor (RGB, resize, normalize) in plain torch."""

        resize = _resize_to
        normalize = _normalize

        def convert_to_rgb(self, video, input_data_format=None):
            video = _grayscale_to_rgb(video)
            if video.shape[-3] != 3:
                raise ValueError(f"video frames have {video.shape[-3]} channels; expected RGB")
            return video

    class TorchVideoProcessor(Qwen3VLVideoProcessor, _TorchOps):
        """Qwen3VLVideoProcessor whose torchvision calls run in plain torch (see the module docstring)."""

    return TorchVideoProcessor


@contextmanager
def _torchvision_placeholder() -> Iterator[None]:
    """An empty `torchvision.transforms.v2.functional` for the length of one import.

    transformers' Qwen2-VL image processor module imports tvF at the top but only names it in (string)
    annotations; every call into torchvision is in TorchvisionBackend's methods, which the subclass
    below overrides. Real torchvision modules, if some were imported, are put back afterwards.
    """
    names = (
        "torchvision",
        "torchvision.transforms",
        "torchvision.transforms.v2",
        "torchvision.transforms.v2.functional",
    )
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    for parent, child in zip(names[:-1], names[1:], strict=True):
        setattr(sys.modules[parent], child.rsplit(".", 1)[1], sys.modules[child])
    try:
        yield
    finally:
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


@functools.cache
def _torch_image_processor_class() -> type:
    import transformers.models.qwen2_vl as package
    from transformers.image_processing_backends import TorchvisionBackend

    # Load the module under a private name so transformers' own (torchvision) module entry stays untouched.
    name = f"{package.__name__}._torch_only_image_processing_qwen2_vl"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(package.__file__).with_name("image_processing_qwen2_vl.py")
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            with _torchvision_placeholder():
                spec.loader.exec_module(module)
        except Exception:
            del sys.modules[name]  # no half-imported module left behind
            raise
    qwen2vl = sys.modules[name].Qwen2VLImageProcessor

    class _TorchOps(TorchvisionBackend):
        """The torchvision calls under TorchvisionBackend (RGB, resize, normalize) in plain torch."""

        resize = _resize_to
        normalize = _normalize

        def convert_to_rgb(self, image, input_data_format=None):
            # PIL images never come here (process_image converts them with PIL); arrays and tensors do.
            if image.ndim == 2:
                image = image[None]
            image = _grayscale_to_rgb(image)
            if image.shape[-3] != 3:
                raise ValueError(f"image has {image.shape[-3]} channels; pass RGB (or a PIL image)")
            return image

    class TorchImageProcessor(qwen2vl, _TorchOps):
        """transformers' Qwen2VLImageProcessor (torchvision backend), its torchvision calls in plain torch."""

    return TorchImageProcessor


def video_processor_class() -> type:
    """transformers' Qwen3VLVideoProcessor where torchvision works, else its torch-only subclass."""
    if torchvision_available():
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        return Qwen3VLVideoProcessor
    return _torch_video_processor_class()


def image_processor_class(folder: str | Path) -> type | None:
    """The image processor class transformers' AutoImageProcessor picks with torchvision installed.

    With torchvision: None (AutoImageProcessor decides). Without it, AutoImageProcessor would fall back to the
    PIL class, whose resize rounds differently; a Qwen2-VL config gets the torch-only torchvision class.
    """
    if torchvision_available():
        return None
    config = json.loads((Path(folder) / "preprocessor_config.json").read_text())
    kind = str(config.get("image_processor_type", ""))
    if kind.removesuffix("Fast").removesuffix("Pil") == "Qwen2VLImageProcessor":
        return _torch_image_processor_class()
    return None


def _processor_class():
    from transformers import Qwen3VLProcessor
    from transformers.video_processing_utils import VideoProcessorMixin

    class Processor(Qwen3VLProcessor):
        """Qwen3VLProcessor that also accepts the torch-only video processor (its class check looks the
        base class up in transformers' namespace, which lacks it without torchvision)."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and isinstance(argument, VideoProcessorMixin):
                return type(argument)
            return super().check_argument_for_proper_class(argument_name, argument)

    return Processor


def load_processor(folder: str | Path):
    """The checkpoint's Qwen3VLProcessor (tokenizer, image and video processors, chat template)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    folder = Path(folder)
    missing = [f for f in (*PROCESSOR_FILES, "tokenizer.json") if not (folder / f).is_file()]
    if missing:
        raise QwenExportError(
            f"{folder}: no {', '.join(missing)}; multimodal prompts need the checkpoint's processor files "
            "(pass processor_dir= a folder that has them)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        image_class = image_processor_class(folder) or AutoImageProcessor
        image_processor = image_class.from_pretrained(folder)
        video_processor = video_processor_class().from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise QwenExportError(f"{folder}: cannot load the processor ({type(e).__name__}: {e})") from None
    return _processor_class()(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=_chat_template(folder, tokenizer),
    )


def _chat_template(folder: Path, tokenizer) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    legacy = folder / "chat_template.json"
    if legacy.is_file():
        return json.loads(legacy.read_text()).get("chat_template")
    return getattr(tokenizer, "chat_template", None)


def check_token_ids(processor, vspec: VisionSpec) -> None:
    """The tokenizer's placeholder ids must be the ones config.json tells the model to look for."""
    pairs = {
        "image_token_id": (processor.image_token_id, vspec.image_token_id),
        "video_token_id": (processor.video_token_id, vspec.video_token_id),
        "vision_start_token_id": (processor.vision_start_token_id, vspec.vision_start_token_id),
        "vision_end_token_id": (processor.vision_end_token_id, vspec.vision_end_token_id),
    }
    for name, (tok, cfg) in pairs.items():
        if tok != cfg:
            raise QwenExportError(
                f"the tokenizer maps {name.removesuffix('_id')} to id {tok} but config.json has "
                f"{name} = {cfg}; "
                "the processor files do not belong to this checkpoint"
            )


def prompt_text(processor, prompt: str, num_images: int, num_videos: int, chat: bool | None = None) -> str:
    """The text the processor expands: the prompt with one placeholder per image / video.

    A prompt that already holds placeholders is used as is. Otherwise images then videos come before the
    prompt, inside the checkpoint's chat template when it has one (chat=None) or chat=True.
    """
    if processor.image_token in prompt or processor.video_token in prompt:
        return prompt
    use_chat = bool(processor.chat_template) if chat is None else chat
    if use_chat:
        if not processor.chat_template:
            raise QwenExportError("chat=True but the checkpoint's processor has no chat template")
        content: list[dict[str, Any]] = [{"type": "image"}] * num_images + [{"type": "video"}] * num_videos
        messages = [{"role": "user", "content": [*content, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return IMAGE_PLACEHOLDER * num_images + VIDEO_PLACEHOLDER * num_videos + prompt


def process(
    processor,
    text: str,
    images: Sequence[Any] = (),
    videos: Sequence[np.ndarray] = (),
    video_fps: float = 2.0,
) -> dict[str, np.ndarray]:
    """Run the processor: input_ids, mm_token_type_ids, pixel_values(_videos), image/video_grid_thw."""
    from transformers.video_utils import VideoMetadata

    kwargs: dict[str, Any] = {"text": [text], "return_tensors": "np"}
    if images:
        kwargs["images"] = list(images)
    if videos:
        kwargs["videos"] = list(videos)
        kwargs["videos_kwargs"] = {
            "do_sample_frames": False,  # the frames given are the frames used
            "video_metadata": [
                VideoMetadata(total_num_frames=len(v), fps=video_fps, frames_indices=list(range(len(v))))
                for v in videos
            ],
        }
    try:
        out = processor(**kwargs)
    except (ValueError, TypeError, OSError) as e:
        raise QwenExportError(f"the checkpoint's processor rejected the input: {e}") from None
    return {k: np.asarray(v) for k, v in out.items()}


# --- grid -> vision graph inputs ------------------------------------------------------------------------
def vision_graph_feeds(pixel_values: np.ndarray, grid_thw: np.ndarray, vspec: VisionSpec) -> dict[str, Any]:
    """Inputs of vision.onnx from transformers.vision_utils, called as Qwen3_5VisionModel.forward calls it."""
    import torch
    from transformers.vision_utils import (
        get_vision_cu_seqlens,
        get_vision_interpolation_indices_and_weights,
        get_vision_position_ids,
    )

    grid = torch.as_tensor(np.asarray(grid_thw), dtype=torch.long)
    indices, weights = get_vision_interpolation_indices_and_weights(
        grid,
        num_grid_per_side=vspec.num_grid_per_side,
        mode="bilinear",
        align_corners=True,
        spatial_merge_size=vspec.spatial_merge_size,
    )
    return {
        "pixel_values": np.ascontiguousarray(pixel_values, np.float32),
        "interp_indices": indices.numpy().astype(np.int64),
        "interp_weights": weights.numpy().astype(np.float32),
        "position_ids": get_vision_position_ids(grid, vspec.spatial_merge_size).numpy().astype(np.int64),
        "cu_seqlens": get_vision_cu_seqlens(grid).numpy().astype(np.int64),
    }
