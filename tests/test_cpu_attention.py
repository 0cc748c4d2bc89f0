"""qwen.cpu Attention / AttentionKv16 (plugins/ort_cpu/attention) and the targets that run them.

- The kernel against a NumPy reference (float64 softmax attention over concat(past, new)) and against ONNX
  Runtime's own com.microsoft GroupQueryAttention on the same inputs (the bias and lengths the ort lowering
  feeds it): decode over a carried cache (short, and long enough to split the keys across tasks), several
  query heads per kv head, left padding, no past tokens, prefill with and without past tokens. The
  present caches are concat(past, new) exactly.
- Caches with spare rows (a buffer the runtime grows): the rows past P are ignored; with one buffer bound
  to past and present (IOBinding) only the new rows are written and the output is the same, bit for bit.
- AttentionKv16: the caches are float16 (new rows rounded to nearest even, the past copied bit for bit);
  its output equals the float kernel run on the float16-rounded cache (to float rounding).
- The AVX-512, AVX2 and portable loops agree (child processes force each).
- ort-cpu, ort-cpu-int4 and ort-cpu-int4-kv16 put every full-attention layer on the kernel (and ort-cpu
  every fp32 MoE on FloatMoE); built
  artifacts on a tiny preset decode the golden's greedy tokens (transformers) and hold its logits to the
  target's tolerance; the float16-cache graph stays within KV16_MAX_ABS of the float-cache graph.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from qwen_export import cpu_kernels

FLOAT_MIN = float(np.finfo(np.float32).min)
# Kernel vs float64 NumPy: fp32 dot products and sums over up to a few thousand keys.
FP32_ATTENTION = 2e-5
# Kernel vs ORT's GroupQueryAttention (both fp32, sums in other orders).
VS_GQA = 2e-5


def _session(node, inputs, outputs, threads=2) -> ort.InferenceSession:
    graph = helper.make_graph([node], "g", inputs, outputs)
    opsets = [
        helper.make_opsetid("", 21),
        helper.make_opsetid("com.microsoft", 1),
        helper.make_opsetid(cpu_kernels.DOMAIN, cpu_kernels.DOMAIN_VERSION),
    ]
    model = helper.make_model(graph, ir_version=10, opset_imports=opsets)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(str(cpu_kernels.library_path()))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _io(name, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, None)


def ours(nh, kv, scale, half=False, threads=2) -> ort.InferenceSession:
    cache = TensorProto.FLOAT16 if half else TensorProto.FLOAT
    node = helper.make_node(
        "AttentionKv16" if half else "Attention", ["q", "k", "v", "pk", "pv", "bias"], ["o", "ck", "cv"],
        domain="qwen.cpu", num_heads=nh, kv_num_heads=kv, scale=scale,
    )  # fmt: skip
    inputs = [_io("q"), _io("k"), _io("v"), _io("pk", cache), _io("pv", cache), _io("bias")]
    return _session(node, inputs, [_io("o"), _io("ck", cache), _io("cv", cache)], threads)


def gqa(nh, kv, scale) -> ort.InferenceSession:
    node = helper.make_node(
        "GroupQueryAttention", ["q", "k", "v", "pk", "pv", "seqlens", "total", "", "", "", "bias"],
        ["o", "ck", "cv"], domain="com.microsoft", num_heads=nh, kv_num_heads=kv, scale=scale,
    )  # fmt: skip
    inputs = [_io("q"), _io("k"), _io("v"), _io("pk"), _io("pv"), _io("seqlens", TensorProto.INT32)]
    inputs += [_io("total", TensorProto.INT32), _io("bias")]
    return _session(node, inputs, [_io("o"), _io("ck"), _io("cv")])


def case(b, t, p, nh, kv, hd, pad=(), seed=0):
    """Random q/k/v and past caches; `pad[i]` leading padded keys in row i (the bias the lowering feeds)."""
    rng = np.random.default_rng(seed)
    s = p + t
    f = {
        "q": rng.standard_normal((b, t, nh * hd), np.float32),
        "k": rng.standard_normal((b, t, kv * hd), np.float32),
        "v": rng.standard_normal((b, t, kv * hd), np.float32),
        "pk": rng.standard_normal((b, kv, p, hd), np.float32),
        "pv": rng.standard_normal((b, kv, p, hd), np.float32),
    }
    mask = np.ones((b, s), np.int64)
    for row, n in enumerate(pad):
        mask[row, :n] = 0
    f["bias"] = np.broadcast_to(np.where(mask[:, None, None, :] == 1, 0.0, FLOAT_MIN), (b, 1, t, s))
    f["bias"] = np.ascontiguousarray(f["bias"], np.float32)
    return f, mask


def reference(f, nh, kv, scale):
    """float64: softmax(scale q k^T + bias, causal with the new tokens last) v, and the present caches."""
    b, t, _ = f["q"].shape
    p, hd = f["pk"].shape[2], f["pk"].shape[3]
    ck = np.concatenate([f["pk"], f["k"].reshape(b, t, kv, hd).transpose(0, 2, 1, 3)], axis=2)
    cv = np.concatenate([f["pv"], f["v"].reshape(b, t, kv, hd).transpose(0, 2, 1, 3)], axis=2)
    q = f["q"].reshape(b, t, nh, hd).transpose(0, 2, 1, 3).astype(np.float64)
    keys = np.repeat(ck.astype(np.float64), nh // kv, axis=1)
    values = np.repeat(cv.astype(np.float64), nh // kv, axis=1)
    scores = scale * q @ keys.transpose(0, 1, 3, 2) + f["bias"].astype(np.float64)
    causal = np.arange(p + t)[None, :] > (p + np.arange(t))[:, None]
    scores = np.where(causal, -np.inf, scores)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    out = (w / w.sum(-1, keepdims=True)) @ values
    return out.transpose(0, 2, 1, 3).reshape(b, t, nh * hd), ck, cv


def _relative(a, b):
    return float(np.abs(a.astype(np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


# (B, T, P, nh, kv, hd, padding per row)
CASES = {
    "decode": (1, 1, 37, 8, 2, 128, ()),
    "decode-long-split": (2, 1, 3000, 8, 2, 64, (0, 700)),  # several key ranges per head, combined
    "decode-ranges-of-blocks": (1, 1, 40000, 4, 1, 16, (9,)),  # 40 ranges of 1024 keys: two 512-key blocks
    "decode-mha": (1, 1, 20, 4, 4, 32, ()),
    "decode-narrow-heads": (1, 1, 37, 4, 2, 32, ()),  # 32 dims, two query heads a kv head (trained model's)
    "decode-one-kv-head": (3, 1, 65, 6, 1, 16, (5, 0, 64)),
    # eight and sixteen query heads a kv head (Qwen3.5-35B-A3B's, -397B's): float16 rows in groups of four
    "decode-eight-heads-a-kv-head": (2, 1, 1100, 16, 2, 64, (0, 37)),
    "decode-sixteen-heads-a-kv-head": (1, 1, 45, 32, 2, 64, ()),
    # six (Qwen3.5-27B's): a group of four rows and a last pair
    "decode-six-heads-a-kv-head": (2, 1, 700, 24, 4, 64, (0, 21)),
    "no-past-prompt": (2, 7, 0, 8, 2, 64, (3, 0)),
    "prefill-tiles": (1, 40, 0, 8, 2, 32, ()),  # 16 tokens per 64-row tile: three tiles
    "prefill-with-past": (1, 9, 33, 4, 2, 64, ()),
    "prefill-with-past-batch-padded": (2, 5, 70, 4, 2, 32, (10, 0)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_attention_matches_numpy(name):
    b, t, p, nh, kv, hd, pad = CASES[name]
    f, mask = case(b, t, p, nh, kv, hd, pad)
    scale = 1 / np.sqrt(hd)
    o, ck, cv = ours(nh, kv, scale).run(None, f)
    ro, rk, rv = reference(f, nh, kv, scale)
    np.testing.assert_array_equal(ck, rk)  # the present caches are concat(past, new), exactly
    np.testing.assert_array_equal(cv, rv)
    real = mask[:, -t:] == 1  # a padded query row's output is never read
    assert _relative(o[real], ro[real]) < FP32_ATTENTION


@pytest.mark.parametrize(
    "name", [n for n in CASES if not (CASES[n][0] > 1 and CASES[n][1] > 1 and CASES[n][2])]
)
def test_attention_matches_onnxruntime_group_query_attention(name):
    """GQA (CPU) takes a prompt with past tokens at batch 1 only: that case is left to the NumPy test."""
    b, t, p, nh, kv, hd, pad = CASES[name]
    f, mask = case(b, t, p, nh, kv, hd, pad, seed=1)
    scale = 1 / np.sqrt(hd)
    o, ck, cv = ours(nh, kv, scale).run(None, f)
    feeds = {**f, "seqlens": np.full(b, p + t - 1, np.int32), "total": np.array([p + t], np.int32)}
    go, gk, gv = gqa(nh, kv, scale).run(None, feeds)
    np.testing.assert_array_equal(ck, gk)
    np.testing.assert_array_equal(cv, gv)
    real = mask[:, -t:] == 1
    assert _relative(o[real], go[real]) < VS_GQA


def test_one_thread_and_broadcast_bias_give_the_same_output():
    f, _ = case(2, 1, 2000, 8, 2, 64, seed=3)
    scale = 0.125
    two = ours(8, 2, scale).run(None, f)[0]
    one = ours(8, 2, scale, threads=1).run(None, f)[0]
    np.testing.assert_array_equal(one, two)  # the key ranges do not depend on the thread count
    flat = {**f, "bias": np.zeros((2, 1, 1, 2001), np.float32)}
    np.testing.assert_array_equal(ours(8, 2, scale).run(None, flat)[0], two)


@pytest.mark.parametrize(
    "name",
    [
        "decode",
        "decode-long-split",
        "decode-eight-heads-a-kv-head",
        "decode-sixteen-heads-a-kv-head",
        "decode-six-heads-a-kv-head",
        "decode-one-kv-head",  # six rows too, heads of 16: the pair's scores beside the narrow sums
        "no-past-prompt",
        "prefill-with-past",
    ],
)
def test_kv16_cache_is_float16_with_float_arithmetic(name):
    b, t, p, nh, kv, hd, pad = CASES[name]
    f, mask = case(b, t, p, nh, kv, hd, pad, seed=2)
    scale = 1 / np.sqrt(hd)
    half = {**f, "pk": f["pk"].astype(np.float16), "pv": f["pv"].astype(np.float16)}
    o, ck, cv = ours(nh, kv, scale, half=True).run(None, half)
    assert ck.dtype == cv.dtype == np.float16
    # the float computation on the same (float16-rounded) cache
    rounded = {
        **f,
        "pk": half["pk"].astype(np.float32),
        "pv": half["pv"].astype(np.float32),
        "k": f["k"].astype(np.float16).astype(np.float32),
        "v": f["v"].astype(np.float16).astype(np.float32),
    }
    ro, rk, rv = reference(rounded, nh, kv, scale)
    np.testing.assert_array_equal(ck, rk.astype(np.float16))
    np.testing.assert_array_equal(cv, rv.astype(np.float16))
    real = mask[:, -t:] == 1
    assert _relative(o[real], ro[real]) < FP32_ATTENTION
    # and against the float cache: the float16 rounding of K and V only (|x| ~ 1: about 1e-3)
    assert _relative(o[real], reference(f, nh, kv, scale)[0][real]) < 5e-3


def test_every_isa_gives_the_same_result():
    """AVX-512, AVX2 and portable loops: same arithmetic, float sums in other orders."""
    from cpu_kernel_support import json_per_kernel_mode

    code = (
        "import json, numpy as np; import test_cpu_attention as t;"
        "f, _ = t.case(2, 1, 1500, 8, 2, 64, (0, 9), seed=4); o = t.ours(8, 2, 0.125).run(None, f)[0];"
        "h = {**f, 'pk': f['pk'].astype(np.float16), 'pv': f['pv'].astype(np.float16)};"
        "o16 = t.ours(8, 2, 0.125, half=True).run(None, h);"
        "f, _ = t.case(1, 20, 5, 8, 2, 64, seed=5); p = t.ours(8, 2, 0.125).run(None, f)[0];"
        "print(json.dumps([o.tolist(), o16[0].tolist(), o16[1].astype(np.float32).tolist(), p.tolist()]))"
    )
    outputs = {m: [np.array(x, np.float32) for x in o] for m, o in json_per_kernel_mode(code).items()}
    for mode in ("avx2", "default"):
        for got, want in zip(outputs[mode], outputs["portable"], strict=True):
            assert _relative(got, want) < 1e-6, mode


def with_spare_rows(f, spare, seed=7):
    """`f` with `spare` rows of noise after the past caches' P valid rows (a buffer with room to grow)."""
    rng = np.random.default_rng(seed)
    grown = dict(f)
    for name in ("pk", "pv"):
        b, kv, _, hd = f[name].shape
        noise = rng.standard_normal((b, kv, spare, hd)).astype(f[name].dtype)
        grown[name] = np.ascontiguousarray(np.concatenate([f[name], noise], axis=2))
    return grown


def run_in_one_buffer(session, feeds):
    """Run with each cache bound to one buffer as past and present (IOBinding): the output, and the buffers
    (OrtValues over copies of the feeds' caches) as the call left them."""
    values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in feeds.items()}
    binding = session.io_binding()
    for n, v in values.items():
        binding.bind_ortvalue_input(n, v)
    binding.bind_output("o", "cpu")
    binding.bind_ortvalue_output("ck", values["pk"])
    binding.bind_ortvalue_output("cv", values["pv"])
    session.run_with_iobinding(binding)
    return binding.get_outputs()[0].numpy(), values


@pytest.mark.parametrize("half", [False, True], ids=["float", "kv16"])
@pytest.mark.parametrize("name", ["decode", "decode-long-split", "no-past-prompt", "prefill-with-past"])
def test_spare_rows_and_one_buffer_for_past_and_present(name, half):
    b, t, p, nh, kv, hd, pad = CASES[name]
    f, _ = case(b, t, p, nh, kv, hd, pad, seed=6)
    if half:
        f = {**f, "pk": f["pk"].astype(np.float16), "pv": f["pv"].astype(np.float16)}
    scale = 1 / np.sqrt(hd)
    session = ours(nh, kv, scale, half=half)
    o, ck, cv = session.run(None, f)  # exactly P rows: present = concat(past, new)
    spare = with_spare_rows(f, t + 5)
    # separate buffers: present has the past's rows, the valid ones followed by zeros
    o2, ck2, cv2 = session.run(None, spare)
    np.testing.assert_array_equal(o2, o)
    for got, want in ((ck2, ck), (cv2, cv)):
        assert got.shape == spare["pk"].shape
        np.testing.assert_array_equal(got[:, :, : p + t], want)
        assert not got[:, :, p + t :].any()
    # one buffer bound to both: the new rows written over it, the rest untouched
    o_shared, values = run_in_one_buffer(session, spare)
    np.testing.assert_array_equal(o_shared, o)
    for buffer, want, before in ((values["pk"], ck, spare["pk"]), (values["pv"], cv, spare["pv"])):
        after = buffer.numpy()
        np.testing.assert_array_equal(after[:, :, : p + t], want)
        np.testing.assert_array_equal(after[:, :, p + t :], before[:, :, p + t :])


def one_token_calls(session, f, t):
    """Outputs and caches of `t` one-token calls, each over the caches the one before returned."""
    outs, ck, cv = [], f["pk"], f["pv"]
    p = f["pk"].shape[2]
    for i in range(t):
        step = {n: f[n][:, i : i + 1] for n in ("q", "k", "v")} | {"pk": ck, "pv": cv}
        step["bias"] = np.ascontiguousarray(f["bias"][:, :, i : i + 1, : p + i + 1])
        o, ck, cv = session.run(None, step)
        outs.append(o)
    return np.concatenate(outs, axis=1), ck, cv


# (B, T, P, nh, kv, hd, padding per row): T below kStepTokens (common/step_tokens.h)
STEP_CASES = {
    "verify-3": (1, 3, 37, 8, 2, 128, ()),
    "verify-15-padded": (2, 15, 3000, 8, 2, 64, (0, 700)),
    "verify-across-a-split-change": (1, 6, 32765, 4, 1, 16, (9,)),  # 512-key ranges, then 1024
    "first-tokens": (1, 4, 0, 4, 2, 32, ()),
    "verify-4-eight-heads-a-kv-head": (1, 4, 600, 16, 2, 64, ()),
    "verify-3-six-heads-a-kv-head": (1, 3, 300, 12, 2, 64, ()),
}


@pytest.mark.parametrize("half", [False, True], ids=["float", "kv16"])
@pytest.mark.parametrize("name", list(STEP_CASES))
def test_few_tokens_give_the_bits_of_one_token_calls(name, half):
    """A call of fewer than kStepTokens tokens (a speculative verify step) gives each token the output a
    one-token call at its position gives, bit for bit, and the same caches: separate buffers and one
    buffer for past and present."""
    b, t, p, nh, kv, hd, pad = STEP_CASES[name]
    f, _ = case(b, t, p, nh, kv, hd, pad, seed=11)
    if half:
        f = {**f, "pk": f["pk"].astype(np.float16), "pv": f["pv"].astype(np.float16)}
    session = ours(nh, kv, 1 / np.sqrt(hd), half=half)
    want, want_k, want_v = one_token_calls(session, f, t)
    o, ck, cv = session.run(None, f)
    np.testing.assert_array_equal(o, want)
    np.testing.assert_array_equal(ck, want_k)
    np.testing.assert_array_equal(cv, want_v)
    spare = with_spare_rows(f, t + 3)
    o_shared, values = run_in_one_buffer(session, spare)
    np.testing.assert_array_equal(o_shared, want)
    np.testing.assert_array_equal(values["pk"].numpy()[:, :, : p + t], want_k)


def test_bad_input_fails_with_the_kernels_reason():
    f, _ = case(1, 1, 4, 8, 2, 16)
    session = ours(8, 2, 0.25)
    with pytest.raises(Exception, match=r"Attention: attention_bias must be \[B, 1, T or 1, P \+ T\]"):
        session.run(None, {**f, "bias": np.zeros((1, 1, 2, 5), np.float32)})
    with pytest.raises(Exception, match=r"covers P \+ T = 7 keys, but the past caches hold 4 rows"):
        session.run(None, {**f, "bias": np.zeros((1, 1, 1, 7), np.float32)})
    values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in with_spare_rows(f, 3).items()}
    binding = session.io_binding()
    for n, v in values.items():
        binding.bind_ortvalue_input(n, v)
    binding.bind_output("o", "cpu")
    binding.bind_ortvalue_output("ck", values["pk"])
    binding.bind_output("cv", "cpu")
    with pytest.raises(Exception, match="bind both caches to their past buffers, or neither"):
        session.run_with_iobinding(binding)
    with pytest.raises(
        Exception, match=r"Attention: key and value must be \[B, T, kv_num_heads\*head_size\]"
    ):
        session.run(None, {**f, "k": np.zeros((1, 1, 16), np.float32)})
    with pytest.raises(Exception, match="num_heads must be a multiple of kv_num_heads"):
        ours(6, 4, 0.25)


# ------------------------------------------------------------------------------------------ whole model
KERNEL_TARGETS = {"ort-cpu": "Attention", "ort-cpu-int4": "Attention", "ort-cpu-int4-kv16": "AttentionKv16"}
# The float16 cache against the float cache, same int4 weights, on the tiny golden's prompts and greedy
# continuation: logits max |Δ| (seen: 1.2e-2 at prefill, 1.3e-2 over the decode steps). Bound: fp16's
# logits_max_abs.
KV16_MAX_ABS = 5e-2


MOE_LAYERS = {"tiny-qwen3.5-moe": 4, "tiny-qwen3-next": 3, "tiny-qwen3.5": 0}


@pytest.mark.parametrize("target", list(KERNEL_TARGETS))
@pytest.mark.parametrize("preset", list(MOE_LAYERS))
def test_pipelines_put_every_full_attention_layer_on_the_kernel(preset, target):
    from passes_support import exported

    from qwen_export.passes.fold_cpu_shared_expert import FoldCpuSharedExpert
    from qwen_export.passes.lower_cpu_attention import UseCpuAttention
    from qwen_export.passes.lower_cpu_moe import UseCpuFloatMoe
    from qwen_export.targets import get_target, pipeline

    model = exported(preset)
    passes = pipeline(target)
    for p in passes:
        p(model)
    ops = collections.Counter(f"{n.domain}::{n.op_type}" for n in model.graph)
    assert ops[f"qwen.cpu::{KERNEL_TARGETS[target]}"] == 1 and ops["qwen.cpu::GatedDeltaRule"] == 3, ops
    assert not [op for op in ops if op.endswith("GroupQueryAttention")]
    use = next(p for p in passes if isinstance(p, UseCpuAttention))
    assert use.stats.fired == {KERNEL_TARGETS[target]: 1} and not use.stats.kept
    caches = [v for v in [*model.graph.inputs, *model.graph.outputs] if v.name.endswith((".key", ".value"))]
    want = ir.DataType.FLOAT16 if use.kv_cache == "float16" else ir.DataType.FLOAT
    assert len(caches) == 4 and all(v.dtype == want for v in caches)
    assert get_target(target).cpu_kernels
    # a pipeline with UseCpuFloatMoe (ort-cpu: fp32 experts) puts every MoE on qwen.cpu FloatMoE
    moe = next((p for p in passes if isinstance(p, UseCpuFloatMoe)), None)
    if moe is not None:
        assert ops["qwen.cpu::FloatMoE"] == MOE_LAYERS[preset] and not ops["com.microsoft::MoE"], ops
        assert moe.stats.fired == ({"FloatMoE": MOE_LAYERS[preset]} if MOE_LAYERS[preset] else {})
        assert not moe.stats.kept
    # and every MoE layer's gated shared expert inside its Int4MoE or FloatMoE
    fold = next(p for p in passes if isinstance(p, FoldCpuSharedExpert))
    assert fold.stats.fired_total == MOE_LAYERS[preset] and not fold.stats.kept
    assert not ops["com.microsoft::GatedAdd"], ops


def run_greedy(model_path, prompt: np.ndarray, steps: int, forced: np.ndarray | None = None):
    """Prefill + greedy decode on ONNX Runtime directly, states in the graph's own dtypes (float16 caches
    included). `forced`: feed these tokens instead of the argmax (teacher forcing). Returns (prefill
    logits, tokens [B, steps], step logits [B, steps, V])."""
    from qwen_export.runtime.ort_decoder import positions_from_mask, session_options

    session = ort.InferenceSession(str(model_path), session_options(model_path=model_path, threads=2))
    dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    states = {}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            shape = [prompt.shape[0] if d == "batch" else 0 if isinstance(d, str) else d for d in i.shape]
            states[i.name] = np.zeros(shape, dtypes[i.type])
    names = [o.name for o in session.get_outputs()]

    def step(ids, mask, positions):
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **states}
        out = dict(zip(names, session.run(None, feeds), strict=True))
        for name in states:
            states[name] = out[name.replace("past_key_values.", "present.")]
        return out["logits"]

    mask = np.ones_like(prompt)
    prefill = step(prompt, mask, positions_from_mask(mask))
    last, tokens, logits = prefill[:, -1], [], []
    for s in range(steps):
        logits.append(last)
        token = (forced[:, s : s + 1] if forced is not None else last.argmax(-1)[:, None]).astype(np.int64)
        tokens.append(token)
        position = positions_from_mask(mask)[:, -1:] + 1
        mask = np.concatenate([mask, np.ones_like(token)], axis=1)
        last = step(token, mask, position)[:, -1]
    if not steps:
        return prefill, None, None
    return prefill, np.concatenate(tokens, axis=1), np.stack(logits, axis=1)


def test_ort_cpu_artifact_equals_transformers(tmp_path):
    """fp32 weights, every mixer on the kernels: build --check holds every stage to the fp32 tolerance,
    and the artifact's prefill logits and greedy tokens are the golden's (transformers)."""
    from passes_support import golden

    from qwen_export.build import build
    from qwen_export.golden.store import PROMPT_LENGTHS
    from qwen_export.tolerances import FP32_MAX_ABS

    result = build(tmp_path / "art", preset="tiny-qwen3.5-moe", target="ort-cpu", check=True)
    assert result.check_passed, result.manifest["check"]
    assert cpu_kernels.LIBRARY_NAME in result.manifest["files"]
    path, g = result.out_dir / "model.onnx", golden("tiny-qwen3.5-moe")
    for length in PROMPT_LENGTHS[:2]:
        ids, ref = g.prefill(length)
        logits, _, _ = run_greedy(path, ids, 0)
        assert np.abs(logits - ref).max() < FP32_MAX_ABS, length
    _, tokens, logits = run_greedy(path, g.greedy_prompt, g.greedy_tokens.shape[1])
    np.testing.assert_array_equal(tokens, g.greedy_tokens)
    assert np.abs(logits - g.greedy_logits).max() < FP32_MAX_ABS


@pytest.mark.parametrize("target", ["ort-cpu-int4", "ort-cpu-int4-kv16"])
def test_runtime_updates_the_states_in_place(tmp_path, monkeypatch, target):
    """Session decode steps bind one buffer to each state's past and present (runtime/in_place.py): the
    DeltaNet states and the KV caches (buffers with spare rows, regrown here every 3 rows so a 24-token
    generation crosses several regrowths). Tokens and every step's logits equal the copying path's, bit
    for bit, on a left-padded batch."""
    from qwen_export.build import build
    from qwen_export.runtime import in_place
    from qwen_export.runtime.session import Session

    out = build(tmp_path / "art", preset="tiny-qwen3.5-moe", target=target).out_dir
    session = Session.load(out)
    decoder = session.backend
    layers = {s.split(".")[0] for s in decoder.state_suffixes}
    assert set(decoder.in_place) == set(decoder.state_suffixes), "every state of this graph in place"
    assert {s for s, grows in decoder.in_place.items() if grows} == {
        f"{n}.{kind}" for n in layers for kind in ("key", "value") if f"{n}.key" in decoder.state_suffixes
    }
    monkeypatch.setattr(in_place, "GROW_ROWS", 3)
    prompts = [[5, 9, 14, 3, 7, 11, 2], [8, 1], [4, 4, 6, 13]]
    steps = []

    def record(*args):
        logits, states = step(*args)
        steps.append(logits)
        return logits, states

    step, decoder.step_bound = decoder.step_bound, record
    fast = session.generate(prompts, 24).tokens
    fast_logits, steps = steps, []
    decoder.in_place = {}
    slow = session.generate(prompts, 24).tokens
    assert fast == slow
    for a, b in zip(fast_logits, steps, strict=True):
        np.testing.assert_array_equal(a, b)


def test_kv16_artifact_against_the_float_cache_and_the_golden(tmp_path):
    """ort-cpu-int4-kv16 vs ort-cpu-int4 (same int4 weights): decode logits within KV16_MAX_ABS, the same
    greedy tokens; against the golden, the int4 tolerances (top-1, KL, max |Δ|)."""
    from passes_support import golden

    from qwen_export.build import build
    from qwen_export.metrics import compare_logits
    from qwen_export.runtime.session import Session
    from qwen_export.tolerances import tolerance_for

    g = golden("tiny-qwen3.5-moe")
    n = g.greedy_tokens.shape[1]
    runs = {}
    for target in ("ort-cpu-int4", "ort-cpu-int4-kv16"):
        out = build(tmp_path / target, preset="tiny-qwen3.5-moe", target=target).out_dir
        forced = run_greedy(out / "model.onnx", g.greedy_prompt, n, forced=g.greedy_tokens)
        free = run_greedy(out / "model.onnx", g.greedy_prompt, n)
        runs[target] = (forced, free)
    (f32, free32), (f16, free16) = runs["ort-cpu-int4"], runs["ort-cpu-int4-kv16"]
    assert np.abs(f16[0] - f32[0]).max() < KV16_MAX_ABS  # prefill: the new rows are rounded to float16
    assert np.abs(f16[2] - f32[2]).max() < KV16_MAX_ABS  # decode over the float16 cache
    np.testing.assert_array_equal(free16[1], free32[1])
    # the runtime keeps the float16 cache as it is (no fp32 emulation), updates the states in place and
    # decodes the same tokens
    session = Session.load(tmp_path / "ort-cpu-int4-kv16")
    assert not session.backend.emulated
    assert session.generate([g.greedy_prompt[0].tolist()], n).tokens == [free32[1][0].tolist()]
    tol = tolerance_for("int4", random_weights=True)
    m = compare_logits(f16[2], g.greedy_logits)
    assert m["top1_agreement"] >= tol["top1_min"] and m["kl_mean"] <= tol["kl_mean_max"], m
    assert m["max_abs"] <= tol["logits_max_abs"], m
