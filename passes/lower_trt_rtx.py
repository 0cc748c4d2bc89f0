"""Lower the exporter's standard-ONNX decoder to what TensorRT-RTX builds natively (no plugins).

TensorRT-RTX 1.7 findings this pass encodes (see docs/engines.md):

- attention: the opset-23 `Attention` op builds in fp16/bf16 but only with one output, so the KV cache
  stays a `Concat` before it and the op reads the whole present K/V with a boolean mask. Every query
  also sees its own key: a fully masked row (a left-padding query) would give NaN and poison the cache.
- MoE: its native MoE layer does not build below Blackwell, and inside a `Loop` it cannot build
  data-dependent shapes (NonZero needs a plugin; a data-dependent Slice fails to build), so a loop that
  takes each expert's tokens is out. The sparse form gathers each token's top-k experts' weights and
  runs them as a batched matmul, computing only the selected experts' work. Gathered weights grow with
  tokens (k * 3 * hidden * intermediate per token), so `auto` uses that form alone when the deployment's
  most tokens per step (`max_tokens`) fit `gather_budget_mib`, and otherwise `hybrid`: an `If` that runs
  the gather form up to `gather_max_tokens` tokens and the dense form (all experts, unselected ones
  weighted by zero) above. TensorRT-RTX embeds the expert weights once per branch, so a hybrid engine
  carries them twice.
- the delta rule stays an ONNX Scan (it builds as a TensorRT loop); node names inside each layer's body
  are made unique, as TensorRT names layers from them.
- `Reshape` to a shape read from a tensor gets allowzero=1 (exact: that shape has no 0-as-copy entries),
  which spares TensorRT an ambiguous zero-placeholder at runtime.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from qwen_export.passes.base import PassStats, QwenPass

MOE_MODES = ("auto", "gather", "hybrid", "dense")
DEFAULT_GATHER_BUDGET_MIB = 256


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def _producer(value: ir.Value | None, op_type: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type and node.domain == "" else None


def _only_consumer(value: ir.Value, op_type: str) -> ir.Node | None:
    uses = list(value.uses())
    if len(uses) != 1 or value.is_graph_output():
        return None
    node = uses[0].node
    return node if node.op_type == op_type and node.domain == "" else None


class _Emitter:
    """Adds nodes to a graph (or an If branch) under one name prefix: before `before`, after `after` (in
    order), or at the end. Constants go to `root`'s initializers (the main graph)."""

    def __init__(
        self,
        graph: ir.Graph,
        prefix: str,
        before: ir.Node | None = None,
        after: ir.Node | None = None,
        root: ir.Graph | None = None,
    ):
        self.graph, self.prefix, self.before, self.after, self.count = graph, prefix, before, after, 0
        self.root = root or graph

    def op(self, op_type: str, *inputs: ir.Value | None, num_outputs: int = 1, **attrs: Any):
        attributes = [ir.convenience.convert_attribute(k, v) for k, v in attrs.items()]
        name = f"{self.prefix}/{op_type}_{self.count}"
        self.count += 1
        node = ir.Node("", op_type, inputs, attributes=attributes, num_outputs=num_outputs, name=name)
        for i, out in enumerate(node.outputs):
            out.name = f"{name}/output_{i}"
        if self.before is not None:
            self.graph.insert_before(self.before, node)
        elif self.after is not None:
            self.graph.insert_after(self.after, node)
            self.after = node
        else:
            self.graph.append(node)
        return node.outputs[0] if num_outputs == 1 else node.outputs

    def const(self, array: Any, dtype: Any = np.int64) -> ir.Value:
        arr = np.asarray(array, dtype=dtype)
        name = f"{self.prefix}/const_{self.count}"
        self.count += 1
        value = ir.Value(
            name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(ir.DataType.from_numpy(arr.dtype))
        )
        value.const_value = ir.tensor(arr, name=name)
        self.root.register_initializer(value)
        return value


class LowerToTrtRtx(QwenPass):
    """Lower attention to opset-23 Attention and MoE to gathered top-k expert weights, for TensorRT-RTX.

    The delta rule stays a Scan. Runs on the exporter's fp32 standard graph, before the precision pass.
    """

    name: ClassVar[str] = "lower-trt-rtx"

    def __init__(
        self,
        moe: str = "auto",
        gather_budget_mib: int = DEFAULT_GATHER_BUDGET_MIB,
        attention: bool = True,
        max_tokens: int | None = None,
    ) -> None:
        super().__init__()
        if moe not in MOE_MODES:
            raise ValueError(f"moe must be one of {MOE_MODES}, got {moe!r}")
        self.moe = moe
        self.max_tokens = max_tokens
        self.gather_budget_mib = gather_budget_mib
        self.attention = attention

    def __repr__(self) -> str:
        return (
            f"LowerToTrtRtx(moe={self.moe!r}, gather_budget_mib={self.gather_budget_mib}, "
            f"max_tokens={self.max_tokens})"
        )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self.stats = stats = PassStats(fired={"Attention": 0, "MoE": 0}, extras={"moe_mode": self.moe})
        if model.opset_imports.get("", 0) < 23:
            raise ValueError("lower-trt-rtx needs opset 23 (for Attention); the exporter emits 23")
        if self.attention:
            masks: dict[ir.Value, ir.Value] = {}
            for node in [n for n in graph if n.op_type == "Softmax" and n.domain == ""]:
                stats.fire("Attention", self._lower_attention(graph, node, masks))
        if self.moe != "dense":
            gather_max: list[int] = []
            for node in [n for n in graph if n.op_type == "ScatterElements" and n.domain == ""]:
                limit = self._lower_moe(graph, node)
                if limit is not None:
                    stats.fire("MoE")
                    gather_max.append(limit)
            if gather_max:
                stats.extras["gather_max_tokens"] = min(gather_max)
        stats.extras["scan_bodies_renamed"] = self._rename_scan_bodies(graph)
        stats.extras["reshape_allowzero"] = self._reshape_allowzero(graph)
        common_passes.RemoveUnusedNodesPass()(model)
        modified = bool(
            stats.fired_total or stats.extras["scan_bodies_renamed"] or stats.extras["reshape_allowzero"]
        )
        return ir.passes.PassResult(model, modified=modified)

    # --- attention --------------------------------------------------------------------------------------
    def _lower_attention(self, graph: ir.Graph, softmax: ir.Node, masks: dict[ir.Value, ir.Value]) -> int:
        """softmax(Where(mask, q5 @ Transpose(Unsqueeze(K)) * scale, min)) @ Unsqueeze(V) -> Attention."""
        where = _producer(softmax.inputs[0], "Where")
        mul = _producer(where.inputs[1], "Mul") if where else None
        scores = _producer(mul.inputs[0], "MatMul") if mul else None
        scale = _const(mul.inputs[1]) if mul else None
        if scores is None or scale is None or scale.size != 1:
            return 0
        q5_reshape = _producer(scores.inputs[0], "Reshape")
        k_t = _producer(scores.inputs[1], "Transpose")
        k_unsq = _producer(k_t.inputs[0], "Unsqueeze") if k_t else None
        pv = _only_consumer(softmax.outputs[0], "MatMul")
        v_unsq = _producer(pv.inputs[1], "Unsqueeze") if pv else None
        out_reshape = _only_consumer(pv.outputs[0], "Reshape") if pv else None
        if None in (q5_reshape, k_t, k_unsq, v_unsq, out_reshape):
            return 0
        if list(k_t.attributes.get_ints("perm", [])) != [0, 1, 2, 4, 3]:
            return 0
        q5_shape, out_shape = _const(q5_reshape.inputs[1]), _const(out_reshape.inputs[1])
        if q5_shape is None or out_shape is None or len(q5_shape) != 5 or len(out_shape) != 4:
            return 0
        kv_heads, q_heads = int(q5_shape[1]), int(out_shape[1])
        if kv_heads <= 0 or q_heads <= 0 or q_heads % kv_heads:
            return 0
        allowed = where.inputs[0]
        emit = _Emitter(graph, softmax.name.rsplit("/", 1)[0] + "/attention_op", before=out_reshape)
        if allowed not in masks:
            masks[allowed] = self._attention_mask(graph, allowed)
        y = emit.op(
            "Attention",
            q5_reshape.inputs[0],
            k_unsq.inputs[0],
            v_unsq.inputs[0],
            masks[allowed],
            q_num_heads=q_heads,
            kv_num_heads=kv_heads,
            scale=float(scale.reshape(())),
        )
        out_reshape.outputs[0].replace_all_uses_with(y)
        return 1

    def _attention_mask(self, graph: ir.Graph, allowed: ir.Value) -> ir.Value:
        """[B,1,1,T,S] bool -> [B,1,T,S], with every query seeing its own key (no all-false rows)."""
        producer = allowed.producer()
        if producer is None or producer.graph is not graph:
            raise ValueError(f"attention mask {allowed.name} is not computed in the main graph")
        # Right after the mask's producer, so that every attention layer can read it.
        emit = _Emitter(graph, "/masks/attention_op", after=producer)
        mask = allowed
        causal = _producer(producer.inputs[0], "LessOrEqual") if _producer(allowed, "And") else None
        inputs = {v.name: v for v in graph.inputs}
        if causal is not None and "attention_mask" in inputs and "input_ids" in inputs:
            # Cache slots from a CumSum, not the exporter's Range(past, total): TensorRT-RTX 1.7 aborts
            # (Myelin "For int64 shape interval only") on the Range form when the batch is fixed to 1.
            row = emit.op("Gather", inputs["attention_mask"], emit.const(0), axis=0)  # [S]
            ones = emit.op("Add", emit.op("Mul", row, emit.const(0)), emit.const(1))
            k_pos = emit.op("CumSum", ones, emit.const(0), exclusive=1)  # 0 .. S-1
            seq = emit.op("Gather", emit.op("Shape", inputs["input_ids"]), emit.const([1]), axis=0)
            q_pos = emit.op("Slice", k_pos, emit.op("Neg", seq), emit.const([2**62]), emit.const([0]))
            k_row, q_col = (
                emit.op("Unsqueeze", k_pos, emit.const([0])),
                emit.op("Unsqueeze", q_pos, emit.const([1])),
            )
            visible = emit.op("And", emit.op("LessOrEqual", k_row, q_col), producer.inputs[1])
            mask = emit.op("Or", visible, emit.op("Equal", k_row, q_col))
        elif causal is not None:
            mask = emit.op("Or", allowed, emit.op("Equal", causal.inputs[0], causal.inputs[1]))
        return emit.op("Squeeze", mask, emit.const([1]))

    # --- MoE ----------------------------------------------------------------------------------------------
    def _lower_moe(self, graph: ir.Graph, scatter: ir.Node) -> int | None:
        """Replace the dense expert block that reads `routing = ScatterElements(0, top_idx, top_val)`."""
        top_idx, top_val = scatter.inputs[1], scatter.inputs[2]
        topk = top_idx.producer() if top_idx is not None else None
        if topk is None or topk.op_type != "TopK" or scatter.attributes.get_int("axis", 0) not in (1, -1):
            return None
        transpose = _only_consumer(scatter.outputs[0], "Transpose")
        unsq = _only_consumer(transpose.outputs[0], "Unsqueeze") if transpose else None
        weigh = _only_consumer(unsq.outputs[0], "Mul") if unsq else None
        reduce = _only_consumer(weigh.outputs[0], "ReduceSum") if weigh else None
        if reduce is None:
            return None
        expert_out = weigh.inputs[0] if weigh.inputs[1] is unsq.outputs[0] else weigh.inputs[1]
        down_mm = _producer(expert_out, "MatMul")
        down = down_mm.inputs[1] if down_mm else None
        act = _producer(down_mm.inputs[0], "Mul") if down_mm else None
        if down is None or down.const_value is None or len(down.shape) != 3 or act is None:
            return None
        up_split = None
        for operand in act.inputs:
            node = _producer(operand, "Split")
            if node is not None:
                up_split = node
        gate_up_mm = _producer(up_split.inputs[0], "MatMul") if up_split else None
        gate_up = gate_up_mm.inputs[1] if gate_up_mm else None
        if gate_up is None or gate_up.const_value is None or len(gate_up.shape) != 3:
            return None
        tokens = gate_up_mm.inputs[0]
        experts, hidden, two_inter = (int(d) for d in gate_up.shape)
        inter = two_inter // 2
        k = _const(topk.inputs[1])
        if k is None:
            return None
        k = int(k.reshape(-1)[0])
        itemsize = 2  # engines gather fp16/bf16 weights
        per_token = k * 3 * hidden * inter * itemsize
        gather_max = max(1, (self.gather_budget_mib << 20) // per_token)

        dense_nodes = self._backward_slice(reduce, stop={tokens, top_idx, top_val, topk.inputs[0]})
        if dense_nodes is None:
            return None
        prefix = reduce.name.rsplit("/", 2)[0] + "/sparse_experts"
        form = self.moe
        if form == "auto":
            fits = self.max_tokens is not None and self.max_tokens <= gather_max
            form = "gather" if fits else "hybrid"
        self.stats.extras["moe_form"] = form
        if form == "gather":
            emit = _Emitter(graph, prefix, before=reduce)
            routed = self._gather_experts(emit, tokens, top_idx, top_val, gate_up, down, inter)
            reduce.outputs[0].replace_all_uses_with(routed)
            return gather_max

        # hybrid: If(tokens <= gather_max) gather form else the dense form, both as branches.
        emit = _Emitter(graph, prefix, before=reduce)
        n_tokens = emit.op("Gather", emit.op("Shape", tokens), emit.const(0), axis=0)
        small = emit.op("LessOrEqual", n_tokens, emit.const(gather_max))
        then_graph = ir.Graph([], [], nodes=[], name=prefix + "/gather_branch")
        then_out = self._gather_experts(
            _Emitter(then_graph, prefix + "/gather", root=graph),
            tokens,
            top_idx,
            top_val,
            gate_up,
            down,
            inter,
        )
        routed = reduce.outputs[0]
        users = [u.node for u in routed.uses()]
        if routed.is_graph_output() or not users:
            return None
        order = {n: i for i, n in enumerate(graph)}
        first_user = min(users, key=order.__getitem__)
        if_node = ir.Node("", "If", [small], num_outputs=1, name=prefix + "/If")
        if_node.outputs[0].name = prefix + "/If/output_0"
        for value in (then_out, if_node.outputs[0]):
            value.type, value.shape = routed.type, routed.shape
        routed.replace_all_uses_with(if_node.outputs[0])
        else_graph = ir.Graph([], [], nodes=[], name=prefix + "/dense_branch")
        for node in dense_nodes:
            graph.remove(node)
            else_graph.append(node)
        then_graph.outputs.append(then_out)
        else_graph.outputs.append(routed)
        if_node.attributes["then_branch"] = ir.AttrGraph("then_branch", then_graph)
        if_node.attributes["else_branch"] = ir.AttrGraph("else_branch", else_graph)
        # Outer values a branch reads must be defined before the If: the dense block's users come later.
        graph.insert_before(first_user, if_node)
        return gather_max

    @staticmethod
    def _gather_experts(
        emit: _Emitter,
        tokens: ir.Value,
        top_idx: ir.Value,
        top_val: ir.Value,
        gate_up: ir.Value,
        down: ir.Value,
        inter: int,
    ) -> ir.Value:
        """sum_j top_val[n,j] * SwiGLU_{top_idx[n,j]}(tokens[n]) with only the top-k experts' weights."""
        gu = emit.op("Gather", gate_up, top_idx, axis=0)  # [N, k, H, 2I]
        x = emit.op("Unsqueeze", tokens, emit.const([1, 2]))  # [N, 1, 1, H]
        hu = emit.op("MatMul", x, gu)  # [N, k, 1, 2I]
        gate, up = emit.op("Split", hu, emit.const([inter, inter]), num_outputs=2, axis=-1)
        act = emit.op("Mul", emit.op("Mul", gate, emit.op("Sigmoid", gate)), up)
        dw = emit.op("Gather", down, top_idx, axis=0)  # [N, k, I, H]
        out = emit.op("MatMul", act, dw)  # [N, k, 1, H]
        weights = emit.op("Unsqueeze", top_val, emit.const([2, 3]))  # [N, k, 1, 1]
        return emit.op("ReduceSum", emit.op("Mul", out, weights), emit.const([1, 2]), keepdims=0)

    @staticmethod
    def _backward_slice(root: ir.Node, stop: set[ir.Value]) -> list[ir.Node] | None:
        """Nodes that `root` depends on back to `stop` values and constants, in graph order; None when one of
        them is also used outside the slice (it could not move into a branch)."""
        nodes: dict[ir.Node, None] = {}
        todo = [root]
        while todo:
            node = todo.pop()
            if node in nodes:
                continue
            nodes[node] = None
            for value in node.inputs:
                if value is None or value in stop or value.const_value is not None or value.is_graph_input():
                    continue
                producer = value.producer()
                if producer is not None:
                    todo.append(producer)
        members = set(nodes)
        for node in members:
            for out in node.outputs:
                if node is root:
                    continue
                if out.is_graph_output() or any(u.node not in members for u in out.uses()):
                    return None
        order = {n: i for i, n in enumerate(root.graph)}
        return sorted(members, key=order.__getitem__)

    # --- housekeeping -------------------------------------------------------------------------------------
    @staticmethod
    def _rename_scan_bodies(graph: ir.Graph) -> int:
        renamed = 0
        for node in graph:
            if node.op_type not in ("Scan", "Loop") or node.domain != "":
                continue
            body = node.attributes["body"].as_graph()
            for inner in body:
                if inner.name and not inner.name.startswith(node.name):
                    inner.name = f"{node.name}{inner.name}"
                    renamed += 1
        return renamed

    @staticmethod
    def _reshape_allowzero(graph: ir.Graph) -> int:
        changed = 0
        for node in ir.traversal.RecursiveGraphIterator(graph):
            if node.op_type != "Reshape" or node.domain != "" or node.attributes.get_int("allowzero", 0):
                continue
            shape = node.inputs[1]
            if shape is not None and _producer(shape, "Shape") is not None:
                node.attributes["allowzero"] = ir.AttrInt64("allowzero", 1)
                changed += 1
        return changed
