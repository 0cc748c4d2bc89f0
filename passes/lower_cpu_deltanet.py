"""Lowering of qwen.GatedDeltaNet onto qwen-export's CPU kernel (target ort-cpu-int4).

    Xm       = X * attention_mask[:, -T:]                            (shared [B, T, 1] float mask)
    proj     = MatMul(Xm, [qkv | z | b | a])                          one GEMM, as the ORT lowering
    Y0, present_conv, present_recurrent = qwen.cpu GatedDeltaRule(proj, conv_w, past_conv, past_recurrent,
                                                                  dt_bias, -exp(A_log), norm_w)
    Y        = MatMul(Y0, out_weight)

GatedDeltaRule (plugins/ort_cpu/gated_delta_rule/) is the conv, l2 norms, gates, delta rule and gated
RMSNorm of the ORT lowering's CausalConvWithState .. GatedRMSNorm chain (twelve nodes) in one kernel, with
the states in the same layouts ([B, C, K-1] and [B, nv, dk, dv]). Why: at decode those twelve nodes each
do a few microseconds of work and cost more in dispatch than in arithmetic.
"""

from __future__ import annotations

import onnx_ir as ir

from qwen_export.cpu_kernels import DOMAIN as CPU_DOMAIN
from qwen_export.passes.lower_ort_deltanet import project
from qwen_export.passes.lower_ort_emit import Emitter, attribute


def lower_gated_deltanet_cpu(e: Emitter, node: ir.Node) -> list[ir.Value]:
    past_conv, past_recurrent = node.inputs[2:4]
    conv_w, neg_exp_a, dt_bias, norm_w, out_w = node.inputs[8:]
    h, projected = project(e, node)
    core, present_conv, present_recurrent = e.op_multi(
        "GatedDeltaRule",
        [projected, conv_w, past_conv, past_recurrent, dt_bias, neg_exp_a, norm_w],
        3,
        domain=CPU_DOMAIN,
        num_k_heads=h.nk,
        num_v_heads=h.nv,
        head_k_dim=h.dk,
        head_v_dim=h.dv,
        conv_kernel=h.kernel,
        epsilon=float(attribute(node, "epsilon")),
    )
    return [e.op("MatMul", core, out_w), present_conv, present_recurrent]
