"""qwen-export's ONNX Runtime CPU kernels (plugins/ort_cpu) and the `ort-cpu-int4` target.

- Int4Linear and Int4MoE, one node each on ONNX Runtime, against MatMulNBits and QMoE at accuracy_level 4
  (ONNX Runtime's own int4 kernels, the same int8-activation arithmetic) on the same codes and scales, and
  against NumPy products with the dequantized weights; the AVX-512 VNNI, AVX2 and portable tiles give the
  same bits (child processes force each).
- The kernels' packed layout round-trips the MatMulNBits layout (passes/int4_layout.py).
- The ort-cpu-int4 pipeline on the tiny presets: every int4 product and every DeltaNet mixer runs on the
  kernels, nothing of the com.microsoft chain is left; `build --check` holds the fp32 stages (with
  GatedDeltaRule) to 2e-4 of the golden and the kernel stage to 1e-5 of the MatMulNBits/QMoE stage.
- The artifact carries the library, runs in the runtime from another folder, and `diff` holds it to the
  int4 tolerances. The golden comparison of prefill, decode and greedy tokens is in
  tests/test_quantize_weights.py (parametrised over the int4 targets).
- Bad input to the kernels fails with the kernel's one-line reason.

GatedDeltaRule against the NumPy reference of docs/ops.md (prefill, decode, left padding, carried state) is
in tests/test_lower_ort.py::test_gated_deltanet.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from passes_support import TINY_PRESETS, exported

from qwen_export import cpu_kernels
from qwen_export.errors import QwenExportError
from qwen_export.passes.fold_cpu_shared_expert import FoldCpuSharedExpert
from qwen_export.passes.int4_layout import pack_int4_groups, unpack_codes, unpack_int4_groups
from qwen_export.passes.quantize_weights import dequantize_blockwise, quantize_blockwise
from qwen_export.passes.use_cpu_kernels import UseCpuKernels
from qwen_export.targets import pipeline
from qwen_export.tolerances import FP32_MAX_ABS

# Int4Linear vs MatMulNBits on the same codes: both quantize activations to int8 per block with the same
# rule and sum int32 products exactly; only float rounding of the block sums may differ (seen: 7e-7 of the
# largest output).
SAME_ARITHMETIC = 1e-5
# Against fp64 products with the dequantized weights: the int8 activation rounding, about 1/254 of each
# block's largest |x| per element (seen: 6e-3 of the largest output).
INT8_ACTIVATIONS = 2e-2
# Int4MoE's and FloatMoE's folded shared expert against the nodes it replaces: silu, sigmoid and (FloatMoE)
# the down projection's sums in another float order (seen: 2.5e-7 and 3.9e-7 over 10 seeds and 1 to 200
# tokens); room for one flipped int8 rounding of an int4 shared activation, which moves an output by about
# 1/127 of that block's largest activation times a weight.
SHARED_FOLD = 5e-3


def _session(nodes, inputs, initializers, outputs=("y",), threads=2, library=None) -> ort.InferenceSession:
    graph = helper.make_graph(
        nodes,
        "g",
        inputs,
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in outputs],
        [numpy_helper.from_array(v, name) for name, v in initializers.items()],
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(
        graph, ir_version=10, opset_imports=[*opsets, helper.make_opsetid("qwen.cpu", 1)]
    )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(str(library or cpu_kernels.library_path()))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _x(name: str, shape) -> object:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


def extreme_weights(n: int, k: int, block: int) -> np.ndarray:
    """Each block's first weight the most negative (code 0) and the rest 7/8 of its size, positive (code
    15): with activations of one sign (all quantized to +-127) every other product is 15 * 127, about the
    largest int16 sums the AVX2 tile adds before widening."""
    w = np.full((n, k), 7.0, np.float32)
    w[:, ::block] = -8.0
    return w * 0.01


def extreme_activations(rows: int, k: int) -> np.ndarray:
    """+-1, a row's sign alternating: quantized exactly (to +-127), so the tiles' sums are exact."""
    signs = np.where(np.arange(rows) % 2, -1.0, 1.0).astype(np.float32)
    return np.repeat(signs[:, None], k, axis=1)


def linear_case(k: int, n: int, block: int, seed: int = 0, library=None, extreme: bool = False):
    rng = np.random.default_rng(seed)
    w = extreme_weights(n, k, block) if extreme else rng.standard_normal((n, k)).astype(np.float32) * 0.05
    q, s = quantize_blockwise(w, 4, block, fp16_scales=True)
    packed, packed_scales = pack_int4_groups(q, s, block)
    nbits = helper.make_node(
        "MatMulNBits", ["x", "q", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=block,
        accuracy_level=4,
    )  # fmt: skip
    ours = helper.make_node(
        "Int4Linear", ["x", "p", "ps"], ["y"], domain="qwen.cpu", K=k, N=n, block_size=block
    )
    return (
        _session([nbits], [_x("x", None)], {"q": q, "s": s}),
        _session([ours], [_x("x", None)], {"p": packed, "ps": packed_scales}, library=library),
        dequantize_blockwise(q, s, 4, k),
    )


@pytest.mark.parametrize(
    "k,n,block",
    [(64, 40, 32), (256, 1024, 32), (1024, 3104, 32), (512, 1000, 128), (128, 16, 64)],
    ids=["tiny-padded-rows", "expert-down", "deltanet-in", "block-128", "block-64-one-group"],
)
def test_int4_linear_matches_matmul_nbits_and_the_dequantized_product(k, n, block):
    reference, ours, dequantized = linear_case(k, n, block)
    rng = np.random.default_rng(1)
    for shape in [(1, k), (3, k), (8, k), (13, k), (2, 5, k), (0, k)]:  # decode, tiles of 8 and a tail, 3-D
        x = rng.standard_normal(shape).astype(np.float32)
        y = ours.run(None, {"x": x})[0]
        expected = reference.run(None, {"x": x})[0]
        assert y.shape == expected.shape == (*shape[:-1], n)
        if not x.size:
            continue
        assert _relative(y, expected) < SAME_ARITHMETIC, shape
        assert _relative(y, x.astype(np.float64) @ dequantized.T) < INT8_ACTIVATIONS, shape


# (rows, block): 11 = a tile of 8 plus 3 (block 32, the default); 1 and 2 rows (decode, and a k = 1
# speculative verify step, whose tokens must be a one-token step's: the VNNI tile keeps two chains there);
# 10 rows (8 + 2) at block 128 and 5 rows at block 64 (more pairs per block: the AVX2 tile's long-block
# kind, which widens every pair); 1 row at block 128
TILE_CASES = [(11, 32), (1, 32), (2, 32), (10, 128), (5, 64), (1, 128)]
# (rows, block) with extreme_weights and extreme_activations: 7 = 4 + 3 rows
EXTREME_CASES = [(7, 32), (7, 64)]


def test_every_tile_gives_the_same_bits():
    """The AVX-512 VNNI, AVX2 and portable tiles do the same integer sums and the same fma per block, so
    their outputs are identical (each forced in a child process)."""
    from cpu_kernel_support import json_per_kernel_mode

    code = (
        "import json, numpy as np; import test_cpu_kernels as t; out = []\n"
        "for rows, block in t.TILE_CASES:\n"
        "    _, ours, _ = t.linear_case(1024, 200, block)\n"
        "    x = np.random.default_rng(rows).standard_normal((rows, 1024)).astype(np.float32)\n"
        "    out.append(ours.run(None, {'x': x})[0].tolist())\n"
        "for rows, block in t.EXTREME_CASES:\n"
        "    _, ours, _ = t.linear_case(1024, 200, block, extreme=True)\n"
        "    out.append(ours.run(None, {'x': t.extreme_activations(rows, 1024)})[0].tolist())\n"
        "print(json.dumps(out))"
    )
    outputs = json_per_kernel_mode(code)
    for case, (rows, block) in enumerate(EXTREME_CASES, len(TILE_CASES)):
        # exact integer sums: only float rounding of the block sums separates a tile from the exact product
        q, s = quantize_blockwise(extreme_weights(200, 1024, block), 4, block, fp16_scales=True)
        expected = extreme_activations(rows, 1024).astype(np.float64) @ dequantize_blockwise(q, s, 4, 1024).T
        for mode in ("avx2", "default", "portable"):
            assert _relative(np.array(outputs[mode][case]), expected) < SAME_ARITHMETIC, (mode, rows, block)
    for case, (rows, block) in enumerate(TILE_CASES + EXTREME_CASES):
        portable = np.array(outputs["portable"][case], np.float32)
        assert portable.shape == (rows, 200)
        for mode in ("avx2", "default"):
            ours = np.array(outputs[mode][case], np.float32)
            np.testing.assert_array_equal(ours, portable, f"{mode}: {rows=} {block=}")
    # the runtime says when the slow tile runs
    warn = "from qwen_export import cpu_kernels as c; c.warn_if_portable(c.library_path())"
    env = {**os.environ, "QWEN_CPU_KERNELS": "portable"}
    proc = subprocess.run([sys.executable, "-c", warn], env=env, capture_output=True, text=True, check=True)
    assert "qwen.cpu kernels run their portable tile (QWEN_CPU_KERNELS=portable)" in proc.stderr
    native = cpu_kernels.backend()
    assert native in ("avx512-vnni", "avx2", "portable")
    if native != "avx512-vnni":
        pytest.skip(f"this CPU runs the {native} tile: the VNNI tile was not exercised (the others agreed)")


@pytest.fixture(scope="module")
def portable_library(tmp_path_factory) -> tuple[Path, Path]:
    """A kernel cache of its own and the library built into it without the x86 files (one compile, which
    two tests share)."""
    cache = tmp_path_factory.mktemp("kernel-cache")
    return cache, cpu_kernels.library_path(cache=cache, portable_only=True)


def test_portable_only_build_gives_the_same_bits(portable_library):
    """Off x86-64 the library builds without the AVX files (-DQWEN_CPU_PORTABLE_ONLY); forced here."""
    _, portable = portable_library
    assert cpu_kernels.backend(portable) == "portable"
    x = np.random.default_rng(5).standard_normal((9, 256)).astype(np.float32)
    _, native, _ = linear_case(256, 48, 32)
    _, forced, _ = linear_case(256, 48, 32, library=portable)
    np.testing.assert_array_equal(forced.run(None, {"x": x})[0], native.run(None, {"x": x})[0])


def test_packed_layout_round_trips():
    rng = np.random.default_rng(2)
    for lead, n, k, block in [((), 40, 64, 32), ((3,), 32, 256, 128), ((2,), 17, 96, 32)]:
        q = rng.integers(0, 256, (*lead, n, k // block, block // 2), dtype=np.uint8)
        s = rng.random((*lead, n, k // block), dtype=np.float32).astype(np.float16).astype(np.float32)
        packed, packed_scales = pack_int4_groups(q, s, block)
        assert packed_scales.dtype == np.float16
        assert packed.shape == (*lead, -(-n // 16), k // block, block // 8, 64)
        codes, scales = unpack_int4_groups(packed, packed_scales, n)
        np.testing.assert_array_equal(codes, unpack_codes(q))
        np.testing.assert_array_equal(scales, s)
    with pytest.raises(ValueError, match="multiples of 32"):
        pack_int4_groups(np.zeros((4, 1, 8), np.uint8), np.zeros((4, 1), np.float32), 16)


def moe_weights(experts=8, hidden=64, inter=32, seed=3) -> tuple[dict, dict, tuple]:
    """Random experts quantized to int4: QMoE's codes and scales, Int4MoE's packed ones, and the dequantized
    fc1 [E, 2I, H] and fc2 [E, H, I]."""
    rng = np.random.default_rng(seed)
    fc1 = rng.standard_normal((experts, 2 * inter, hidden)).astype(np.float32) * 0.1
    fc2 = rng.standard_normal((experts, hidden, inter)).astype(np.float32) * 0.1
    q1, s1 = quantize_blockwise(fc1.reshape(-1, hidden), 4, 32, fp16_scales=True)
    q2, s2 = quantize_blockwise(fc2.reshape(-1, inter), 4, 32, fp16_scales=True)
    q1, s1 = q1.reshape(experts, 2 * inter, hidden // 2), s1.reshape(experts, 2 * inter, hidden // 32)
    q2, s2 = q2.reshape(experts, hidden, inter // 2), s2.reshape(experts, hidden, inter // 32)
    p1, ps1 = pack_int4_groups(q1.reshape(experts, 2 * inter, hidden // 32, 16), s1, 32)
    p2, ps2 = pack_int4_groups(q2.reshape(experts, hidden, inter // 32, 16), s2, 32)
    dequantized = (
        dequantize_blockwise(q1.reshape(-1, hidden // 32, 16), s1.reshape(-1, hidden // 32), 4, hidden),
        dequantize_blockwise(q2.reshape(-1, inter // 32, 16), s2.reshape(-1, inter // 32), 4, inter),
    )
    return (
        {"q1": q1, "s1": s1, "q2": q2, "s2": s2},
        {"p1": p1, "ps1": ps1, "p2": p2, "ps2": ps2},
        (dequantized[0].reshape(fc1.shape), dequantized[1].reshape(fc2.shape)),
    )


def moe_case(experts=8, hidden=64, inter=32, k=2, normalize=1, seed=3):
    qmoe_weights, packed, dequantized = moe_weights(experts, hidden, inter, seed)
    attrs = dict(k=k, normalize_routing_weights=normalize)
    qmoe = helper.make_node(
        "QMoE", ["x", "r", "q1", "s1", "", "q2", "s2"], ["y"], domain="com.microsoft",
        activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
        expert_weight_bits=4, block_size=32, weights_prepacked=0, accuracy_level=4, **attrs,
    )  # fmt: skip
    ours = helper.make_node(
        "Int4MoE", ["x", "r", "p1", "ps1", "p2", "ps2"], ["y"], domain="qwen.cpu", fc1_block_size=32,
        fc2_block_size=32, **attrs,
    )  # fmt: skip
    inputs = [_x("x", None), _x("r", None)]
    return _session([qmoe], inputs, qmoe_weights), _session([ours], inputs, packed), dequantized


@pytest.mark.parametrize("k,normalize", [(2, 1), (1, 0), (4, 1), (2, 0)])
def test_int4_moe_matches_qmoe_and_the_dequantized_experts(k, normalize):
    """Against QMoE where QMoE is right: ORT 1.31.1's QMoE renormalises the top-k weights whatever
    normalize_routing_weights says (QuantizeWeights therefore keeps such a MoE in fp32); against the NumPy
    experts with the dequantized weights always."""
    from test_quantize_weights import numpy_moe

    reference, ours, (d1, d2) = moe_case(k=k, normalize=normalize)
    rng = np.random.default_rng(4)
    for tokens in (1, 5, 37):
        x = rng.standard_normal((tokens, 64)).astype(np.float32)
        logits = rng.standard_normal((tokens, 8)).astype(np.float32)
        y = ours.run(None, {"x": x, "r": logits})[0]
        assert y.shape == x.shape
        assert _relative(y, numpy_moe(x, logits, d1, d2, k, normalize=bool(normalize))) < INT8_ACTIVATIONS
        if normalize:
            assert _relative(y, reference.run(None, {"x": x, "r": logits})[0]) < SAME_ARITHMETIC, tokens
    x3 = rng.standard_normal((2, 3, 64)).astype(np.float32)  # [B, T, H] with logits [B*T, E]
    logits = rng.standard_normal((6, 8)).astype(np.float32)
    y3 = ours.run(None, {"x": x3, "r": logits})[0]
    flat = ours.run(None, {"x": x3.reshape(6, 64), "r": logits})[0]
    np.testing.assert_array_equal(y3.reshape(6, 64), flat)


def shared_moe_case(kind: str, experts=8, hidden=64, inter=32, shared=64, k=2, seed=3):
    """Int4MoE ("int4") or FloatMoE ("float") with its gated shared expert folded in
    (passes/fold_cpu_shared_expert.py), the seven nodes it replaces (Split, the routed op, QuickGelu, Mul, the
    down projection, Sigmoid, GatedAdd), and the weights as floats: fc1, fc2 and the shared down [H, I_s]."""
    rng = np.random.default_rng(seed + 1)
    down = rng.standard_normal((hidden, shared)).astype(np.float32) * 0.1
    moe = dict(k=k, normalize_routing_weights=1)
    if kind == "int4":
        _, weights, (fc1, fc2) = moe_weights(experts, hidden, inter, seed)
        q, scales = quantize_blockwise(down, 4, 32, fp16_scales=True)
        weights["pd"], weights["psd"] = pack_int4_groups(q, scales, 32)
        down = dequantize_blockwise(q, scales, 4, shared)
        op, experts_in, folded_in = "Int4MoE", ["p1", "ps1", "p2", "ps2"], ["pd", "psd"]
        moe, shared_attrs = {**moe, "fc1_block_size": 32, "fc2_block_size": 32}, dict(shared_block_size=32)
        down_node = helper.make_node(
            "Int4Linear", ["h", "pd", "psd"], ["shared"], domain="qwen.cpu", K=shared, N=hidden, block_size=32
        )
    else:
        _, _, (fc1, fc2) = float_moe_case(experts=experts, hidden=hidden, inter=inter, seed=seed)
        weights = {"w1": fc1, "w2": fc2, "wd": np.ascontiguousarray(down.T), "wdt": down}
        op, experts_in, folded_in, shared_attrs = "FloatMoE", ["w1", "w2"], ["wdt"], {}
        down_node = helper.make_node("MatMul", ["h", "wd"], ["shared"])
    folded = helper.make_node(
        op, ["x", "m", *experts_in, *folded_in], ["y"], domain="qwen.cpu", shared_expert_size=shared,
        **shared_attrs, **moe,
    )  # fmt: skip
    weights["sizes"] = np.array([experts, shared, shared, 1], np.int64)
    nodes = [
        helper.make_node("Split", ["m", "sizes"], ["r", "g", "u", "s"], axis=-1),
        helper.make_node(op, ["x", "r", *experts_in], ["routed"], domain="qwen.cpu", **moe),
        helper.make_node("QuickGelu", ["g"], ["silu"], domain="com.microsoft", alpha=1.0),
        helper.make_node("Mul", ["silu", "u"], ["h"]),
        down_node,
        helper.make_node("Sigmoid", ["s"], ["gate"]),
        helper.make_node("GatedAdd", ["routed", "shared", "gate"], ["y"], domain="com.microsoft"),
    ]
    inputs = [_x("x", None), _x("m", None)]
    return (
        _session([folded], inputs, {n: v for n, v in weights.items() if n in [*experts_in, *folded_in]}),
        _session(nodes, inputs, {n: v for n, v in weights.items() if n != "wdt"}),
        (fc1, fc2, down),
    )


@pytest.mark.parametrize("kind", ["int4", "float"])
def test_moe_with_the_shared_expert_matches_the_nodes_it_replaces_and_numpy(kind):
    """Int4MoE: 1 and 5 tokens take the decode path (the shared down projection as more fc2 tasks), 37 and
    130 tokens x 2 experts the fused per-expert blocks; FloatMoE: one path, its shared activations in tasks
    of 64 tokens. [B, T, H] input with [B, T, E + 2 I_s + 1] logits gives the 2-D call's bits."""
    from test_quantize_weights import numpy_moe

    experts, hidden, shared = 8, 64, 64
    folded, nodes, (fc1, fc2, down) = shared_moe_case(kind, experts=experts, hidden=hidden, shared=shared)
    tolerance = INT8_ACTIVATIONS if kind == "int4" else FLOAT_MOE
    rng = np.random.default_rng(5)
    for tokens in (1, 5, 37, 130):
        x = rng.standard_normal((tokens, hidden)).astype(np.float32)
        m = rng.standard_normal((tokens, experts + 2 * shared + 1)).astype(np.float32)
        y = folded.run(None, {"x": x, "m": m})[0]
        columns = [experts, experts + shared, experts + 2 * shared]
        router, g, u, s = np.split(m.astype(np.float64), columns, -1)
        expected = numpy_moe(x.astype(np.float64), router, fc1.astype(np.float64), fc2.astype(np.float64), 2)
        expected += (g / (1 + np.exp(-g)) * u) @ down.T.astype(np.float64) / (1 + np.exp(-s))
        assert _relative(y, expected) < tolerance, tokens
        assert _relative(y, nodes.run(None, {"x": x, "m": m})[0]) < SHARED_FOLD, tokens
    x3 = rng.standard_normal((2, 3, hidden)).astype(np.float32)
    m3 = rng.standard_normal((2, 3, experts + 2 * shared + 1)).astype(np.float32)
    y3 = folded.run(None, {"x": x3, "m": m3})[0]
    flat = folded.run(None, {"x": x3.reshape(6, hidden), "m": m3.reshape(6, -1)})[0]
    np.testing.assert_array_equal(y3.reshape(6, hidden), flat)


# FloatMoE (fp32 experts) against the float64 NumPy experts and ONNX Runtime's own MoE: fp32 sums over H and
# I in another order.
FLOAT_MOE = 2e-5


def float_moe_case(experts=8, hidden=64, inter=32, k=2, normalize=1, seed=5):
    rng = np.random.default_rng(seed)
    fc1 = rng.standard_normal((experts, 2 * inter, hidden)).astype(np.float32) * 0.1
    fc2 = rng.standard_normal((experts, hidden, inter)).astype(np.float32) * 0.1
    attrs = dict(k=k, normalize_routing_weights=normalize)
    moe = helper.make_node(
        "MoE", ["x", "r", "w1", "", "w2"], ["y"], domain="com.microsoft", activation_type="swiglu",
        swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0, **attrs,
    )  # fmt: skip
    ours = helper.make_node("FloatMoE", ["x", "r", "w1", "w2"], ["y"], domain="qwen.cpu", **attrs)
    inputs, weights = [_x("x", None), _x("r", None)], {"w1": fc1, "w2": fc2}
    return _session([moe], inputs, weights), _session([ours], inputs, weights), (fc1, fc2)


@pytest.mark.parametrize("k,normalize", [(2, 1), (1, 0), (4, 1), (3, 0)])
def test_float_moe_matches_onnxruntime_moe_and_numpy(k, normalize):
    """600 tokens cross the kernel's 512-token passes; 37 give experts odd token counts (the tiles take
    four, two and one token at a time)."""
    from test_quantize_weights import numpy_moe

    reference, ours, (fc1, fc2) = float_moe_case(k=k, normalize=normalize)
    rng = np.random.default_rng(6)
    for tokens in (1, 5, 37, 600):
        x = rng.standard_normal((tokens, 64)).astype(np.float32)
        logits = rng.standard_normal((tokens, 8)).astype(np.float32)
        y = ours.run(None, {"x": x, "r": logits})[0]
        want = numpy_moe(x.astype(np.float64), logits.astype(np.float64), fc1, fc2, k, bool(normalize))
        assert _relative(y, want) < FLOAT_MOE, tokens
        assert _relative(y, reference.run(None, {"x": x, "r": logits})[0]) < FLOAT_MOE, tokens
    x3 = rng.standard_normal((2, 3, 64)).astype(np.float32)  # [B, T, H] with logits [B*T, E]
    logits = rng.standard_normal((6, 8)).astype(np.float32)
    flat = ours.run(None, {"x": x3.reshape(6, 64), "r": logits})[0]
    np.testing.assert_array_equal(ours.run(None, {"x": x3, "r": logits})[0].reshape(6, 64), flat)


def test_float_moe_decode_rows_give_a_batchs_bits():
    """One token runs its weight rows one after another (hidden 68: a 64-row block, then 4 rows), as do the
    experts of a batch that up to 6 tokens chose; experts more tokens chose run tiles of four tokens (against
    four weight rows on AVX-512, one on AVX2). Every output sums in the same order either way: each token
    alone gives the same bits as its row in a batch of 40 (about 10 tokens an expert), and the batch is
    right against NumPy."""
    from test_quantize_weights import numpy_moe

    _, ours, (fc1, fc2) = float_moe_case(hidden=68, inter=36)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((40, 68)).astype(np.float32)
    logits = rng.standard_normal((40, 8)).astype(np.float32)
    chosen = np.argsort(-logits, axis=1)[:, :2]
    assert np.bincount(chosen.ravel(), minlength=8).max() > 6  # some expert runs the tiles
    batch = ours.run(None, {"x": x, "r": logits})[0]
    for t in range(40):
        alone = ours.run(None, {"x": x[t : t + 1], "r": logits[t : t + 1]})[0]
        np.testing.assert_array_equal(alone[0], batch[t])
    want = numpy_moe(x.astype(np.float64), logits.astype(np.float64), fc1, fc2, 2, True)
    assert _relative(batch, want) < FLOAT_MOE


def test_float_moe_loops_follow_qwen_cpu_kernels_and_agree():
    """FloatMoE's three compiled copies (x86-64-v4, AVX2, baseline) are picked by CPUID or narrowed by
    QWEN_CPU_KERNELS like every other kernel's (the AVX2 rows of benchmarks/runtime_llama_avx2.md rely on it),
    and give the same results: float sums in the same order, fused or not (x86-64-v4 and AVX2 fuse)."""
    from cpu_kernel_support import cpu_flags, json_per_kernel_mode

    code = "import json, test_cpu_kernels as t; print(json.dumps(t.float_moe_loops_and_outputs()))"
    outputs = json_per_kernel_mode(code)
    loops = {mode: out[0] for mode, out in outputs.items()}
    assert loops["portable"] == "baseline"
    assert loops["avx2"] in ("avx2", "baseline") and loops["default"] in ("x86-64-v4", "avx2", "baseline")
    if {"avx512f", "avx512vl", "avx512bw", "avx512dq"} <= cpu_flags():
        assert loops == {"portable": "baseline", "avx2": "avx2", "default": "x86-64-v4"}
    for mode in ("avx2", "default"):
        for got, want in zip(outputs[mode][1], outputs["portable"][1], strict=True):
            assert _relative(np.array(got), np.array(want)) < 1e-6, mode


def float_moe_loops_and_outputs() -> list:
    """(in a child per kernel mode) the loops FloatMoE runs, and its output for one token (the one-stream
    rows) and for 40 (the tiles of four tokens too)."""
    _, ours, _ = float_moe_case(hidden=68, inter=36)
    rng = np.random.default_rng(8)
    x, r = rng.standard_normal((40, 68)).astype(np.float32), rng.standard_normal((40, 8)).astype(np.float32)
    y = [ours.run(None, {"x": x[:n], "r": r[:n]})[0].tolist() for n in (1, 40)]
    return [cpu_kernels.float_moe_loops(), y]


def test_bad_input_fails_with_the_kernels_reason():
    _, ours, _ = linear_case(64, 40, 32)
    with pytest.raises(Exception, match="Int4Linear: the last dimension of X must be K"):
        ours.run(None, {"x": np.zeros((2, 63), np.float32)})
    _, moe, _ = moe_case()
    with pytest.raises(Exception, match=r"Int4MoE: router logits must be \[tokens, experts\]"):
        moe.run(None, {"x": np.zeros((3, 64), np.float32), "r": np.zeros((2, 8), np.float32)})
    for kind, op in (("int4", "Int4MoE"), ("float", "FloatMoE")):
        shared, _, _ = shared_moe_case(kind)
        with pytest.raises(Exception, match=rf"{op}: with a shared expert the logits must be \[tokens"):
            shared.run(None, {"x": np.zeros((3, 64), np.float32), "m": np.zeros((3, 8), np.float32)})
    _, float_moe, _ = float_moe_case()
    with pytest.raises(Exception, match="FloatMoE: the last dimension of X must be the hidden size"):
        float_moe.run(None, {"x": np.zeros((3, 63), np.float32), "r": np.zeros((3, 8), np.float32)})
    bad = helper.make_node(
        "Int4Linear", ["x", "p", "ps"], ["y"], domain="qwen.cpu", K=64, N=40, block_size=48
    )
    with pytest.raises(Exception, match="block_size must be a multiple of 32"):
        _session([bad], [_x("x", None)], {"p": np.zeros(1, np.uint8), "ps": np.zeros(1, np.float16)})


# ------------------------------------------------------------------------------------------ whole model

# per tiny preset: int4 products (17 for the MoE model: see test_quantize_weights), MoE layers, DeltaNet and
# full-attention layers (the attention kernel: tests/test_cpu_attention.py)
EXPECTED_KERNELS = {
    "tiny-qwen3.5-moe": {"Int4Linear": 17, "Int4MoE": 4, "GatedDeltaRule": 3, "Attention": 1},
    "tiny-qwen3-next": {"Int4Linear": 18, "Int4MoE": 3, "GatedDeltaRule": 3, "Attention": 1},  # dense MLP: 3
    "tiny-qwen3.5": {"Int4Linear": 21, "GatedDeltaRule": 3, "Attention": 1},
}
# each MoE layer's shared down projection goes into its Int4MoE (passes/fold_cpu_shared_expert.py)
FOLDED_SHARED_EXPERTS = {"tiny-qwen3.5-moe": 4, "tiny-qwen3-next": 3, "tiny-qwen3.5": 0}


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_ort_cpu_int4_pipeline_runs_every_product_and_mixer_on_the_kernels(preset):
    model = exported(preset)
    passes = pipeline("ort-cpu-int4")
    for p in passes:
        p(model)
    ops = collections.Counter(n.op_type for n in model.graph if n.domain == "qwen.cpu")
    folded = FOLDED_SHARED_EXPERTS[preset]
    expected = EXPECTED_KERNELS[preset]
    assert dict(ops) == {**expected, "Int4Linear": expected["Int4Linear"] - folded}
    fold = next(p for p in passes if isinstance(p, FoldCpuSharedExpert))
    assert fold.stats.fired == ({"Int4MoE": folded} if folded else {}) and not fold.stats.kept
    shared = [n for n in model.graph if n.op_type == "Int4MoE"]
    assert all(len(n.inputs) == 8 and n.attributes["shared_expert_size"].value > 0 for n in shared)
    left = {f"{n.domain}::{n.op_type}" for n in model.graph}
    chain = {"MatMulNBits", "QMoE", "MoE", "CausalConvWithState", "LinearAttention", "GatedRMSNorm"}
    chain.add("GatedAdd")  # folded into Int4MoE
    assert not {op for op in left if op.split("::")[1] in chain}, left
    assert not [n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None]
    use = next(p for p in passes if isinstance(p, UseCpuKernels))
    fired = {op: n for op, n in EXPECTED_KERNELS[preset].items() if op not in ("GatedDeltaRule", "Attention")}
    assert use.stats.fired == {"Int4Linear": 0, "Int4MoE": 0, **fired} and not use.stats.kept


def test_ort_cpu_int4_artifact_checks_runs_elsewhere_and_diffs(tmp_path):
    from qwen_export.build import build
    from qwen_export.diff import diff_artifact
    from qwen_export.golden.store import repo_golden_dir
    from qwen_export.runtime.session import Session
    from qwen_export.tolerances import tolerance_for

    result = build(tmp_path / "art", preset="tiny-qwen3.5-moe", target="ort-cpu-int4", check=True)
    assert result.check_passed, result.manifest["check"]
    records = {r.name: r for r in result.report.records}
    assert records["lower-ort"].numerics.tolerance == FP32_MAX_ABS  # the fp32 graph with GatedDeltaRule
    assert records["lower-ort"].numerics.max_vs_golden < FP32_MAX_ABS
    # Same codes and arithmetic as the MatMulNBits/QMoE stage, but float sums in another order (~1e-7) can
    # tip one int8 activation rounding in a later product, which moves logits by one int8 step (seen 7e-3
    # once in 200 prefill positions): far below the int4 error itself (0.44 against the golden).
    assert records["use-cpu-kernels"].numerics.max_vs_previous < 2e-2
    assert cpu_kernels.LIBRARY_NAME in result.manifest["files"]
    # the artifact runs from another folder with its own copy of the library
    moved = tmp_path / "deployed"
    shutil.copytree(result.out_dir, moved)
    shutil.rmtree(result.out_dir)
    session = Session.load(moved)
    assert session.artifact.target == "ort-cpu-int4"
    tokens = session.generate([[1, 2, 3], [4, 5]], 4).tokens
    assert [len(t) for t in tokens] == [4, 4]
    report = diff_artifact(moved, against=repo_golden_dir("tiny-qwen3.5-moe"))
    assert report.precision == "int4" and report.tolerances == tolerance_for("int4", random_weights=True)
    assert report.passed, report.to_json()
    (moved / cpu_kernels.LIBRARY_NAME).unlink()
    with pytest.raises(QwenExportError, match=f"{cpu_kernels.LIBRARY_NAME} is missing"):
        Session.load(moved)


SHAPE_READ_CHILD = """
import ctypes, json, sys
import numpy as np
from qwen_export.runtime.ort_decoder import OrtDecoder
out = {}
for folder in sys.argv[1:]:
    decoder = OrtDecoder(folder + "/model.onnx", optimize=True)
    ids = np.array([[0, 0, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7]])
    _, logits = decoder.greedy(ids, 4, (np.arange(7) >= [[2], [0]]).astype(np.int64))
    out[folder] = logits.astype(np.float32).tobytes().hex()
library = ctypes.CDLL(folder + "/LIBRARY")  # the copy the sessions loaded: the same globals
out["reads_shape_references"] = library.QwenCpuReadsShapeReferences()
print(json.dumps(out))
"""


def test_both_ways_of_reading_input_shapes_give_the_same_bits(tmp_path):
    """On ONNX Runtime 1.24+ the ops read an input's dims without allocating (common/ort_op.h: 9% of the
    trained model's decode step went to the info objects API 17 allocates); QWEN_CPU_ORT_API=17 keeps the
    older calls. Every qwen.cpu op of a tiny build for each target that carries the kernel library (the
    target registry's `cpu_kernels`), a left-padded prefill and decode steps, in a child process each way:
    the same logits, bit for bit."""
    from qwen_export.build import build
    from qwen_export.targets import get_target, names

    folders = [
        str(build(tmp_path / target, preset="tiny-qwen3.5-moe", target=target).out_dir)
        for target in names()
        if get_target(target).cpu_kernels
    ]
    assert len(folders) >= 2  # fp32 (FloatMoE) and int4 (Int4MoE) at least
    child = SHAPE_READ_CHILD.replace("LIBRARY", cpu_kernels.LIBRARY_NAME)
    runs = {}
    for forced in (None, "17"):
        env = {k: v for k, v in os.environ.items() if k != "QWEN_CPU_ORT_API"}
        env |= {"QWEN_CPU_ORT_API": forced} if forced else {}
        proc = subprocess.run(
            [sys.executable, "-c", child, *folders], env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[forced] = json.loads(proc.stdout.strip().splitlines()[-1])
    assert runs[None].pop("reads_shape_references") == 1  # this project's ONNX Runtime is 1.24 or newer
    assert runs["17"].pop("reads_shape_references") == 0
    assert runs[None] == runs["17"]


def test_library_is_built_once_per_fingerprint(portable_library, tmp_path):
    cache, first = portable_library
    assert first.is_file() and first.parent.parent == cache / "kernels"
    mtime = first.stat().st_mtime_ns
    again = cpu_kernels.library_path(cache=cache, portable_only=True)
    assert again == first and first.stat().st_mtime_ns == mtime
    # without a compiler: one line that says what to install, or which target needs none
    code = "from pathlib import Path; "
    code += "from qwen_export import cpu_kernels; cpu_kernels.library_path(cache=Path(%r))"
    env = {**os.environ, "CXX": "", "PATH": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", code % str(tmp_path / "other")], env=env, capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "need a C++ compiler to build once (install g++ or set CXX)" in proc.stderr
    assert "--target ort-int4" in proc.stderr


@pytest.mark.parametrize("normalize", [1, 0])
def test_moe_without_renormalisation_stays_fp32_and_right(normalize):
    """QMoE (ORT 1.31.1) renormalises whatever normalize_routing_weights says, so QuantizeWeights keeps such
    a MoE as fp32 com.microsoft MoE (which honours it); a renormalising one goes to Int4MoE. The dense
    products stay fp32 here (excluded by name), so the routing is the reference's."""
    from test_lower_ort import lower, moe_case, qwen_model, rnd, run

    from qwen_export.passes.quantize_weights import QuantizeWeights

    import qwen_op_reference as ref

    rng = np.random.default_rng(3)
    x = rnd(rng, 2, 7, 64)
    weights = moe_case(rng, hidden=64, inter=32, shared=32)  # whole 32-blocks for the experts
    model = lower(qwen_model("MoE", [("x", x, False), *weights], ["y"], top_k=2, normalize=normalize))
    quantize = QuantizeWeights(
        bits=4, exclude=["MatMul"], fp16_scales=True
    )  # the routed experts only: the router stays exact
    quantize(model)
    UseCpuKernels()(model)
    fold = FoldCpuSharedExpert()
    fold(model)  # refuses both: an fp32 shared expert, an fp32 routed MoE
    ops = collections.Counter(n.op_type for n in model.graph)
    if normalize:
        assert ops["Int4MoE"] == 1 and "MoE" not in ops, ops
        why = "GatedAdd's shared expert is not Int4Linear(Mul(...)) gated by Sigmoid"
    else:
        assert ops["MoE"] == 1 and "QMoE" not in ops and "Int4MoE" not in ops, ops
        kept = "MoE without top-k renormalisation (QMoE's CPU kernel always renormalises)"
        assert quantize.stats.kept[kept] == 1
        why = "GatedAdd whose first input is not a qwen.cpu Int4MoE or FloatMoE"
    assert fold.stats.kept == {why: 1} and not fold.stats.fired and ops["GatedAdd"] == 1
    actual = run(model, {"x": x})[0]
    right, wrong = (
        ref.moe(x, *(w for _, w, _ in weights), top_k=2, normalize=n)[0] for n in (normalize, 1 - normalize)
    )
    if normalize:  # int4 experts move the output by ~13% here; the other normalisation by ~23%
        assert _relative(actual, right) < 0.2 and _relative(actual, wrong) > 0.2
    else:  # all fp32: exact
        assert _relative(actual, right) < 1e-5
