"""A deliberately wrong rewrite planted in a pipeline: the numeric check must name exactly that pass."""

from __future__ import annotations

import onnx_ir as ir
import pytest
from passes_support import TOL, exported, golden

from qwen_export.passes.base import QwenPass, pass_name
from qwen_export.passes.manager import PassManager
from qwen_export.passes.numerics import NumericCheck
from qwen_export.targets import pipeline

pytestmark = pytest.mark.usefixtures("verify_every_pass")


class PlantEpsilon(QwenPass):
    """Set the first fused node of `op`'s epsilon to 1e-2 (a wrong attribute, as a buggy fusion would)."""

    name = "plant-epsilon"

    def __init__(self, op: str):
        super().__init__()
        self.op = op

    def call(self, model):
        node = next(n for n in model.graph if n.domain == "qwen" and n.op_type == self.op)
        node.attributes["epsilon"] = ir.AttrFloat32("epsilon", 1e-2)
        return ir.passes.PassResult(model, True)


class PlantSwappedExperts(QwenPass):
    """Give the first MoE node experts 0 and 1 in swapped order (gate_up only), as a wrong stacking would."""

    name = "plant-swapped-experts"

    def call(self, model):
        node = next(n for n in model.graph if n.op_type == "MoE")
        gate_up = node.inputs[2].const_value.numpy().copy()
        gate_up[[0, 1]] = gate_up[[1, 0]]
        value = ir.Value(
            name="planted.gate_up",
            shape=ir.Shape(gate_up.shape),
            type=ir.TensorType(ir.DataType.FLOAT),
            const_value=ir.tensor(gate_up, name="planted.gate_up"),
        )
        model.graph.register_initializer(value)
        node.replace_input_with(2, value)
        return ir.passes.PassResult(model, True)


PLANTS = {
    "rms-norm-epsilon": (lambda: PlantEpsilon("RMSNorm"), "fuse-rms-norm"),
    "deltanet-epsilon": (
        lambda: PlantEpsilon("GatedDeltaNet"),
        "fuse-gated-deltanet",
    ),  # reaches its nested norm
    "swapped-experts": (PlantSwappedExperts, "fuse-moe"),
}


@pytest.mark.parametrize("plant", list(PLANTS))
def test_check_names_the_planted_pass(plant):
    make, after = PLANTS[plant]
    passes = pipeline("onnx")
    at = [pass_name(p) for p in passes].index(after) + 1
    planted = make()
    passes.insert(at, planted)
    _, report = PassManager(passes, check=NumericCheck(golden("tiny-qwen3.5-moe"))).run(
        exported("tiny-qwen3.5-moe")
    )

    assert report.first_failure == planted.name
    assert all(r.numerics.within_tolerance for r in report.records[:at])
    bad = report.records[at].numerics
    assert bad.max_vs_previous > TOL and bad.max_vs_golden > TOL
    # Later passes are faithful to the (wrong) graph they get: only the golden comparison stays off.
    for r in report.records[at + 1 :]:
        assert r.numerics.max_vs_previous <= TOL and r.numerics.max_vs_golden > TOL


def test_planted_fault_is_visible_without_a_golden():
    """Without a golden, the stage-to-stage comparison alone still names the pass."""
    passes = pipeline("fused")
    passes.insert(len(passes) - 1, PlantSwappedExperts())
    check = NumericCheck(None, vocab_size=512)
    _, report = PassManager(passes, check=check).run(exported("tiny-qwen3-next"))
    assert report.first_failure == "plant-swapped-experts"
    assert report.baseline.max_vs_golden is None
    assert report.records[-2].numerics.max_vs_previous > TOL
