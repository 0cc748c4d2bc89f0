"""Gated DeltaNet fusion: projections, causal conv, delta-rule Scan and gated norm -> qwen.GatedDeltaNet."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnx_ir as ir

from qwen_export.passes.functions import float_scalar, int_list
from qwen_export.passes.fusion import FusionPass, FusionRule, MatchResult
from qwen_export.passes.onnxscript_adapter import OrValue, Pattern

INT64_BIG = 2**31  # a Slice end at least this large means "to the end"


def l2norm(op, x):
    """x / sqrt(sum(x^2) + 1e-6) over the head dimension."""
    return op.Mul(x, op.Reciprocal(op.Sqrt(op.Add(op.ReduceSum(op.Mul(x, x), [-1], keepdims=1), 1e-6))))


def delta_rule_step(op, state, q_t, k_t, v_t, g_t, beta_t):
    """One token: S = S*exp(g); S += k (x) beta*(v - S^T k); o = S^T q (per value head)."""
    decayed = op.Mul(state, op.Unsqueeze(op.Exp(g_t), [2, 3]))
    kv_mem = op.MatMul(op.Unsqueeze(k_t, [2]), decayed)
    delta = op.Mul(op.Sub(op.Unsqueeze(v_t, [2]), kv_mem), op.Unsqueeze(beta_t, [2, 3]))
    new_state = op.Add(decayed, op.MatMul(op.Unsqueeze(k_t, [3]), delta), _outputs=["new_state"])
    return op.Squeeze(op.MatMul(op.Unsqueeze(q_t, [2]), new_state), [2])


_STEP = Pattern(delta_rule_step, name="delta_rule_step")


def is_delta_rule_step(model: ir.Model, body: ir.Graph) -> str | None:
    """None when the Scan body is one gated delta-rule step over (state, q, k, v, g, beta), else why not."""
    if len(body.inputs) != 6 or len(body.outputs) != 2:
        return "Scan body does not take (state, q, k, v, g, beta) and return (state, o)"
    out = body.outputs[1].producer()
    match = _STEP.match(model, body, out, check_nodes_are_removable=False) if out is not None else None
    if not match:
        return "Scan body is not a delta rule step"
    b = match.bindings
    if [b["state"], b["q_t"], b["k_t"], b["v_t"], b["g_t"], b["beta_t"]] != list(body.inputs):
        return "Scan body reads its inputs in another role than (state, q, k, v, g, beta)"
    state_out = body.outputs[0]
    if state_out is not b["new_state"] and not (
        state_out.producer() is not None
        and state_out.producer().op_type == "Identity"
        and state_out.producer().inputs[0] is b["new_state"]
    ):
        return "Scan body's carried state is not the updated state"
    return None


class GatedDeltaNetRule(FusionRule):
    op = "GatedDeltaNet"

    def pattern(
        self,
        op,
        x,
        ids,
        attention_mask,
        past_conv,
        past_recurrent,
        qkv_weight,
        z_weight,
        b_weight,
        a_weight,
        conv_weight,
        neg_exp_A,
        dt_bias,
        norm_weight,
        out_weight,
        mask_end,
        z_shape,
        conv_start,
        conv_end,
        split,
        q_shape,
        k_shape,
        v_shape,
        heads_q,
        heads_k,
        q_scale,
        out_shape,
    ):
        # Padding tokens must not reach the state: X * attention_mask[:, -T:].
        seq = op.Gather(op.Shape(ids), [1], axis=0)
        token_mask = op.Unsqueeze(op.Cast(op.Slice(attention_mask, op.Neg(seq), mask_end, [1]), to=1), [2])
        x = op.Mul(x, token_mask)

        mixed = op.MatMul(x, qkv_weight)
        z = op.Reshape(op.MatMul(x, z_weight), z_shape)
        b = op.MatMul(x, b_weight)
        a = op.MatMul(x, a_weight)

        # Depthwise causal conv over [past K-1 columns | new tokens], SiLU; the window's tail is the state.
        window = op.Concat(past_conv, op.Transpose(mixed, perm=[0, 2, 1]), axis=2)
        present_conv = op.Slice(window, conv_start, conv_end, [2])
        conv = op.Conv(window, conv_weight, _outputs=["conv"])
        mixed = op.Transpose(op.Mul(conv, op.Sigmoid(conv)), perm=[0, 2, 1])

        q, k, v = op.Split(mixed, split, axis=-1, _outputs=3)
        q = l2norm(op, op.Reshape(q, q_shape))
        k = l2norm(op, op.Reshape(k, k_shape))
        v = op.Reshape(v, v_shape)
        q = op.Mul(OrValue([op.Gather(q, heads_q, axis=2), q]), q_scale)
        k = OrValue([op.Gather(k, heads_k, axis=2), k])

        beta = op.Sigmoid(b)
        g = op.Mul(neg_exp_A, op.Softplus(op.Add(a, dt_bias)))
        present_recurrent, core = op.Scan(
            past_recurrent, q, k, v, g, beta, _outputs=["present_recurrent", "core"]
        )

        gated = op.GatedRMSNorm(core, z, norm_weight, _domain="qwen", _outputs=["gated"])
        y = op.MatMul(op.Reshape(gated, out_shape), out_weight)
        return y, present_conv, present_recurrent

    def check(self, context, **bound) -> MatchResult:
        m = SimpleNamespace(**bound)  # the match's values by pattern name
        weights = [
            m.qkv_weight,
            m.z_weight,
            m.b_weight,
            m.a_weight,
            m.conv_weight,
            m.neg_exp_A,
            m.dt_bias,
            m.norm_weight,
            m.out_weight,
        ]
        missing = [w for w in weights if w.const_value is None]
        if missing:
            return self.refuse("weights are not initializers", *missing)
        if not m.ids.is_graph_input():
            return self.refuse("sequence length is not read from a graph input", m.ids)
        shapes = [
            int_list(v)
            for v in (
                m.q_shape,
                m.k_shape,
                m.v_shape,
                m.z_shape,
                m.out_shape,
                m.split,
                m.conv_start,
                m.conv_end,
                m.mask_end,
            )
        ]
        if any(s is None for s in shapes):
            return self.refuse("reshape/split/slice arguments are not constants")
        q_s, k_s, v_s, z_s, out_s, split_s, start, end, m_end = shapes
        if (
            len(q_s) != 4
            or q_s[:2] != [0, 0]
            or k_s != q_s
            or len(v_s) != 4
            or v_s[:2] != [0, 0]
            or z_s != v_s
        ):
            return self.refuse("head reshapes are not [0, 0, heads, dim]", m.q_shape)
        nk, dk, nv, dv = q_s[2], q_s[3], v_s[2], v_s[3]
        conv_dim = 2 * nk * dk + nv * dv
        c, one, kernel = m.conv_weight.const_value.shape
        if split_s != [nk * dk, nk * dk, nv * dv] or c != conv_dim or one != 1 or out_s != [0, 0, nv * dv]:
            return self.refuse("channel split does not match the head shapes", m.split)
        if m.qkv_weight.const_value.shape[1] != conv_dim or m.z_weight.const_value.shape[1] != nv * dv:
            return self.refuse("projection widths do not match the head shapes", m.qkv_weight)
        if (
            list(m.b_weight.const_value.shape[1:]) != [nv]
            or list(m.a_weight.const_value.shape[1:]) != [nv]
            or list(m.neg_exp_A.const_value.shape) != [nv]
            or list(m.dt_bias.const_value.shape) != [nv]
            or list(m.norm_weight.const_value.shape) != [dv]
        ):
            return self.refuse("gate/decay/norm parameters do not match the head counts", m.b_weight)
        reason = self._conv_problem(m.conv.producer(), conv_dim, kernel, start, end, m_end)
        if reason:
            return self.refuse(reason, m.conv)
        grouped = m.heads_q is not None
        if grouped != (nv != nk) or (m.heads_k is None) == grouped:
            return self.refuse("value heads are not mapped to key heads", m.heads_q)
        if grouped and (
            int_list(m.heads_q) != list(np.arange(nv) // (nv // nk))
            or int_list(m.heads_k) != int_list(m.heads_q)
        ):
            return self.refuse(
                "value head j does not read key head j // (num_v_heads / num_k_heads)", m.heads_q
            )
        scale = float_scalar(m.q_scale)
        if scale is None or not np.isclose(scale, dk**-0.5, rtol=1e-6):
            return self.refuse("query is not scaled by 1/sqrt(head_k_dim)", m.q_scale)
        reason = self._scan_problem(context.model, m.core.producer())
        if reason:
            return self.refuse(reason, m.core)
        epsilon = m.gated.producer().attributes.get("epsilon")
        if epsilon is None or epsilon.is_ref():
            return self.refuse("gated norm has no epsilon", m.gated)
        self._attrs = dict(
            num_k_heads=nk,
            num_v_heads=nv,
            head_k_dim=dk,
            head_v_dim=dv,
            conv_kernel=kernel,
            epsilon=float(epsilon.value),
        )
        return MatchResult()

    @staticmethod
    def _conv_problem(node: ir.Node, channels: int, kernel: int, start, end, mask_end) -> str | None:
        a = {k: v.value for k, v in node.attributes.items()}
        if a.get("group") != channels:
            return "conv is not depthwise (group != channels)"
        if list(a.get("kernel_shape", [kernel])) != [kernel] or any(
            set(a.get(k, [1])) != {1} for k in ("strides", "dilations")
        ):
            return "conv kernel/stride/dilation is not a plain causal conv"
        if set(a.get("pads", [0])) != {0} or a.get("auto_pad", "NOTSET") != "NOTSET" or len(node.inputs) > 2:
            return "conv has padding or a bias"
        if start != [-(kernel - 1)] or end[0] < INT64_BIG or mask_end[0] < INT64_BIG:
            return "conv state is not the window's last kernel-1 columns"
        return None

    @staticmethod
    def _scan_problem(model: ir.Model, scan: ir.Node) -> str | None:
        a = {k: v.value for k, v in scan.attributes.items()}
        if a.get("num_scan_inputs") != 5 or list(a.get("scan_input_axes", [])) != [1] * 5:
            return "Scan does not step q, k, v, g, beta over the sequence axis"
        if list(a.get("scan_output_axes", [])) != [1] or any(
            k in a for k in ("scan_input_directions", "scan_output_directions")
        ):
            return "Scan output is not stacked forward along the sequence axis"
        return is_delta_rule_step(model, scan.attributes["body"].as_graph())

    def aliases(self, bindings):
        return {bindings["ids"]: 0}  # the body takes the sequence length from X [B, T, H]


class FuseGatedDeltaNet(FusionPass):
    """Fuse each Gated DeltaNet block (mask, projections, causal conv, delta rule, gated norm, out_proj).

    Needs fuse-gated-rms-norm first: the block's output norm is matched as a nested qwen.GatedRMSNorm,
    which stays a nested call in the block's body. The Scan body must be one gated delta-rule step.
    """

    name = "fuse-gated-deltanet"
    rule = GatedDeltaNetRule
