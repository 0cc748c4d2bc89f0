"""ORT lowering of qwen.MoE: com.microsoft MoE for the routed experts, MatMuls for the shared expert.

    r, g, u, s = Split(MatMul(X, [router_weight | shared_gate | shared_up | shared_expert_gate]))  one GEMM
    routed     = MoE(X, Reshape(r, [-1, E]), fc1, -, fc2; k=top_k, normalize_routing_weights=normalize)
    shared     = MatMul(QuickGelu(g; alpha=1) * u, shared_down)         QuickGelu with alpha 1 is silu
    Y          = GatedAdd(routed, shared, Sigmoid(s))                    routed + shared * sigmoid(s)

ORT's MoE takes router logits: it applies softmax over all experts, picks the top k and, with
normalize_routing_weights=1, renormalises the k weights (= softmax over the chosen logits), exactly the
op's step 2. Its CPU kernel only takes interleaved SwiGLU weights (swiglu_fusion=1): fc1 is
[E, 2I, H] with rows gate_0, up_0, gate_1, up_1, ...; fc2 is [E, H, I]. A one-expert MoE node would also
compute the shared expert (two nodes fewer), but measured on CPU it is 1.5-2.3x slower than these MatMuls
for a 128-token prompt (hidden 1024-4096), and no faster for one token.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qwen_export.passes.lower_ort_emit import MS_DOMAIN, Emitter, NotLowered, attribute, const_shape


def interleave_swiglu(gate_up: np.ndarray) -> np.ndarray:
    """[E, H, 2I] (gate columns, then up columns) -> fc1 [E, 2I, H] with gate/up rows interleaved."""
    e, h, two_i = gate_up.shape
    return gate_up.reshape(e, h, 2, two_i // 2).transpose(0, 3, 2, 1).reshape(e, two_i, h)


def _swiglu_kwargs(k: int, normalize: int) -> dict:
    return dict(
        domain=MS_DOMAIN,
        k=k,
        normalize_routing_weights=normalize,
        activation_type="swiglu",
        swiglu_fusion=1,
        activation_alpha=1.0,
        activation_beta=0.0,
    )


def lower_moe(e: Emitter, node: ir.Node) -> list[ir.Value]:
    x, router, gate_up, down, shared_gate, shared_up, shared_down, shared_expert_gate = node.inputs
    top_k, normalize = int(attribute(node, "top_k")), int(attribute(node, "normalize"))
    hidden, experts = const_shape(router, "router_weight")
    inter = const_shape(down, "down")[1]
    shared_inter = const_shape(shared_gate, "shared_gate")[1]
    if const_shape(gate_up, "gate_up") != (experts, hidden, 2 * inter):
        raise NotLowered("gate_up is not [E, H, 2I]")
    for value, what in ((shared_up, "shared_up"), (shared_expert_gate, "shared_expert_gate")):
        const_shape(value, what)
    if x is not None and x.shape is not None and len(x.shape) not in (2, 3):
        raise NotLowered("com.microsoft MoE takes 2-D or 3-D input")

    ctx = e.ctx
    gates = ctx.derived(
        f"{router.name}.ort_with_shared",
        [router, shared_gate, shared_up, shared_expert_gate],
        lambda *w: np.concatenate(w, axis=1),
        (hidden, experts + 2 * shared_inter + 1),
    )
    fc1 = ctx.derived(f"{gate_up.name}.ort_fc1", [gate_up], interleave_swiglu, (experts, 2 * inter, hidden))
    fc2 = ctx.derived(
        f"{down.name}.ort_fc2", [down], lambda d: d.transpose(0, 2, 1), (experts, hidden, inter)
    )

    logits, gate, up, shared_logit = e.split(
        e.op("MatMul", x, gates), [experts, shared_inter, shared_inter, 1]
    )
    routed = e.op(
        "MoE", x, e.reshape(logits, [-1, experts]), fc1, None, fc2, **_swiglu_kwargs(top_k, normalize)
    )
    hidden_act = e.op("Mul", e.op("QuickGelu", gate, domain=MS_DOMAIN, alpha=1.0), up)
    shared = e.op("MatMul", hidden_act, shared_down)
    return [e.op("GatedAdd", routed, shared, e.op("Sigmoid", shared_logit), domain=MS_DOMAIN)]
