"""The GatedRMSNorm Triton kernels as the AOT build and `kernels check` see them.

`check_layer` runs the kernel on a linear-attention layer's real `linear_attn.norm` (its weight as is: the
gated norm is not zero-centred), per value head, on a seeded random x and gate, against the transformers
module's own forward in fp32 (on the model's device). Layers without a gated norm (full attention) give no
rows. The kernel runs on CPU tensors (Guarded buffers), under Triton's interpreter, which must have been on
when this module was first imported.
"""

from __future__ import annotations

from qwen_export.plugins.gated_rms_norm.gated_rms_norm_triton import (
    SPECS,
    gated_rms_norm,
    gated_rms_norm_kernel,
    select_spec,
)
from qwen_export.plugins.rms_norm.kernels import decoder_layers, nan_output, require_interpreter
from qwen_export.plugins.triton_support import CheckRow, Guarded, KernelSpec, compare, guard_problems

KERNELS: list[KernelSpec] = SPECS
TOKENS = 7
SEED = 20260302


def check_layer(model, layer_index: int, dtype) -> list[CheckRow]:
    """One CheckRow of gated_rms_norm on layer `layer_index`'s linear_attn.norm ([] without one)."""
    import torch

    mixer = getattr(decoder_layers(model)[layer_index], "linear_attn", None)
    norm = getattr(mixer, "norm", None)
    if norm is None:
        return []
    require_interpreter(gated_rms_norm_kernel)
    weight = norm.weight.detach().float().cpu()
    device, dim = norm.weight.device, weight.shape[0]
    heads = int(getattr(mixer, "num_v_heads", 1))
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    shape = (TOKENS, heads, dim)
    gen = torch.Generator().manual_seed(SEED + layer_index)
    x = Guarded(torch.randn(shape, generator=gen), dtype)
    z = Guarded(torch.randn(shape, generator=gen), dtype)
    scale = Guarded(weight)
    y = nan_output(shape, dtype)
    with torch.no_grad():
        gated_rms_norm(x.tensor, z.tensor, scale.tensor, eps, out=y.tensor)
        reference = norm(x.tensor.float().to(device), z.tensor.float().to(device)).cpu()
    ok = not guard_problems(x=x, z=z, scale=scale, y=y)
    precision = str(dtype).removeprefix("torch.")
    case = f"layer {layer_index} linear_attn.norm, {TOKENS} tokens x {heads} heads x {dim}, {precision}"
    views = [t.tensor.view(-1, dim) for t in (x, z, y)]
    kernel = select_spec(views[0], views[1], scale.tensor, views[2]).name
    return [compare(kernel, case, y.tensor, reference, dtype, ok)]
