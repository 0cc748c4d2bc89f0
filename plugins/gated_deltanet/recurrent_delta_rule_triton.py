"""Gated delta rule, token by token (decode): docs/ops.md steps 4-6 fused in one kernel.

Per token: q, k = l2norm(q), l2norm(k) (fp32, eps 1e-6), q /= sqrt(DK); beta = sigmoid(b);
g = neg_exp_a * softplus(a + dt_bias); S = S * exp(g); S += k ⊗ (beta * (v - S^T k)); o = S^T q.
One program owns (batch row, value head, BV state columns) and keeps its [DK, BV] slice of the fp32
state in registers across the tokens (T is 1 for decode; a few draft tokens work the same), so
`state_out` may alias `state_in`.

Layouts (the conv output feeds this kernel directly):
- qkv [B, T, C] activations, token stride `stride_qkv`, C >= 2 nk DK + nv DV: q of key head h at
  columns h DK, k at nk DK + h DK, v of value head j at 2 nk DK + j DV. Value head j reads key head
  j // (nv / nk).
- a, b [B, T, nv] activations (token stride `stride_ab`); neg_exp_a = -exp(A_log) and dt_bias [nv] fp32.
- mask [B, mask_len] int32, token t is column mask_len - T + t; a 0 makes the token inert (no decay, no
  update, output 0): padding never changes the state.
- state_in / state_out [B, nv, DK, DV] fp32; `use_state` 0 starts from zeros (state_in is not read).
- out [B, T, nv, DV] activations.
"""

from __future__ import annotations

import triton
import triton.language as tl

from qwen_export.plugins.triton_support import KernelSpec, aligned16


@triton.jit
def gates(a, b, neg_exp_a, dt_bias, live):
    """(g, beta) in fp32 from the a and b projections; 0 and 0 for inert (padding) tokens."""
    x = a.to(tl.float32) + dt_bias
    softplus = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))
    g = tl.where(live, neg_exp_a * softplus, 0.0)
    beta = tl.where(live, 1.0 / (1.0 + tl.exp(-b.to(tl.float32))), 0.0)
    return g, beta


@triton.jit
def l2norm_rows(x, scale):
    """x * rsqrt(sum(x^2, last axis) + 1e-6) * scale, in fp32."""
    x = x.to(tl.float32)
    return x * (scale / tl.sqrt(tl.sum(x * x, axis=-1, keep_dims=True) + 1e-6))


@triton.jit
def head_offsets(nk, nv, hv, DK: tl.constexpr, DV: tl.constexpr):
    """Column offsets of q, k (key head of value head hv) and v in the conv output."""
    hk = hv // (nv // nk)
    return hk * DK, nk * DK + hk * DK, 2 * nk * DK + hv * DV


@triton.jit
def recurrent_delta_rule_kernel(
    qkv_ptr,
    a_ptr,
    b_ptr,
    neg_exp_a_ptr,
    dt_bias_ptr,
    mask_ptr,
    state_in_ptr,
    state_out_ptr,
    out_ptr,
    T,
    mask_len,
    nk,
    nv,
    stride_qkv,
    stride_ab,
    use_state,
    DK: tl.constexpr,
    DV: tl.constexpr,
    BV: tl.constexpr,
):
    pid_v = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // nv).to(tl.int64)
    hv = pid_bh % nv
    q_off, k_off, v_off = head_offsets(nk, nv, hv, DK, DV)
    dk = tl.arange(0, DK)
    dv = pid_v * BV + tl.arange(0, BV)
    scale: tl.constexpr = DK**-0.5
    neg_exp_a = tl.load(neg_exp_a_ptr + hv)
    dt_bias = tl.load(dt_bias_ptr + hv)

    state_at = (b * nv + hv) * DK * DV + dk[:, None] * DV + dv[None, :]
    state = tl.zeros([DK, BV], dtype=tl.float32)
    if use_state != 0:
        state = tl.load(state_in_ptr + state_at)

    at = qkv_ptr + b * T * stride_qkv  # token t's row (pointers advance per token)
    ab_at = b * T * stride_ab + hv
    m_at = mask_ptr + b * mask_len + (mask_len - T)
    out_at = out_ptr + (b * T * nv + hv) * DV
    for _ in range(T):
        live = tl.load(m_at) != 0
        q = l2norm_rows(tl.load(at + q_off + dk), scale)
        k = l2norm_rows(tl.load(at + k_off + dk), 1.0)
        v = tl.load(at + v_off + dv).to(tl.float32)
        g, beta = gates(tl.load(a_ptr + ab_at), tl.load(b_ptr + ab_at), neg_exp_a, dt_bias, live)
        new = state * tl.exp(g)
        delta = beta * (v - tl.sum(new * k[:, None], axis=0))
        new += k[:, None] * delta[None, :]
        state = tl.where(live, new, state)  # a padding token leaves the state as it was, bit for bit
        o = tl.where(live, tl.sum(state * q[:, None], axis=0), 0.0)
        tl.store(out_at + dv, o.to(out_ptr.dtype.element_ty))
        at += stride_qkv
        ab_at += stride_ab
        m_at += 1
        out_at += nv * DV

    tl.store(state_out_ptr + state_at, state)


SIGNATURE = {
    "qkv_ptr": "*{act}",
    "a_ptr": "*{act}",
    "b_ptr": "*{act}",
    "neg_exp_a_ptr": "*fp32",
    "dt_bias_ptr": "*fp32",
    "mask_ptr": "*i32",
    "state_in_ptr": "*fp32",
    "state_out_ptr": "*fp32",
    "out_ptr": "*{act}",
    "T": "i32",
    "mask_len": "i32",
    "nk": "i32",
    "nv": "i32",
    "stride_qkv": "i32",
    "stride_ab": "i32",
    "use_state": "i32",
    "DK": "constexpr",
    "DV": "constexpr",
    "BV": "constexpr",
}

# Arguments the launchers guarantee to be multiples of 16 (pointers: 16-byte aligned; integers: divisible),
# as Triton's JIT would find them at run time; the AOT build compiles these divisibility hints in (without
# them the chunk kernel's loads do not vectorise and it spills 5x more on sm_90a).
ALIGNED_16 = ("qkv_ptr", "a_ptr", "b_ptr", "neg_exp_a_ptr", "dt_bias_ptr", "mask_ptr", "state_in_ptr")
ALIGNED_16 += ("state_out_ptr", "out_ptr", "stride_qkv")

SPEC = KernelSpec(
    name="gated_deltanet.recurrent_delta_rule",
    kernel=recurrent_delta_rule_kernel,
    signature=aligned16(SIGNATURE, ALIGNED_16),
    constexprs={"DK": 128, "DV": 128, "BV": 32},
    num_warps=4,
    num_stages=1,
)


def device_sm(device) -> str:
    """The KernelSpec SM name (triton_support.SMS) whose configuration a launch on `device` uses: the
    GPU's own, or sm_90a (the H100/H200 build) on the CPU under the interpreter."""
    import torch

    from qwen_export.plugins.triton_support import SMS

    if torch.device(device).type != "cuda":
        return "sm_90a"
    major, minor = torch.cuda.get_device_capability(device)
    name = f"sm_{major}{minor}"
    return next((sm for sm in SMS if sm.rstrip("a") == name), "sm_90a" if major >= 9 else "sm_80")


def runtime_args(spec: KernelSpec, values: tuple) -> dict:
    """The kernel's non-constexpr arguments by name, in signature order."""
    names = [name for name, kind in spec.signature.items() if kind != "constexpr"]
    return dict(zip(names, values, strict=True))


def check_aligned(args: dict, names: tuple[str, ...] = ALIGNED_16) -> None:
    """Fail unless every argument in `names` is what ALIGNED_16 promises the compiled kernel."""
    for name in names:
        value = args[name]
        value = value.data_ptr() if hasattr(value, "data_ptr") else value
        assert value % 16 == 0, f"{name} is not a multiple of 16 ({value}): the kernels assume it is"


def launch_config(spec: KernelSpec, variant: str, device) -> tuple[dict, int, int]:
    """(constexprs, num_warps, num_stages) of `spec`'s `variant` as the AOT build freezes them for the
    SM of `device`; a launcher overrides only what the shapes decide (head dims, conv kernel width)."""
    _, constexprs, warps, stages = spec.config(device_sm(device), variant)
    return constexprs, warps, stages


def check_inputs(qkv, a, b, neg_exp_a, dt_bias, mask, nk: int, dk: int, dv: int):
    """Shapes and layouts the kernels assume; returns (batch, tokens, nv, mask)."""
    import torch

    batch, tokens, channels = qkv.shape
    nv = a.shape[-1]
    assert nv % nk == 0 and channels >= 2 * nk * dk + nv * dv
    assert dk & (dk - 1) == 0 and dv & (dv - 1) == 0 and 16 <= dk <= 256 and 16 <= dv <= 256
    assert qkv.stride(2) == 1 and (batch == 1 or qkv.stride(0) == tokens * qkv.stride(1))
    for x in (a, b):
        assert x.shape == (batch, tokens, nv) and x.stride(2) == 1 and x.stride(1) == a.stride(1)
        assert batch == 1 or x.stride(0) == tokens * x.stride(1)
    assert neg_exp_a.dtype == dt_bias.dtype == torch.float32 and neg_exp_a.numel() == dt_bias.numel() == nv
    if mask is None:
        mask = torch.ones((batch, tokens), dtype=torch.int32, device=qkv.device)
    assert mask.dtype == torch.int32 and mask.is_contiguous()
    assert mask.shape[0] == batch and mask.shape[1] >= tokens
    return batch, tokens, nv, mask


def launch(spec, qkv, a, b, neg_exp_a, dt_bias, nk, dk, dv, state, mask, state_out, out):
    """Run `spec`'s kernel (this one or the chunked one: same arguments); returns (out, state_out)."""
    import torch

    batch, tokens, nv, mask = check_inputs(qkv, a, b, neg_exp_a, dt_bias, mask, nk, dk, dv)
    variant = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(qkv.dtype, "fp16")
    constexprs, warps, stages = launch_config(spec, variant, qkv.device)
    constexprs.update(DK=dk, DV=dv, BV=min(constexprs["BV"], dv))
    if state_out is None:
        state_out = torch.empty((batch, nv, dk, dv), dtype=torch.float32, device=qkv.device)
    if out is None:
        out = torch.empty((batch, tokens, nv, dv), dtype=qkv.dtype, device=qkv.device)
    use_state = state is not None
    state_in = state if use_state else state_out
    for s in (state_in, state_out):
        assert s.dtype == torch.float32 and s.shape == (batch, nv, dk, dv) and s.is_contiguous()
    assert out.shape == (batch, tokens, nv, dv) and out.is_contiguous()
    values = (qkv, a, b, neg_exp_a, dt_bias, mask, state_in, state_out, out, tokens, mask.shape[1], nk, nv)
    args = runtime_args(spec, values + (qkv.stride(1), a.stride(1), int(use_state)))
    check_aligned(args)
    spec.kernel[(dv // constexprs["BV"], batch * nv)](
        **args, **constexprs, num_warps=warps, num_stages=stages
    )
    return out, state_out


def recurrent_delta_rule(
    qkv, a, b, neg_exp_a, dt_bias, nk, dk, dv, state=None, mask=None, state_out=None, out=None
):
    """Token-by-token gated delta rule on the conv output `qkv` [B, T, C]; returns (out [B, T, nv, dv],
    final state [B, nv, dk, dv] fp32). `state` None starts from zeros; `state_out` may be `state`."""
    return launch(SPEC, qkv, a, b, neg_exp_a, dt_bias, nk, dk, dv, state, mask, state_out, out)
