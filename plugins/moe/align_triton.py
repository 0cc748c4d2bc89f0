"""MoE token alignment: group the (token, slot) pairs by expert, padded to the grouped GEMM's BLOCK_M.

The router's ids [T, k] are read flat: pair p = t * k + slot routes token t to expert ids[p]. Outputs:
- `sorted_ids` [n_sorted] int32: the pairs grouped by expert, each expert's group padded to a multiple of
  BLOCK_M with the sentinel n_pairs (= T * k). Experts that no pair routes to take no room.
  n_sorted = n_pairs + min(n_pairs, E) * (BLOCK_M - 1), rounded up to BLOCK_M: a bound known before the
  kernels run, so every grid is static (no host sync in the engine).
- `expert_ids` [n_sorted / BLOCK_M] int32: the expert of each BLOCK_M block, -1 past the used blocks.
- `offsets` [E + 1] int32: where each expert's padded group starts; offsets[E] is the used length.

Three kernels, all integer (one cubin per SM, whatever the activations):
1. `align_count_kernel`: per chunk of CHUNK pairs, a histogram per expert into counts [n_chunks, E]; every
   program also fills its slice of sorted_ids with the sentinel.
2. `align_scan_kernel` (one program): per expert the total over chunks, padded up to BLOCK_M, exclusive
   prefix sum over experts -> offsets, and a cursor per expert starting at its offset.
3. `align_scatter_kernel`: each pair takes the next free slot of its expert (atomic add on the cursor:
   the order within an expert is not fixed, and nothing depends on it: every row of a GEMM tile is computed
   on its own); the block -> expert map by binary search of each block's first row in offsets.
"""

from __future__ import annotations

import triton
import triton.language as tl

from qwen_export.plugins.triton_support import KernelSpec

from .router_topk_triton import MAX_EXPERTS, device_sm, empty_alloc

SEARCH_STEPS = 13  # binary search over offsets: enough for E <= MAX_EXPERTS (4096 < 2**13)


@triton.jit
def align_count_kernel(
    ids_ptr,  # [n_pairs] int32 expert of each pair
    counts_ptr,  # [n_chunks, E] int32 out
    sorted_ids_ptr,  # [n_sorted] int32 out: the sentinel everywhere (scatter fills the pairs in)
    n_pairs,
    E,
    n_sorted,
    CHUNK: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    c = tl.program_id(0)
    offs = c * CHUNK + tl.arange(0, CHUNK)
    tl.store(sorted_ids_ptr + offs, tl.full((CHUNK,), 0, tl.int32) + n_pairs, mask=offs < n_sorted)
    if c * CHUNK < n_pairs:
        ok = offs < n_pairs
        ids = tl.load(ids_ptr + offs, mask=ok, other=0)
        for e0 in range(0, E, BLOCK_E):
            local = ids - e0
            hist = tl.histogram(local, BLOCK_E, mask=ok & (local >= 0) & (local < BLOCK_E))
            e = e0 + tl.arange(0, BLOCK_E)
            tl.store(counts_ptr + c * E + e, hist, mask=e < E)


@triton.jit
def align_scan_kernel(
    counts_ptr,  # [n_chunks, E] int32
    offsets_ptr,  # [E + 1] int32 out
    cursor_ptr,  # [E] int32 out: next free slot of each expert
    n_chunks,
    E,
    block_m,
    BLOCK_E: tl.constexpr,
):
    lane = tl.arange(0, BLOCK_E)
    carry = tl.sum(tl.full((BLOCK_E,), 0, tl.int32), axis=0)
    for e0 in range(0, E, BLOCK_E):
        e = e0 + lane
        e_ok = e < E
        total = tl.full((BLOCK_E,), 0, tl.int32)
        for c in range(0, n_chunks):
            total += tl.load(counts_ptr + c * E + e, mask=e_ok, other=0)
        padded = (total + block_m - 1) // block_m * block_m
        start = carry + tl.cumsum(padded, axis=0) - padded
        tl.store(offsets_ptr + e, start, mask=e_ok)
        tl.store(cursor_ptr + e, start, mask=e_ok)
        carry += tl.sum(padded, axis=0)
    tl.store(offsets_ptr + E, carry)


@triton.jit
def align_scatter_kernel(
    ids_ptr,  # [n_pairs] int32
    cursor_ptr,  # [E] int32, advanced here
    offsets_ptr,  # [E + 1] int32
    sorted_ids_ptr,  # [n_sorted] int32 out: pair index at its slot
    expert_ids_ptr,  # [n_blocks] int32 out
    n_pairs,
    E,
    block_m,
    n_blocks,
    CHUNK: tl.constexpr,
    BLOCK_B: tl.constexpr,
    SEARCH_STEPS: tl.constexpr,
):
    pid = tl.program_id(0)
    if pid * CHUNK < n_pairs:
        offs = pid * CHUNK + tl.arange(0, CHUNK)
        ok = offs < n_pairs
        ids = tl.load(ids_ptr + offs, mask=ok, other=0)
        slot = tl.atomic_add(cursor_ptr + ids, 1, mask=ok)
        tl.store(sorted_ids_ptr + slot, offs, mask=ok)
    if pid * BLOCK_B < n_blocks:
        b = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        first_row = b * block_m
        used = tl.load(offsets_ptr + E)
        # the expert of a block: the first e whose group ends (offsets[e + 1]) past the block's first row
        lo = tl.full((BLOCK_B,), 0, tl.int32)
        hi = tl.full((BLOCK_B,), 0, tl.int32) + E
        for _ in range(SEARCH_STEPS):
            active = lo < hi
            mid = (lo + hi) // 2
            end = tl.load(offsets_ptr + mid + 1, mask=active, other=0)
            right = active & (end <= first_row)
            lo = tl.where(right, mid + 1, lo)
            hi = tl.where(active & (end > first_row), mid, hi)
        tl.store(expert_ids_ptr + b, tl.where(first_row < used, lo, -1), mask=b < n_blocks)


_NO_ACT = {"i32": {}}  # integer kernels: one cubin per SM

COUNT_SPEC = KernelSpec(
    name="moe.align_count",
    kernel=align_count_kernel,
    signature={
        "ids_ptr": "*i32",
        "counts_ptr": "*i32",
        "sorted_ids_ptr": "*i32",
        "n_pairs": "i32",
        "E": "i32",
        "n_sorted": "i32",
        "CHUNK": "constexpr",
        "BLOCK_E": "constexpr",
    },
    constexprs={"CHUNK": 1024, "BLOCK_E": 256},
    num_warps=4,
    num_stages=1,
    variants=_NO_ACT,
)
_SCAN_SIGNATURE = {
    "counts_ptr": "*i32", "offsets_ptr": "*i32", "cursor_ptr": "*i32", "n_chunks": "i32",
    "E": "i32", "block_m": "i32", "BLOCK_E": "constexpr",
}  # fmt: skip
SCAN_SPEC = KernelSpec(
    name="moe.align_scan",
    kernel=align_scan_kernel,
    signature=_SCAN_SIGNATURE,
    constexprs={"BLOCK_E": 512},
    num_warps=4,
    num_stages=1,
    variants=_NO_ACT,
)
_SCATTER_SIGNATURE = {
    "ids_ptr": "*i32", "cursor_ptr": "*i32", "offsets_ptr": "*i32", "sorted_ids_ptr": "*i32",
    "expert_ids_ptr": "*i32", "n_pairs": "i32", "E": "i32", "block_m": "i32", "n_blocks": "i32",
    "CHUNK": "constexpr", "BLOCK_B": "constexpr", "SEARCH_STEPS": "constexpr",
}  # fmt: skip
SCATTER_SPEC = KernelSpec(
    name="moe.align_scatter",
    kernel=align_scatter_kernel,
    signature=_SCATTER_SIGNATURE,
    constexprs={"CHUNK": 1024, "BLOCK_B": 256, "SEARCH_STEPS": SEARCH_STEPS},
    num_warps=4,
    num_stages=1,
    variants=_NO_ACT,
)

SPECS: list[KernelSpec] = [COUNT_SPEC, SCAN_SPEC, SCATTER_SPEC]


def sorted_length(n_pairs: int, num_experts: int, block_m: int) -> int:
    """Slots sorted_ids needs for any routing of n_pairs pairs over num_experts experts."""
    bound = n_pairs + min(n_pairs, num_experts) * (block_m - 1)
    return triton.cdiv(bound, block_m) * block_m


def moe_align(ids, num_experts: int, block_m: int, alloc=None, sm: str | None = None):
    """Launch the three kernels on ids [T, k] int32: (sorted_ids, expert_ids, offsets)."""
    import torch

    if num_experts > MAX_EXPERTS:
        raise ValueError(f"{num_experts} experts: the block map searches at most {MAX_EXPERTS}")
    alloc = alloc or empty_alloc(ids)
    n_pairs = ids.numel()
    n_sorted = sorted_length(n_pairs, num_experts, block_m)
    n_blocks = n_sorted // block_m
    target = device_sm(ids, sm)
    _, count_c, count_w, count_s = COUNT_SPEC.config(target, "i32")
    _, scan_c, scan_w, scan_s = SCAN_SPEC.config(target, "i32")
    _, scat_c, scat_w, scat_s = SCATTER_SPEC.config(target, "i32")
    n_chunks = triton.cdiv(n_pairs, count_c["CHUNK"])
    counts = alloc("align_counts", (n_chunks, num_experts), torch.int32)
    offsets = alloc("expert_offsets", (num_experts + 1,), torch.int32)
    cursor = alloc("expert_cursor", (num_experts,), torch.int32)
    sorted_ids = alloc("sorted_ids", (n_sorted,), torch.int32)
    expert_ids = alloc("expert_ids", (n_blocks,), torch.int32)
    align_count_kernel[(triton.cdiv(n_sorted, count_c["CHUNK"]),)](
        ids,
        counts,
        sorted_ids,
        n_pairs,
        num_experts,
        n_sorted,
        **count_c,
        num_warps=count_w,
        num_stages=count_s,
    )
    align_scan_kernel[(1,)](
        counts, offsets, cursor, n_chunks, num_experts, block_m, **scan_c, num_warps=scan_w, num_stages=scan_s
    )
    grid = (max(triton.cdiv(n_pairs, scat_c["CHUNK"]), triton.cdiv(n_blocks, scat_c["BLOCK_B"])),)
    align_scatter_kernel[grid](
        ids, cursor, offsets, sorted_ids, expert_ids, n_pairs, num_experts, block_m, n_blocks,
        **scat_c, num_warps=scat_w, num_stages=scat_s,
    )  # fmt: skip
    return sorted_ids, expert_ids, offsets
