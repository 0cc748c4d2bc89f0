"""The committed goldens are what the Hugging Face reference produces now, and `qwen-export golden` works."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from qwen_export.cli import app
from qwen_export.golden.store import PROMPT_LENGTHS, load_golden, repo_golden_dir


@pytest.mark.parametrize("preset", ["tiny-qwen3.5-moe", "tiny-qwen3-next", "tiny-qwen3.5"])
def test_committed_golden_reproduces(tmp_path, preset):
    out = tmp_path / "golden"
    result = CliRunner().invoke(app, ["golden", "--preset", preset, "-o", str(out)])
    assert result.exit_code == 0, result.output
    fresh, committed = load_golden(out), load_golden(repo_golden_dir(preset))
    assert sorted(fresh.tensors) == sorted(committed.tensors)
    for name, value in committed.tensors.items():
        if value.dtype == np.int64:
            np.testing.assert_array_equal(fresh.tensors[name], value, err_msg=name)
        else:
            np.testing.assert_allclose(fresh.tensors[name], value, atol=1e-5, rtol=0, err_msg=name)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prompt_lengths"] == list(PROMPT_LENGTHS)
    assert manifest["greedy"] == {"prompt_length": 16, "new_tokens": 32}
    assert set(manifest["versions"]) >= {"torch", "transformers"}
    assert fresh.greedy_tokens.shape == (1, 32)


def test_tampered_golden_is_rejected(tmp_path):
    import shutil

    from qwen_export.errors import QwenExportError

    folder = tmp_path / "g"
    shutil.copytree(repo_golden_dir("tiny-qwen3.5"), folder)
    data = bytearray((folder / "golden.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "golden.safetensors").write_bytes(bytes(data))
    with pytest.raises(QwenExportError, match="sha256"):
        load_golden(folder)
