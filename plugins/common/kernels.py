"""The Triton kernels shared by the fused plugins (the projections' dense GEMM, matmul_triton.py) as the AOT
build and `kernels check` see them.

`check_layer` runs the GEMM on one real projection weight of a decoder layer (its attention or
linear-attention input projection, else the layer's first nn.Linear), transposed to the [K, N] layout the
plugins keep, on a seeded random input: 7 tokens through the prefill tile class and 1 token through the
decode class, outputs in the activation dtype and in fp32 (the router's variant), against torch's fp32
matmul of the same rounded operands at the activation precision's bound (`compare`). The kernels run on CPU
tensors (Guarded buffers, outputs NaN-initialised), i.e. under Triton's interpreter, which must have been on
when this module was first imported (`triton_support.interpreter()`); bf16 needs
`triton_support.upcast_bf16_dots()`, as every check does.
"""

from __future__ import annotations

from qwen_export.plugins.rms_norm.kernels import decoder_layers, nan_output, require_interpreter
from qwen_export.plugins.triton_support import CheckRow, Guarded, KernelSpec, compare, guard_problems

from .matmul_triton import SPECS, is_aligned, matmul, matmul_kernel, select_spec

KERNELS: list[KernelSpec] = SPECS
SEED = 20260311
# (tokens, forced tile class): 7 tokens would take the decode class on their own (M <= 16)
CASES = ((7, "prefill"), (1, None))
# the input projections, preferred in this order; else the layer's first 2-D nn.Linear
PREFERRED = ("self_attn.q_proj", "linear_attn.in_proj_qkvz", "linear_attn.in_proj_qkv")


def projection(layer):
    """(qualified name, weight [N, K]) of the projection `check_layer` uses in `layer`."""
    import torch

    linears = {
        name: module.weight
        for name, module in layer.named_modules()
        if isinstance(module, torch.nn.Linear) and module.weight.dim() == 2
    }
    if not linears:
        raise ValueError(f"{type(layer).__name__} has no nn.Linear to check the GEMM on")
    name = next((n for n in PREFERRED if n in linears), next(iter(linears)))
    return name, linears[name]


def check_layer(model, layer_index: int, dtype) -> list[CheckRow]:
    """CheckRows of the GEMM on layer `layer_index`'s input projection: prefill (7 tokens) and decode
    (1 token), each with the activation-typed and the fp32 output."""
    import torch

    require_interpreter(matmul_kernel)
    name, weight = projection(decoder_layers(model)[layer_index])
    n_out, k_in = weight.shape
    w = Guarded(weight.detach().float().cpu().t().contiguous(), dtype)  # [K, N], N contiguous
    gen = torch.Generator().manual_seed(SEED + layer_index)
    precision = str(dtype).removeprefix("torch.")
    rows = []
    for tokens, tile in CASES:
        x = Guarded(torch.randn(tokens, k_in, generator=gen), dtype)
        reference = x.tensor.float() @ w.tensor.float()
        for out_dtype in dict.fromkeys((dtype, torch.float32)):
            y = nan_output((tokens, n_out), out_dtype)
            with torch.no_grad():
                matmul(x.tensor, w.tensor, out=y.tensor, tile=tile)
            ok = not guard_problems(x=x, w=w, y=y)
            spec = select_spec(tokens, is_aligned(x.tensor, w.tensor, y.tensor), tile)
            out = "" if out_dtype == dtype else ", fp32 out"
            shape = f"{tokens} x {k_in} @ {k_in} x {n_out}"
            case = f"layer {layer_index} {name} (x @ W^T), {shape}, {precision}{out}"
            # held to the activation precision's bound either way (fp32's absolute 1e-4 would hinge on the
            # layer's output magnitude, and on K summation order)
            rows.append(compare(spec.name, case, y.tensor, reference, dtype, ok))
    return rows
