"""The RMSNorm Triton kernels as the AOT build and `kernels check` see them.

`check_layer` runs the kernels on one decoder layer's real `input_layernorm` (its `1 + w` as the fp32
scale) on a seeded random input, with and without the fused residual add, against the transformers
module's own forward in fp32 (on the model's device). The kernels run on CPU tensors (Guarded buffers),
i.e. under Triton's interpreter, which must have been on when this module was first imported
(`triton_support.interpreter()`).
"""

from __future__ import annotations

from qwen_export.plugins.rms_norm.rms_norm_triton import SPECS, rms_norm, rms_norm_kernel, select_spec
from qwen_export.plugins.triton_support import CheckRow, Guarded, KernelSpec, compare, guard_problems

KERNELS: list[KernelSpec] = SPECS
TOKENS = 7
SEED = 20260301


def decoder_layers(model):
    """The decoder layers of a transformers CausalLM (or of its multimodal wrapper's language model)."""
    inner = model.model
    layers = getattr(inner, "layers", None)
    return layers if layers is not None else inner.language_model.layers


def require_interpreter(kernel) -> None:
    """Raise unless `kernel` runs on CPU tensors (the interpreter was on when its module was imported)."""
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(kernel, InterpretedFunction):
        raise RuntimeError(
            "Triton kernels on CPU tensors need the interpreter: call "
            "qwen_export.plugins.triton_support.interpreter() before importing the kernel modules"
        )


def nan_output(shape, dtype) -> Guarded:
    """A guarded output that starts as NaN, so an element the kernel never wrote fails the comparison."""
    import torch

    return Guarded(torch.full(shape, float("nan")), dtype)


def check_layer(model, layer_index: int, dtype) -> list[CheckRow]:
    """CheckRows of rms_norm (y) and add_rms_norm (y and the new residual) on layer `layer_index`."""
    import torch

    norm = decoder_layers(model)[layer_index].input_layernorm
    require_interpreter(rms_norm_kernel)
    weight = norm.weight.detach().float().cpu()
    device, dim = norm.weight.device, weight.shape[0]
    eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
    gen = torch.Generator().manual_seed(SEED + layer_index)
    x = Guarded(torch.randn(TOKENS, dim, generator=gen), dtype)
    res = Guarded(torch.randn(TOKENS, dim, generator=gen), dtype)
    scale = Guarded(1.0 + weight)
    precision = str(dtype).removeprefix("torch.")
    where = f"layer {layer_index} input_layernorm, {TOKENS} tokens x {dim}, {precision}"
    rows = []
    with torch.no_grad():
        y = nan_output((TOKENS, dim), dtype)
        rms_norm(x.tensor, scale.tensor, eps, out=y.tensor)
        ok = not guard_problems(x=x, scale=scale, y=y)
        reference = norm(x.tensor.float().to(device)).cpu()
        kernel = select_spec(x.tensor, scale.tensor, y2=y.tensor).name
        rows.append(compare(kernel, where, y.tensor, reference, dtype, ok))

        y = nan_output((TOKENS, dim), dtype)
        h = nan_output((TOKENS, dim), dtype)
        rms_norm(x.tensor, scale.tensor, eps, res.tensor, out=y.tensor, residual_out=h.tensor)
        ok = not guard_problems(x=x, residual=res, scale=scale, y=y, residual_out=h)
        h_ref = x.tensor.float() + res.tensor.float()
        kernel = select_spec(x.tensor, scale.tensor, res.tensor, y.tensor, h.tensor).name
        reference = norm(h_ref.to(device)).cpu()
        rows.append(compare(kernel, f"{where}, with residual", y.tensor, reference, dtype, ok))
        rows.append(compare(kernel, f"{where}, new residual", h.tensor, h_ref, dtype, ok))
    return rows
