"""The op table (passes/op_table.py) against every copy of it that cannot be generated from it, and the
checklist of docs/plugins.md ("Adding an op"): every file an op must reach does.

Proven equal here: the launch parameter structs (plugins/<op>/<op>_launch.h) and the ctypes mirrors that
scripts/gpu_check.py generates from the table, the exported launchers, the plugin READMEs' tables, and
the NumPy reference's signatures. The creators' constexpr tables are proven equal in
tests/test_plugins_fields.py, docs/ops.md's tables in tests/test_fusion_contract.py.
"""

from __future__ import annotations

import ast
import ctypes
import inspect
import re
import sys
from pathlib import Path

import pytest
from plugin_library import load_gpu_check
from plugin_tables import PLUGINS_DIR, params_struct, readme_table

from qwen_export.passes import op_table
from qwen_export.passes.op_table import ACT, F32, FLOAT, I32, INT, OP_TABLE, camel

ROOT = Path(__file__).resolve().parents[1]
# C types of the struct members as ctypes passes them (pointers of any kind are addresses).
C_TO_CTYPES = {"int64_t": ctypes.c_int64, "int32_t": ctypes.c_int32, "float": ctypes.c_float}
OPS = sorted(OP_TABLE)


@pytest.fixture(scope="module")
def gpu_check():
    return load_gpu_check()


# ---- the table itself -------------------------------------------------------------------------------------
def test_table_is_well_formed():
    folders = [op.folder for op in OP_TABLE.values()]
    assert len(set(folders)) == len(folders)
    for name, op in OP_TABLE.items():
        assert op.name == name and op.plugin == f"Qwen{name}"
        assert (PLUGINS_DIR / op.folder).is_dir(), op.folder
        ports = [*op.input_names, *op.output_names]
        assert len(set(ports)) == len(ports), name
        assert all(p.kind in (ACT, F32, I32) for p in (*op.inputs, *op.outputs)), name
        assert op.inputs[0].name == "X" and op.inputs[0].kind == ACT  # "act" means X's type
        assert all(a.type in (INT, FLOAT) for a in op.attributes), name
        assert op.attributes == tuple(sorted(op.attributes, key=lambda a: a.type != INT)), "ints first"
        c_fields = [f for f, _ in op.params_fields]
        assert len(set(c_fields)) == len(c_fields), name


def test_op_table_needs_only_the_standard_library():
    tree = ast.parse(Path(op_table.__file__).read_text())
    modules = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert modules - set(sys.stdlib_module_names) <= {"__future__"}, modules


def test_camel_case_names():
    assert [camel(n) for n in ["X", "past_key", "neg_exp_A", "num_kv_heads", "head_k_dim", "top_k"]] == [
        "x",
        "pastKey",
        "negExpA",
        "numKvHeads",
        "headKDim",
        "topK",
    ]


# ---- plugins/<op>/<op>_launch.h ----------------------------------------------------------------------------
@pytest.mark.parametrize("op", OPS)
def test_kernel_params_struct_is_the_op_table(op):
    """Qwen<Op>Params: names, order and C types (pointer constness and element type follow the type
    class: inputs `void const*` (act), `float const*` (f32), `int32_t const*` (i32); outputs non-const)."""
    spec = OP_TABLE[op]
    assert params_struct(op) == (spec.params_struct, spec.params_fields)


@pytest.mark.parametrize("op", OPS)
def test_kernel_header_declares_the_launchers(op):
    spec = OP_TABLE[op]
    text = (PLUGINS_DIR / spec.folder / f"{spec.folder}_launch.h").read_text()
    declared = set(re.findall(r"QWEN_EXPORT \w+ (qwen\w+)\(", text))
    assert declared == set(spec.launchers)


# ---- scripts/gpu_check.py ----------------------------------------------------------------------------------
@pytest.mark.parametrize("op", OPS)
def test_gpu_check_ctypes_mirrors_are_the_kernel_structs(gpu_check, op):
    """The generated mirrors against the parsed C struct: names, order, and ctypes types of the C types."""
    name, fields = params_struct(op)
    struct = gpu_check.STRUCTS[op]
    assert struct.__name__ == name
    expected = [(f, ctypes.c_void_p if t.endswith("*") else C_TO_CTYPES[t]) for f, t in fields]
    assert list(struct._fields_) == expected


def test_gpu_check_runs_every_op_of_the_table(gpu_check):
    folders = [op.folder for op in OP_TABLE.values()]
    assert gpu_check.OPS == folders
    assert set(gpu_check.CASES) == set(folders)
    for folder in folders:
        assert callable(getattr(gpu_check.Runner, folder))


class _Tensor:
    def __init__(self, address: int) -> None:
        self.address = address

    def data_ptr(self) -> int:
        return self.address


@pytest.mark.parametrize("op", OPS)
def test_gpu_check_fills_params_by_role(gpu_check, op):
    """make_params puts each tensor, size, attribute and knob in its own field (none left over)."""
    spec = OP_TABLE[op]
    ins = [_Tensor(0x1000 * (i + 1)) for i in range(len(spec.inputs))]
    outs = [_Tensor(0x100000 * (i + 1)) for i in range(len(spec.outputs))]
    sizes = {s: 10 + i for i, s in enumerate(spec.launch.sizes)}
    attrs = {a.name: (100 + i if a.type == INT else 0.5 + i) for i, a in enumerate(spec.attributes)}
    knobs = {k: 7 for k in spec.launch.knobs}
    p = gpu_check.make_params(op, ins, outs, sizes, attrs, "bf16", **knobs)
    expected = {
        **{
            port.c_field: t.address for port, t in zip((*spec.inputs, *spec.outputs), ins + outs, strict=True)
        },
        **sizes,
        **{a.c_field: attrs[a.name] for a in spec.attributes},
        "dtype": 1,
        **knobs,
    }
    if spec.launch.workspace:
        expected["workspace"] = None  # set by the runner once the workspace size is known
    assert {f: getattr(p, f) for f, _ in p._fields_} == pytest.approx(expected)
    with pytest.raises(ValueError):
        gpu_check.make_params(op, ins[:-1], outs, sizes, attrs, "bf16")


# ---- plugins/<op>/README.md, the NumPy reference ----------------------------------------------------------
@pytest.mark.parametrize("op", OPS)
def test_plugin_readme_tables_are_the_op_table(op):
    spec, readme = OP_TABLE[op], readme_table(op)
    assert (readme.name, readme.version, readme.namespace) == (
        spec.plugin,
        op_table.PLUGIN_VERSION,
        op_table.PLUGIN_NAMESPACE,
    )
    assert readme.fields == spec.plugin_fields
    assert readme.inputs == tuple((p.name, p.kind) for p in spec.inputs)
    assert readme.outputs == tuple((p.name, p.kind) for p in spec.outputs)


@pytest.mark.parametrize("op", OPS)
def test_numpy_reference_takes_the_interface(op):
    from qwen_op_reference import REFERENCES

    spec = OP_TABLE[op]
    params = inspect.signature(REFERENCES[op]).parameters.values()
    positional = [p.name for p in params if p.kind == p.POSITIONAL_OR_KEYWORD]
    keyword = [p.name for p in params if p.kind == p.KEYWORD_ONLY]
    assert positional == [n.lower() for n in spec.input_names]
    assert keyword == [a.name for a in spec.attributes]


# ---- the checklist: every place an op reaches --------------------------------------------------------------
@pytest.mark.parametrize("op", OPS)
def test_every_op_reaches_every_file(op):
    """docs/plugins.md "Adding an op": the files that cannot be generated from the table all know the op."""
    from qwen_export.passes import lower_ort, pipeline, qwen_ops
    from qwen_export.passes.fusion import FusionPass

    spec, f = OP_TABLE[op], OP_TABLE[op].folder
    # passes: shape rules, a fusion rule in the fusion pipeline, an ONNX Runtime lowering
    assert op in qwen_ops._RULES
    assert op in [p.rule.op for p in pipeline.fusions() if isinstance(p, FusionPass)]
    assert op in lower_ort.LOWERINGS
    # docs/ops.md has the op's section (its tables: tests/test_fusion_contract.py)
    assert re.search(rf"^## {op}$", (ROOT / "docs" / "ops.md").read_text(), re.M)
    # plugins/<folder>/: core, launcher, Triton kernels, TensorRT wrapper, README
    for name in ["_core.h", "_core.cpp", "_launch.h", "_launch.cpp", "_plugin.h", "_plugin.cpp"]:
        assert (PLUGINS_DIR / f / f"{f}{name}").is_file(), f"{f}/{f}{name}"
    assert (PLUGINS_DIR / f / "README.md").is_file()
    assert (PLUGINS_DIR / f / "kernels.py").is_file()
    cmake = (PLUGINS_DIR / "CMakeLists.txt").read_text()
    assert f in re.search(r"set\(QWEN_OPS ([^)]*)\)", cmake).group(1).split()
    assert "${op}/${op}_launch.cpp" in cmake  # every folder of QWEN_OPS: its launcher is in the library
    library = (PLUGINS_DIR / "common" / "trt_plugin_library.cpp").read_text()
    assert f'#include "../{f}/{f}_plugin.h"' in library
    creator = re.search(rf"static QwenPluginCreator<{op}Op> (\w+);", library)
    assert creator and re.search(rf"kCreators\[\][^;]*&{creator.group(1)}\b", library, re.S)
    assert f'#include "../{f}/{f}_core.h"' in (PLUGINS_DIR / "tests" / "test_cores.cpp").read_text()
    # tests that keep their own op lists
    import test_plugins_build

    assert f in test_plugins_build.OPS
    assert set(spec.launchers) - {f"qwen{op}ParamsSize"} <= set(test_plugins_build.LAUNCHERS)
