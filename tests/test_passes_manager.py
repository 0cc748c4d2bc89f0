"""The pass manager's records, its graph verification, pass composition, and the pipelines per target."""

from __future__ import annotations

import json

import onnx_ir as ir
import onnx_ir.passes.common as common
import pytest
from passes_support import TOL, exported, golden

from qwen_export.errors import QwenExportError
from qwen_export.passes.base import QwenPass, pass_name, pass_summary
from qwen_export.passes.manager import PassManager
from qwen_export.passes.numerics import NumericCheck
from qwen_export.passes.shape_inference import InferShapes
from qwen_export.targets import TARGETS, pass_catalog, pipeline

pytestmark = pytest.mark.usefixtures("verify_every_pass")


@pytest.fixture(scope="module")
def checked_run():
    check = NumericCheck(golden("tiny-qwen3.5-moe"))
    return PassManager(pipeline("fused"), check=check, trace_memory=True).run(exported("tiny-qwen3.5-moe"))


def record(report, name):
    return next(r for r in report.records if r.name == name)


def test_records_time_memory_sizes_and_op_changes(checked_run):
    _, report = checked_run
    assert [r.name for r in report.records] == [pass_name(p) for p in pipeline("fused")]
    for r in report.records:
        assert r.wall_s > 0 and r.rss_after_mib > 0 and r.peak_rss_rise_mib >= 0 and r.python_peak_mib >= 0
        assert r.summary and r.verified
        assert set(r.nodes_after) == {"graph", "subgraphs", "functions", "total"}
    dn = record(report, "fuse-gated-deltanet")
    # The three Scan bodies (16 nodes each) move from the top graph's subgraphs into one shared function.
    assert dn.nodes_before["subgraphs"] == 48 and dn.nodes_after["subgraphs"] == 0
    assert dn.nodes_after["functions"] > dn.nodes_before["functions"]
    assert dn.nodes_after["graph"] < dn.nodes_before["graph"]
    moe = record(report, "fuse-moe")
    assert moe.ops_delta["qwen.MoE"] == 4 and moe.ops_delta["TopK"] == -4
    assert moe.ops_delta_all["qwen.MoE"] == 4 and moe.ops_delta_all["TopK"] == 1 - 4  # one body holds a TopK
    assert moe.stats.fired == {"MoE": 4}


def test_numeric_check_against_previous_stage_and_golden(checked_run):
    _, report = checked_run
    assert report.checked and report.first_failure is None and report.tolerance == TOL
    assert report.baseline.max_vs_golden <= TOL
    for r in report.records:
        n = r.numerics
        assert set(n.cases) == {"prefill_65", "prefill_200", "decode_step"}
        assert n.max_vs_previous <= TOL and n.max_vs_golden <= TOL and n.within_tolerance
        assert n.cases["prefill_200"].states_vs_golden is not None
        assert n.cases["decode_step"].logits_vs_golden is not None


def test_report_is_json(checked_run):
    _, report = checked_run
    data = json.loads(json.dumps(report.to_json()))
    assert data["passes"][0]["numerics"]["cases"]["prefill_65"]["logits_vs_golden"] <= TOL
    assert data["first_failure"] is None


class BreakGraph(QwenPass):
    """Plant an op that does not exist (for the verification test)."""

    name = "plant-unknown-op"

    def call(self, model):
        model.graph[0].op_type = "NoSuchOp"
        return ir.passes.PassResult(model, True)


def test_verify_names_the_pass_that_broke_the_graph():
    with pytest.raises(ir.passes.PassError, match="after pass 'plant-unknown-op'"):
        PassManager([*pipeline("fused")[:2], BreakGraph()], verify=True).run(exported("tiny-qwen3.5"))


def test_library_passes_and_functional_passes_run_too():
    passes = [common.ClearMetadataAndDocStringPass(), ir.passes.functionalize(common.RemoveUnusedNodesPass())]
    model = exported("tiny-qwen3.5")
    out, report = PassManager(passes, verify=True).run(model)
    assert out is not model  # the functional pass returned a new model
    assert [r.name for r in report.records][0] == "ClearMetadataAndDocStringPass"
    assert report.records[0].summary.startswith("Clear all metadata")


def test_pipelines_are_built_fresh_per_call():
    first, second = pipeline("onnx"), pipeline("onnx")
    assert [type(p) for p in first] == [type(p) for p in second]
    assert not set(map(id, first)) & set(map(id, second))


def test_unknown_target_is_a_user_error():
    with pytest.raises(QwenExportError, match="unknown target 'tensorrt'"):
        pipeline("tensorrt")


def test_lowering_passes_sit_between_fusions_and_cleanup():
    ort = [type(p).__name__ for p in pipeline("ort")]
    assert ort.index("FuseMoE") < ort.index("LowerToOrt") < ort.index("LowerPortable")
    trt = [type(p).__name__ for p in pipeline("trt-plugins")]
    assert trt.index("FuseMoE") < trt.index("LowerTrtPlugins") < trt.index("LiftConstants")


def test_catalog_names_and_summaries():
    classes = pass_catalog()
    names = [pass_name(c) for c in classes]
    assert len(names) == len(set(names))
    assert all(pass_summary(c) for c in classes)
    for target in TARGETS:
        try:
            used = pipeline(target)
        except QwenExportError:
            continue
        assert {type(p) for p in used} <= set(classes)


def test_shape_inference_annotates_fused_and_lowered_graphs():
    for target in ("fused", "onnx"):
        passes = [*pipeline(target), InferShapes()]
        model, _ = PassManager(passes, verify=True).run(exported("tiny-qwen3.5-moe"))
        assert all(v.dtype is not None for n in model.graph for v in n.outputs), target
        logits = next(v for v in model.graph.outputs if v.name == "logits")
        assert logits.shape[-1] == 512
