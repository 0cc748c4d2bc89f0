"""The qwen op set's interfaces, declared once: one `OpSpec` per op in `OP_TABLE`.

Everything that names an op's inputs, outputs or attributes reads them from here or is proven equal to
this table by a test (docs/plugins.md, "Adding an op", lists every place an op reaches):

- generated from it: `qwen_ops.OPS` (the signatures the fusions emit and check), `lower_trt_plugins.PLUGINS`
  (the TensorRT lowering's plugin descriptions), and the ctypes mirrors of the kernels' launch parameter
  structs in scripts/gpu_check.py (which loads this file by path: it cannot import qwen_export);
- proven equal to it: the plugin creators' constexpr tables (`kPluginName`, `kFields`, `kInputs`,
  `kOutputs` in plugins/<folder>/<folder>_core.h) and the plugin READMEs (tests/test_plugins_fields.py,
  tests/test_op_table.py), the launch parameter structs in plugins/<folder>/<folder>_launch.h
  (tests/test_op_table.py), and the tables of docs/ops.md (tests/test_fusion_contract.py).

No imports beyond the standard library, and nothing newer than Python 3.9 at run time: the GPU machine
loads this module with importlib from a bare Python with torch.
"""

from __future__ import annotations

from dataclasses import dataclass

DOMAIN = "qwen"
VERSION = 1
PLUGIN_VERSION = "2"  # 2: the Triton kernels (1: the CUDA C++ ones); bump on any behaviour change
PLUGIN_NAMESPACE = "qwen"

# Tensor type classes of the plugins (plugins/common/qwen_core.h, IoType): "act" is fp16 or bf16, the type
# of input 0 (X) wherever it appears; "f32" is float32; "i32" is int32.
ACT, F32, I32 = "act", "f32", "i32"
IO_CLASSES = (ACT, F32, I32)
# Attribute types of the qwen ops, and the plugin field type each becomes (TensorRT's ONNX parser narrows
# INT attributes to kINT32 fields and passes FLOAT attributes as kFLOAT32 fields).
INT, FLOAT = "int", "float"
FIELD_TYPES = {INT: "int32", FLOAT: "float32"}

# C types of the launch parameter structs' fields, per role.
_C_INPUT = {ACT: "void const*", F32: "float const*", I32: "int32_t const*"}
_C_OUTPUT = {ACT: "void*", F32: "float*", I32: "int32_t*"}
_C_ATTRIBUTE = {INT: "int32_t", FLOAT: "float"}


def camel(name: str) -> str:
    """The C field name of a snake_case ONNX name: `past_key` -> `pastKey`, `neg_exp_A` -> `negExpA`."""
    first, *rest = name.split("_")
    return first[:1].lower() + first[1:] + "".join(w[:1].upper() + w[1:] for w in rest)


@dataclass(frozen=True)
class Port:
    """One input or output: its ONNX name and the plugin's type class for it (act / f32 / i32)."""

    name: str
    kind: str
    c_name: str = ""  # its field in the launch parameter struct; "" means camel(name)

    @property
    def c_field(self) -> str:
        return self.c_name or camel(self.name)


@dataclass(frozen=True)
class Attribute:
    """One attribute: its name, type ("int" / "float") and the plugin creator's default for the field."""

    name: str
    type: str
    default: float = 0.0

    @property
    def field_type(self) -> str:
        return FIELD_TYPES[self.type]

    @property
    def c_field(self) -> str:
        return camel(self.name)


@dataclass(frozen=True)
class Launch:
    """What the kernel's launch parameter struct holds besides the op's interface.

    `Qwen<Op>Params` (plugins/<folder>/<folder>_launch.h) is laid out as: one pointer per input, one per
    output, a `workspace` pointer (when `workspace`), the int64 problem `sizes`, one field per attribute
    (int32 / float, camelCase), int32 `dtype`, then the int32 test `knobs` (0: automatic).
    """

    sizes: tuple[str, ...]
    workspace: bool = False
    knobs: tuple[str, ...] = ()


@dataclass(frozen=True)
class OpSpec:
    name: str  # the qwen op (ONNX op_type in domain "qwen")
    folder: str  # plugins/<folder>/, and the <folder>_core/_kernel/_plugin file names
    inputs: tuple[Port, ...]
    outputs: tuple[Port, ...]
    attributes: tuple[Attribute, ...]
    launch: Launch

    @property
    def plugin(self) -> str:
        """The TensorRT plugin's name (a `Qwen` prefix: the parser's built-in importers win over plugins)."""
        return "Qwen" + self.name

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.outputs)

    @property
    def int_attributes(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.attributes if a.type == INT)

    @property
    def float_attributes(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.attributes if a.type == FLOAT)

    @property
    def plugin_fields(self) -> tuple[tuple[str, str, float], ...]:
        """(name, "int32" | "float32", default) per field, in the creator's order."""
        return tuple((a.name, a.field_type, float(a.default)) for a in self.attributes)

    @property
    def params_struct(self) -> str:
        return f"Qwen{self.name}Params"

    @property
    def params_fields(self) -> tuple[tuple[str, str], ...]:
        """(field, C type) of the launch parameter struct, in declaration order (see `Launch`)."""
        launch = self.launch
        return (
            *((p.c_field, _C_INPUT[p.kind]) for p in self.inputs),
            *((p.c_field, _C_OUTPUT[p.kind]) for p in self.outputs),
            *((("workspace", "void*"),) if launch.workspace else ()),
            *((s, "int64_t") for s in launch.sizes),
            *((a.c_field, _C_ATTRIBUTE[a.type]) for a in self.attributes),
            ("dtype", "int32_t"),
            *((k, "int32_t") for k in launch.knobs),
        )

    @property
    def launchers(self) -> tuple[str, ...]:
        """The plain-C entry points the kernel library exports for this op."""
        names = [f"qwenLaunch{self.name}", f"qwen{self.name}ParamsSize"]
        if self.launch.workspace:
            names.append(f"qwen{self.name}WorkspaceSize")
        return tuple(names)


_EPS = Attribute("epsilon", FLOAT, 1e-6)
_MASK = Port("attention_mask", I32, c_name="mask")

OP_TABLE: dict[str, OpSpec] = {
    op.name: op
    for op in [
        OpSpec(
            "RMSNorm", "rms_norm",
            inputs=(Port("X", ACT), Port("scale", F32)),
            outputs=(Port("Y", ACT),),
            attributes=(_EPS,),
            launch=Launch(sizes=("rows", "dim")),
        ),
        OpSpec(
            "GatedRMSNorm", "gated_rms_norm",
            inputs=(Port("X", ACT), Port("Z", ACT), Port("scale", F32)),
            outputs=(Port("Y", ACT),),
            attributes=(_EPS,),
            launch=Launch(sizes=("rows", "dim")),
        ),
        OpSpec(
            "GatedAttention", "gated_attention",
            inputs=(
                Port("X", ACT), _MASK, Port("cos", F32), Port("sin", F32),
                Port("past_key", ACT), Port("past_value", ACT),
                Port("q_weight", ACT), Port("k_weight", ACT), Port("v_weight", ACT), Port("o_weight", ACT),
                Port("q_norm", F32), Port("k_norm", F32),
            ),
            outputs=(Port("Y", ACT), Port("present_key", ACT), Port("present_value", ACT)),
            attributes=(
                Attribute("num_heads", INT), Attribute("num_kv_heads", INT), Attribute("head_dim", INT),
                Attribute("rotary_dim", INT), _EPS, Attribute("scale", FLOAT, 0.0),  # 0: 1/sqrt(head_dim)
            ),
            launch=Launch(sizes=("batch", "tokens", "past", "hidden"), workspace=True, knobs=("kvSplits",)),
        ),
        OpSpec(
            "GatedDeltaNet", "gated_deltanet",
            inputs=(
                Port("X", ACT), _MASK, Port("past_conv", ACT), Port("past_recurrent", F32),
                Port("qkv_weight", ACT), Port("z_weight", ACT), Port("b_weight", ACT), Port("a_weight", ACT),
                Port("conv_weight", ACT), Port("neg_exp_A", F32), Port("dt_bias", F32),
                Port("norm_weight", F32), Port("out_weight", ACT),
            ),
            outputs=(Port("Y", ACT), Port("present_conv", ACT), Port("present_recurrent", F32)),
            attributes=(
                Attribute("num_k_heads", INT), Attribute("num_v_heads", INT), Attribute("head_k_dim", INT),
                Attribute("head_v_dim", INT), Attribute("conv_kernel", INT, 4), _EPS,
            ),
            launch=Launch(
                sizes=("batch", "tokens", "maskLen", "hidden"), workspace=True, knobs=("ruleMode",)
            ),
        ),
        OpSpec(
            "MoE", "moe",
            inputs=(
                Port("X", ACT), Port("router_weight", ACT), Port("gate_up", ACT), Port("down", ACT),
                Port("shared_gate", ACT), Port("shared_up", ACT), Port("shared_down", ACT),
                Port("shared_expert_gate", ACT),
            ),
            outputs=(Port("Y", ACT),),
            attributes=(Attribute("top_k", INT), Attribute("normalize", INT, 1)),
            launch=Launch(
                sizes=("tokens", "hidden", "experts", "inter", "sharedInter"),
                workspace=True,
                knobs=("forceTiled",),
            ),
        ),
    ]
}  # fmt: skip


def by_folder(folder: str) -> OpSpec:
    """The op whose plugin lives in plugins/<folder>/."""
    for op in OP_TABLE.values():
        if op.folder == folder:
            return op
    raise KeyError(
        f"no qwen op has its plugin in plugins/{folder}/ ({[o.folder for o in OP_TABLE.values()]})"
    )
