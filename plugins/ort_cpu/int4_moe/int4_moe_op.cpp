// The ONNX Runtime wrapper of Int4MoE: attribute and shape checks, output, ORT's pool. The arithmetic is
// int4_moe.
#include "common/ort_op.h"
#include "int4_moe/int4_moe.h"

namespace qwen_cpu {
namespace ort {
namespace {

// ---- Int4MoE: routed SwiGLU experts with block-int4 weights ----------------------------------------
struct MoeKernel {
  int64_t top_k, normalize, fc1_block, fc2_block, shared_inter, shared_block;
};

constexpr size_t kMoeRequiredInputs = 6;  // inputs 6 and 7: the shared expert's down projection (version 4)

constexpr const char* kMoe = "Int4MoE";

Status* create_moe(const CustomOp*, ApiTable, const KernelInfo* info, void** kernel) {
  return guarded(kMoe, [&] {
    const int64_t one = 1, block = 32, none = 0;
    *kernel = new MoeKernel{attribute(info, kMoe, "k"), attribute(info, kMoe, "normalize_routing_weights", &one),
                            attribute(info, kMoe, "fc1_block_size", &block),
                            attribute(info, kMoe, "fc2_block_size", &block),
                            attribute(info, kMoe, "shared_expert_size", &none),
                            attribute(info, kMoe, "shared_block_size", &block)};
  });
}

Status* compute_moe(void* kernel, KernelContext* context) {
  return guarded(kMoe, [&] {
    const MoeKernel& a = *static_cast<const MoeKernel*>(kernel);
    const Tensor x = input(context, 0, kFloat, kMoe, "X");
    const Tensor logits = input(context, 1, kFloat, kMoe, "router logits");
    const Tensor fc1 = input(context, 2, kUint8, kMoe, "fc1 packed weight");
    const Tensor fc1_scales = input(context, 3, kFloat16, kMoe, "fc1 packed scales");
    const Tensor fc2 = input(context, 4, kUint8, kMoe, "fc2 packed weight");
    const Tensor fc2_scales = input(context, 5, kFloat16, kMoe, "fc2 packed scales");
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
    shape.shared_inter = a.shared_inter;
    shape.shared_block = a.shared_block;
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
    SharedDown shared;
    if (shape.shared_inter > 0) {
      const Tensor down = input(context, 6, kUint8, kMoe, "shared expert down packed weight");
      const Tensor down_scales = input(context, 7, kFloat16, kMoe, "shared expert down packed scales");
      // [H/16, I_s/Bs, Bs/8, 64] and [H/16, I_s/Bs, 16]
      expect(down.numel() == shape.hidden / kGroupRows * packed_group_bytes(shape.shared_inter) &&
                 down_scales.numel() == shape.hidden / kGroupRows * group_scales(shape.shared_inter, a.shared_block),
             "Int4MoE: the shared expert's down projection must be packed [H/16, shared_expert_size/B, B/8, 64]");
      shared = {down.data<uint8_t>(), down_scales.data<Half>()};
      expect(logits.numel() == shape.tokens * shape.logits_stride(),
             "Int4MoE: with a shared expert the logits must be [tokens, experts + 2 * shared_expert_size + 1]");
    } else {
      expect(!input_given(context, kMoeRequiredInputs),
             "Int4MoE: a shared expert's down projection needs shared_expert_size > 0");
      expect(logits.numel() == shape.tokens * shape.experts, "Int4MoE: router logits must be [tokens, experts]");
    }
    float* y = output(context, x.dims);
    if (shape.tokens == 0) return;
    int4_moe(x.data<float>(), logits.data<float>(), fc1.data<uint8_t>(), fc1_scales.data<Half>(),
             fc2.data<uint8_t>(), fc2_scales.data<Half>(), shape, y, pool(context), shared);
  });
}

constexpr ElementType kMoeInputs[] = {kFloat, kFloat, kUint8, kFloat16, kUint8, kFloat16, kUint8, kFloat16};

}  // namespace

const CustomOp& int4_moe_op() {
  static const CustomOp op = make_op<8, kMoeInputs, 1, kMoe, create_moe, compute_moe, MoeKernel, kMoeRequiredInputs>();
  return op;
}

}  // namespace ort
}  // namespace qwen_cpu
