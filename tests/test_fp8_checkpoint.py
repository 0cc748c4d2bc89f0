"""The FP8 checkpoint writer (qwen_export/fp8_checkpoint.py) against Qwen's official layout
(qwen_export/exporter/fp8.py) and against transformers' own model classes.

Round-trip bound used throughout (e4m3: 3 mantissa bits, so a step is 2^-3 of its binade's base and
round-to-nearest errs by at most half a step): |W - dequant(quant(W))| <= 2^-4 |W| + 2^-10 scale per
element (the second term covers e4m3 subnormals, whose step is 2^-9), hence <= 2^-4 amax per block, where
scale = amax / 448.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

from qwen_export.errors import QwenExportError
from qwen_export.exporter import fp8
from qwen_export.fp8_checkpoint import (
    INDEX_FILE,
    OutTensor,
    dequantize_checkpoint,
    dequantize_fp8,
    quantize_checkpoint,
    quantize_fp8,
    read_checkpoint_index,
    write_sharded,
)
from qwen_export.presets import materialize

PRESETS = ["tiny-qwen3.5-moe", "tiny-qwen3-next", "tiny-qwen3.5"]
BF16 = ml_dtypes.bfloat16


def _entries(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype, shape), read with safetensors itself (not our reader)."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(_entries_of(path))
    return out


def _entries_of(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    with safe_open(path, framework="numpy") as f:
        return {n: (f.get_slice(n).get_dtype(), tuple(f.get_slice(n).get_shape())) for n in f.keys()}


def _torch_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def _to_numpy(t) -> np.ndarray:
    """A torch tensor (fp8 and bf16 included) as numpy with ml_dtypes' dtype."""
    import torch

    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


def _assert_within_bound(w: np.ndarray, q: np.ndarray, scale: np.ndarray) -> None:
    deq = dequantize_fp8(q, scale)
    grid = np.repeat(np.repeat(scale.astype(np.float32), 128, 0), 128, 1)[: w.shape[0], : w.shape[1]]
    bound = 2.0**-4 * np.abs(w) + 2.0**-10 * grid
    assert (np.abs(deq - w) <= bound * (1 + 1e-6)).all()


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """preset -> (source folder, FP8 folder)."""
    root = tmp_path_factory.mktemp("fp8")
    return {
        p: (materialize(p, quiet=True), quantize_checkpoint(materialize(p, quiet=True), root / p))
        for p in PRESETS
    }


# --- block math ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_dtype", ["F32", "BF16"])
def test_ragged_shape_gets_a_ceil_grid_and_stays_within_half_a_step(scale_dtype):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((300, 200)).astype(np.float32) * rng.uniform(0.001, 10, (300, 1)).astype(
        np.float32
    )
    w[:128, 128:] = 0.0  # an all-zero block: scale 1.0, exact round trip
    q, scale = quantize_fp8(w, scale_dtype=scale_dtype)
    assert q.dtype == ml_dtypes.float8_e4m3fn and q.shape == (300, 200)
    assert scale.shape == (3, 2) == fp8.scale_grid((300, 200))
    assert scale.dtype == (np.float32 if scale_dtype == "F32" else BF16)
    assert float(scale[0, 1]) == 1.0 and (dequantize_fp8(q, scale)[:128, 128:] == 0).all()
    _assert_within_bound(w, q, scale)
    # per block: scale = amax / 448 (bf16-stored scales rounded up), never saturating, error <= 2^-4 amax
    deq = dequantize_fp8(q, scale)
    for i in range(3):
        for j in range(2):
            block = (slice(128 * i, 128 * i + 128), slice(128 * j, 128 * j + 128))
            amax = np.abs(w[block]).max()
            if amax == 0:
                continue
            s = float(scale[i, j])
            assert amax / 448 <= s * (1 + 1e-7) and s <= amax / 448 * (1 + 2.0**-7)
            assert np.abs(deq[block] - w[block]).max() <= 2.0**-4 * amax * (1 + 1e-6)
    assert np.isfinite(q.astype(np.float32)).all() and np.abs(q.astype(np.float32)).max() <= 448


def test_quantize_refuses_nan():
    w = np.ones((4, 4), np.float32)
    w[1, 1] = np.nan
    with pytest.raises(QwenExportError, match="NaN"):
        quantize_fp8(w)


# --- the official layout ---------------------------------------------------------------------------------


def test_official_layout_of_the_tiny_moe(quantized):
    src, out = quantized["tiny-qwen3.5-moe"]
    entries = _entries(out)
    assert entries["model.layers.0.mlp.experts.3.up_proj.weight"] == ("F8_E4M3", (32, 64))
    assert entries["model.layers.0.mlp.experts.3.up_proj.weight_scale_inv"] == ("F32", (1, 1))
    assert entries["model.layers.0.mlp.experts.7.down_proj.weight"] == ("F8_E4M3", (64, 32))
    assert entries["model.layers.3.self_attn.q_proj.weight"][0] == "F8_E4M3"
    assert entries["model.layers.0.mlp.shared_expert.gate_proj.weight"][0] == "F8_E4M3"
    assert entries["model.layers.0.linear_attn.in_proj_qkv.weight"][0] == "F8_E4M3"
    assert entries["model.layers.0.mlp.gate.weight"] == ("BF16", (8, 64))
    assert entries["model.layers.0.mlp.shared_expert_gate.weight"] == ("BF16", (1, 64))
    assert entries["model.layers.0.linear_attn.in_proj_a.weight"] == ("BF16", (4, 64))
    assert entries["model.layers.0.linear_attn.in_proj_b.weight"] == ("BF16", (4, 64))
    assert entries["model.layers.0.linear_attn.conv1d.weight"] == ("BF16", (128, 1, 4))
    assert entries["model.layers.0.linear_attn.A_log"] == ("BF16", (4,))
    assert entries["model.embed_tokens.weight"] == ("BF16", (512, 64))
    assert entries["lm_head.weight"] == ("BF16", (512, 64))
    assert not any("gate_up_proj" in n for n in entries)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == fp8.OFFICIAL_QUANTIZATION_CONFIG
    assert fp8.fp8_block(config) == fp8.BLOCK
    assert config["dtype"] == "bfloat16"
    assert (out / "generation_config.json").is_file()


@pytest.mark.parametrize("preset", PRESETS)
def test_every_tensor_follows_the_official_rule(quantized, preset):
    src, out = quantized[preset]
    source = _entries(src)
    entries = _entries(out)
    weights = {n: e for n, e in entries.items() if not n.endswith(fp8.SCALE_SUFFIX)}
    assert set(weights) == set(source)  # the tiny presets are saved per expert: names unchanged
    for name, (dtype, shape) in weights.items():
        assert shape == source[name][1]
        if fp8.is_quantized_weight(name, shape):
            assert dtype == "F8_E4M3", name
            assert entries[fp8.scale_name(name)] == ("F32", fp8.scale_grid(shape)), name
        else:
            assert dtype == "BF16", name
            assert fp8.scale_name(name) not in entries
    assert len(entries) - len(weights) == sum(fp8.is_quantized_weight(n, s) for n, (_, s) in weights.items())


@pytest.mark.parametrize("preset", PRESETS)
def test_round_trip_within_half_an_e4m3_step(quantized, preset):
    src, out = quantized[preset]
    source, written = _torch_tensors(src), _torch_tensors(out)
    checked = 0
    for name, w in source.items():
        w = w.float().numpy()
        if fp8.is_quantized_weight(name, w.shape):
            q, scale = _to_numpy(written[name]), _to_numpy(written[fp8.scale_name(name)])
            # bit-identical to the reference math, and within the bound
            want_q, want_scale = quantize_fp8(w)
            np.testing.assert_array_equal(q.view(np.uint8), want_q.view(np.uint8))
            np.testing.assert_array_equal(scale, want_scale)
            _assert_within_bound(w, q, scale)
            checked += 1
        else:
            np.testing.assert_array_equal(_to_numpy(written[name]), w.astype(BF16))
    assert checked > 10


def test_bf16_scales_and_shards(tmp_path):
    src = materialize("tiny-qwen3.5-moe", quiet=True)
    out = quantize_checkpoint(src, tmp_path / "sharded", scale_dtype="BF16", shard_bytes=20_000)
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 3 and shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    for shard in shards:  # at most shard_bytes of tensor data, or one tensor larger than that on its own
        sizes = [int(np.prod(s)) * {"F8_E4M3": 1, "BF16": 2}[d] for d, s in _entries_of(shard).values()]
        assert sum(sizes) <= 20_000 or len(sizes) == 1
    entries = _entries(out)
    assert set(index["weight_map"]) == set(entries)
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(
        int(np.prod(s)) * {"F8_E4M3": 1, "BF16": 2}[d] for d, s in entries.values()
    )
    assert entries["model.layers.0.mlp.experts.3.up_proj.weight_scale_inv"] == ("BF16", (1, 1))
    single = _entries(quantize_checkpoint(src, tmp_path / "single", scale_dtype="BF16"))
    assert single == entries


def test_stacked_source_gives_the_same_per_expert_checkpoint(tmp_path):
    """A checkpoint with transformers' stacked experts (as torch holds them) quantizes to exactly the
    per-expert checkpoint: gate is gate_up_proj's first I rows, up the next I."""
    import torch
    import transformers
    from safetensors.torch import save_file

    src = materialize("tiny-qwen3.5-moe", quiet=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    stacked = tmp_path / "stacked"
    stacked.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, stacked / "model.safetensors", metadata={"format": "pt"})
    (stacked / "config.json").write_text((src / "config.json").read_text())
    a = _torch_tensors(quantize_checkpoint(stacked, tmp_path / "a"))
    b = _torch_tensors(quantize_checkpoint(src, tmp_path / "b"))
    b = {k: v for k, v in b.items() if not k.startswith("mtp.")}  # transformers' state holds no MTP layer
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name].view(torch.uint8), b[name].view(torch.uint8)), name


def test_non_multiple_of_128_weight_in_a_checkpoint(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(1)
    weights = {
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((300, 200)).astype(np.float32),
        "model.layers.0.self_attn.q_norm.weight": rng.standard_normal(200).astype(np.float32),
        "model.visual.blocks.0.attn.qkv_proj.weight": rng.standard_normal((64, 32)).astype(np.float32),
        "mtp.layers.0.mlp.up_proj.weight": rng.standard_normal((64, 32)).astype(np.float32),
        "model.rope.steps": np.arange(5, dtype=np.int64),
    }
    write_sharded(src, [OutTensor(n, _st(a), a.shape, lambda a=a: [a]) for n, a in weights.items()])
    (src / "config.json").write_text(json.dumps({"text_config": {"dtype": "float32"}, "dtype": "float32"}))
    (src / "tokenizer.json").write_text("{}")
    out = quantize_checkpoint(src, tmp_path / "out")
    entries = _entries(out)
    assert entries["model.layers.0.self_attn.q_proj.weight"] == ("F8_E4M3", (300, 200))
    assert entries["model.layers.0.self_attn.q_proj.weight_scale_inv"] == ("F32", (3, 2))
    assert entries["model.layers.0.self_attn.q_norm.weight"] == ("BF16", (200,))
    assert entries["model.visual.blocks.0.attn.qkv_proj.weight"] == ("BF16", (64, 32))  # copied in bf16
    assert entries["mtp.layers.0.mlp.up_proj.weight"] == ("F8_E4M3", (64, 32))  # the text tower's rule
    assert entries["mtp.layers.0.mlp.up_proj.weight_scale_inv"] == ("F32", (1, 1))
    assert entries["model.rope.steps"] == ("I64", (5,))
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["text_config"]["dtype"] == "bfloat16"
    assert (out / "tokenizer.json").read_text() == "{}"
    written = _torch_tensors(out)
    q = _to_numpy(written["model.layers.0.self_attn.q_proj.weight"])
    scale = _to_numpy(written["model.layers.0.self_attn.q_proj.weight_scale_inv"])
    _assert_within_bound(weights["model.layers.0.self_attn.q_proj.weight"], q, scale)
    assert (_to_numpy(written["model.rope.steps"]) == np.arange(5)).all()


def _st(a: np.ndarray) -> str:
    return {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}[a.dtype]


def test_failure_leaves_nothing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    bad = np.ones((4, 4), np.float32)
    bad[0, 0] = np.inf
    write_sharded(src, [OutTensor("model.layers.0.mlp.up_proj.weight", "F32", (4, 4), lambda: [bad])])
    (src / "config.json").write_text("{}")
    with pytest.raises(QwenExportError, match="NaN or inf"):
        quantize_checkpoint(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    with pytest.raises(QwenExportError, match="must not be"):
        quantize_checkpoint(src, src)


def test_already_quantized_source_is_refused(quantized, tmp_path):
    with pytest.raises(QwenExportError, match="already quantized"):
        quantize_checkpoint(quantized["tiny-qwen3.5-moe"][1], tmp_path / "again")


# --- transformers loads the dequantized checkpoint -------------------------------------------------------


def _round_tripped_reference(source: Path):
    """transformers' model from the source preset, each weight put through the FP8 checkpoint's round trip
    in memory (quantized weights: quantize + dequantize per expert and projection; the rest: bf16)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.state_dict().items():
            w = param.numpy()
            if name.endswith("mlp.experts.gate_up_proj"):
                inter = w.shape[1] // 2
                parts = [np.concatenate([_rt(e[:inter]), _rt(e[inter:])]) for e in w]
                param.copy_(torch.from_numpy(np.stack(parts)))
            elif name.endswith("mlp.experts.down_proj"):
                param.copy_(torch.from_numpy(np.stack([_rt(e) for e in w])))
            elif fp8.is_quantized_weight(name, w.shape):
                param.copy_(torch.from_numpy(_rt(w)))
            else:
                param.copy_(torch.from_numpy(w.astype(BF16).astype(np.float32)))
    return model


def _rt(w: np.ndarray) -> np.ndarray:
    return dequantize_fp8(*quantize_fp8(w))


@pytest.mark.parametrize("preset", PRESETS)
def test_transformers_loads_the_dequantized_checkpoint(quantized, preset, tmp_path):
    import torch
    import transformers

    src, out = quantized[preset]
    dq = dequantize_checkpoint(out, tmp_path / "dq", dtype="float32")
    entries = _entries(dq)
    if preset != "tiny-qwen3.5":
        assert entries["model.layers.0.mlp.experts.gate_up_proj"] == ("F32", (8, 64, 64))
        assert entries["model.layers.0.mlp.experts.down_proj"] == ("F32", (8, 64, 32))
    assert not any(n.endswith(fp8.SCALE_SUFFIX) for n in entries)
    assert "quantization_config" not in json.loads((dq / "config.json").read_text())
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        dq, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    reference = _round_tripped_reference(src)
    ids = torch.tensor([[1, 17, 300, 5, 42, 511, 9]])
    with torch.no_grad():
        got, want = loaded(ids).logits, reference(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    # and per-expert output (the FP8 checkpoint's names) is loadable too, converted by transformers
    per_expert = dequantize_checkpoint(out, tmp_path / "pe", dtype="bfloat16", experts="per_expert")
    assert set(_entries(per_expert)) == set(_entries(src))
    model = transformers.AutoModelForCausalLM.from_pretrained(per_expert, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=0.05, atol=0.05)


def test_reader_matches_safetensors(quantized):
    src, out = quantized["tiny-qwen3.5-moe"]
    ours = read_checkpoint_index(out)
    assert {n: (t.dtype, t.shape) for n, t in ours.items()} == _entries(out)


def test_layout_from_shapes_alone_is_what_is_written(quantized):
    """official_fp8_layout (used by scripts/bench_scale.py to write FP8 checkpoints without source data)
    states exactly the names, dtypes and shapes quantize_checkpoint writes."""
    from qwen_export.fp8_checkpoint import official_fp8_layout

    for src, out in quantized.values():
        source = {n: (t.dtype, t.shape) for n, t in read_checkpoint_index(src).items()}
        layout = official_fp8_layout(source)
        assert {e.name: (e.dtype, e.shape) for e in layout} == _entries(out)
