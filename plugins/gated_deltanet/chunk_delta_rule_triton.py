"""Gated delta rule in 64-token chunks (prefill): docs/ops.md steps 4-6 fused in one kernel.

Same math, arguments and layouts as recurrent_delta_rule_triton (l2norm, q scale, gates and the padding
mask are fused here too). One program owns (batch row, value head, BV state columns) and makes one pass
over the chunks, carrying its [DK, BV] slice of the fp32 state in registers (`state_out` may alias
`state_in`). Per chunk of 64 tokens (G = cumulative log decay from the chunk start, Γ_ij = exp(G_i - G_j),
k and q l2-normalised, q scaled by DK^-1/2):

    A = strict_lower(beta_i k_i.k_j Γ_ij)              (I + A): the WY / UT system of the chunk
    v_new = (I + A)^-1 beta (v - exp(G) k S)           block forward substitution in registers: the four
                                                        16x16 diagonal blocks inverted together, then
                                                        four block steps
    o = exp(G) q S + causal(q_i.k_j Γ_ij) v_new
    S = exp(G_last) S + (exp(G_last - G) k)^T v_new

q and k enter the dots as loaded (fp16/bf16 MMA, fp32 accumulation): their l2 norms come from the
diagonals of k k^T and q q^T and scale rows of the products; the state is read in the activation type.
The solve and the in-chunk attention (I + A)^-1, v_new and q.k run as fp16 MMA for fp16 and bf16 alike
(bf16 there tripled the kernel's error on the tiny preset), on the right-hand side scaled by a power of two
so that fp16 cannot overflow. The state, gates, norms and all accumulations are fp32; fp32 activations
(the `kernels check` path) run every dot in fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl

from qwen_export.plugins.gated_deltanet import recurrent_delta_rule_triton as recurrent
from qwen_export.plugins.gated_deltanet.recurrent_delta_rule_triton import gates, head_offsets
from qwen_export.plugins.triton_support import KernelSpec, aligned16

CHUNK = 64  # tokens per chunk (the kernel's tiles are written for 64)
ALIGNED_16 = recurrent.ALIGNED_16  # same arguments, same launcher as the recurrent kernel


@triton.jit
def _decay(g):
    """Γ_ij = exp(G_i - G_j) for j <= i in a chunk, else 0 (G: cumulative log decay, [64])."""
    c = tl.arange(0, 64)
    causal = c[:, None] >= c[None, :]
    return tl.where(causal, tl.exp(tl.where(causal, g[:, None] - g[None, :], 0.0)), 0.0)


@triton.jit
def _block_diagonal_inverse(a, n):
    """(I + d)^-1 where d is the four 16x16 diagonal blocks of the strictly lower 64x64 fp32 tile `a`.

    The blocks are taken out as a [4, 16, 16] batch and inverted together by forward substitution: step i
    makes row i of X - I, -d_i + sum_m (-d_im) (X - I)_m, with two batched 16x16 fp32 dots (every row of
    `pick @ d` is row i of d). Rows 0 and 1 need no step, nor rows at or past `n` (the chunk's tokens) when
    n < 16: they are zero. The result is put back as a block-diagonal 64x64 tile."""
    blocks = tl.arange(0, 4)
    own = blocks[:, None, None, None] == blocks[None, None, :, None]  # [4, 1, 4, 1]
    d = tl.sum(tl.where(own, tl.reshape(a, [4, 16, 4, 16]), 0.0), axis=2)  # [4, 16, 16]
    r = tl.arange(0, 16)
    rows = r[None, :, None] + tl.zeros([4, 16, 16], dtype=tl.int32)
    cols = r[None, None, :] + tl.zeros([4, 16, 16], dtype=tl.int32)
    x = -d
    for i in range(2, tl.minimum(n, 16)):
        row = -tl.dot(tl.where(cols == i, 1.0, 0.0), d, input_precision="ieee")
        row += tl.dot(row, x, input_precision="ieee")
        x = tl.where(rows == i, row, x)
    x = tl.where(rows == cols, 1.0, x)
    wide = tl.broadcast_to(tl.reshape(x, [4, 16, 1, 16]), [4, 16, 4, 16])
    return tl.reshape(tl.where(own, wide, 0.0), [64, 64])


@triton.jit
def _solve(a, rhs, n, dt: tl.constexpr):
    """(I + a)^-1 rhs for a strictly lower 64x64 fp32 tile `a`, by block forward substitution over its
    16-row blocks: with d its diagonal blocks and l = a - d, y <- (I + d)^-1 (rhs - l y) is exact for
    one more block each time, so four steps from y = 0 solve it (fewer when the chunk's `n` tokens fill
    fewer blocks). (I + d)^-1, l and y enter the dots in `dt` (fp32 accumulation)."""
    r = tl.arange(0, 64)
    inv_d = _block_diagonal_inverse(a, n).to(dt)
    below = tl.where((r[:, None] // 16) > (r[None, :] // 16), a, 0.0).to(dt)
    y = tl.dot(inv_d, rhs.to(dt))
    for _ in range(1, tl.minimum(tl.cdiv(n, 16), 4)):
        y = tl.dot(inv_d, (rhs - tl.dot(below, y.to(dt))).to(dt))
    return y


@triton.jit
def chunk_delta_rule_kernel(  # the recurrent kernel's arguments (recurrent.SIGNATURE), one launcher for both
    qkv_ptr, a_ptr, b_ptr, neg_exp_a_ptr, dt_bias_ptr, mask_ptr, state_in_ptr, state_out_ptr, out_ptr,
    T, mask_len, nk, nv, stride_qkv, stride_ab, use_state,
    DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    dt: tl.constexpr = qkv_ptr.dtype.element_ty
    # the solve's and in-chunk attention's dot operands: fp16 (10 mantissa bits) for fp16 and bf16
    # activations, fp32 for fp32 ones
    inner: tl.constexpr = tl.float32 if dt == tl.float32 else tl.float16
    pid_v = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // nv).to(tl.int64)
    hv = pid_bh % nv
    q_off, k_off, v_off = head_offsets(nk, nv, hv, DK, DV)
    dk = tl.arange(0, DK)
    c = tl.arange(0, 64)
    scale: tl.constexpr = DK**-0.5
    neg_exp_a = tl.load(neg_exp_a_ptr + hv)
    dt_bias = tl.load(dt_bias_ptr + hv)
    strict = c[:, None] > c[None, :]

    # 64-bit scalar bases, 32-bit offsets within them
    state_base = (b * nv + hv) * DK * DV + pid_v * BV
    state_at = dk[:, None] * DV + tl.arange(0, BV)[None, :]
    state = tl.zeros([DK, BV], dtype=tl.float32)
    if use_state != 0:
        state = tl.load(state_in_ptr + state_base + state_at)

    qkv_row = qkv_ptr + b * T * stride_qkv
    ab_row = b * T * stride_ab + hv  # an offset (a and b share it)
    m_row = mask_ptr + b * mask_len + (mask_len - T)
    out_row = out_ptr + (b * T * nv + hv) * DV + pid_v * BV
    qkv_at = c[:, None] * stride_qkv + dk[None, :]
    v_at = c[:, None] * stride_qkv + v_off + pid_v * BV + tl.arange(0, BV)[None, :]
    out_at = c[:, None] * (nv * DV) + tl.arange(0, BV)[None, :]
    for c0 in range(0, T, 64):
        rows = c0 + c
        inside = rows < T
        live = (tl.load(m_row + rows, mask=inside, other=0) != 0) & inside
        at = qkv_row + qkv_at
        # q and k stay as loaded (the dot type); their l2 norms scale rows of the products instead
        k = tl.load(at + k_off, mask=live[:, None], other=0.0)
        v = tl.load(qkv_row + v_at, mask=live[:, None], other=0.0)
        v = v.to(tl.float32)
        ab = ab_row + c * stride_ab
        g, beta = gates(
            tl.load(a_ptr + ab, mask=inside, other=0.0), tl.load(b_ptr + ab, mask=inside, other=0.0),
            neg_exp_a, dt_bias, live,
        )  # fmt: skip
        g_total = tl.sum(g, axis=0)
        g = tl.cumsum(g, axis=0)  # log decay from the chunk start (g <= 0: it only falls)
        s_dt = state.to(dt)

        # v_new = (I + A)^-1 beta (v - exp(G) k S), A = strict_lower(beta_i k_i.k_j Γ_ij): the WY system
        kk = tl.dot(k, tl.trans(k))
        k_norm = 1.0 / tl.sqrt(tl.sum(tl.where(c[:, None] == c[None, :], kk, 0.0), axis=1) + 1e-6)
        kb = k_norm * beta
        a = tl.where(strict, kk * _decay(g) * (kb[:, None] * k_norm[None, :]), 0.0)
        rhs = v * beta[:, None] - tl.dot(k, s_dt) * (kb * tl.exp(g))[:, None]
        # the solve and the in-chunk attention run on rhs / p (p: a power of two >= max |rhs|), so that
        # their fp16 operands stay in range whatever the activations' scale
        p = tl.exp2(tl.ceil(tl.log2(tl.max(tl.abs(rhs)) + 1e-30)))
        v_scaled = _solve(a, rhs / p, T - c0, inner)

        # outputs: the carried state's read plus causal attention over v_new within the chunk
        q = tl.load(at + q_off, mask=live[:, None], other=0.0)
        q_norm = scale / tl.sqrt(
            tl.sum(tl.where(c[:, None] == c[None, :], tl.dot(q, tl.trans(q)), 0.0), 1) + 1e-6
        )
        qk = tl.dot(q, tl.trans(k)) * _decay(g) * (q_norm[:, None] * k_norm[None, :])
        o = tl.dot(q, s_dt) * (q_norm * tl.exp(g))[:, None] + tl.dot(qk.to(inner), v_scaled.to(inner)) * p
        tl.store(out_row + out_at, o.to(dt), mask=inside[:, None])

        # the state at the chunk's end
        v_end = (v_scaled * (p * k_norm * tl.exp(g_total - g))[:, None]).to(dt)
        state = state * tl.exp(g_total) + tl.dot(tl.trans(k), v_end)
        qkv_row += 64 * stride_qkv
        ab_row += 64 * stride_ab
        out_row += 64 * nv * DV

    tl.store(state_out_ptr + state_base + state_at, state)


SIGNATURE = recurrent.SIGNATURE  # the same arguments as the recurrent kernel, for one launcher

SPEC = KernelSpec(
    name="gated_deltanet.chunk_delta_rule",
    kernel=chunk_delta_rule_kernel,
    signature=aligned16(SIGNATURE, ALIGNED_16),
    constexprs={"DK": 128, "DV": 128, "BV": 32},
    num_warps=4,  # 64-row tiles: one warpgroup (more warps replicate the M=64 wgmma work)
    num_stages=1,
    # mma.sync GPUs hold dot operands in registers: a narrower state slice spills less there
    per_sm={sm: {"BV": 16} for sm in ("sm_80", "sm_86", "sm_89", "sm_120a")},
)


def chunk_delta_rule(
    qkv, a, b, neg_exp_a, dt_bias, nk, dk, dv, state=None, mask=None, state_out=None, out=None
):
    """Chunked gated delta rule on the conv output `qkv` [B, T, C]; returns (out [B, T, nv, dv], final
    state [B, nv, dk, dv] fp32). `state` None starts from zeros; `state_out` may be `state`."""
    return recurrent.launch(SPEC, qkv, a, b, neg_exp_a, dt_bias, nk, dk, dv, state, mask, state_out, out)
