"""The verify graph of speculative decoding: the main graph and the MTP layer in one ONNX Runtime run.

A round verifies its k drafts in one multi-token step of the main graph; the next round starts from an MTP
draft of the pair (h_t, next token) at the last decided position t. At every verified position up to the
first rejected draft, the main model's own greedy token is that next token (an accepted draft, or the
correction), so the MTP layer runs on every position of the step, paired with the main graph's greedy
tokens, and the runtime keeps the draft where acceptance stopped. One run a round instead of a verify run
and a draft run: on the trained model (ort-cpu-int4) a one-token run of mtp.onnx cost 0.35-0.45 of a plain
step, the MTP layer inside a two-token verify run 0.1-0.3 of one (docs/mtp.md).

The pairs past the first rejection are not the sequence's: their KV rows in the MTP layer's cache lie past
the valid ones, which the next verify run writes again (it starts at the first column not yet in the
states), as the main graph's KV rows of rejected drafts.

Composed when a session first decodes speculatively, in memory, from the artifact's model.onnx and mtp.onnx
(passes already run on both): the weights stay in their .data files beside them, and nothing is written.

Inputs: the main graph's; `next_ids` [B, T], the token after each position where it is already decided (a
prompt's, a re-fed column's), -1 where the main graph's greedy token stands in; and the MTP layer's KV cache
as `past_key_values.mtp.<suffix>`. A prompt thus runs through this graph too, its MTP pairs its own.

Outputs: `predicted_ids` [B, T] (the main graph's greedy token at each position), `draft_logits`
[B, T, vocab] (the MTP layer's, for the position after that), `draft_hidden_states` [B, T, hidden] (what a
further draft step of mtp.onnx takes), the main graph's present states, and `present.mtp.<suffix>`. Where
the main graph's DeltaNet ops can give their states after every token (qwen.cpu GatedDeltaRule from domain
version 3, cpu_kernels.POSITION_STATES), also `position.<suffix>` [B, T, ...] for each of those states: a
round that rejects a draft keeps the states after its last accepted token (rollback "snapshot").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from qwen_export.cpu_kernels import DOMAIN, POSITION_STATES, POSITIONS_DIM
from qwen_export.errors import QwenExportError
from qwen_export.exporter.builder import GraphBuilder
from qwen_export.exporter.model import HIDDEN_STATES
from qwen_export.exporter.mtp import DRAFT_HIDDEN_STATES
from qwen_export.runtime.ort_decoder import PAST_PREFIX, PRESENT_PREFIX

MTP_STATES = "mtp."  # the MTP layer's states in the verify graph: past_key_values.mtp.0.key, ...
PREDICTED_IDS = "predicted_ids"
NEXT_IDS = "next_ids"  # the token after each position where it is decided, -1 where predicted_ids stands in
DRAFT_LOGITS = "draft_logits"
POSITION_PREFIX = "position."  # a state after each column of the step: position.0.recurrent_state, ...
_SHARED_INPUTS = ("attention_mask", "position_ids")  # the pair at column t sits at the main token's position


def compose_verify_graph(main_path: Path, draft_path: Path) -> ir.Model:
    """The verify graph of an artifact's main and draft graphs (see the module docstring)."""
    main, draft = ir.load(main_path), ir.load(draft_path)
    graph = main.graph
    outputs = {v.name: v for v in graph.outputs}
    if HIDDEN_STATES not in outputs or "logits" not in outputs:
        raise QwenExportError(
            f"{main_path}: the main graph has no {HIDDEN_STATES} output; re-export the checkpoint"
        )
    main_inputs = {v.name: v for v in graph.inputs}
    # the vocabulary projection: the nodes between the final norm and the logits, run again on the draft's
    head_input, head = _head(graph, outputs[HIDDEN_STATES], outputs["logits"])
    next_ids = ir.Value(
        name=NEXT_IDS, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["batch", "sequence"])
    )
    graph.inputs.append(next_ids)
    gb = GraphBuilder(graph)
    with gb.scope("verify"):  # the MTP pairs' tokens: next_ids where given, else the greedy ones
        predicted = gb.op("ArgMax", outputs["logits"], axis=-1, keepdims=0)
        predicted.name = PREDICTED_IDS
        zero = gb.initializer("verify/next_ids_known_from", ir.tensor(np.int64(0)))
        pair_tokens = gb.op("Where", gb.op("GreaterOrEqual", next_ids, zero), next_ids, predicted)

    for name, version in draft.opset_imports.items():
        graph.opset_imports.setdefault(name, version)
    draft_inputs, draft_outputs = list(draft.graph.inputs), list(draft.graph.outputs)
    draft.graph.inputs.clear()
    draft.graph.outputs.clear()
    _take_draft_nodes(draft.graph, graph)
    replacement = {
        "input_ids": pair_tokens,
        HIDDEN_STATES: outputs[HIDDEN_STATES],
        **{name: main_inputs[name] for name in _SHARED_INPUTS},
    }
    for value in draft_inputs:
        if value.name in replacement:
            value.replace_all_uses_with(replacement[value.name])
        elif value.name.startswith(PAST_PREFIX):
            value.name = PAST_PREFIX + MTP_STATES + value.name.removeprefix(PAST_PREFIX)
            graph.inputs.append(value)
        elif not value.is_initializer():  # an overridable initializer (logits_to_keep) stays one
            raise QwenExportError(f"{draft_path}: the draft graph's input {value.name!r} has no source here")
    kept = [v for v in graph.outputs if v.name.startswith(PRESENT_PREFIX)]
    kept += _position_state_outputs(graph)
    draft_hidden = None
    for value, name in [(v, v.name.removeprefix(MTP_STATES)) for v in draft_outputs]:
        if name.startswith(PRESENT_PREFIX):
            value.name = PRESENT_PREFIX + MTP_STATES + name.removeprefix(PRESENT_PREFIX)
            kept.append(value)
        elif name == DRAFT_HIDDEN_STATES:
            draft_hidden = value
    if draft_hidden is None:
        raise QwenExportError(f"{draft_path}: the draft graph has no {DRAFT_HIDDEN_STATES} output")

    # the runtime takes the argmax of the one row it keeps (ONNX Runtime's ArgMax over every row cost
    # 10 us of a 300 us step on the trained model, numpy's of one row 1 us)
    draft_logits = _clone_head(graph, head, head_input, draft_hidden)
    predicted.dtype, predicted.shape = ir.DataType.INT64, ir.Shape(["batch", "sequence"])
    graph.outputs.clear()
    graph.outputs.extend([predicted, draft_logits, draft_hidden, *kept])
    draft_hidden.name, draft_logits.name = DRAFT_HIDDEN_STATES, DRAFT_LOGITS
    RemoveUnusedNodesPass()(main)  # the draft's last-position lm_head, the main graph's hidden output
    return main


def _position_state_outputs(graph: ir.Graph) -> list[ir.Value]:
    """The states after every token of the ops that can give them (cpu_kernels.POSITION_STATES, at the
    domain version the graph imports) and read each of those states straight from a graph input: each
    such op takes its optional outputs, named POSITION_PREFIX + the state's suffix, [B, positions, ...]."""
    version = graph.opset_imports.get(DOMAIN, 0)
    outputs = []
    for node in list(graph):
        spec = POSITION_STATES.get(node.op_type) if node.domain == DOMAIN else None
        if spec is None or version < spec.since:
            continue
        pasts = [node.inputs[i] for i in spec.output_of_past]
        if not all(p is not None and p.is_graph_input() and p.name.startswith(PAST_PREFIX) for p in pasts):
            continue  # a state made inside the graph: no rollback by snapshot (runtime/speculative.py)
        with_positions = ir.Node(
            node.domain,
            node.op_type,
            list(node.inputs),
            attributes=list(node.attributes.values()),
            num_outputs=max(spec.output_of_past.values()) + 1,
            version=node.version,
            name=node.name,
        )
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], [with_positions], node.outputs, with_positions.outputs[: len(node.outputs)]
        )
        for past_index, output_index in spec.output_of_past.items():
            past = with_positions.inputs[past_index]
            value = with_positions.outputs[output_index]
            value.name = POSITION_PREFIX + past.name.removeprefix(PAST_PREFIX)
            value.type = past.type
            value.shape = ir.Shape([past.shape[0], POSITIONS_DIM, *past.shape[1:]])
            outputs.append(value)
    return outputs


def _head(graph: ir.Graph, hidden: ir.Value, logits: ir.Value) -> tuple[ir.Value, list[ir.Node]]:
    """The final norm's output (what `hidden` copies) and the nodes from it to `logits`, in order."""
    producer = hidden.producer()
    normed = producer.inputs[0] if producer is not None and producer.op_type == "Identity" else hidden
    below: set[ir.Node] = set()  # the nodes that read `normed`, directly or not
    frontier = [use.node for use in normed.uses()]
    while frontier:
        node = frontier.pop()
        if node not in below:
            below.add(node)
            frontier += [use.node for out in node.outputs for use in out.uses()]
    head, stack = [], [logits.producer()]
    while stack:
        node = stack.pop()
        if node is None or node not in below or node in head:
            continue
        head.append(node)
        stack += [value.producer() for value in node.inputs if value is not None]
    if not head:
        raise QwenExportError("the main graph's logits do not come from its final hidden states")
    order = {node: i for i, node in enumerate(graph)}
    return normed, sorted(head, key=order.__getitem__)


def _clone_head(graph: ir.Graph, head: list[ir.Node], head_input: ir.Value, source: ir.Value) -> ir.Value:
    """The nodes of `head` again, reading `source` where they read `head_input` (other inputs shared);
    returns the clone's last output."""
    mapped = {head_input: source}
    for node in head:
        clone = ir.Node(
            node.domain,
            node.op_type,
            [mapped.get(v, v) if v is not None else None for v in node.inputs],
            attributes=list(node.attributes.values()),
            num_outputs=len(node.outputs),
            version=node.version,
            name=f"{MTP_STATES}head/{node.name}",
        )
        for old, new in zip(node.outputs, clone.outputs, strict=True):
            new.name = f"{MTP_STATES}head/{old.name}" if old.name else ""
            new.type, new.shape = old.type, old.shape
            mapped[old] = new
        graph.append(clone)
    return clone.outputs[0]


def _take_draft_nodes(draft: ir.Graph, graph: ir.Graph) -> None:
    """Move every node and initializer of `draft` into `graph`, their names prefixed (the draft graph
    names its layer like the main graph's first one)."""
    for name in list(draft.initializers):
        value = draft.initializers.pop(name)
        value.name = MTP_STATES + name
        graph.register_initializer(value)
    nodes = list(draft)
    draft.remove(nodes)
    for node in nodes:
        node.name = MTP_STATES + (node.name or node.op_type)
        for value in node.outputs:
            if value.name:  # an unused optional output keeps its empty name
                value.name = MTP_STATES + value.name
    graph.extend(nodes)
