"""Precision policy: fp16/bf16 weights and activations with fp32 islands, expressed as Casts in the graph.

TensorRT 11 and TensorRT-RTX build strongly typed networks: each layer runs in the type of its inputs,
so the precision policy has to be the graph's own dtypes. The islands follow what the reference
(transformers' Qwen3.5 / Qwen3-Next modules) computes in fp32 whatever the model dtype:

- norm statistics: RMSNorm runs wholly in fp32 (`x.float()`, scale by `1 + w` in fp32), and so do the
  DeltaNet q/k L2-norm statistics; RMSNormalization / LayerNormalization ops run in fp32;
- softmax: attention scores from the mask on (`softmax(..., dtype=float32)`), and the router: logits,
  softmax, top-k and renormalisation (routing is discrete; a flipped expert changes the output);
- DeltaNet gates and decay: beta = sigmoid(b), g = -exp(A_log) * softplus(a + dt_bias);
- the delta rule: a Scan/Loop body and its carried recurrent state stay fp32 (the reference casts
  q, k, v, g, beta to fp32 for it);
- position arithmetic: anything computed from integer inputs only (RoPE tables, masks).

Graph I/O: KV cache and conv state in the low precision, recurrent state fp32, logits fp32 on request.
Opset-23 `Attention` runs in the low precision (TensorRT refuses its softmax_precision attribute; its
fused kernels accumulate the softmax in fp32). Nodes of other domains (fused qwen ops) are
kept fp32 with casts around them: their kernels, not this pass, decide their precision.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from qwen_export.exporter.checkpoint import cast_array
from qwen_export.passes.base import PassStats, QwenPass
from qwen_export.passes.names import UniqueNames

FLOAT = ir.DataType.FLOAT
LOW_DTYPES = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}
FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}

# Ops that only move or select data: they run in the dtype of their (first float) data input.
MOVEMENT = {
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Split", "Slice", "Gather", "GatherElements",
    "GatherND", "Identity", "Expand", "Flatten", "Tile", "Where", "Pad",
}  # fmt: skip
# Ops whose float inputs do not need a particular dtype (they read shapes only).
SHAPE_ONLY = {"Shape", "Size"}
UNARY_ELEMENTWISE = {"Sigmoid", "Softplus", "Exp", "Neg", "Log", "Tanh", "Relu", "Sqrt", "Reciprocal", "Abs"}
BINARY_ELEMENTWISE = {"Add", "Mul", "Sub", "Div", "Pow"}
NORM_OPS = {"RMSNormalization", "LayerNormalization"}
LOOPS = {"Scan", "Loop"}


def _is_const(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and not value.is_graph_input()


def _dtype(value: ir.Value | None) -> ir.DataType | None:
    return value.type.dtype if value is not None and value.type is not None else None


def _is_float(value: ir.Value | None) -> bool:
    return _dtype(value) in FLOAT_TYPES


class Precision(QwenPass):
    """Convert an fp32 graph to fp16/bf16 with fp32 islands (norms, softmax, router, DeltaNet gates, state).

    Weights become low-precision initializers (converted lazily, so saving streams them); activations
    follow; islands read fp32 through Casts (one per value and graph, shared by its readers). Runs on the
    exporter's fp32 graph, after the target's lowering.
    """

    name: ClassVar[str] = "precision"

    def __init__(
        self,
        precision: str = "bf16",
        logits_fp32: bool = True,
        kv_cache: str = "low",
        conv_state: str = "low",
        recurrent_state: str = "fp32",
        residual: str = "fp32",
        lm_head: str = "low",
    ) -> None:
        super().__init__()
        if precision not in LOW_DTYPES:
            raise ValueError(f"precision must be one of {sorted(LOW_DTYPES)}, got {precision!r}")
        choices = {
            "kv_cache": kv_cache, "conv_state": conv_state, "recurrent_state": recurrent_state,
            "residual": residual, "lm_head": lm_head,
        }  # fmt: skip
        for key, choice in choices.items():
            if choice not in ("low", "fp32"):
                raise ValueError(f"{key} must be 'low' or 'fp32', got {choice!r}")
        self.precision = precision
        self.low = LOW_DTYPES[precision]
        self.logits_fp32 = logits_fp32
        self.state_policy = {"kv": kv_cache, "conv": conv_state, "recurrent": recurrent_state}
        self.residual, self.lm_head = residual, lm_head

    def __repr__(self) -> str:
        return f"Precision({self.precision!r}, logits_fp32={self.logits_fp32})"

    # --- entry ------------------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        common_passes.ShapeInferencePass()(model)
        graph = model.graph
        self._casts: dict[tuple[int, ir.Value, ir.DataType], ir.Value] = {}
        self._low_consts: dict[ir.Value, ir.Value] = {}
        self._dt: dict[ir.Value, ir.DataType] = {}
        self._unique = UniqueNames()
        self.stats = PassStats(
            extras={"precision": self.precision, "casts": 0, "fp32_nodes": 0, "low_nodes": 0, "islands": {}}
        )
        extras = self.stats.extras

        derived = _int_derived_nodes(graph)
        islands = self._islands(graph, derived)
        for reason, nodes in islands.items():
            extras["islands"][reason] = len(nodes)
        self._fp32 = set().union(*islands.values()) if islands else set()

        for value in graph.inputs:
            if _is_float(value):
                self._dt[value] = self._io_dtype(value.name)
                value.type = ir.TensorType(self._dt[value])
        self._rewrite(graph)
        self._fix_outputs(graph)
        common_passes.RemoveUnusedNodesPass()(model)
        self._drop_unused_initializers(graph)
        extras["low_initializers"] = sum(
            1
            for v in graph.initializers.values()
            if v.const_value is not None and v.const_value.dtype == self.low
        )
        return ir.passes.PassResult(model, modified=True)

    def _io_dtype(self, name: str) -> ir.DataType:
        if name.endswith("recurrent_state"):
            kind = "recurrent"
        elif name.endswith("conv_state"):
            kind = "conv"
        else:
            kind = "kv"
        return FLOAT if self.state_policy[kind] == "fp32" else self.low

    # --- islands ----------------------------------------------------------------------------------------
    def _islands(self, graph: ir.Graph, derived: set[ir.Node]) -> dict[str, set[ir.Node]]:
        islands: dict[str, set[ir.Node]] = {
            "position_and_mask": set(derived),
            "norm_statistics": set(),
            "softmax": set(),
            "router": set(),
            "deltanet_gates": set(),
            "recurrence": set(),
            "other_domain": set(),
            "residual_stream": _residual_chain(graph) if self.residual == "fp32" else set(),
            "lm_head": _lm_head(graph) if self.lm_head == "fp32" else set(),
        }
        for node in _nodes(graph):
            if node.domain not in ("", "ai.onnx"):
                islands["other_domain"].add(node)
            elif node.op_type in NORM_OPS:
                islands["norm_statistics"].add(node)
            elif node.op_type in ("ReduceMean", "ReduceSum") and _square_of(node.inputs[0]) is not None:
                islands["norm_statistics"] |= _norm_chain(node)
            elif node.op_type == "Softmax":
                island = islands["softmax"]
                island.add(node)
                island |= _pre_softmax(node, derived)
                if any(u.node.op_type == "TopK" for u in node.outputs[0].uses()):
                    islands["router"] |= _router(node, derived)
            elif node.op_type in LOOPS:
                islands["recurrence"].add(node)
                islands["deltanet_gates"] |= _gate_chain(node)
        return islands

    # --- rewrite ----------------------------------------------------------------------------------------
    def _rewrite(self, graph: ir.Graph) -> None:
        for node in list(graph):
            self._rewrite_node(graph, node)

    def _rewrite_node(self, graph: ir.Graph, node: ir.Node) -> None:
        float_inputs = [(i, v) for i, v in enumerate(node.inputs) if v is not None and self._known_float(v)]
        if node.op_type in SHAPE_ONLY:
            return
        if node.op_type == "If" and node.domain == "":
            self._rewrite_if(node)
            return
        if node.op_type == "DequantizeLinear" and node.domain == "" and node not in self._fp32:
            # Weights dequantized straight into the low dtype; the block scales stay fp32 (bf16 scales
            # would move every dequantized weight by up to 2^-9 relative).
            node.attributes["output_dtype"] = ir.AttrInt64("output_dtype", int(self.low))
            self._dt[node.outputs[0]] = self.low
            node.outputs[0].type = ir.TensorType(self.low)
            self.stats.extras["low_nodes"] += 1
            return
        if node in self._fp32 or node.op_type in LOOPS | {"ConstantOfShape"}:
            compute = FLOAT
        elif node.op_type in MOVEMENT:
            data = [v for i, v in float_inputs if not (node.op_type == "Where" and i == 0)]
            compute = self._current(data[0]) if data else self.low
        elif node.op_type == "Cast":
            compute = FLOAT  # an int -> float cast the graph had (position or mask arithmetic)
        else:
            compute = self.low
        self.stats.extras["fp32_nodes" if compute == FLOAT else "low_nodes"] += 1
        for index, value in float_inputs:
            if node.op_type == "Where" and index == 0:
                continue
            node.replace_input_with(index, self._as(graph, node, value, compute))
        for out in node.outputs:
            if _dtype(out) in FLOAT_TYPES:  # a loop body (untouched) is fp32, like its node
                self._dt[out] = compute
                out.type = ir.TensorType(compute)

    def _rewrite_if(self, node: ir.Node) -> None:
        """Both branches follow the policy; they read outer values through casts of their own."""
        results: list[list[ir.DataType | None]] = []
        branches = [node.attributes[name].as_graph() for name in ("then_branch", "else_branch")]
        for branch in branches:
            self._rewrite(branch)
            results.append([self._dt.get(v, _dtype(v)) for v in branch.outputs])
        for i, out in enumerate(node.outputs):
            kinds = {r[i] for r in results}
            if not kinds <= FLOAT_TYPES:
                continue
            # Branches must agree: a mixed pair settles on the low precision.
            target = results[0][i] if len(kinds) == 1 else self.low
            for branch in branches:
                value = branch.outputs[i]
                if self._dt.get(value, _dtype(value)) != target:
                    cast = self._new_cast(branch, None, value, target)
                    branch.outputs[i] = cast
            self._dt[out] = target
            out.type = ir.TensorType(target)
        self.stats.extras["low_nodes"] += 1

    def _known_float(self, value: ir.Value) -> bool:
        return value in self._dt or _is_float(value)

    def _current(self, value: ir.Value) -> ir.DataType:
        if value in self._dt:
            return self._dt[value]
        if _is_const(value):
            return self.low  # a weight: whatever the consumer needs; movement ops take the low copy
        return _dtype(value) or FLOAT

    def _as(self, graph: ir.Graph, node: ir.Node, value: ir.Value, dtype: ir.DataType | None) -> ir.Value:
        """`value` in `dtype`: itself, a converted initializer, or a (shared) Cast placed before `node`."""
        if dtype is None:
            return value
        if value not in self._dt and _is_const(value):
            if value.const_value.dtype == dtype:
                return value
            if dtype == FLOAT:
                return value
            return self._low_const(value)
        if self._current(value) == dtype:
            return value
        key = (id(graph), value, dtype)
        if key not in self._casts:
            self._casts[key] = self._new_cast(graph, node, value, dtype)
        return self._casts[key]

    def _new_cast(
        self, graph: ir.Graph, before: ir.Node | None, value: ir.Value, dtype: ir.DataType
    ) -> ir.Value:
        suffix = "fp32" if dtype == FLOAT else self.precision
        name = self._unique(f"{value.name}/{suffix}")  # one outer value can be cast in both branches of an If
        cast = ir.Node("", "Cast", [value], attributes=[ir.AttrInt64("to", int(dtype))], name=f"{name}/Cast")
        out = cast.outputs[0]
        out.name = name
        out.type, out.shape = ir.TensorType(dtype), value.shape
        if before is not None:
            graph.insert_before(before, cast)
        else:
            graph.append(cast)
        self._dt[out] = dtype
        self.stats.extras["casts"] += 1
        return out

    def _low_const(self, value: ir.Value) -> ir.Value:
        if value not in self._low_consts:
            tensor = value.const_value
            name = f"{value.name}.{self.precision}"
            if hasattr(tensor, "with_dtype"):  # a checkpoint tensor: read straight into the low dtype
                lazy = tensor.with_dtype(self.low)
                lazy.name = name
            else:
                lazy = ir.LazyTensor(
                    _converter(tensor, self.low), dtype=self.low, shape=tensor.shape, name=name
                )
            low = ir.Value(name=name, shape=value.shape, type=ir.TensorType(self.low))
            low.const_value = lazy
            value.graph.register_initializer(low)  # type: ignore[union-attr]
            self._low_consts[value] = low
        return self._low_consts[value]

    def _fix_outputs(self, graph: ir.Graph) -> None:
        for index, value in enumerate(list(graph.outputs)):
            if not self._known_float(value):
                continue
            if value.name == "logits":
                wanted = FLOAT if self.logits_fp32 else self.low
            elif value.name.startswith("present."):
                wanted = self._io_dtype(value.name)
            else:
                wanted = FLOAT  # debug outputs (hidden states) stay comparable with the reference
            if self._current(value) == wanted:
                continue
            name = value.name
            value.name = f"{name}/{self.precision if wanted == FLOAT else 'fp32'}_source"
            cast = self._new_cast(graph, None, value, wanted)
            cast.name = name
            graph.outputs[index] = cast

    @staticmethod
    def _drop_unused_initializers(graph: ir.Graph) -> None:
        for name, value in list(graph.initializers.items()):
            if not value.uses() and not value.is_graph_output():
                del graph.initializers[name]


def _converter(tensor: ir.TensorProtocol, dtype: ir.DataType):
    """A loader for `tensor` in `dtype`: fp16 saturates at its finite range instead of becoming inf."""

    def load() -> ir.Tensor:
        return ir.tensor(cast_array(tensor.numpy(), dtype), dtype=dtype)

    return load


# --- island matchers (on the fp32 graph) ---------------------------------------------------------------
def _nodes(graph: ir.Graph) -> Iterable[ir.Node]:
    """Nodes of `graph` and of its If branches, in order (a loop body is one unit: its node)."""
    for node in graph:
        yield node
        if node.op_type == "If" and node.domain == "":
            for name in ("then_branch", "else_branch"):
                yield from _nodes(node.attributes[name].as_graph())


def _int_derived_nodes(graph: ir.Graph) -> set[ir.Node]:
    """Float-producing nodes whose float inputs trace back only to constants: position and mask arithmetic.

    Taint flows through float values only (a shape read from an activation carries no precision).
    """
    tainted: set[ir.Value] = {v for v in graph.inputs if _is_float(v)}
    for value in graph.initializers.values():
        if value.const_value is not None and len(value.shape or ()) >= 2 and _is_float(value):
            tainted.add(value)  # weights
    derived = set()
    for node in _nodes(graph):
        float_outputs = [o for o in node.outputs if _is_float(o)]
        reads = any(v in tainted for v in node.inputs if v is not None and _is_float(v))
        if reads or node.op_type in LOOPS | {"If"} or node.domain not in ("", "ai.onnx"):
            tainted.update(float_outputs)
        elif float_outputs:
            derived.add(node)
    return derived


def _embedding(graph: ir.Graph) -> ir.Node | None:
    for node in graph:
        if (
            node.op_type == "Gather"
            and _is_const(node.inputs[0])
            and len(node.inputs[0].shape or ()) == 2
            and node.inputs[1] is not None
            and node.inputs[1].is_graph_input()
        ):
            return node
    return None


def _residual_chain(graph: ir.Graph) -> set[ir.Node]:
    """The Adds that carry the residual stream from the embedding to the final norm."""
    embed = _embedding(graph)
    chain: set[ir.Node] = set()
    frontier = list(embed.outputs) if embed is not None else []
    while frontier:
        value = frontier.pop()
        for use in value.uses():
            if use.node.op_type == "Add" and use.node not in chain:
                chain.add(use.node)
                frontier.extend(use.node.outputs)
    return chain


def _lm_head(graph: ir.Graph) -> set[ir.Node]:
    """The MatMul that produces the logits output (through at most an Identity)."""
    for value in graph.outputs:
        if value.name != "logits":
            continue
        node = value.producer()
        if node is not None and node.op_type == "Identity":
            node = node.inputs[0].producer()
        return {node} if node is not None and node.op_type == "MatMul" else set()
    return set()


def _square_of(value: ir.Value | None) -> ir.Node | None:
    """The Pow(x, 2) or Mul(x, x) producing `value`."""
    node = value.producer() if value is not None else None
    if node is None or node.domain != "":
        return None
    if (
        node.op_type == "Pow"
        and _is_const(node.inputs[1])
        and float(node.inputs[1].const_value.numpy()) == 2.0
    ):
        return node
    if node.op_type == "Mul" and node.inputs[0] is node.inputs[1]:
        return node
    return None


def _norm_chain(reduce: ir.Node) -> set[ir.Node]:
    """square -> reduce -> (+eps, sqrt, reciprocal / div) -> x * inv -> (* scale): one norm, in fp32."""
    square = _square_of(reduce.inputs[0])
    x = square.inputs[0]
    chain = {square, reduce}
    frontier = [reduce.outputs[0]]
    while frontier:
        value = frontier.pop()
        for use in value.uses():
            node = use.node
            if node.op_type in UNARY_ELEMENTWISE | {"Add"} and all(
                v is value or _is_const(v) for v in node.inputs
            ):
                chain.add(node)
                frontier.append(node.outputs[0])
            elif node.op_type in ("Mul", "Div") and x in node.inputs:
                chain.add(node)
                chain |= _scale_after(node)
    return chain


def _scale_after(normalize: ir.Node) -> set[ir.Node]:
    uses = list(normalize.outputs[0].uses())
    if len(uses) == 1 and uses[0].node.op_type == "Mul":
        other = [v for v in uses[0].node.inputs if v is not normalize.outputs[0]]
        if other and _is_const(other[0]):
            return {uses[0].node}
    return set()


def _pre_softmax(softmax: ir.Node, derived: set[ir.Node]) -> set[ir.Node]:
    """Scale and mask in front of a softmax (Where/Mul/Add/...) back to the score MatMul."""
    chain: set[ir.Node] = set()
    value = softmax.inputs[0]
    while True:
        node = value.producer() if value is not None else None
        if node is None or node.op_type not in BINARY_ELEMENTWISE | {"Where"}:
            return chain
        data = [
            v for i, v in enumerate(node.inputs)
            if v is not None and not _is_const(v) and not (node.op_type == "Where" and i == 0)
            and v.producer() not in derived
        ]  # fmt: skip
        chain.add(node)
        if len(data) != 1:
            return chain
        value = data[0]


def _router(softmax: ir.Node, derived: set[ir.Node]) -> set[ir.Node]:
    """Router logits MatMul (fp32 weights), top-k and renormalisation up to the tensor that weighs experts."""
    chain: set[ir.Node] = set()
    logits = softmax.inputs[0].producer()
    if logits is not None and logits.op_type == "MatMul":
        chain.add(logits)
    routing: set[ir.Value] = set(softmax.outputs)
    frontier = list(softmax.outputs)
    while frontier:
        value = frontier.pop()
        for use in value.uses():
            node = use.node
            if node in chain or node.op_type in SHAPE_ONLY:
                continue
            others = [v for v in node.inputs if v is not None and v not in routing]
            if all(_is_const(v) or not _is_float(v) or v.producer() in derived for v in others):
                chain.add(node)
                for out in node.outputs:
                    routing.add(out)
                    frontier.append(out)
    return {n for n in chain if n.op_type not in MOVEMENT and n.op_type != "If"}


def _gate_chain(loop: ir.Node) -> set[ir.Node]:
    """Elementwise ops with constant operands feeding a loop's inputs: beta = sigmoid(b), g = ..."""
    chain: set[ir.Node] = set()
    frontier = [v for v in loop.inputs if v is not None]
    while frontier:
        value = frontier.pop()
        node = value.producer()
        if node is None or node in chain:
            continue
        unary = node.op_type in UNARY_ELEMENTWISE
        binary = node.op_type in BINARY_ELEMENTWISE and sum(not _is_const(v) for v in node.inputs) == 1
        if unary or binary:
            chain.add(node)
            frontier.extend(v for v in node.inputs if v is not None and not _is_const(v))
    return chain
