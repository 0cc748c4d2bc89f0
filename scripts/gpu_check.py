#!/usr/bin/env python3
"""GPU check of the plugin library (plugins/) against PyTorch references of the qwen ops (docs/ops.md).

The library is built on any machine, without a GPU (CMake: the Triton kernels compiled ahead of time for
sm_80 ... sm_120a and embedded, our loader, the launchers): `cmake -S plugins -B build/plugins && cmake
--build build/plugins`. On a CUDA machine with PyTorch (no TensorRT, no CuPy, no compiler needed) this
script loads that library with ctypes (the launchers are plain C functions), runs every op at fp16 and bf16
over the Qwen3.5-397B-A17B layer shapes and ragged prefill lengths, compares each output with the
reference (max |out - ref| / max |ref| within 1e-2), times the decode cases (achieved TB/s against the HBM
peak) and the prefill benchmark (TFLOP/s against the tensor-core peak), and writes a JSON report:

    python3 scripts/gpu_check.py --library build/plugins/libqwen_trt_plugins.so --out gpu_check.json

It finishes within 8 minutes on one H200. Each op runs in its own worker process, so a kernel fault (which
poisons a CUDA context) costs only that op's remaining cases; every case records its status. Without a GPU:

    python3 scripts/gpu_check.py --dry-run --library build/plugins/libqwen_trt_plugins.so
        every case at reduced shapes, through the same launchers, their launches recorded by the recording
        CUDA driver built beside the library and replayed under Triton's interpreter
        (qwen_export.plugins.launch_replay: this mode alone needs the repository's environment)
    python3 scripts/gpu_check.py --cpu-reference-only         # references at tiny shapes on CPU
    python3 scripts/gpu_check.py --check-abi libqwen.so        # ctypes mirrors vs the library's structs

Needs only torch otherwise: it must not import qwen_export, whose pins the GPU image lacks. It reads the op
table (passes/op_table.py, standard library only) by file path, and generates its ctypes mirrors of the
launch parameter structs and its op list from it.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
TOLERANCE = 1e-2
HBM_PEAK_TBPS = 4.8  # H200 HBM3e
BF16_PEAK_TFLOPS = 990.0  # H200 dense bf16 tensor cores (datasheet)
TARGETS = {
    "moe_decode_hbm_fraction": 0.60,
    "deltanet_decode_hbm_fraction": 0.60,
    "attention_prefill_peak_fraction": 0.40,
}
TIME_BUDGET_S = 7 * 60  # the whole run must end within 8 minutes


def _load_op_table():
    """passes/op_table.py, loaded by path: qwen_export is not installed on the GPU machine."""
    path = ROOT / "passes" / "op_table.py"
    spec = importlib.util.spec_from_file_location("qwen_op_table", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


OP_TABLE = _load_op_table().OP_TABLE  # qwen op name -> OpSpec
OPS = [op.folder for op in OP_TABLE.values()]  # plugins/<folder>/: rms_norm, ..., moe
DTYPE_CODE = {"fp16": 0, "bf16": 1}

# Qwen3.5-397B-A17B layer shapes. The shared-expert width is not in the design brief; 1024 (= the routed
# expert width) is assumed.
BIG = dict(
    hidden=4096, heads=32, kv_heads=2, head_dim=256, rotary=64,
    k_heads=16, v_heads=64, kdim=128, vdim=128, conv=4,
    experts=512, top_k=10, inter=1024, shared_inter=1024,
    norm_rows=4000, deltanet_rows=1000,
)  # fmt: skip
TINY = dict(
    hidden=64, heads=4, kv_heads=2, head_dim=32, rotary=8,
    k_heads=1, v_heads=2, kdim=128, vdim=128, conv=4,
    experts=8, top_k=2, inter=32, shared_inter=32,
)  # fmt: skip
RAGGED = [1, 7, 63, 64, 65, 200, 1000]
# --dry-run stands these in for BIG: small enough for CPU references, big enough for every code path.
DRY_SHAPES = dict(
    hidden=64,
    heads=8,
    kv_heads=2,
    head_dim=32,
    rotary=8,
    k_heads=1,
    v_heads=2,
    kdim=128,  # the delta-rule kernels are compiled for head dims 128 (Qwen3.5 / Qwen3-Next)
    vdim=128,
    conv=4,
    experts=16,
    top_k=4,
    inter=32,
    shared_inter=48,
    # the norms' launch code is the same at any row count; the interpreter runs each row as Python
    norm_rows=40,
    deltanet_rows=20,
)


# ---- ctypes mirrors of the launch parameter structs (plugins/<op>/<op>_launch.h) ---------------------------
# Generated from the op table (see Launch in passes/op_table.py for the layout); tests/test_op_table.py
# proves them equal to the C structs, field by field, and --check-abi compares sizes with a built library.
P, I64, I32, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
CTYPES = {"int64_t": I64, "int32_t": I32, "float": F32}


def ctypes_type(c_type: str):
    """The ctypes type of a struct field's C type (every pointer is passed as c_void_p)."""
    return P if c_type.endswith("*") else CTYPES[c_type]


def params_struct(op) -> type:
    """The ctypes mirror of `op`'s Qwen<Op>Params."""
    fields = [(name, ctypes_type(c_type)) for name, c_type in op.params_fields]
    return type(op.params_struct, (ctypes.Structure,), {"_fields_": fields})


STRUCTS = {name: params_struct(op) for name, op in OP_TABLE.items()}


def make_params(name: str, ins, outs, sizes: dict, attrs: dict, dtype: str, **knobs):
    """Qwen<name>Params: the tensors' pointers (inputs, outputs in the op's order; None -> NULL), the
    problem sizes and test knobs by their C names, the op's attributes by their ONNX names."""
    op = OP_TABLE[name]
    if len(ins) != len(op.inputs) or len(outs) != len(op.outputs):
        raise ValueError(f"{name} takes {len(op.inputs)} inputs / {len(op.outputs)} outputs")
    if set(sizes) != set(op.launch.sizes) or not set(knobs) <= set(op.launch.knobs):
        raise ValueError(f"{name} takes sizes {op.launch.sizes} and knobs {op.launch.knobs}")
    params = STRUCTS[name]()
    for port, tensor in zip((*op.inputs, *op.outputs), (*ins, *outs), strict=True):
        setattr(params, port.c_field, ptr(tensor))
    for size, value in sizes.items():
        setattr(params, size, int(value))
    for attribute in op.attributes:
        setattr(params, attribute.c_field, attrs[attribute.name])
    params.dtype = DTYPE_CODE[dtype]
    for knob, value in knobs.items():
        setattr(params, knob, int(value))
    return params


def load_library(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.qwenLastError.restype = ctypes.c_char_p
    for name, op in OP_TABLE.items():
        getattr(lib, f"qwen{name}ParamsSize").restype = ctypes.c_int64
        getattr(lib, f"qwenLaunch{name}").restype = ctypes.c_int
        getattr(lib, f"qwenLaunch{name}").argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        if op.launch.workspace:
            getattr(lib, f"qwen{name}WorkspaceSize").restype = ctypes.c_int64
            getattr(lib, f"qwen{name}WorkspaceSize").argtypes = [ctypes.c_void_p]
    return lib


def check_abi(lib: ctypes.CDLL) -> dict[str, list[int]]:
    """The ctypes mirrors have the library's struct sizes (a mismatch would scramble every launch)."""
    sizes = {
        name: [ctypes.sizeof(s), int(getattr(lib, f"qwen{name}ParamsSize")())] for name, s in STRUCTS.items()
    }
    bad = {n: s for n, s in sizes.items() if s[0] != s[1]}
    if bad:
        raise RuntimeError(f"ctypes mirrors differ from the library's structs (mirror, library): {bad}")
    return sizes


# ---- the library ------------------------------------------------------------------------------------------
DEFAULT_LIBRARY = ROOT / "build" / "plugins" / "libqwen_trt_plugins.so"
RECORDING_DRIVER = "libqwen_recording_driver.so"  # built beside the library (QWEN_PLUGINS_BUILD_TESTS)
BUILD_HINT = "build it with: cmake -S plugins -B build/plugins && cmake --build build/plugins -j"


def library_problem(path: Path) -> str | None:
    """Why `path` cannot be used as the plugin library (None: it can)."""
    if not path.is_file():
        return f"no plugin library at {path}: {BUILD_HINT}"
    return None


def embedded_kernels(lib: ctypes.CDLL) -> list[dict[str, str]]:
    """The Triton kernel images the library embeds (kernel, variant, sm)."""
    lib.qwenKernelCount.restype = ctypes.c_int64
    kernel, variant, sm, cubin = ctypes.c_char_p(), ctypes.c_char_p(), ctypes.c_char_p(), ctypes.c_void_p()
    images = []
    for i in range(lib.qwenKernelCount()):
        if lib.qwenKernelAt(ctypes.c_int64(i), *map(ctypes.byref, (kernel, variant, sm, cubin))) == 0:
            images.append(
                {"kernel": kernel.value.decode(), "variant": variant.value.decode(), "sm": sm.value.decode()}
            )
    return images


# ---- references (docs/ops.md), fp32 compute on the rounded 16-bit inputs ----------------------------------
def _torch():
    import torch

    return torch


def rms(x, scale, eps):
    torch = _torch()
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale.float()


def ref_rms_norm(x, scale, eps):
    return rms(x, scale, eps)


def ref_gated_rms_norm(x, z, scale, eps):
    torch = _torch()
    return rms(x, scale, eps) * torch.nn.functional.silu(z.float())


def rope(x, cos, sin, rot):
    """x [B, T, heads, hd]; cos/sin [B, T, rot]; x*cos + rotate_half(x)*sin on the first rot channels."""
    torch = _torch()
    r, rest = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat([-r[..., half:], r[..., :half]], -1)
    return torch.cat([r * cos[:, :, None] + rotated * sin[:, :, None], rest], -1)


def ref_gated_attention(ins, a, act):
    """Returns (Y, present_key, present_value); rounds to the activation dtype where the model does."""
    torch = _torch()
    x, mask, cos, sin, pk, pv, qw, kw, vw, ow, qn, kn = ins
    nh, kv, hd, rot = a["num_heads"], a["num_kv_heads"], a["head_dim"], a["rotary_dim"]
    b, t, _ = x.shape
    p = pk.shape[2]
    s = p + t
    xf = x.float()
    qg = (xf @ qw.float()).view(b, t, nh, 2 * hd)
    q, gate = qg[..., :hd], qg[..., hd:].reshape(b, t, nh * hd)
    q = rope(rms(q, qn, a["epsilon"]), cos.float(), sin.float(), rot).to(act).float()
    k = rope(rms((xf @ kw.float()).view(b, t, kv, hd), kn, a["epsilon"]), cos.float(), sin.float(), rot)
    k = k.to(act).float()
    v = (xf @ vw.float()).view(b, t, kv, hd).to(act).float()
    present_k = torch.cat([pk.float(), k.transpose(1, 2)], 2)
    present_v = torch.cat([pv.float(), v.transpose(1, 2)], 2)
    kk = present_k.repeat_interleave(nh // kv, 1)
    vv = present_v.repeat_interleave(nh // kv, 1)
    scores = torch.einsum("bthd,bhsd->bhts", q, kk) * a["scale"]
    pos = torch.arange(s, device=x.device)
    visible = (pos[None, :] <= p + torch.arange(t, device=x.device)[:, None])[None, None]
    visible = visible & (mask[:, None, None, :] != 0)
    scores = torch.where(visible, scores, torch.finfo(torch.float32).min)
    out = torch.einsum("bhts,bhsd->bthd", torch.softmax(scores, -1), vv).reshape(b, t, nh * hd)
    attn = (out * torch.sigmoid(gate)).to(act).float()
    return attn @ ow.float(), present_k, present_v


def ref_gated_deltanet(ins, a, act):
    """Returns (Y, present_conv, present_recurrent): token-by-token recurrence in fp32."""
    torch = _torch()
    F = torch.nn.functional
    x, mask, pconv, prec, qkvw, zw, bw, aw, convw, nega, dtb, normw, outw = ins
    nk, nv, dk, dv, kk = (
        a["num_k_heads"],
        a["num_v_heads"],
        a["head_k_dim"],
        a["head_v_dim"],
        a["conv_kernel"],
    )
    b, t, _ = x.shape
    xf = x.float() * mask[:, -t:, None].float()
    mixed, z = xf @ qkvw.float(), (xf @ zw.float()).view(b, t, nv, dv)
    beta, av = torch.sigmoid(xf @ bw.float()), xf @ aw.float()
    window = torch.cat([pconv.float(), mixed.transpose(1, 2)], 2)
    present_conv = window[:, :, -(kk - 1) :]
    conv = F.silu(F.conv1d(window, convw.float(), groups=window.shape[1])).transpose(1, 2)
    kd = nk * dk
    q = conv[..., :kd].reshape(b, t, nk, dk)
    k = conv[..., kd : 2 * kd].reshape(b, t, nk, dk)
    q = q * torch.rsqrt(q.pow(2).sum(-1, keepdim=True) + 1e-6)
    k = k * torch.rsqrt(k.pow(2).sum(-1, keepdim=True) + 1e-6)
    v = conv[..., 2 * kd :].reshape(b, t, nv, dv)
    heads = torch.arange(nv, device=x.device) // (nv // nk)
    q, k = q[:, :, heads] / math.sqrt(dk), k[:, :, heads]
    g = nega.float() * F.softplus(av + dtb.float())
    state = prec.float().clone()
    core = torch.empty(b, t, nv, dv, device=x.device)
    for i in range(t):
        state = state * torch.exp(g[:, i])[:, :, None, None]
        kv_mem = torch.einsum("bhk,bhkv->bhv", k[:, i], state)
        delta = (v[:, i] - kv_mem) * beta[:, i][:, :, None]
        state = state + k[:, i][..., None] * delta[:, :, None, :]
        core[:, i] = torch.einsum("bhk,bhkv->bhv", q[:, i], state)
    normed = (rms(core, normw, a["epsilon"]) * F.silu(z)).reshape(b, t, nv * dv).to(act).float()
    return normed @ outw.float(), present_conv, state


def ref_moe(ins, a, act):
    """Returns (Y, near_tie_tokens): tokens whose k-th and (k+1)-th router probabilities almost tie may
    legitimately route differently under another summation order; they are excluded from the error."""
    torch = _torch()
    F = torch.nn.functional
    x, router, gate_up, down, sg, su, sd, seg = ins
    k, inter = a["top_k"], down.shape[1]
    shape = x.shape
    xf = x.reshape(-1, shape[-1]).float()
    probs = torch.softmax(xf @ router.float(), -1)
    top = torch.topk(probs, min(k + 1, probs.shape[-1]), -1)
    w, idx = top.values[:, :k], top.indices[:, :k]
    near_tie = torch.zeros(xf.shape[0], dtype=torch.bool, device=x.device)
    if top.values.shape[1] > k:
        near_tie = (top.values[:, k - 1] - top.values[:, k]) < 1e-4 * top.values[:, k - 1]
    if a["normalize"]:
        w = w / w.sum(-1, keepdim=True)
    out = torch.zeros_like(xf)
    for e in idx.unique().tolist():
        rows, slots = torch.nonzero(idx == e, as_tuple=True)
        gu = xf[rows] @ gate_up[e].float()
        act_e = (F.silu(gu[:, :inter]) * gu[:, inter:]).to(act).float()
        out.index_add_(0, rows, (act_e @ down[e].float()) * w[rows, slots, None])
    act_s = (F.silu(xf @ sg.float()) * (xf @ su.float())).to(act).float()
    out += (act_s @ sd.float()) * torch.sigmoid(xf @ seg.float())
    return out.reshape(shape), near_tie


def rel_error(out, ref, rows_mask=None) -> float:
    """max |out - ref| / max |ref| (over the rows kept by rows_mask, if given)."""
    out, ref = out.float(), ref.float()
    if rows_mask is not None:
        keep = ~rows_mask
        out, ref = out.reshape(keep.shape[0], -1)[keep], ref.reshape(keep.shape[0], -1)[keep]
    if ref.numel() == 0:
        return 0.0
    scale = ref.abs().max().item()
    return (out - ref).abs().max().item() / max(scale, 1e-12)


# ---- inputs -------------------------------------------------------------------------------------------
def randn(shape, dtype, device, std=1.0, gen=None):
    torch = _torch()
    return (torch.randn(shape, device=device, generator=gen) * std).to(dtype)


def attention_inputs(s, batch, tokens, past, dtype, device, pad=0, gen=None):
    torch = _torch()
    h, nh, kv, hd, rot = s["hidden"], s["heads"], s["kv_heads"], s["head_dim"], s["rotary"]
    total = past + tokens
    mask = torch.ones(batch, total, dtype=torch.int32, device=device)
    if pad:
        mask[-1, :pad] = 0  # left padding of the last sequence (may cover whole rows: no visible key)
    pos = torch.arange(past, total, device=device, dtype=torch.float32)
    inv = 1.0 / (10000.0 ** (torch.arange(0, rot, 2, device=device, dtype=torch.float32) / rot))
    freqs = torch.outer(pos, inv)
    emb = torch.cat([freqs, freqs], -1)[None].expand(batch, tokens, rot).contiguous()
    ins = [
        randn((batch, tokens, h), dtype, device, gen=gen),
        mask,
        emb.cos(),
        emb.sin(),
        randn((batch, kv, past, hd), dtype, device, gen=gen),
        randn((batch, kv, past, hd), dtype, device, gen=gen),
        randn((h, nh * 2 * hd), dtype, device, h**-0.5, gen),
        randn((h, kv * hd), dtype, device, h**-0.5, gen),
        randn((h, kv * hd), dtype, device, h**-0.5, gen),
        randn((nh * hd, h), dtype, device, (nh * hd) ** -0.5, gen),
        1.0 + 0.1 * torch.randn(hd, device=device, generator=gen),
        1.0 + 0.1 * torch.randn(hd, device=device, generator=gen),
    ]
    attrs = dict(num_heads=nh, num_kv_heads=kv, head_dim=hd, rotary_dim=rot, epsilon=1e-6, scale=hd**-0.5)
    return ins, attrs


def deltanet_inputs(s, batch, tokens, dtype, device, pad=0, gen=None):
    torch = _torch()
    h, nk, nv, dk, dv, kk = s["hidden"], s["k_heads"], s["v_heads"], s["kdim"], s["vdim"], s["conv"]
    c = 2 * nk * dk + nv * dv
    mask = torch.ones(batch, tokens + 3, dtype=torch.int32, device=device)
    if pad:
        mask[-1, : 3 + pad] = 0
    dt = torch.exp(
        torch.rand(nv, device=device, generator=gen) * (math.log(0.1) - math.log(0.001)) + math.log(0.001)
    )
    ins = [
        randn((batch, tokens, h), dtype, device, gen=gen),
        mask,
        randn((batch, c, kk - 1), dtype, device, gen=gen),
        0.1 * torch.randn(batch, nv, dk, dv, device=device, generator=gen),
        randn((h, c), dtype, device, h**-0.5, gen),
        randn((h, nv * dv), dtype, device, h**-0.5, gen),
        randn((h, nv), dtype, device, h**-0.5, gen),
        randn((h, nv), dtype, device, h**-0.5, gen),
        randn((c, 1, kk), dtype, device, 0.5, gen),
        -(torch.rand(nv, device=device, generator=gen) * 15.0 + 1.0),
        dt + torch.log(-torch.expm1(-dt)),
        1.0 + 0.1 * torch.randn(dv, device=device, generator=gen),
        randn((nv * dv, h), dtype, device, (nv * dv) ** -0.5, gen),
    ]
    if pad:  # a padded row is a first prefill: its states are zero (where padding is the same whether
        # transformers zeroes the padding tokens or the kernels skip them)
        ins[2][-1].zero_()
        ins[3][-1].zero_()
    attrs = dict(num_k_heads=nk, num_v_heads=nv, head_k_dim=dk, head_v_dim=dv, conv_kernel=kk, epsilon=1e-6)
    return ins, attrs


def moe_inputs(s, tokens, dtype, device, gen=None, weights=None):
    h, e, i, si = s["hidden"], s["experts"], s["inter"], s["shared_inter"]
    if weights is None:
        weights = [
            randn((h, e), dtype, device, 2.0 * h**-0.5, gen),
            randn((e, h, 2 * i), dtype, device, h**-0.5, gen),
            randn((e, i, h), dtype, device, i**-0.5, gen),
            randn((h, si), dtype, device, h**-0.5, gen),
            randn((h, si), dtype, device, h**-0.5, gen),
            randn((si, h), dtype, device, si**-0.5, gen),
            randn((h, 1), dtype, device, h**-0.5, gen),
        ]
    ins = [randn((tokens, h), dtype, device, gen=gen), *weights]
    return ins, dict(top_k=s["top_k"], normalize=1), weights


# ---- launches -------------------------------------------------------------------------------------------
def ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


class Runner:
    """Drives the library's launchers on `device`. With `replay` (a qwen_export LaunchReplay, --dry-run) the
    buffers are CPU tensors and each launch's recorded kernels are replayed under Triton's interpreter."""

    def __init__(self, lib, device: str = "cuda", replay=None):
        self.lib = lib
        torch = _torch()
        self.torch = torch
        self.device = device
        self.replay = replay
        self.interpret = True  # dry run: False checks the recorded launches without interpreting them
        self.stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream if replay is None else None)

    def _launch(self, name: str, params, tensors) -> None:
        status = getattr(self.lib, f"qwenLaunch{name}")(ctypes.byref(params), self.stream)
        if status != 0:
            raise RuntimeError(f"qwenLaunch{name} returned {status}: {self.lib.qwenLastError().decode()}")
        if self.replay is not None:
            self.replay.replay([t for t in tensors if t is not None], run=self.interpret)

    def _workspace(self, name: str, params):
        size = int(getattr(self.lib, f"qwen{name}WorkspaceSize")(ctypes.byref(params)))
        ws = self.torch.empty(max(size, 256), dtype=self.torch.uint8, device=self.device)
        params.workspace = ptr(ws)
        return ws

    def rms_norm(self, x, scale, eps, dtype):
        y = self.torch.empty_like(x)
        sizes = dict(rows=x.numel() // x.shape[-1], dim=x.shape[-1])
        p = make_params("RMSNorm", (x, scale), (y,), sizes, dict(epsilon=eps), dtype)
        return (lambda: self._launch("RMSNorm", p, (x, scale, y))), (y,)

    def gated_rms_norm(self, x, z, scale, eps, dtype):
        y = self.torch.empty_like(x)
        sizes = dict(rows=x.numel() // x.shape[-1], dim=x.shape[-1])
        p = make_params("GatedRMSNorm", (x, z, scale), (y,), sizes, dict(epsilon=eps), dtype)
        return (lambda: self._launch("GatedRMSNorm", p, (x, z, scale, y))), (y,)

    def gated_attention(self, ins, a, dtype, kv_splits=0):
        torch = self.torch
        x, pk = ins[0], ins[4]
        b, t, h = x.shape
        past = pk.shape[2]
        y = torch.empty_like(x)
        shape = (b, a["num_kv_heads"], past + t, a["head_dim"])
        pres_k = torch.empty(shape, dtype=x.dtype, device=self.device)
        pres_v = torch.empty_like(pres_k)
        sizes = dict(batch=b, tokens=t, past=past, hidden=h)
        p = make_params("GatedAttention", ins, (y, pres_k, pres_v), sizes, a, dtype, kvSplits=kv_splits)
        ws = self._workspace("GatedAttention", p)
        tensors = (*ins, y, pres_k, pres_v, ws)
        return (lambda: self._launch("GatedAttention", p, tensors)), (y, pres_k, pres_v)

    def gated_deltanet(self, ins, a, dtype, mode=0, in_place=False):
        torch = self.torch
        x, mask, pconv, prec = ins[0], ins[1], ins[2], ins[3]
        b, t, h = x.shape
        y = torch.empty_like(x)
        conv_out = pconv.clone() if in_place else torch.empty_like(pconv)
        rec_out = prec.clone() if in_place else torch.empty_like(prec)
        args = list(ins)
        if in_place:  # the state outputs alias their inputs, as TensorRT's aliased plugin I/O does
            args[2], args[3] = conv_out, rec_out
        sizes = dict(batch=b, tokens=t, maskLen=mask.shape[1], hidden=h)
        p = make_params("GatedDeltaNet", args, (y, conv_out, rec_out), sizes, a, dtype, ruleMode=mode)
        ws = self._workspace("GatedDeltaNet", p)
        tensors = (*args, y, conv_out, rec_out, ws)
        if in_place:
            saved = (pconv.clone(), prec.clone())

            def run():  # re-seed the aliased state so every timed launch starts from the same past
                conv_out.copy_(saved[0])
                rec_out.copy_(saved[1])
                self._launch("GatedDeltaNet", p, tensors)

            return run, (y, conv_out, rec_out)
        return (lambda: self._launch("GatedDeltaNet", p, tensors)), (y, conv_out, rec_out)

    def moe(self, ins, a, dtype, force_tiled=0):
        x = ins[0]
        y = self.torch.empty_like(x)
        e, i, h = ins[3].shape
        sizes = dict(
            tokens=x.numel() // x.shape[-1],
            hidden=x.shape[-1],
            experts=e,
            inter=i,
            sharedInter=ins[4].shape[1],
        )
        p = make_params("MoE", ins, (y,), sizes, a, dtype, forceTiled=force_tiled)
        ws = self._workspace("MoE", p)
        return (lambda: self._launch("MoE", p, (*ins, y, ws))), (y,)


DRY_RUN = False  # --dry-run: on CPU, the launches replayed under Triton's interpreter


def sync() -> None:
    if not DRY_RUN:
        _torch().cuda.synchronize()


def dry_run(out: Path, lib_path: Path, ops: list[str]) -> int:
    """Every case list, metric and the report assembly, on CPU at reduced shapes (BIG -> DRY_SHAPES), through
    the library's launchers: the recording driver beside it records their launches, and
    qwen_export.plugins.launch_replay replays them under Triton's interpreter (so this mode needs the
    repository's environment; the GPU run does not). A timing-only case's launches are checked, not
    interpreted: nothing compares their results."""
    global DRY_RUN, BIG
    import importlib

    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    import torch

    driver = lib_path.parent / RECORDING_DRIVER
    for problem in (library_problem(lib_path), None if driver.is_file() else f"no {driver}: {BUILD_HINT}"):
        if problem:
            print(problem)
            return 2
    # Imported by name: the GPU machine has no qwen_export, and only this mode needs it.
    replay = importlib.import_module("qwen_export.plugins.launch_replay").launch_replay(lib_path, driver)
    DRY_RUN, BIG = True, DRY_SHAPES
    report = {"mode": "dry-run", "library": str(lib_path), "cases": []}
    runner = Runner(load_library(lib_path), device="cpu", replay=replay)
    for op in ops:
        gen = torch.Generator().manual_seed(1234)
        started = time.monotonic()
        try:
            with torch.no_grad():
                # fp16: the interpreter converts fp32 -> bf16 by truncation where a GPU rounds to nearest,
                # which doubles bf16's error against the 1e-2 bound; the launch code is the same for both
                # (bf16 is replayed against the references by tests/test_plugin_launch_*.py).
                report["cases"].extend(CASES[op](runner, "fp16", "cpu", gen))
        except Exception:
            report["cases"].append({"op": op, "status": "error", "error": traceback.format_exc()[-4000:]})
        print(f"{op}: {time.monotonic() - started:.0f}s", flush=True)
    statuses = [c["status"] for c in report["cases"]]
    report["summary"] = {st: statuses.count(st) for st in sorted(set(statuses))}
    report["benchmarks"] = summarize_benchmarks(report["cases"])
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["summary"]))
    return 0 if set(statuses) <= {"ok"} else 1


def time_ms(run, min_iters=5, max_iters=50, budget_s=0.5) -> float:
    torch = _torch()
    if DRY_RUN:  # the case ran once already; an interpreter's time means nothing
        return float("nan")
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    iters, elapsed = 0, 0.0
    start.record()
    wall = time.monotonic()
    while iters < max_iters and (iters < min_iters or time.monotonic() - wall < budget_s):
        run()
        iters += 1
    end.record()
    end.synchronize()
    elapsed = start.elapsed_time(end)
    return elapsed / iters


# ---- cases ----------------------------------------------------------------------------------------------
def case_result(op, name, dtype, shapes, errors, extra=None):
    worst = max(errors.values()) if errors else 0.0
    result = {
        "op": op,
        "case": name,
        "dtype": dtype,
        "shapes": shapes,
        "errors": errors,
        "max_rel_error": worst,
        "tolerance": TOLERANCE,
        "status": "ok" if worst <= TOLERANCE else "fail",
    }
    result.update(extra or {})
    return result


def attention_bytes(ins, past):
    x = ins[0]
    b, t, _ = x.shape
    weights = sum(ins[i].numel() for i in (6, 7, 8, 9)) * x.element_size()
    kv = ins[4]
    cache = 2 * b * kv.shape[1] * (past + t) * kv.shape[3] * x.element_size()  # present K and V read once
    return weights + cache


def attention_flops(ins, a, past):
    x = ins[0]
    b, t, h = x.shape
    nh, kv, hd = a["num_heads"], a["num_kv_heads"], a["head_dim"]
    proj = 2 * b * t * h * (nh * 2 * hd + 2 * kv * hd) + 2 * b * t * nh * hd * h
    visible_keys = t * past + t * (t + 1) / 2  # causal
    core = 4 * b * nh * hd * visible_keys
    return proj, core


def cases_rms_norm(runner, dtype, device, gen):
    torch = _torch()
    out = []
    prefill = (4, BIG["norm_rows"] // 4, 4096)
    for name, shape in [(f"hidden prefill {list(prefill)}", prefill), ("tiny odd [5,3,36]", (5, 3, 36))]:
        x = randn(shape, getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[dtype]), device, gen=gen)
        scale = 1.0 + 0.1 * torch.randn(shape[-1], device=device, generator=gen)
        run, (y,) = runner.rms_norm(x, scale, 1e-6, dtype)
        run()
        err = rel_error(y, ref_rms_norm(x, scale, 1e-6))
        out.append(case_result("rms_norm", name, dtype, [list(shape)], {"Y": err}))
    return out


def cases_gated_rms_norm(runner, dtype, device, gen):
    torch = _torch()
    out = []
    heads = (BIG["deltanet_rows"], 64, 128)
    for name, shape in [(f"deltanet heads {list(heads)}", heads), ("tiny odd [7,20]", (7, 20))]:
        tdt = getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[dtype])
        x, z = randn(shape, tdt, device, gen=gen), randn(shape, tdt, device, gen=gen)
        scale = 1.0 + 0.1 * torch.randn(shape[-1], device=device, generator=gen)
        run, (y,) = runner.gated_rms_norm(x, z, scale, 1e-6, dtype)
        run()
        err = rel_error(y, ref_gated_rms_norm(x, z, scale, 1e-6))
        out.append(case_result("gated_rms_norm", name, dtype, [list(shape)], {"Y": err}))
    return out


def attention_case_list():
    cases = [
        ("decode B=1 P=4096", BIG, 1, 1, 4096, 0, 0, "decode"),
        ("decode B=4 P=1000 left-padded", BIG, 4, 1, 1000, 37, 0, None),
        ("decode forced 4 KV splits", BIG, 1, 1, 300, 0, 4, None),
    ]
    cases += [(f"prefill T={t}", BIG, 1, t, 0, 0, 0, None) for t in RAGGED]
    cases += [
        ("prefill B=2 T=65 left-padded 20", BIG, 2, 65, 0, 20, 0, None),
        ("continue T=7 after P=300", BIG, 1, 7, 300, 0, 0, None),
        ("prefill bench B=2 T=2048", BIG, 2, 2048, 0, 0, 0, "prefill"),
        ("tiny hd=32 T=9 P=5 fully padded rows", TINY, 2, 9, 5, 8, 0, None),
        ("tiny hd=32 forced splits", TINY, 2, 3, 40, 0, 3, None),
    ]
    return cases


def cases_gated_attention(runner, dtype, device, gen):
    torch = _torch()
    tdt = getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[dtype])
    out = []
    for name, shapes, b, t, past, pad, splits, bench in attention_case_list():
        ins, a = attention_inputs(shapes, b, t, past, tdt, device, pad, gen)
        run, (y, pk, pv) = runner.gated_attention(ins, a, dtype, splits)
        # A dry run interprets the timing-only case's launches no further than their records (an
        # interpreted T=2048 prefill took 21 s; its kernels are interpreted and checked at T <= 1000)
        runner.interpret = not (DRY_RUN and bench == "prefill")
        run()
        sync()
        runner.interpret = True
        extra = {}
        if bench != "prefill":  # the reference's [B, heads, T, S] scores are too large for the bench shape
            ry, rk, rv = ref_gated_attention(ins, a, tdt)
            errors = {
                "Y": rel_error(y, ry),
                "present_key": rel_error(pk, rk),
                "present_value": rel_error(pv, rv),
            }
        else:
            errors = {}
            extra["checked"] = "timing only (the same kernels are checked at T <= 1000)"
        if bench:
            ms = time_ms(run)
            extra["time_ms"] = ms
            if bench == "decode":
                gbps = attention_bytes(ins, past) / ms / 1e6
                extra.update(bandwidth_tbps=gbps / 1e3, hbm_fraction=gbps / 1e3 / HBM_PEAK_TBPS)
            else:
                proj, core = attention_flops(ins, a, past)
                extra.update(
                    tflops=(proj + core) / ms / 1e9,
                    core_flops_fraction=core / (proj + core),
                    peak_fraction=(proj + core) / ms / 1e9 / BF16_PEAK_TFLOPS,
                )
        out.append(
            case_result(
                "gated_attention", name, dtype, [list(v.shape) for v in ins[:1]] + [[past]], errors, extra
            )
        )
        del ins, y, pk, pv
    return out


def deltanet_bytes(ins):
    x = ins[0]
    act = x.element_size()
    weights = sum(ins[i].numel() for i in (4, 5, 6, 7, 8, 12)) * act
    state = 2 * ins[3].numel() * 4 + 2 * ins[2].numel() * act
    return weights + state


def deltanet_flops(ins, a):
    x = ins[0]
    b, t, h = x.shape
    nv, dk, dv = a["num_v_heads"], a["head_k_dim"], a["head_v_dim"]
    proj = 2 * b * t * h * (ins[4].shape[1] + ins[5].shape[1] + 2 * nv) + 2 * b * t * nv * dv * h
    rule = 6 * b * t * nv * dk * dv
    return proj + rule


def cases_gated_deltanet(runner, dtype, device, gen):
    torch = _torch()
    tdt = getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[dtype])
    cases = [
        ("decode B=1 T=1", BIG, 1, 1, 0, 0, False, "decode"),
        ("decode B=8 T=1 in place", BIG, 8, 1, 0, 0, True, None),
    ]
    cases += [
        (f"prefill T={t}", BIG, 1, t, 0, 0, False, "prefill" if t == 1000 else None) for t in RAGGED[1:]
    ]
    cases += [
        ("T=7 chunked (forced)", BIG, 1, 7, 0, 2, False, None),
        ("T=65 recurrent (forced)", BIG, 1, 65, 0, 1, False, None),
        ("B=2 T=65 padded, states in place", BIG, 2, 65, 9, 0, True, None),
        ("tiny T=130 chunked", TINY, 2, 130, 5, 0, False, None),
        ("tiny T=3", TINY, 2, 3, 0, 0, False, None),
    ]
    out = []
    for name, shapes, b, t, pad, mode, in_place, bench in cases:
        ins, a = deltanet_inputs(shapes, b, t, tdt, device, pad, gen)
        run, (y, conv, rec) = runner.gated_deltanet(ins, a, dtype, mode, in_place)
        run()
        sync()
        ry, rconv, rrec = ref_gated_deltanet(ins, a, tdt)
        errors = {
            "Y": rel_error(y, ry),
            "present_conv": rel_error(conv, rconv),
            "present_recurrent": rel_error(rec, rrec),
        }
        extra = {"rule": {0: "auto", 1: "recurrent", 2: "chunked"}[mode], "in_place": in_place}
        if bench:
            ms = time_ms(run)
            extra["time_ms"] = ms
            if bench == "decode":
                tbps = deltanet_bytes(ins) / ms / 1e9
                extra.update(bandwidth_tbps=tbps, hbm_fraction=tbps / HBM_PEAK_TBPS)
            else:
                tflops = deltanet_flops(ins, a) / ms / 1e9
                extra.update(tflops=tflops, peak_fraction=tflops / BF16_PEAK_TFLOPS)
        out.append(case_result("gated_deltanet", name, dtype, [list(ins[0].shape)], errors, extra))
    return out


def moe_bytes(ins, a):
    torch = _torch()
    x, router = ins[0], ins[1]
    act = x.element_size()
    probs = torch.softmax(x.float() @ router.float(), -1)
    experts = torch.topk(probs, a["top_k"], -1).indices.unique().numel()
    per_expert = (ins[2][0].numel() + ins[3][0].numel()) * act
    return router.numel() * act + experts * per_expert + sum(ins[i].numel() for i in (4, 5, 6, 7)) * act


def moe_flops(ins, a):
    n, h = ins[0].shape
    e, i, _ = ins[3].shape
    si = ins[4].shape[1]
    return 2 * n * h * e + 2 * n * a["top_k"] * 3 * h * i + 2 * n * 3 * h * si


def cases_moe(runner, dtype, device, gen):
    torch = _torch()
    tdt = getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[dtype])
    cases = [
        ("decode 1 token", BIG, 1, 0, "decode"),
        ("decode 4 tokens", BIG, 4, 0, None),
        ("7 tokens, tensor-core path (forced)", BIG, 7, 1, None),
    ]
    cases += [(f"prefill {n} tokens", BIG, n, 0, "prefill" if n == 1000 else None) for n in RAGGED[1:]]
    cases += [("tiny 8 experts top-2, 33 tokens", TINY, 33, 0, None), ("tiny tiled", TINY, 100, 1, None)]
    out = []
    weights = {}
    for name, shapes, tokens, tiled, bench in cases:
        key = id(shapes)
        ins, a, weights[key] = moe_inputs(shapes, tokens, tdt, device, gen, weights.get(key))
        run, (y,) = runner.moe(ins, a, dtype, tiled)
        run()
        sync()
        ry, near_tie = ref_moe(ins, a, tdt)
        extra = {"near_tie_tokens_excluded": int(near_tie.sum().item()), "tiled": bool(tiled)}
        errors = {"Y": rel_error(y, ry, near_tie)}
        if bench:
            ms = time_ms(run)
            extra["time_ms"] = ms
            if bench == "decode":
                tbps = moe_bytes(ins, a) / ms / 1e9
                extra.update(bandwidth_tbps=tbps, hbm_fraction=tbps / HBM_PEAK_TBPS)
            else:
                tflops = moe_flops(ins, a) / ms / 1e9
                extra.update(tflops=tflops, peak_fraction=tflops / BF16_PEAK_TFLOPS)
        out.append(case_result("moe", name, dtype, [list(ins[0].shape), list(ins[2].shape)], errors, extra))
    return out


CASES = {
    "rms_norm": cases_rms_norm,
    "gated_rms_norm": cases_gated_rms_norm,
    "gated_attention": cases_gated_attention,
    "gated_deltanet": cases_gated_deltanet,
    "moe": cases_moe,
}


def worker(op: str, lib_path: Path, out_path: Path, deadline: float) -> int:
    """Runs one op's cases (both dtypes) in this process; appends each result to out_path as a JSON line."""
    torch = _torch()
    lib = load_library(lib_path)
    check_abi(lib)
    runner = Runner(lib)
    device = "cuda"
    for dtype in ["bf16", "fp16"]:
        if time.time() > deadline:
            _append(out_path, {"op": op, "dtype": dtype, "status": "skipped", "reason": "time budget"})
            continue
        gen = torch.Generator(device=device).manual_seed(1234)
        try:
            with torch.no_grad():
                results = CASES[op](runner, dtype, device, gen)
            for r in results:
                _append(out_path, r)
        except Exception:
            _append(
                out_path,
                {"op": op, "dtype": dtype, "status": "error", "error": traceback.format_exc()[-4000:]},
            )
        torch.cuda.empty_cache()
    return 0


def _append(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


# ---- CPU reference self-check (no GPU) -----------------------------------------------------------------
def cpu_reference_only() -> dict:
    """Runs every reference on CPU at tiny shapes in fp32 and cross-checks the ones that have a second
    formulation (the DeltaNet recurrence against a chunked evaluation; attention against an explicit loop)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    report = {}
    f32 = torch.float32
    for op, fn in {
        "rms_norm": lambda: ref_rms_norm(torch.randn(3, 5, 16, generator=gen), torch.ones(16), 1e-6),
        "gated_rms_norm": lambda: ref_gated_rms_norm(
            torch.randn(3, 16, generator=gen), torch.randn(3, 16, generator=gen), torch.ones(16), 1e-6
        ),
    }.items():
        y = fn()
        report[op] = {"status": "ok" if torch.isfinite(y).all() else "fail", "shape": list(y.shape)}

    ins, a = attention_inputs(TINY, 2, 9, 5, f32, "cpu", pad=8, gen=gen)
    y, pk, pv = ref_gated_attention(ins, a, f32)
    # fully padded rows of the last sequence (token 0..2 see only padded keys) average V over all keys
    b, t = 1, 0
    mean_v = pv[b].repeat_interleave(2, 0).mean(1)  # [heads, hd]
    x = ins[0].float()
    gate = (x @ ins[6].float()).view(2, 9, 4, 64)[b, t, :, 32:]
    expected = ((mean_v * torch.sigmoid(gate)).reshape(-1)) @ ins[9].float()
    report["gated_attention"] = {
        "status": "ok"
        if torch.allclose(y[b, t], expected, atol=1e-4) and torch.isfinite(y).all()
        else "fail",
        "fully_masked_row_is_mean_of_v": bool(torch.allclose(y[b, t], expected, atol=1e-4)),
        "present_shape": list(pk.shape),
    }

    ins, a = deltanet_inputs(TINY, 2, 70, f32, "cpu", pad=4, gen=gen)
    y, conv, state = ref_gated_deltanet(ins, a, f32)
    chunk_state, chunk_core = _chunked_delta_rule_check(ins, a)
    rec_core = _recurrent_core(ins, a)
    ok = torch.allclose(chunk_state, state, atol=1e-4) and torch.allclose(chunk_core, rec_core, atol=1e-4)
    report["gated_deltanet"] = {
        "status": "ok" if ok else "fail",
        "chunked_matches_recurrent": bool(ok),
        "state_shape": list(state.shape),
    }

    ins, a, _ = moe_inputs(TINY, 11, f32, "cpu", gen)
    y, near = ref_moe(ins, a, f32)
    dense = _dense_moe(ins, a)
    report["moe"] = {
        "status": "ok" if torch.allclose(y, dense, atol=1e-5) else "fail",
        "sparse_matches_dense": bool(torch.allclose(y, dense, atol=1e-5)),
    }
    return report


def _deltanet_prepared(ins, a):
    torch = _torch()
    F = torch.nn.functional
    x, mask, pconv, prec, qkvw, zw, bw, aw, convw, nega, dtb, normw, outw = ins
    nk, nv, dk, dv = a["num_k_heads"], a["num_v_heads"], a["head_k_dim"], a["head_v_dim"]
    b, t, _ = x.shape
    xf = x.float() * mask[:, -t:, None].float()
    window = torch.cat([pconv.float(), (xf @ qkvw.float()).transpose(1, 2)], 2)
    conv = F.silu(F.conv1d(window, convw.float(), groups=window.shape[1])).transpose(1, 2)
    kd = nk * dk
    q = conv[..., :kd].reshape(b, t, nk, dk)
    k = conv[..., kd : 2 * kd].reshape(b, t, nk, dk)
    q = q * torch.rsqrt(q.pow(2).sum(-1, keepdim=True) + 1e-6)
    k = k * torch.rsqrt(k.pow(2).sum(-1, keepdim=True) + 1e-6)
    heads = torch.arange(nv) // (nv // nk)
    q, k = q[:, :, heads] / math.sqrt(dk), k[:, :, heads]
    v = conv[..., 2 * kd :].reshape(b, t, nv, dv)
    beta = torch.sigmoid(xf @ bw.float())
    g = nega.float() * F.softplus(xf @ aw.float() + dtb.float())
    return q, k, v, beta, g, prec.float()


def _recurrent_core(ins, a):
    torch = _torch()
    q, k, v, beta, g, state = _deltanet_prepared(ins, a)
    out = torch.empty_like(v)
    for i in range(q.shape[1]):
        state = state * torch.exp(g[:, i])[:, :, None, None]
        delta = (v[:, i] - torch.einsum("bhk,bhkv->bhv", k[:, i], state)) * beta[:, i][:, :, None]
        state = state + k[:, i][..., None] * delta[:, :, None, :]
        out[:, i] = torch.einsum("bhk,bhkv->bhv", q[:, i], state)
    return out


def _chunked_delta_rule_check(ins, a, chunk=64):
    """The chunked evaluation the plugin uses (WY form, as in Hugging Face's torch_chunk_gated_delta_rule)."""
    torch = _torch()
    q, k, v, beta, g, state = _deltanet_prepared(ins, a)
    b, t, h, dk = q.shape
    pad = (chunk - t % chunk) % chunk
    q, k, v = [torch.nn.functional.pad(z, (0, 0, 0, 0, 0, pad)).transpose(1, 2) for z in (q, k, v)]
    beta, g = [torch.nn.functional.pad(z, (0, 0, 0, pad)).transpose(1, 2) for z in (beta, g)]
    n = q.shape[2] // chunk
    q, k, v = [z.reshape(b, h, n, chunk, -1) for z in (q, k, v)]
    beta, g = beta.reshape(b, h, n, chunk), g.reshape(b, h, n, chunk).cumsum(-1)
    lower = torch.tril(torch.ones(chunk, chunk, dtype=torch.bool))
    decay = torch.exp((g[..., :, None] - g[..., None, :]).masked_fill(~lower, 0)).masked_fill(~lower, 0)
    strict = torch.tril(torch.ones(chunk, chunk, dtype=torch.bool), -1)
    attn = -((k * beta[..., None]) @ k.transpose(-1, -2) * decay).masked_fill(~strict, 0)
    for i in range(1, chunk):
        row = attn[..., i, :i].clone()
        attn[..., i, :i] = row + (row[..., None] * attn[..., :i, :i]).sum(-2)
    attn = attn + torch.eye(chunk)
    u = attn @ (v * beta[..., None])
    w = attn @ (k * beta[..., None] * torch.exp(g)[..., None])
    out = torch.zeros_like(v)
    for c in range(n):
        aqk = (q[:, :, c] @ k[:, :, c].transpose(-1, -2) * decay[:, :, c]).masked_fill(~lower, 0)
        vn = u[:, :, c] - w[:, :, c] @ state
        out[:, :, c] = (q[:, :, c] * torch.exp(g[:, :, c])[..., None]) @ state + aqk @ vn
        last = g[:, :, c, -1]
        state = (
            state * torch.exp(last)[..., None, None]
            + (k[:, :, c] * torch.exp(last[..., None] - g[:, :, c])[..., None]).transpose(-1, -2) @ vn
        )
    out = out.reshape(b, h, n * chunk, -1)[:, :, :t].transpose(1, 2)
    return state, out


def _dense_moe(ins, a):
    """All experts computed, unselected ones weighted by zero (a second formulation of ref_moe)."""
    torch = _torch()
    F = torch.nn.functional
    x, router, gate_up, down, sg, su, sd, seg = [t.float() for t in ins]
    inter = down.shape[1]
    probs = torch.softmax(x @ router, -1)
    w, idx = torch.topk(probs, a["top_k"], -1)
    w = w / w.sum(-1, keepdim=True)
    weights = torch.zeros_like(probs).scatter(1, idx, w)
    gu = torch.einsum("nh,ehi->eni", x, gate_up)
    ye = torch.einsum("eni,eih->enh", F.silu(gu[..., :inter]) * gu[..., inter:], down)
    routed = torch.einsum("enh,ne->nh", ye, weights)
    return routed + (F.silu(x @ sg) * (x @ su)) @ sd * torch.sigmoid(x @ seg)


# ---- driver ---------------------------------------------------------------------------------------------
def run_all(out: Path, ops: list[str], lib: Path) -> int:
    import torch

    start = time.time()
    deadline = start + TIME_BUDGET_S
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "tolerance": TOLERANCE,
        "targets": TARGETS,
        "peaks": {"hbm_tbps": HBM_PEAK_TBPS, "bf16_tflops": BF16_PEAK_TFLOPS},
        "cases": [],
    }
    if not torch.cuda.is_available():
        report["status"] = "error: no CUDA device"
        out.write_text(json.dumps(report, indent=2))
        print(report["status"])
        return 2
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    report["device"] = {
        "name": torch.cuda.get_device_name(),
        "sm": arch,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "host": platform.node(),
    }
    work = Path(tempfile.mkdtemp(prefix="qwen_gpu_check_"))
    problem = library_problem(lib)
    try:
        if problem:
            raise RuntimeError(problem)
        images = embedded_kernels(load_library(lib))
        check_abi(load_library(lib))
        report["library"] = {
            "status": "ok", "path": str(lib), "kernel_images": len(images),
            "sms": sorted({i["sm"] for i in images}),
        }  # fmt: skip
    except Exception:
        report["library"] = {"status": "error", "error": problem or traceback.format_exc()[-4000:]}
        out.write_text(json.dumps(report, indent=2))
        print(f"cannot use the plugin library: {problem or 'see ' + str(out)}")
        return 2
    print(f"{lib}: {len(images)} kernel images for {', '.join(report['library']['sms'])}", flush=True)
    for op in ops:
        part = work / f"{op}.jsonl"
        remaining = deadline - time.time()
        if remaining <= 5:
            report["cases"].append({"op": op, "status": "skipped", "reason": "time budget"})
            continue
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            op,
            "--lib",
            str(lib),
            "--part",
            str(part),
            "--deadline",
            str(deadline),
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=remaining + 30)
            tail = (proc.stdout + proc.stderr)[-3000:]
            code = proc.returncode
        except subprocess.TimeoutExpired as e:
            tail, code = f"worker timed out: {str(e)[-500:]}", -1
        records = [json.loads(line) for line in part.read_text().splitlines()] if part.exists() else []
        report["cases"].extend(records)
        if code != 0:
            report["cases"].append({"op": op, "status": "error", "error": f"worker exit {code}: {tail}"})
        print(f"{op}: {len(records)} records, worker exit {code}", flush=True)
        out.write_text(json.dumps(report, indent=2))  # keep what is done if a later op hangs the machine
    statuses = [c["status"] for c in report["cases"]]
    report["summary"] = {s: statuses.count(s) for s in sorted(set(statuses))}
    report["benchmarks"] = summarize_benchmarks(report["cases"])
    report["seconds"] = round(time.time() - start, 1)
    report["status"] = "ok" if set(statuses) <= {"ok"} else "failures"
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps({"summary": report["summary"], "benchmarks": report["benchmarks"]}, indent=2))
    return 0 if report["status"] == "ok" else 1


def summarize_benchmarks(cases: list[dict]) -> dict:
    bench = {}
    for c in cases:
        key = f"{c.get('op')} {c.get('case')} {c.get('dtype')}"
        if "hbm_fraction" in c:
            bench[key] = {
                "time_ms": round(c["time_ms"], 4),
                "TB/s": round(c["bandwidth_tbps"], 3),
                "hbm_fraction": round(c["hbm_fraction"], 3),
            }
        elif "peak_fraction" in c:
            bench[key] = {
                "time_ms": round(c["time_ms"], 4),
                "TFLOP/s": round(c["tflops"], 1),
                "peak_fraction": round(c["peak_fraction"], 3),
            }
    return bench


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    parser.add_argument(
        "--library",
        type=Path,
        default=DEFAULT_LIBRARY,
        help=f"the plugin library (default {DEFAULT_LIBRARY})",
    )
    parser.add_argument(
        "--cpu-reference-only", action="store_true", help="no GPU: reference self-check on CPU"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="no GPU: every case through the launchers, replayed on the CPU"
    )
    parser.add_argument(
        "--check-abi", type=Path, help="compare the ctypes mirrors with this library's structs"
    )
    parser.add_argument("--worker", choices=OPS, help=argparse.SUPPRESS)
    parser.add_argument("--lib", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--part", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.lib, args.part, args.deadline)
    if args.check_abi:
        print(json.dumps(check_abi(load_library(args.check_abi.resolve()))))
        return 0
    if args.dry_run:
        return dry_run(args.out, args.library.resolve(), [o for o in args.ops.split(",") if o])
    if args.cpu_reference_only:
        report = cpu_reference_only()
        args.out.write_text(json.dumps({"mode": "cpu-reference-only", "ops": report}, indent=2))
        print(json.dumps(report, indent=2))
        return 0 if all(r["status"] == "ok" for r in report.values()) else 1
    ops = [o for o in args.ops.split(",") if o]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        parser.error(f"unknown ops {unknown}")
    return run_all(args.out.resolve(), ops, args.library.resolve())


if __name__ == "__main__":
    sys.exit(main())
