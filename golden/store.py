"""Golden reference outputs: generated from the PyTorch model, stored as safetensors with a manifest."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors.numpy import load_file, save_file

from qwen_export.artifact import GOLDEN_FORMAT, MANIFEST_FILE, sha256_file
from qwen_export.errors import QwenExportError
from qwen_export.exporter.spec import config_hash, read_config_json, spec_from_config
from qwen_export.fsutil import atomic_output_dir
from qwen_export.golden.reference import (
    REFERENCE_DTYPES,
    cache_states,
    load_reference,
    reference_forward,
    reference_greedy,
)

if TYPE_CHECKING:
    from qwen_export.golden.multimodal import MultimodalCase

PROMPT_LENGTHS = (1, 7, 63, 64, 65, 200)
GREEDY_PROMPT_LENGTH = 16
GREEDY_NEW_TOKENS = 32
PROMPT_SEED = 1234
GOLDEN_FILE = "golden.safetensors"
REPO_GOLDEN_DIR = Path(__file__).resolve().parent  # golden/<preset>/ in the repository
# How a manifest names the reference's dtype (torch's names; "float32" in every golden written before).
REFERENCE_TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def make_prompt(vocab_size: int, length: int, seed: int = PROMPT_SEED) -> np.ndarray:
    """Deterministic random token ids [1, length] (independent of torch's RNG)."""
    rng = np.random.default_rng(seed + length)
    return rng.integers(0, vocab_size, size=(1, length), dtype=np.int64)


@dataclass
class Golden:
    manifest: dict[str, Any]
    tensors: dict[str, np.ndarray]
    folder: Path | None = None  # where the media files of multimodal cases live

    @property
    def multimodal_cases(self) -> list[MultimodalCase]:
        """The image / video cases of a multimodal checkpoint's golden (none for a text model's)."""
        from qwen_export.golden.multimodal import stored_cases

        return stored_cases(self.manifest, self.tensors, self.folder or Path("."))

    @property
    def dtype(self) -> str:
        """The precision the reference ran in (fp32 | bf16 | fp16)."""
        torch_name = self.manifest.get("reference", {}).get("dtype", "float32")
        return {v: k for k, v in REFERENCE_TORCH_NAMES.items()}.get(torch_name, "fp32")

    def prefill(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        return self.tensors[f"prefill.{length}.input_ids"], self.tensors[f"prefill.{length}.logits"]

    @property
    def greedy_prompt(self) -> np.ndarray:
        return self.tensors["greedy.prompt_ids"]

    @property
    def greedy_tokens(self) -> np.ndarray:
        return self.tensors["greedy.tokens"]

    @property
    def greedy_logits(self) -> np.ndarray:
        return self.tensors["greedy.step_logits"]

    def final_states(self) -> dict[str, np.ndarray]:
        prefix = f"states.after_prefill_{max(PROMPT_LENGTHS)}."
        return {k.removeprefix(prefix): v for k, v in self.tensors.items() if k.startswith(prefix)}


def generate_golden(
    model_dir: str | os.PathLike, out: str | os.PathLike, source: str, log=None, dtype: str | None = None
) -> Golden:
    """Run the reference on the standard prompts and write OUT/golden.safetensors + OUT/manifest.json.

    The reference runs in `dtype`, by default the checkpoint's own precision (as an export does): a bf16
    checkpoint's golden is transformers in bf16. A multimodal checkpoint's golden also holds an image and a
    video prompt (OUT/media/*.png, the processor's arrays, vision features, prefill logits, greedy tokens:
    golden/multimodal.py); the text tensors are the same either way."""
    import torch
    import transformers

    from qwen_export.exporter.checkpoint import Checkpoint
    from qwen_export.exporter.export import checkpoint_dtype

    model_dir = Path(model_dir)
    config = read_config_json(model_dir)
    spec = spec_from_config(config, model_dir / "config.json")
    if dtype is None:
        dtype = checkpoint_dtype(config, Checkpoint.open(model_dir, config))
    if dtype not in REFERENCE_DTYPES:
        raise QwenExportError(f"--dtype {dtype!r} is not one of {', '.join(REFERENCE_DTYPES)}")
    model = load_reference(model_dir, dtype)
    tensors: dict[str, np.ndarray] = {}
    for length in PROMPT_LENGTHS:
        ids = make_prompt(spec.vocab_size, length)
        logits, cache = reference_forward(model, ids)
        tensors[f"prefill.{length}.input_ids"] = ids
        tensors[f"prefill.{length}.logits"] = logits
        if log:
            log(f"prefill {length:>3} tokens: done")
    for suffix, value in cache_states(cache, spec.layer_types).items():
        tensors[f"states.after_prefill_{max(PROMPT_LENGTHS)}.{suffix}"] = value
    prompt = make_prompt(spec.vocab_size, GREEDY_PROMPT_LENGTH, seed=PROMPT_SEED + 1)
    tokens, step_logits = reference_greedy(model, prompt, GREEDY_NEW_TOKENS)
    tensors.update({"greedy.prompt_ids": prompt, "greedy.tokens": tokens, "greedy.step_logits": step_logits})
    if log:
        log(f"greedy {GREEDY_NEW_TOKENS} tokens: done")

    with atomic_output_dir(Path(out)) as tmp:
        section = _multimodal_cases(model, model_dir, config, tmp, tensors, log) if spec.multimodal else None
        tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        save_file(tensors, str(tmp / GOLDEN_FILE))
        digests = {GOLDEN_FILE: sha256_file(tmp / GOLDEN_FILE)}
        if section is not None:
            media = sorted(p for p in (tmp / section["media_dir"]).iterdir())
            digests |= {str(p.relative_to(tmp)): sha256_file(p) for p in media}
        manifest = {
            "format": GOLDEN_FORMAT,
            "source": source,
            "architecture": spec.architecture,
            "config_sha256": config_hash(config),
            "prompt_seed": PROMPT_SEED,
            "prompt_lengths": list(PROMPT_LENGTHS),
            "greedy": {"prompt_length": GREEDY_PROMPT_LENGTH, "new_tokens": GREEDY_NEW_TOKENS},
            "reference": {"attn_implementation": "eager", "dtype": REFERENCE_TORCH_NAMES[dtype]},
            "versions": {
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "python": platform.python_version(),
            },
            "tensors": {
                k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in sorted(tensors.items())
            },
            "sha256": digests,
        }
        if section is not None:
            manifest["multimodal"] = section
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return load_golden(out)  # media paths point into the final folder


def _multimodal_cases(
    model: Any, model_dir: Path, config: dict, folder: Path, tensors: dict[str, np.ndarray], log
) -> dict[str, Any] | None:
    """Add the image / video cases to `tensors` (media written under `folder`); the manifest section, or
    None where the checkpoint ships no processor files (the golden is then text only, as said in the log)."""
    from qwen_export.errors import QwenExportError
    from qwen_export.exporter.vision_spec import vision_spec_from_config
    from qwen_export.golden.multimodal import MEDIA_DIR, case_manifest, case_tensors, live_cases
    from qwen_export.runtime.multimodal_inputs import load_processor

    try:
        processor = load_processor(model_dir)
    except QwenExportError as e:
        if log:
            log(f"no image / video cases: {e}")
        return None
    vspec = vision_spec_from_config(config, model_dir / "config.json")
    cases = live_cases(model, processor, vspec.temporal_patch_size, folder)
    tensors.update(case_tensors(cases))
    if log:
        log(f"image and video prompts ({', '.join(c.name for c in cases)}): done")
    return {**case_manifest(cases, folder), "media_dir": MEDIA_DIR}


def load_golden(folder: str | os.PathLike) -> Golden:
    folder = Path(folder)
    manifest_path, data_path = folder / MANIFEST_FILE, folder / GOLDEN_FILE
    if not manifest_path.is_file() or not data_path.is_file():
        raise QwenExportError(f"{folder}: not a golden folder (needs {MANIFEST_FILE} and {GOLDEN_FILE})")
    manifest = json.loads(manifest_path.read_text())
    for name, expected in manifest["sha256"].items():  # the tensors, and a multimodal golden's media
        path = folder / name
        if not path.is_file() or sha256_file(path) != expected:
            raise QwenExportError(
                f"{path}: missing or sha256 does not match {manifest_path}; regenerate the golden"
            )
    return Golden(manifest, load_file(str(data_path)), folder)


def repo_golden_dir(preset: str) -> Path:
    return REPO_GOLDEN_DIR / preset
