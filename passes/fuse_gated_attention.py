"""Gated attention fusion: projections, q/k norms, partial RoPE, KV cache, GQA softmax, output gate."""

from __future__ import annotations

from typing import Any

import numpy as np

from qwen_export.passes.functions import float_scalar, int_list
from qwen_export.passes.fusion import FusionPass, FusionRule, MatchResult
from qwen_export.passes.onnxscript_adapter import OrValue, Var

BOOL = 9  # onnx TensorProto.BOOL


def visible_keys(op, ids, attention_mask):
    """Key j is visible to query t when j <= past + t and attention_mask[b, j] == 1."""
    seq = op.Gather(op.Shape(ids), 1, axis=0)
    total = op.Gather(op.Shape(attention_mask), 1, axis=0)
    q_pos = op.Range(op.Sub(total, seq), total, 1)
    k_pos = op.Range(0, total, 1)
    causal = op.LessOrEqual(op.Unsqueeze(k_pos, [0]), op.Unsqueeze(q_pos, [1]))
    return op.And(causal, op.Unsqueeze(op.Cast(attention_mask, to=BOOL), [1, 2, 3]))


def partial_rope(op, x, cos, sin, p: str):
    """x*cos + rotate_half(x)*sin on the first rotary_dim channels; the rest passes through."""
    x_rot = op.Slice(x, [0], Var(f"{p}_rot_end"), [-1])
    x1 = op.Slice(x_rot, [0], Var(f"{p}_half_end"), [-1])
    x2 = op.Slice(x_rot, Var(f"{p}_half_start"), Var(f"{p}_rot_end2"), [-1])
    embedded = op.Add(op.Mul(x_rot, cos), op.Mul(op.Concat(op.Neg(x2), x1, axis=-1), sin))
    passthrough = op.Slice(x, Var(f"{p}_tail_start"), Var(f"{p}_tail_end"), [-1])
    return OrValue([op.Concat(embedded, passthrough, axis=-1), embedded])


class GatedAttentionRule(FusionRule):
    op = "GatedAttention"

    def pattern(
        self,
        op,
        x,
        ids,
        attention_mask,
        cos,
        sin,
        past_key,
        past_value,
        q_weight,
        k_weight,
        v_weight,
        o_weight,
        q_norm,
        k_norm,
        qg_shape,
        gate_split,
        gate_shape,
        k_shape,
        v_shape,
        grouped_shape,
        heads_shape,
        merged_shape,
        scale,
        masked_score,
    ):
        allowed = visible_keys(op, ids, attention_mask)

        # q_proj yields query and output gate per head; per-head RMSNorm on q and k.
        query, gate = op.Split(op.Reshape(op.MatMul(x, q_weight), qg_shape), gate_split, axis=-1, _outputs=2)
        gate = op.Reshape(gate, gate_shape)
        key = op.Reshape(op.MatMul(x, k_weight), k_shape)
        value = op.Reshape(op.MatMul(x, v_weight), v_shape)
        query = op.RMSNorm(query, q_norm, _domain="qwen", _outputs=["q_normed"])
        key = op.RMSNorm(key, k_norm, _domain="qwen", _outputs=["k_normed"])

        cos4, sin4 = op.Unsqueeze(cos, [1]), op.Unsqueeze(sin, [1])
        query = partial_rope(op, op.Transpose(query, perm=[0, 2, 1, 3]), cos4, sin4, "q")
        key = partial_rope(op, op.Transpose(key, perm=[0, 2, 1, 3]), cos4, sin4, "k")
        value = op.Transpose(value, perm=[0, 2, 1, 3])

        present_key = op.Concat(past_key, key, axis=2)
        present_value = op.Concat(past_value, value, axis=2)

        # GQA: query head h reads kv head h // groups; masked scores are float32.min.
        q5 = op.Reshape(query, grouped_shape)
        scores = op.MatMul(q5, op.Transpose(op.Unsqueeze(present_key, [2]), perm=[0, 1, 2, 4, 3]))
        scores = op.Where(allowed, op.Mul(scores, scale, _outputs=["scaled"]), masked_score)
        attn = op.MatMul(op.Softmax(scores, axis=-1), op.Unsqueeze(present_value, [2]))
        attn = op.Transpose(op.Reshape(attn, heads_shape), perm=[0, 2, 1, 3])
        attn = op.Mul(op.Reshape(attn, merged_shape), op.Sigmoid(gate))
        return op.MatMul(attn, o_weight), present_key, present_value

    def check(self, context, **b: Any) -> MatchResult:
        weights = [b[n] for n in ("q_weight", "k_weight", "v_weight", "o_weight", "q_norm", "k_norm")]
        missing = [w for w in weights if w.const_value is None]
        if missing:
            return self.refuse("weights are not initializers", *missing)
        if not b["ids"].is_graph_input():
            return self.refuse("sequence length is not read from a graph input", b["ids"])
        names = (
            "qg_shape",
            "gate_split",
            "gate_shape",
            "k_shape",
            "v_shape",
            "grouped_shape",
            "heads_shape",
            "merged_shape",
        )
        s = {n: int_list(b[n]) for n in names}
        if any(v is None for v in s.values()) or len(s["qg_shape"]) != 4 or len(s["k_shape"]) != 4:
            return self.refuse(
                "reshape/split arguments are not constants of the expected rank", b["qg_shape"]
            )
        nh, hd2 = s["qg_shape"][2:]
        kv, hd = s["k_shape"][2:]
        if nh <= 0 or kv <= 0 or nh % kv or hd2 != 2 * hd:
            return self.refuse("q_proj is not [query | gate] per head", b["qg_shape"])
        expected = {
            "qg_shape": [0, 0, nh, 2 * hd],
            "gate_split": [hd, hd],
            "gate_shape": [0, 0, nh * hd],
            "k_shape": [0, 0, kv, hd],
            "v_shape": [0, 0, kv, hd],
            "grouped_shape": [0, kv, nh // kv, -1, hd],
            "heads_shape": [0, nh, -1, hd],
            "merged_shape": [0, 0, nh * hd],
        }
        wrong = [n for n in names if s[n] != expected[n]]
        if wrong:
            return self.refuse(
                f"head layout differs from num_heads={nh}, num_kv_heads={kv}, head_dim={hd}", b[wrong[0]]
            )
        shapes = {n: list(w.const_value.shape) for n, w in zip("q k v o qn kn".split(), weights, strict=True)}
        hidden = shapes["q"][0]
        if (
            shapes["q"] != [hidden, nh * 2 * hd]
            or shapes["k"] != [hidden, kv * hd]
            or shapes["v"] != shapes["k"]
            or shapes["o"] != [nh * hd, hidden]
            or shapes["qn"] != [hd]
            or shapes["kn"] != [hd]
        ):
            return self.refuse("projection or norm weights do not match the head layout", b["q_weight"])
        rot = self._rotary_dim(b, hd)
        if rot is None:
            return self.refuse(
                "RoPE is not the same rotate-half over the first rotary_dim channels of q and k"
            )
        scale, masked = float_scalar(b["scale"]), float_scalar(b["masked_score"])
        if scale is None or not scale > 0:
            return self.refuse("score scale is not a positive constant", b["scale"])
        if masked != float(np.finfo(np.float32).min):
            return self.refuse("masked scores are not float32.min", b["masked_score"])
        eps = [b[n].producer().attributes.get("epsilon") for n in ("q_normed", "k_normed")]
        if any(e is None or e.is_ref() for e in eps) or eps[0].value != eps[1].value:
            return self.refuse("q_norm and k_norm epsilons differ", b["q_normed"])
        self._attrs = dict(
            num_heads=nh,
            num_kv_heads=kv,
            head_dim=hd,
            rotary_dim=rot,
            epsilon=float(eps[0].value),
            scale=scale,
        )
        return MatchResult()

    @staticmethod
    def _rotary_dim(b: dict[str, Any], head_dim: int) -> int | None:
        dims = set()
        for p in ("q", "k"):
            v = {
                n: int_list(b.get(f"{p}_{n}"))
                for n in ("rot_end", "half_end", "half_start", "rot_end2", "tail_start", "tail_end")
            }
            if any(v[n] is None or len(v[n]) != 1 for n in ("rot_end", "half_end", "half_start", "rot_end2")):
                return None
            rot = v["rot_end"][0]
            if (
                v["rot_end2"] != [rot]
                or v["half_end"] != [rot // 2]
                or v["half_start"] != [rot // 2]
                or rot % 2
            ):
                return None
            partial = v["tail_start"] is not None
            if partial != (rot < head_dim) or (
                partial and (v["tail_start"] != [rot] or v["tail_end"][0] < head_dim)
            ):
                return None
            dims.add(rot)
        return dims.pop() if len(dims) == 1 else None

    def aliases(self, bindings):
        return {bindings["ids"]: 0}  # the body takes the sequence length from X [B, T, H]

    def attribute_uses(self, bindings):
        return [(bindings["scaled"].producer(), 1, "scale")]


class FuseGatedAttention(FusionPass):
    """Fuse each gated full-attention block (projections, q/k norms, RoPE, KV cache, GQA, gate, o_proj).

    Needs fuse-rms-norm first: q_norm and k_norm are matched as nested qwen.RMSNorm calls that stay in the
    block's body. The mask is rebuilt from attention_mask inside each block (the op's spec input).
    """

    name = "fuse-gated-attention"
    rule = GatedAttentionRule
