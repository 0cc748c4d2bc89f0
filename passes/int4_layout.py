"""The packed int4 layout of qwen-export's CPU kernels (plugins/ort_cpu/int4_linear/int4_gemm.h), made
from MatMulNBits'.

MatMulNBits (and QMoE) store a weight as codes `q [N, K/B, B/2]` (two 4-bit codes per byte along K, even k
in the low nibble) and scales `[N, K/B]`. The CPU kernels read 16 output rows at a time, four consecutive
k of one row in each 32-bit lane (what one VNNI dot product sums):

    packed [ceil(N/16), K/B, B/8, 64] uint8   byte j of pair p of block b of group g:
        low nibble = code[16g + j//4, bB + 8p + j%4]     high nibble = code[16g + j//4, bB + 8p + 4 + j%4]
    scales [ceil(N/16), K/B, 16] float16      lane order; rows past N are zero

The codes are the same numbers in another order. The scales are stored as float16 (2 bytes per 32 weights
instead of 4: 10% fewer bytes to stream per decode step); they are the same numbers when the quantizer
rounded them to float16 values (`QuantizeWeights(fp16_scales=True)`, as the ort-cpu-int4 pipeline does),
and are rounded to the nearest float16 otherwise.
"""

from __future__ import annotations

import numpy as np

GROUP_ROWS = 16


def unpack_codes(q: np.ndarray) -> np.ndarray:
    """MatMulNBits codes `[..., N, K/B, B/2]` -> `[..., N, K]` uint8 in 0..15."""
    codes = np.stack([q & 0x0F, q >> 4], axis=-1)
    return codes.reshape(*q.shape[:-2], -1)


def pack_int4_groups(q: np.ndarray, scales: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits `(q [..., N, K/B, B/2], scales [..., N, K/B])` -> the kernels' `(packed, scales)` with
    the same leading (expert) axes. K must be a whole number of blocks and B a multiple of 32."""
    if q.shape[:-1] != scales.shape:
        raise ValueError(f"codes {q.shape} and scales {scales.shape} do not match")
    return pack_codes(q, block), pack_scales(scales)


def pack_codes(q: np.ndarray, block: int) -> np.ndarray:
    """MatMulNBits codes `[..., N, K/B, B/2]` -> packed `[..., ceil(N/16), K/B, B/8, 64]`."""
    *lead, n, blocks, half = q.shape
    if block % 32 or half * 2 != block:
        raise ValueError(
            f"the CPU kernels need blocks that are multiples of 32 (codes {q.shape}, block {block})"
        )
    groups = -(-n // GROUP_ROWS)
    codes = np.zeros((*lead, groups * GROUP_ROWS, blocks * block), np.uint8)
    codes[..., :n, :] = unpack_codes(q)
    # k = b*B + 8p + 4h + kk -> axes (group, lane, block, pair, half, kk)
    c = codes.reshape(*lead, groups, GROUP_ROWS, blocks, block // 8, 2, 4)
    d = len(lead)
    c = c.transpose(*range(d), d, d + 2, d + 3, d + 4, d + 1, d + 5)  # group, block, pair, half, lane, kk
    c = c.reshape(*lead, groups, blocks, block // 8, 2, 64)
    return np.ascontiguousarray(c[..., 0, :] | (c[..., 1, :] << 4))


def packed_shapes(n: int, k: int, block: int, lead: tuple[int, ...] = ()) -> tuple[tuple[int, ...], ...]:
    """Shapes of (packed codes, packed scales) for `[*lead, N, K]` weights in blocks of B."""
    groups, blocks = -(-n // GROUP_ROWS), k // block
    return (*lead, groups, blocks, block // 8, 64), (*lead, groups, blocks, GROUP_ROWS)


def pack_scales(scales: np.ndarray) -> np.ndarray:
    """MatMulNBits scales `[..., N, K/B]` -> lane-ordered float16 `[..., ceil(N/16), K/B, 16]`, 0 past N."""
    *lead, n, blocks = scales.shape
    groups = -(-n // GROUP_ROWS)
    padded = np.zeros((*lead, groups * GROUP_ROWS, blocks), np.float16)
    padded[..., :n, :] = scales
    return np.ascontiguousarray(padded.reshape(*lead, groups, GROUP_ROWS, blocks).swapaxes(-1, -2))


def unpack_int4_groups(packed: np.ndarray, scales: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The inverse: the kernels' layout -> (codes `[..., N, K]`, scales `[..., N, K/B]`)."""
    *lead, groups, blocks, pairs, _ = packed.shape
    halves = np.stack([packed & 0x0F, packed >> 4], axis=-2)  # ..., block, pair, half, 64
    halves = halves.reshape(*lead, groups, blocks, pairs, 2, GROUP_ROWS, 4)
    d = len(lead)
    codes = halves.transpose(*range(d), d, d + 4, d + 1, d + 2, d + 3, d + 5)
    codes = codes.reshape(*lead, groups * GROUP_ROWS, blocks * pairs * 8)[..., :n, :]
    lane_scales = scales.swapaxes(-1, -2).reshape(*lead, groups * GROUP_ROWS, blocks)[..., :n, :]
    return codes, lane_scales.astype(np.float32)
