"""scripts/gpu_check.py without a GPU: its references cross-checked on CPU (second formulations), every
case run through the plugin library's launchers with their launches replayed under Triton's interpreter,
the report, and its independence from qwen_export (the GPU machine runs it under its own packages)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def run(*args: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--out", str(out)], capture_output=True, text=True, timeout=900
    )
    return proc, json.loads(out.read_text()) if out.exists() else {}


def test_cpu_reference_only(tmp_path):
    proc, report = run("--cpu-reference-only", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ops = report["ops"]
    assert {k: v["status"] for k, v in ops.items()} == dict.fromkeys(
        [
            "rms_norm",
            "gated_rms_norm",
            "gated_attention",
            "gated_deltanet",
            "moe",
        ],
        "ok",
    )
    assert ops["gated_deltanet"]["chunked_matches_recurrent"]
    assert ops["gated_attention"]["fully_masked_row_is_mean_of_v"]


def test_dry_run_covers_every_case_and_writes_the_report(tmp_path, plugin_library):
    """Every case through the library's launchers, their launches replayed under Triton's interpreter (the
    timing-only attention prefill bench's launches checked against its buffers, not interpreted)."""
    proc, report = run("--dry-run", "--library", str(plugin_library.library), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ops = {c["op"] for c in report["cases"]}
    assert ops == {"rms_norm", "gated_rms_norm", "gated_attention", "gated_deltanet", "moe"}
    assert report["summary"] == {"ok": len(report["cases"])}
    cases = {(c["op"], c["case"]) for c in report["cases"]}
    for t in [1, 7, 63, 64, 65, 200, 1000]:  # ragged prefill lengths
        assert ("gated_attention", f"prefill T={t}") in cases
    bench = report["benchmarks"]
    assert any(k.startswith("moe decode") and "hbm_fraction" in v for k, v in bench.items())
    assert any(k.startswith("gated_deltanet decode") and "hbm_fraction" in v for k, v in bench.items())
    assert any(
        k.startswith("gated_attention prefill bench") and "peak_fraction" in v for k, v in bench.items()
    )


def test_script_needs_only_torch_and_the_standard_library():
    tree = ast.parse(SCRIPT.read_text())
    modules = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert modules - set(sys.stdlib_module_names) <= {"torch", "__future__"}, modules
