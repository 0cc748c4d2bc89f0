"""Golden reference outputs: generated from the PyTorch model, stored as safetensors with a manifest."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    checkpoint's golden is transformers in bf16."""
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

    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    with atomic_output_dir(Path(out)) as tmp:
        save_file(tensors, str(tmp / GOLDEN_FILE))
        digest = sha256_file(tmp / GOLDEN_FILE)
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
            "sha256": {GOLDEN_FILE: digest},
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return Golden(manifest, tensors)


def load_golden(folder: str | os.PathLike) -> Golden:
    folder = Path(folder)
    manifest_path, data_path = folder / MANIFEST_FILE, folder / GOLDEN_FILE
    if not manifest_path.is_file() or not data_path.is_file():
        raise QwenExportError(f"{folder}: not a golden folder (needs {MANIFEST_FILE} and {GOLDEN_FILE})")
    manifest = json.loads(manifest_path.read_text())
    digest = sha256_file(data_path)
    if digest != manifest["sha256"][GOLDEN_FILE]:
        raise QwenExportError(f"{data_path}: sha256 does not match {manifest_path}; regenerate the golden")
    return Golden(manifest, load_file(str(data_path)))


def repo_golden_dir(preset: str) -> Path:
    return REPO_GOLDEN_DIR / preset
