"""The `trt` target's rank graphs carry TensorRT 11's DistCollective as TensorRT's tools write it
(tests/data/trt_dist_collective.json records each fact with its source) and pass onnx.checker."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from qwen_export.build import BuildRequest, build_artifact
from qwen_export.collectives import Loopback
from qwen_export.collectives_trt import TRT_ATTRIBUTES, TRT_DOMAIN, TRT_OP, register_schema

FACTS = json.loads((Path(__file__).parent / "data" / "trt_dist_collective.json").read_text())
TYPES = {name: getattr(onnx.AttributeProto, name) for name in ("STRING", "INT", "INTS")}


@pytest.fixture(scope="module")
def trt_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "ranks"
    build_artifact(BuildRequest(out=out, target="trt", preset="tiny-qwen3.5-moe", tp=2, ep=2))
    return [onnx.load(str(out / "ranks" / str(r) / "model.onnx")) for r in (0, 1)]  # tiny: weights inline


def test_our_declaration_is_tensorrts():
    assert (TRT_OP, TRT_DOMAIN) == (FACTS["op_type"]["value"], FACTS["domain"]["value"])
    assert {name: kind for name, (kind, _) in TRT_ATTRIBUTES.items()} == {
        name: TYPES[fact["type"]] for name, fact in FACTS["attributes"].items()
    }


def test_rank_graphs_pass_the_checker_with_tensorrts_attributes(trt_ranks):
    register_schema()
    for rank, model in enumerate(trt_ranks):
        onnx.checker.check_model(model)
        nodes = [n for n in model.graph.node if n.op_type == TRT_OP and n.domain == TRT_DOMAIN]
        assert len(nodes) == 2 * 4 + 2, rank  # 4 layers x (mixer, MoE) + embedding + logits
        for node in nodes:
            attrs = {a.name: a for a in node.attribute}
            assert set(attrs) == set(FACTS["attributes"])
            for name, fact in FACTS["attributes"].items():
                assert attrs[name].type == TYPES[fact["type"]], name
            value = {name: onnx.helper.get_attribute_value(a) for name, a in attrs.items()}
            operations = FACTS["attributes"]["collective_operation"]["values"]
            assert value["collective_operation"].decode() in operations
            assert value["reduce_op"].decode() in FACTS["attributes"]["reduce_op"]["values"]
            assert value["root"] == FACTS["attributes"]["root"]["no_root"]
            assert value["group_size"] == FACTS["attributes"]["group_size"]["all_ranks"]
            assert value["groups"] == FACTS["attributes"]["groups"]["all_ranks"]
            assert value["nb_rank"] == 2
        gathers = [n for n in nodes if onnx.helper.get_attribute_value(n.attribute[0]) == b"all_gather"]
        assert len(gathers) == 1 and gathers[0].output[0] in {i for n in model.graph.node for i in n.input}


def test_the_checker_refuses_a_wrong_attribute_type(trt_ranks):
    register_schema()
    model = onnx.ModelProto()
    model.CopyFrom(trt_ranks[0])
    node = next(n for n in model.graph.node if n.op_type == TRT_OP)
    attr = next(a for a in node.attribute if a.name == "nb_rank")
    node.attribute.remove(attr)
    node.attribute.append(onnx.helper.make_attribute("nb_rank", "two"))
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)


def test_loopback_lowering_keeps_the_collective():
    import onnx_ir as ir

    from qwen_export.collectives_trt import to_loopback, trt_collective

    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT))
    group = ir.Value(name="group", type=ir.TensorType(ir.DataType.INT64))
    for op in ("all_reduce", "all_gather"):
        loop = to_loopback(trt_collective(x, op, 4, "n"), rank=3, tag=7, group=group)
        a = loop.attributes
        spec = Loopback(
            a.get_string("collective_operation"), a.get_string("reduce_op"), a.get_int("nb_rank"),
            a.get_int("rank"), a.get_int("tag"),
        )  # fmt: skip
        assert spec.problems() == [] and spec.collective_operation == op and loop.inputs[1] is group
