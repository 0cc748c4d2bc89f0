"""TensorRT 11's `DistCollective` ONNX op, declared once: the form the `trt` target's rank graphs carry.

TensorRT's ONNX parser turns the node into an IDistCollectiveLayer (NvInfer.h: addDistCollective,
CollectiveOperation, ReduceOperation); the engine's execution context then runs it over the NCCL
communicator given to `IExecutionContext::setCommunicator`. The node's form is the one NVIDIA's own
sharding tool writes (NVIDIA/TensorRT at a892d222, tools/Polygraphy/polygraphy/tools/multi_device/
subtool/shard.py, `_make_attrs` and `run_impl`; samples/python/attention_mdtrt/hint.json):

- op `DistCollective` in the default ONNX domain (graphsurgeon nodes without a domain);
- `collective_operation`: a string, the CollectiveOperation in snake case ("all_reduce", "all_gather",
  "reduce_scatter", ...);
- `reduce_op`: a string ("sum", "max", ...); Polygraphy writes "sum" for all_gather, which reduces nothing;
- `root`: int, -1 for the collectives without a root (NvInfer.h's recommended sentinel);
- `group_size`: int, 0 = every rank; `groups`: ints, [] = every rank (Polygraphy appends it by hand);
- `nb_rank`: int, the number of ranks (hint.json's dist_collectives; NvInfer.h: setNbRanks sets the output
  shape of all_gather, which concatenates along axis 0).

The default ONNX domain has no schema for the op, so `onnx.checker` refuses it; `register_schema()` declares
this one (attributes and their types, one input, one output) so the checker validates our rank graphs
against it (tests/test_collectives_trt.py).
"""

from __future__ import annotations

import onnx
import onnx_ir as ir

from qwen_export.collectives import (
    ALL_GATHER,
    ALL_REDUCE,
    LOOPBACK_DOMAIN,
    LOOPBACK_OP,
    REDUCE_NONE,
    REDUCE_SUM,
)

TRT_DOMAIN = ""
TRT_OP = "DistCollective"
TRT_VERSION = 1  # the schema's since-version (the default domain's opset is the graph's own)
# attribute -> (ONNX type, value every node of ours carries; None: set per node)
TRT_ATTRIBUTES: dict[str, tuple[int, object]] = {
    "collective_operation": (onnx.AttributeProto.STRING, None),
    "reduce_op": (onnx.AttributeProto.STRING, None),
    "root": (onnx.AttributeProto.INT, -1),
    "group_size": (onnx.AttributeProto.INT, 0),
    "groups": (onnx.AttributeProto.INTS, []),
    "nb_rank": (onnx.AttributeProto.INT, None),
}
_REDUCE = {ALL_REDUCE: REDUCE_SUM, ALL_GATHER: REDUCE_SUM}  # Polygraphy's all_gather carries "sum"


def trt_collective(x: ir.Value, collective_operation: str, nb_rank: int, name: str) -> ir.Node:
    """A DistCollective node over every rank: all_reduce (sum) or all_gather (axis 0)."""
    if collective_operation not in _REDUCE:
        raise ValueError(f"collective_operation {collective_operation!r} is not one of {tuple(_REDUCE)}")
    attributes = [
        ir.AttrString("collective_operation", collective_operation),
        ir.AttrString("reduce_op", _REDUCE[collective_operation]),
        ir.AttrInt64("root", -1),
        ir.AttrInt64("group_size", 0),
        ir.AttrInt64s("groups", []),
        ir.AttrInt64("nb_rank", nb_rank),
    ]
    return ir.Node(TRT_DOMAIN, TRT_OP, [x], attributes=attributes, name=name)


def to_loopback(node: ir.Node, rank: int, tag: int, group: ir.Value) -> ir.Node:
    """The loopback form (qwen_export.collectives) of a TensorRT-form node, for ONNX Runtime CPU."""
    operation = node.attributes.get_string("collective_operation")
    reduce_op = REDUCE_SUM if operation == ALL_REDUCE else REDUCE_NONE
    attributes = [
        ir.AttrString("collective_operation", operation),
        ir.AttrString("reduce_op", reduce_op),
        ir.AttrInt64("nb_rank", node.attributes.get_int("nb_rank")),
        ir.AttrInt64("rank", rank),
        ir.AttrInt64("tag", tag),
    ]
    inputs = [node.inputs[0], group]
    return ir.Node(LOOPBACK_DOMAIN, LOOPBACK_OP, inputs, attributes=attributes, name=f"{node.name}/loopback")


def register_schema() -> None:
    """Declare DistCollective to onnx's checker (once per process)."""
    if onnx.defs.has(TRT_OP, TRT_DOMAIN):
        return
    attr = onnx.defs.OpSchema.Attribute
    schema = onnx.defs.OpSchema(
        TRT_OP,
        TRT_DOMAIN,
        TRT_VERSION,
        doc="TensorRT 11 multi-device collective (IDistCollectiveLayer over NCCL)",
        inputs=[onnx.defs.OpSchema.FormalParameter("input", "T")],
        outputs=[onnx.defs.OpSchema.FormalParameter("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "")],
        attributes=[
            attr(name, onnx.defs.OpSchema.AttrType(kind), "", required=default is None)
            if default is None
            else attr(name, onnx.defs.OpSchema.AttrType(kind), "", required=False)
            for name, (kind, default) in TRT_ATTRIBUTES.items()
        ],
    )
    onnx.defs.register_schema(schema)
