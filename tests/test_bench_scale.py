"""scripts/bench_scale.py at reduced width (hidden 64, 4 experts, vocab 1024): the same steps as the
full-width benchmark (disk measurement, sharded bf16 and official-FP8 checkpoints, peer copy, exports
through the CLI in a subprocess, results written atomically), checked field by field. ~20 s."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from qwen_export.exporter import fp8

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_scale", REPO / "scripts" / "bench_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMOKE = [
    "--hidden",
    "64",
    "--experts",
    "4",
    "--vocab",
    "1024",
    "--disk-test-gb",
    "0.02",
    "--shard-gb",
    "0.002",
]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    argv = [*SMOKE, "--work", str(root / "work"), "--results", str(root / "results"), "--keep"]
    assert _bench().main(argv) == 0
    return root, json.loads((root / "results" / "scale.json").read_text())


def test_result_fields(smoke):
    root, res = smoke
    assert res["command"].startswith("python scripts/bench_scale.py --hidden 64")
    assert res["machine"]["vector_isa"] and res["machine"]["cores"] >= 1
    assert res["slice"]["reduced_width"] and res["slice"]["layer_types"] == [
        "linear_attention",
        "full_attention",
    ]
    assert res["slice"]["num_experts"] == 4 and res["slice"]["head_dim"] == 256
    disk = res["disk"]
    # a sample at the start, then before each export and after each case's last one
    assert [x["when"] for x in disk["samples"]] == [
        "at start",
        "before fp8 / fp8",
        "before fp8 / fp8 -> dequant bf16",
        "after fp8",
        "before bf16 / bf16",
        "after bf16",
    ]
    for x in disk["samples"]:
        assert x["write_gbps"] > 0 and x["read_gbps"] > 0
        # each figure is rounded to 3 decimals: on a slow disk (0.08 GB/s writes in one CI run) that alone
        # moves the recomputed floor by about 1e-3, more than 1% of it
        floor = 1 / (1 / x["read_gbps"] + 1 / x["write_gbps"])
        assert x["copy_floor_gbps"] == pytest.approx(floor, rel=0.01, abs=1.5e-3)
    assert disk["copy_floor_gbps_median"] > 0
    cases = {c["case"]: c for c in res["cases"]}
    assert set(cases) == {"fp8", "bf16"}
    for case in cases.values():
        assert case["checkpoint"]["shards"] > 1 and case["checkpoint"]["index"]
        assert case["peer_copy"]["gbps"] > 0
    assert [e["variant"] for e in cases["bf16"]["exports"]] == ["bf16"]
    assert [e["variant"] for e in cases["fp8"]["exports"]] == ["fp8", "fp8 -> dequant bf16"]
    bf16 = cases["bf16"]["exports"][0]
    assert bf16["status"] == "ok", bf16.get("error")
    for e in [bf16, *cases["fp8"]["exports"]]:
        assert e["command"].startswith("qwen-export export --model ")
        if e["status"] != "ok":
            continue
        assert e["wall_s"] > 0 and e["bytes_written"] > 0 and e["peak_rss_bytes"] > 100e6
        assert e["gbps"] == pytest.approx(e["bytes_written"] / e["wall_s"] / 1e9, abs=2e-3)
        assert "pct_of_copy_floor" in e and "pct_of_peer_copy" in e and "timings_s" in e["export_json"]
        floor = e["disk_around"]["copy_floor_gbps"]
        assert e["pct_of_copy_floor"] == pytest.approx(100 * e["gbps"] / floor, abs=0.2)
        assert e["rss_timeline"]["rows"] and e["polled_peak_at"]["s"] <= e["wall_s"]
        assert set(e["acceptance"]) == {"throughput_ok", "peak_rss_ok"}
    ex = cases["bf16"]["extrapolation_397b"]
    assert ex["layers"] == 60 and ex["checkpoint_published_gb"] == 807.0
    md = (root / "results" / "scale.md").read_text()
    assert md.splitlines()[2].startswith(f"Produced by `{res['command']}`")
    assert "Copy floor" in md and "| bf16 |" in md and "Extrapolation" in md
    assert not list((root / "results").glob(".*"))  # no temp files left by the atomic writes


def test_checkpoints_have_the_stated_layouts(smoke):
    root, _ = smoke
    work = root / "work"
    fp8_dir, bf16_dir = work / "ckpt-fp8", work / "ckpt-bf16"
    config = json.loads((fp8_dir / "config.json").read_text())
    assert config["quantization_config"] == fp8.OFFICIAL_QUANTIZATION_CONFIG
    assert config["architectures"] == ["Qwen3_5MoeForCausalLM"] and config["hidden_size"] == 64
    index = json.loads((fp8_dir / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.mlp.experts.3.up_proj.weight"
    with safe_open(fp8_dir / index[name], framework="numpy") as f:
        assert f.get_slice(name).get_dtype() == "F8_E4M3" and f.get_slice(name).get_shape() == [1024, 64]
    tensors = {}
    for shard in sorted(fp8_dir.glob("*.safetensors")):
        tensors.update(load_file(shard))
    assert (
        tensors[fp8.scale_name(name)].shape == (8, 1) and tensors[fp8.scale_name(name)].dtype == torch.float32
    )
    assert tensors["model.layers.0.mlp.gate.weight"].dtype == torch.bfloat16
    for t in tensors.values():
        assert torch.isfinite(t.float()).all()
    assert (tensors[fp8.scale_name(name)] > 0).all()
    bf16_index = json.loads((bf16_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.0.mlp.experts.gate_up_proj" in bf16_index
    with safe_open(bf16_dir / bf16_index["model.layers.0.mlp.experts.gate_up_proj"], framework="pt") as f:
        stacked = f.get_tensor("model.layers.0.mlp.experts.gate_up_proj")
    assert stacked.shape == (4, 2048, 64) and stacked.dtype == torch.bfloat16
    assert torch.isfinite(stacked.float()).all() and np.unique(stacked.float().numpy()).size > 1000


def test_refuses_a_step_that_would_fill_the_disk(tmp_path, capsys):
    argv = [*SMOKE, "--work", str(tmp_path / "w"), "--results", str(tmp_path / "r"), "--min-free-gb", "1e9"]
    assert _bench().main(argv) == 2
    assert "refusing to measure the disk" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
