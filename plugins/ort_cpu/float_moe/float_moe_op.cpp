// The ONNX Runtime wrapper of FloatMoE: attribute and shape checks, output, ORT's pool. The arithmetic is
// float_moe.
#include "common/ort_op.h"
#include "float_moe/float_moe.h"

namespace qwen_cpu {
namespace ort {
namespace {

struct FloatMoeKernel {
  int64_t top_k, normalize, shared_inter;
};

constexpr size_t kFloatMoeRequiredInputs = 4;  // input 4: the shared expert's down projection (version 4)

constexpr const char* kFloatMoe = "FloatMoE";

Status* create_float_moe(const CustomOp*, ApiTable, const KernelInfo* info, void** kernel) {
  return guarded(kFloatMoe, [&] {
    const int64_t one = 1, none = 0;
    *kernel = new FloatMoeKernel{attribute(info, kFloatMoe, "k"),
                                 attribute(info, kFloatMoe, "normalize_routing_weights", &one),
                                 attribute(info, kFloatMoe, "shared_expert_size", &none)};
  });
}

Status* compute_float_moe(void* kernel, KernelContext* context) {
  return guarded(kFloatMoe, [&] {
    const FloatMoeKernel& a = *static_cast<const FloatMoeKernel*>(kernel);
    const Tensor x = input(context, 0, kFloat, kFloatMoe, "X");
    const Tensor logits = input(context, 1, kFloat, kFloatMoe, "router logits");
    const Tensor fc1 = input(context, 2, kFloat, kFloatMoe, "fc1 experts weights");
    const Tensor fc2 = input(context, 3, kFloat, kFloatMoe, "fc2 experts weights");
    expect(fc1.dims.size() == 3 && fc2.dims.size() == 3,
           "FloatMoE: expert weights must be fc1 [E, 2I, H] and fc2 [E, H, I]");
    MoeShape shape;
    shape.experts = fc1.dims[0];
    shape.hidden = fc1.dims[2];
    shape.inter = fc1.dims[1] / 2;
    shape.top_k = a.top_k;
    shape.normalize = a.normalize != 0;
    shape.shared_inter = a.shared_inter;
    expect(fc2.dims == std::vector<int64_t>{shape.experts, shape.hidden, shape.inter} && fc1.dims[1] % 2 == 0,
           "FloatMoE: fc1 [E, 2I, H] and fc2 [E, H, I] do not agree");
    const std::string why = float_moe_shape_error(shape);
    expect(why.empty(), "FloatMoE: " + why);
    expect(!x.dims.empty() && x.dims.back() == shape.hidden,
           "FloatMoE: the last dimension of X must be the hidden size");
    shape.tokens = x.numel() / shape.hidden;
    const float* shared_down = nullptr;
    if (shape.shared_inter > 0) {
      const Tensor down = input(context, 4, kFloat, kFloatMoe, "shared expert down weight");
      expect(down.dims == std::vector<int64_t>{shape.hidden, shape.shared_inter},
             "FloatMoE: the shared expert's down projection must be [H, shared_expert_size] (transposed)");
      shared_down = down.data<float>();
      expect(logits.numel() == shape.tokens * shape.logits_stride(),
             "FloatMoE: with a shared expert the logits must be [tokens, experts + 2 * shared_expert_size + 1]");
    } else {
      expect(!input_given(context, kFloatMoeRequiredInputs),
             "FloatMoE: a shared expert's down projection needs shared_expert_size > 0");
      expect(logits.numel() == shape.tokens * shape.experts, "FloatMoE: router logits must be [tokens, experts]");
    }
    float* y = output(context, x.dims);
    if (shape.tokens == 0) return;
    float_moe(x.data<float>(), logits.data<float>(), fc1.data<float>(), fc2.data<float>(), shape, y,
              pool(context), shared_down);
  });
}

constexpr ElementType kFloatMoeInputs[] = {kFloat, kFloat, kFloat, kFloat, kFloat};

}  // namespace

const CustomOp& float_moe_op() {
  static const CustomOp op = make_op<5, kFloatMoeInputs, 1, kFloatMoe, create_float_moe, compute_float_moe,
                                     FloatMoeKernel, kFloatMoeRequiredInputs>();
  return op;
}

}  // namespace ort
}  // namespace qwen_cpu
