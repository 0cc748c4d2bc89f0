// The ONNX Runtime wrapper of GatedDeltaRule: attribute and shape checks, the three outputs and the two
// optional per-token states (domain version 3), ORT's pool. The arithmetic is gated_delta_rule.
#include "common/ort_op.h"
#include "common/step_tokens.h"
#include "gated_delta_rule/gated_delta_rule.h"

namespace qwen_cpu {
namespace ort {
namespace {

// ---- GatedDeltaRule: the Gated DeltaNet mixer between its projections --------------------------------
struct DeltaRuleKernel {
  DeltaRuleShape shape;
};

constexpr const char* kDeltaRule = "GatedDeltaRule";
constexpr size_t kDeltaRuleRequiredOutputs = 3;  // Y and the present states; then the optional per-token states

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
    // outputs 3 and 4, where the node has them: the states after every token of a call narrower than
    // kStepTokens (a speculative verify step), none ([B, 0, ...]) for a wider one (a prompt)
    size_t outputs = 0;
    check(g_api.KernelContextGetOutputCount(context, &outputs));
    float *position_conv = nullptr, *position_state = nullptr;
    if (outputs > kDeltaRuleRequiredOutputs) {
      const int64_t positions = s.tokens < kStepTokens ? s.tokens : 0;
      position_conv = output(context, {s.batch, positions, C, keep}, 3);
      position_state = output(context, {s.batch, positions, s.nv, s.dk, s.dv}, 4);
      if (positions == 0) position_conv = position_state = nullptr;
    }
    gated_delta_rule(proj.data<float>(), conv_w.data<float>(), past_conv.data<float>(), past_state.data<float>(),
                     dt_bias.data<float>(), neg_exp_a.data<float>(), norm_w.data<float>(), s, out, present_conv,
                     present_state, pool(context), position_conv, position_state);
  });
}

constexpr ElementType kDeltaRuleInputs[] = {kFloat, kFloat, kFloat, kFloat, kFloat, kFloat, kFloat};

}  // namespace

const CustomOp& gated_delta_rule_op() {
  static const CustomOp op = [] {
    CustomOp o =
        make_op<7, kDeltaRuleInputs, 5, kDeltaRule, create_delta_rule, compute_delta_rule, DeltaRuleKernel>();
    o.GetOutputCharacteristic = [](const CustomOp*, size_t i) {
      return i < kDeltaRuleRequiredOutputs ? kRequired : kOptional;
    };
    return o;
  }();
  return op;
}

}  // namespace ort
}  // namespace qwen_cpu
