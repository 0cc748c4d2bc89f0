// Header-free plugin core: attribute tables, I/O type classes, shape recipes and workspace helpers.
//
// Nothing here includes TensorRT or CUDA headers, so the shape/attribute/workspace logic of every plugin
// is unit-testable on a machine without either (plugins/tests/test_cores.cpp). The TensorRT wrappers
// (<op>_plugin.cpp) and the launchers (<op>_launch.cpp) both read these tables, so there is one
// source of truth for field names, defaults, dtypes and workspace layouts.
//
// tests/test_plugins_fields.py parses the `kFields`, `kInputs` and `kOutputs` tables of each
// <op>_core.h with regular expressions: keep one entry per line, in the form shown.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>

namespace qwen
{

// Every plugin of this library is registered under this namespace and version (the ONNX nodes carry them
// as `plugin_namespace` / `plugin_version`).
constexpr char kPluginNamespace[] = "qwen";
constexpr char kPluginVersion[] = "2";

// Plugin field types. TensorRT's ONNX parser turns INT attributes into kINT32 fields and FLOAT attributes
// into kFLOAT32 fields; the creators also accept 64-bit fields (from hand-built networks).
enum class FieldType : int32_t
{
    kInt32 = 0,
    kFloat32 = 1,
};

struct FieldSpec
{
    char const* name;
    FieldType type;
    double defaultValue;
};

// Tensor type classes. kAct: fp16 or bf16, and the same type as input 0 (X) wherever it appears.
enum class IoType : int32_t
{
    kAct = 0,
    kF32 = 1,
    kI32 = 2,
};

struct IoSpec
{
    char const* name;
    IoType type;
};

constexpr int kMaxDims = 8;

struct Dims
{
    int32_t nbDims{0};
    int64_t d[kMaxDims]{};
};

// One output dimension: in[input].d[dim] + (input2 >= 0 ? in[input2].d[dim2] : 0).
struct DimRecipe
{
    int8_t input;
    int8_t dim;
    int8_t input2;
    int8_t dim2;
};

// How an output's shape follows from the input shapes: either a copy of an input's shape (rank-generic),
// or an explicit list of dimension recipes.
struct OutputRecipe
{
    int8_t sameAsInput; // >= 0: copy that input's shape; -1: use dims
    int8_t nbDims;
    DimRecipe dims[kMaxDims];
};

// Element sizes of the type classes (kAct given as 2 bytes: fp16 and bf16 alike).
constexpr size_t kActBytes = 2;

// Dtype codes passed to the CUDA launchers.
enum class ActType : int32_t
{
    kF16 = 0,
    kBF16 = 1,
};

// GEMM dispatch (projections and experts): up to these many rows the weight-streaming kernel runs (decode
// and small batches: memory-bound, split-K for parallelism), above them the tensor-core tiled kernel.
constexpr int64_t kSkinnyMaxRows = 16;        // dense GEMMs (rows = tokens)
constexpr int64_t kSkinnyMaxGroupedRows = 64; // expert GEMMs (rows = tokens * top_k)

// ---- field values ---------------------------------------------------------------------------------------

// Values of a plugin's fields, in the order of its kFields table, initialised to the defaults.
template <size_t N>
struct FieldValues
{
    double v[N];
};

template <size_t N>
FieldValues<N> defaultFieldValues(FieldSpec const (&fields)[N])
{
    FieldValues<N> values{};
    for (size_t i = 0; i < N; ++i)
    {
        values.v[i] = fields[i].defaultValue;
    }
    return values;
}

// Sets the field called `name` (returns false when the table has no such field: the caller ignores it).
template <size_t N>
bool setFieldValue(FieldSpec const (&fields)[N], FieldValues<N>& values, char const* name, double value)
{
    for (size_t i = 0; i < N; ++i)
    {
        if (std::string(fields[i].name) == name)
        {
            values.v[i] = fields[i].type == FieldType::kInt32 ? static_cast<double>(static_cast<int64_t>(value))
                                                              : value;
            return true;
        }
    }
    return false;
}

// ---- shapes ---------------------------------------------------------------------------------------------

Dims makeDims(std::initializer_list<int64_t> dims);
int64_t volume(Dims const& dims);
std::string toString(Dims const& dims);

// Concrete output shape from concrete input shapes. Returns false (with a message) on a bad recipe.
bool applyRecipe(OutputRecipe const& recipe, Dims const* inputs, int32_t nbInputs, Dims& out, std::string& error);

// Shape-check helper: `dims` must have rank `rank` and match `expected` where expected[i] >= 0 and the
// actual dim is known (>= 0; -1 marks a dynamic dimension not yet known). Appends to `error` on mismatch.
void expectShape(char const* what, Dims const& dims, int32_t rank, std::initializer_list<int64_t> expected,
    std::string& error);

// ---- workspace layout -----------------------------------------------------------------------------------

// Workspace carve-up: each buffer starts on a 256-byte boundary (vector loads, WMMA, coalescing).
class WorkspaceLayout
{
public:
    static constexpr size_t kAlign = 256;

    // Reserves `bytes` and returns the buffer's offset.
    size_t add(size_t bytes)
    {
        size_t const offset = mTotal;
        mTotal += (bytes + kAlign - 1) / kAlign * kAlign;
        return offset;
    }
    size_t total() const
    {
        return mTotal;
    }

private:
    size_t mTotal{0};
};

inline int64_t ceilDiv(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}

} // namespace qwen
