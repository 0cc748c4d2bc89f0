// ONNX Runtime custom-op wrappers of the qwen.cpu kernels (domain "qwen.cpu", CPU execution provider):
// attribute and shape checks, output allocation, ORT's intra-op thread pool. The arithmetic lives in the
// header-free cores (int4_gemm, int4_moe). Entry point: RegisterCustomOps, which ORT looks up when
// SessionOptions.register_custom_ops_library loads this library.
#include <algorithm>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "gated_delta_rule.h"
#include "int4_gemm.h"
#include "int4_moe.h"
#include "ort_abi.h"

namespace qwen_cpu {
namespace {

using namespace ort;

Api g_api;  // set once by RegisterCustomOps; the table is static for the process

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

void check(Status* status) {
  if (status == nullptr) return;
  std::string message = g_api.fn<const char* (*)(const Status*)>(kGetErrorMessage)(status);
  g_api.ReleaseStatus(status);
  throw Error(message);
}

struct Tensor {
  const Value* value = nullptr;
  ElementType type = kFloat;
  std::vector<int64_t> dims;

  int64_t numel() const {
    int64_t count = 1;
    for (int64_t d : dims) count *= d;
    return count;
  }
  template <typename T>
  const T* data() const {
    void* out = nullptr;
    check(g_api.GetTensorMutableData(const_cast<Value*>(value), &out));
    return static_cast<const T*>(out);
  }
};

Tensor input(KernelContext* context, size_t index, ElementType type, const char* op, const char* name) {
  Tensor t;
  check(g_api.KernelContextGetInput(context, index, &t.value));
  if (t.value == nullptr) throw Error(std::string(op) + ": input " + name + " is missing");
  TensorTypeAndShapeInfo* info = nullptr;
  check(g_api.GetTensorTypeAndShape(t.value, &info));
  size_t rank = 0;
  Status* status = g_api.GetTensorElementType(info, &t.type);
  if (status == nullptr) status = g_api.GetDimensionsCount(info, &rank);
  if (status == nullptr) {
    t.dims.resize(rank);
    status = g_api.GetDimensions(info, t.dims.data(), rank);
  }
  g_api.ReleaseTensorTypeAndShapeInfo(info);
  check(status);
  if (t.type != type) throw Error(std::string(op) + ": input " + name + " has the wrong element type");
  return t;
}

float* output(KernelContext* context, const std::vector<int64_t>& dims, size_t index = 0) {
  Value* value = nullptr;
  check(g_api.KernelContextGetOutput(context, index, dims.data(), dims.size(), &value));
  void* data = nullptr;
  check(g_api.GetTensorMutableData(value, &data));
  return static_cast<float*>(data);
}

int64_t attribute(const KernelInfo* info, const char* op, const char* name, const int64_t* fallback = nullptr) {
  int64_t value = 0;
  Status* status = g_api.KernelInfoGetAttributeInt64(info, name, &value);
  if (status == nullptr) return value;
  g_api.ReleaseStatus(status);
  if (fallback != nullptr) return *fallback;
  throw Error(std::string(op) + ": attribute " + name + " is required");
}

float float_attribute(const KernelInfo* info, const char* name, float fallback) {
  float value = 0.f;
  Status* status = g_api.KernelInfoGetAttributeFloat(info, name, &value);
  if (status == nullptr) return value;
  g_api.ReleaseStatus(status);
  return fallback;
}

void expect(bool condition, const std::string& message) {
  if (!condition) throw Error(message);
}

// Runs fn(i), i < count, on ORT's intra-op threads (serially for one task: no hand-off cost).
void parallel_for(KernelContext* context, int64_t count, const std::function<void(int64_t)>& fn) {
  if (count <= 1) return serial_for(count, fn);
  auto body = [](void* data, size_t index) {
    (*static_cast<const std::function<void(int64_t)>*>(data))(static_cast<int64_t>(index));
  };
  check(g_api.KernelContextParallelFor(context, body, static_cast<size_t>(count), 0,
                                       const_cast<std::function<void(int64_t)>*>(&fn)));
}

// int8 copies of activation rows, quantized in parallel row ranges
struct QuantizedBuffer {
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> zero_fix;

  QuantizedRows quantize(KernelContext* context, const float* x, int64_t rows, int64_t k, int64_t block) {
    const int64_t blocks = k / block;
    q.resize(rows * k);
    scale.resize(rows * blocks);
    zero_fix.resize(rows * blocks);
    constexpr int64_t kRowsPerTask = 16;
    parallel_for(context, (rows + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task) {
      const int64_t r0 = task * kRowsPerTask, count = std::min(kRowsPerTask, rows - r0);
      quantize_rows(x + r0 * k, count, k, block, q.data() + r0 * k, scale.data() + r0 * blocks,
                    zero_fix.data() + r0 * blocks);
    });
    return {q.data(), scale.data(), zero_fix.data()};
  }
};

template <typename Kernel>
Status* guarded(const char* op, Kernel&& body) {
  try {
    body();
    return nullptr;
  } catch (const std::exception& e) {
    return g_api.CreateStatus(kInvalidArgument, e.what());
  } catch (...) {
    return g_api.CreateStatus(kFail, op);
  }
}

// ---- Int4Linear: Y [..., N] = X [..., K] W^T, W block-int4 ------------------------------------------
struct LinearKernel {
  int64_t k, n, block;
};

constexpr const char* kLinear = "Int4Linear";

Status* create_linear(const CustomOp*, ApiTable, const KernelInfo* info, void** kernel) {
  return guarded(kLinear, [&] {
    LinearKernel attrs{attribute(info, kLinear, "K"), attribute(info, kLinear, "N"),
                       attribute(info, kLinear, "block_size")};
    expect(attrs.k > 0 && attrs.n > 0, "Int4Linear: K and N must be positive");
    expect(attrs.block > 0 && attrs.block % 32 == 0 && attrs.k % attrs.block == 0,
           "Int4Linear: block_size must be a multiple of 32 that divides K");
    *kernel = new LinearKernel(attrs);
  });
}

Status* compute_linear(void* kernel, KernelContext* context) {
  return guarded(kLinear, [&] {
    const LinearKernel& a = *static_cast<const LinearKernel*>(kernel);
    const Tensor x = input(context, 0, kFloat, kLinear, "X");
    const Tensor w = input(context, 1, kUint8, kLinear, "packed weight");
    const Tensor s = input(context, 2, kFloat, kLinear, "packed scales");
    const int64_t groups = (a.n + kGroupRows - 1) / kGroupRows;
    expect(!x.dims.empty() && x.dims.back() == a.k, "Int4Linear: the last dimension of X must be K");
    expect(w.numel() == groups * packed_group_bytes(a.k), "Int4Linear: packed weight size does not match K, N");
    expect(s.numel() == groups * group_scales(a.k, a.block), "Int4Linear: scales size does not match K, N");
    std::vector<int64_t> dims = x.dims;
    dims.back() = a.n;
    float* y = output(context, dims);
    const int64_t rows = x.numel() / a.k;
    if (rows == 0) return;
    QuantizedBuffer buffer;
    const QuantizedRows xq = buffer.quantize(context, x.data<float>(), rows, a.k, a.block);
    const uint8_t* packed = w.data<uint8_t>();
    const float* scales = s.data<float>();
    // about 32 tasks: enough to balance the pool, few enough that each streams a long run of weights
    const int64_t per_task = std::max<int64_t>(1, groups / 32);
    parallel_for(context, (groups + per_task - 1) / per_task, [&](int64_t task) {
      const int64_t g0 = task * per_task, g1 = std::min(groups, g0 + per_task);
      int4_gemm(xq, rows, a.k, a.block, packed, scales, a.n, g0, g1, y, a.n);
    });
  });
}

// ---- Int4MoE: routed SwiGLU experts with block-int4 weights ----------------------------------------
struct MoeKernel {
  int64_t top_k, normalize, fc1_block, fc2_block;
};

constexpr const char* kMoe = "Int4MoE";

Status* create_moe(const CustomOp*, ApiTable, const KernelInfo* info, void** kernel) {
  return guarded(kMoe, [&] {
    const int64_t one = 1, block = 32;
    *kernel = new MoeKernel{attribute(info, kMoe, "k"), attribute(info, kMoe, "normalize_routing_weights", &one),
                            attribute(info, kMoe, "fc1_block_size", &block),
                            attribute(info, kMoe, "fc2_block_size", &block)};
  });
}

Status* compute_moe(void* kernel, KernelContext* context) {
  return guarded(kMoe, [&] {
    const MoeKernel& a = *static_cast<const MoeKernel*>(kernel);
    const Tensor x = input(context, 0, kFloat, kMoe, "X");
    const Tensor logits = input(context, 1, kFloat, kMoe, "router logits");
    const Tensor fc1 = input(context, 2, kUint8, kMoe, "fc1 packed weight");
    const Tensor fc1_scales = input(context, 3, kFloat, kMoe, "fc1 packed scales");
    const Tensor fc2 = input(context, 4, kUint8, kMoe, "fc2 packed weight");
    const Tensor fc2_scales = input(context, 5, kFloat, kMoe, "fc2 packed scales");
    // fc1 [E, 2I/16, H/B1, B1/8, 64], fc2 [E, H/16, I/B2, B2/8, 64]
    expect(fc1.dims.size() == 5 && fc2.dims.size() == 5, "Int4MoE: packed expert weights must be 5-D");
    MoeShape shape;
    shape.experts = fc1.dims[0];
    shape.hidden = fc2.dims[1] * kGroupRows;
    shape.inter = fc1.dims[1] * kGroupRows / 2;
    shape.top_k = a.top_k;
    shape.fc1_block = a.fc1_block;
    shape.fc2_block = a.fc2_block;
    shape.normalize = a.normalize != 0;
    const std::string why = moe_shape_error(shape);
    expect(why.empty(), "Int4MoE: " + why);
    expect(fc1.dims[2] * a.fc1_block == shape.hidden && fc2.dims[2] * a.fc2_block == shape.inter &&
               fc2.dims[0] == shape.experts,
           "Int4MoE: fc1 and fc2 shapes do not agree");
    expect(fc1_scales.numel() == shape.experts * fc1.dims[1] * group_scales(shape.hidden, a.fc1_block) &&
               fc2_scales.numel() == shape.experts * fc2.dims[1] * group_scales(shape.inter, a.fc2_block),
           "Int4MoE: scales do not match the expert weights");
    expect(!x.dims.empty() && x.dims.back() == shape.hidden, "Int4MoE: the last dimension of X must be the hidden size");
    shape.tokens = x.numel() / shape.hidden;
    expect(logits.numel() == shape.tokens * shape.experts, "Int4MoE: router logits must be [tokens, experts]");
    float* y = output(context, x.dims);
    if (shape.tokens == 0) return;
    int4_moe(x.data<float>(), logits.data<float>(), fc1.data<uint8_t>(), fc1_scales.data<float>(),
             fc2.data<uint8_t>(), fc2_scales.data<float>(), shape, y,
             [&](int64_t count, const std::function<void(int64_t)>& fn) { parallel_for(context, count, fn); });
  });
}

// ---- GatedDeltaRule: the Gated DeltaNet mixer between its projections --------------------------------
struct DeltaRuleKernel {
  DeltaRuleShape shape;
};

constexpr const char* kDeltaRule = "GatedDeltaRule";

Status* create_delta_rule(const CustomOp*, ApiTable, const KernelInfo* info, void** kernel) {
  return guarded(kDeltaRule, [&] {
    DeltaRuleShape s;
    s.nk = attribute(info, kDeltaRule, "num_k_heads");
    s.nv = attribute(info, kDeltaRule, "num_v_heads");
    s.dk = attribute(info, kDeltaRule, "head_k_dim");
    s.dv = attribute(info, kDeltaRule, "head_v_dim");
    s.kernel = attribute(info, kDeltaRule, "conv_kernel");
    s.epsilon = float_attribute(info, "epsilon", 1e-6f);
    const std::string why = delta_rule_shape_error(s);
    expect(why.empty(), std::string("GatedDeltaRule: ") + why);
    *kernel = new DeltaRuleKernel{s};
  });
}

Status* compute_delta_rule(void* kernel, KernelContext* context) {
  return guarded(kDeltaRule, [&] {
    DeltaRuleShape s = static_cast<const DeltaRuleKernel*>(kernel)->shape;
    const Tensor proj = input(context, 0, kFloat, kDeltaRule, "projections");
    const Tensor conv_w = input(context, 1, kFloat, kDeltaRule, "conv weight");
    const Tensor past_conv = input(context, 2, kFloat, kDeltaRule, "past conv state");
    const Tensor past_state = input(context, 3, kFloat, kDeltaRule, "past recurrent state");
    const Tensor dt_bias = input(context, 4, kFloat, kDeltaRule, "dt_bias");
    const Tensor neg_exp_a = input(context, 5, kFloat, kDeltaRule, "-exp(A_log)");
    const Tensor norm_w = input(context, 6, kFloat, kDeltaRule, "norm weight");
    expect(proj.dims.size() == 3 && proj.dims[2] == s.proj_width(),
           "GatedDeltaRule: projections must be [B, T, 2*nk*dk + 2*nv*dv + 2*nv]");
    s.batch = proj.dims[0];
    s.tokens = proj.dims[1];
    const int64_t C = s.channels(), keep = s.kernel - 1;
    expect(conv_w.numel() == C * s.kernel, "GatedDeltaRule: conv weight must be [C, 1, K]");
    expect(past_conv.numel() == s.batch * C * keep, "GatedDeltaRule: past conv state must be [B, C, K-1]");
    expect(past_state.numel() == s.batch * s.nv * s.dk * s.dv,
           "GatedDeltaRule: past recurrent state must be [B, nv, dk, dv]");
    expect(dt_bias.numel() == s.nv && neg_exp_a.numel() == s.nv && norm_w.numel() == s.dv,
           "GatedDeltaRule: dt_bias and -exp(A_log) must have nv values, the norm weight dv");
    float* out = output(context, {s.batch, s.tokens, s.nv * s.dv}, 0);
    float* present_conv = output(context, {s.batch, C, keep}, 1);
    float* present_state = output(context, {s.batch, s.nv, s.dk, s.dv}, 2);
    gated_delta_rule(proj.data<float>(), conv_w.data<float>(), past_conv.data<float>(), past_state.data<float>(),
                     dt_bias.data<float>(), neg_exp_a.data<float>(), norm_w.data<float>(), s, out, present_conv,
                     present_state,
                     [&](int64_t count, const std::function<void(int64_t)>& fn) { parallel_for(context, count, fn); });
  });
}

// ---- op tables --------------------------------------------------------------------------------------
template <size_t Inputs, const ElementType (&InputTypes)[Inputs], size_t Outputs, const char* const& Name,
          Status* (*Create)(const CustomOp*, ApiTable, const KernelInfo*, void**),
          Status* (*Compute)(void*, KernelContext*), typename Kernel>
CustomOp make_op() {
  CustomOp op{};
  op.version = kApiVersion;
  op.GetName = [](const CustomOp*) { return Name; };
  op.GetExecutionProviderType = [](const CustomOp*) -> const char* { return nullptr; };  // CPU
  op.GetInputType = [](const CustomOp*, size_t i) { return InputTypes[i]; };
  op.GetInputTypeCount = [](const CustomOp*) { return Inputs; };
  op.GetOutputType = [](const CustomOp*, size_t) { return kFloat; };
  op.GetOutputTypeCount = [](const CustomOp*) { return Outputs; };
  op.KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
  op.GetInputCharacteristic = [](const CustomOp*, size_t) { return kRequired; };
  op.GetOutputCharacteristic = [](const CustomOp*, size_t) { return kRequired; };
  op.GetInputMemoryType = [](const CustomOp*, size_t) { return kMemTypeDefault; };
  op.GetVariadicInputMinArity = [](const CustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const CustomOp*) { return 1; };
  op.GetVariadicOutputMinArity = [](const CustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const CustomOp*) { return 1; };
  op.CreateKernelV2 = Create;
  op.KernelComputeV2 = Compute;
  op.GetStartVersion = [](const CustomOp*) { return 1; };
  op.GetEndVersion = [](const CustomOp*) { return 0x7fffffff; };
  return op;
}

constexpr ElementType kLinearInputs[] = {kFloat, kUint8, kFloat};
constexpr ElementType kMoeInputs[] = {kFloat, kFloat, kUint8, kFloat, kUint8, kFloat};
constexpr ElementType kDeltaRuleInputs[] = {kFloat, kFloat, kFloat, kFloat, kFloat, kFloat, kFloat};

const CustomOp kLinearOp = make_op<3, kLinearInputs, 1, kLinear, create_linear, compute_linear, LinearKernel>();
const CustomOp kMoeOp = make_op<6, kMoeInputs, 1, kMoe, create_moe, compute_moe, MoeKernel>();
const CustomOp kDeltaRuleOp =
    make_op<7, kDeltaRuleInputs, 3, kDeltaRule, create_delta_rule, compute_delta_rule, DeltaRuleKernel>();

}  // namespace
}  // namespace qwen_cpu

// Which int4 tile runs on this CPU ("avx512-vnni" or "portable"), for tools and tests (ctypes).
extern "C" __attribute__((visibility("default"))) const char* QwenCpuKernelsBackend() {
  return qwen_cpu::int4_gemm_backend();
}

extern "C" __attribute__((visibility("default"))) qwen_cpu::ort::Status* RegisterCustomOps(
    qwen_cpu::ort::SessionOptions* options, const qwen_cpu::ort::ApiBase* base) {
  using namespace qwen_cpu::ort;
  ApiTable table = base->GetApi(kApiVersion);
  if (table == nullptr) return nullptr;  // cannot even report: ORT older than 1.17 loads nothing from us
  qwen_cpu::g_api.table = table;
  CustomOpDomain* domain = nullptr;
  if (Status* s = qwen_cpu::g_api.CreateCustomOpDomain("qwen.cpu", &domain)) return s;
  if (Status* s = qwen_cpu::g_api.CustomOpDomainAdd(domain, &qwen_cpu::kLinearOp)) return s;
  if (Status* s = qwen_cpu::g_api.CustomOpDomainAdd(domain, &qwen_cpu::kMoeOp)) return s;
  if (Status* s = qwen_cpu::g_api.CustomOpDomainAdd(domain, &qwen_cpu::kDeltaRuleOp)) return s;
  // the domain lives as long as the process: sessions keep using it after registration returns
  return qwen_cpu::g_api.AddCustomOpDomain(options, domain);
}
