// The ONNX Runtime wrappers of the attention core: qwen.cpu Attention (float KV cache) and AttentionKv16
// (float16 KV cache, fp32 arithmetic). Attribute and shape checks, the three outputs, ORT's pool; the
// arithmetic is attention().
#include <algorithm>
#include <cmath>
#include <string>

#include "attention/attention.h"
#include "common/ort_op.h"

namespace qwen_cpu {
namespace ort {
namespace {

struct AttentionKernel {
  AttentionShape shape;  // heads and scale; the rest per call
  bool half = false;
  float scale_attr = 0.f;  // 0: 1/sqrt(head size)
};

constexpr const char* kAttention = "Attention";
constexpr const char* kAttentionKv16 = "AttentionKv16";

template <bool Half>
Status* create_attention(const CustomOp*, ApiTable, const KernelInfo* info, void** kernel) {
  const char* name = Half ? kAttentionKv16 : kAttention;
  return guarded(name, [&] {
    auto* k = new AttentionKernel;
    k->shape.num_heads = attribute(info, name, "num_heads");
    k->shape.kv_heads = attribute(info, name, "kv_num_heads");
    k->shape.head_dim = 1;  // checked per call, from the query width
    k->scale_attr = float_attribute(info, "scale", 0.f);
    k->half = Half;
    const std::string why = attention_shape_error(k->shape);
    if (!why.empty()) {
      delete k;
      throw Error(std::string(name) + ": " + why);
    }
    *kernel = k;
  });
}

void* output_data(KernelContext* context, const std::vector<int64_t>& dims, size_t index) {
  Value* value = nullptr;
  check(g_api.KernelContextGetOutput(context, index, dims.data(), dims.size(), &value));
  void* data = nullptr;
  check(g_api.GetTensorMutableData(value, &data));
  return data;
}

template <bool Half>
Status* compute_attention(void* kernel, KernelContext* context) {
  const char* name = Half ? kAttentionKv16 : kAttention;
  return guarded(name, [&] {
    const auto* kern = static_cast<const AttentionKernel*>(kernel);
    AttentionShape s = kern->shape;
    const ElementType cache = Half ? kFloat16 : kFloat;
    const Tensor q = input(context, 0, kFloat, name, "query");
    const Tensor k = input(context, 1, kFloat, name, "key");
    const Tensor v = input(context, 2, kFloat, name, "value");
    const Tensor past_k = input(context, 3, cache, name, "past_key");
    const Tensor past_v = input(context, 4, cache, name, "past_value");
    const Tensor bias = input(context, 5, kFloat, name, "attention_bias");
    const std::string op(name);
    expect(q.dims.size() == 3 && q.dims[2] % s.num_heads == 0, op + ": query must be [B, T, num_heads*head_size]");
    s.batch = q.dims[0];
    s.tokens = q.dims[1];
    s.head_dim = q.dims[2] / s.num_heads;
    const int64_t kv_width = s.kv_heads * s.head_dim;
    expect(k.dims == std::vector<int64_t>{s.batch, s.tokens, kv_width} && v.dims == k.dims,
           op + ": key and value must be [B, T, kv_num_heads*head_size]");
    expect(past_k.dims.size() == 4 && past_k.dims[0] == s.batch && past_k.dims[1] == s.kv_heads &&
               past_k.dims[3] == s.head_dim && past_v.dims == past_k.dims,
           op + ": past_key and past_value must be [B, kv_num_heads, C, head_size]");
    // P, the valid past rows, comes from the bias ([.., P + T]): the caches may be longer (room to grow)
    expect(bias.dims.size() == 4 && bias.dims[0] == s.batch && bias.dims[1] == 1 &&
               (bias.dims[2] == s.tokens || bias.dims[2] == 1),
           op + ": attention_bias must be [B, 1, T or 1, P + T]");
    s.past = bias.dims[3] - s.tokens;
    s.past_rows = past_k.dims[2];
    expect(s.past >= 0 && s.past <= s.past_rows,
           op + ": attention_bias covers P + T = " + std::to_string(bias.dims[3]) + " keys, but the past caches hold " +
               std::to_string(s.past_rows) + " rows (P must be at most that)");
    s.present_rows = std::max(s.past_rows, s.total());
    s.bias_per_token = bias.dims[2] == s.tokens;
    s.scale = kern->scale_attr != 0.f ? kern->scale_attr : 1.f / std::sqrt(static_cast<float>(s.head_dim));
    float* out = output(context, {s.batch, s.tokens, s.num_heads * s.head_dim}, 0);
    void* present_k = output_data(context, {s.batch, s.kv_heads, s.present_rows, s.head_dim}, 1);
    void* present_v = output_data(context, {s.batch, s.kv_heads, s.present_rows, s.head_dim}, 2);
    // one buffer bound to past and present (IOBinding): update it in place
    s.shared = present_k == past_k.data<char>() && present_v == past_v.data<char>();
    expect(s.shared || (present_k != past_k.data<char>() && present_v != past_v.data<char>()),
           op + ": bind both caches to their past buffers, or neither");
    attention(q.data<float>(), k.data<float>(), v.data<float>(), past_k.data<char>(), past_v.data<char>(),
              bias.data<float>(), s, Half, out, present_k, present_v, pool(context));
  });
}

constexpr ElementType kFloatCache[] = {kFloat, kFloat, kFloat, kFloat, kFloat, kFloat};
constexpr ElementType kHalfCache[] = {kFloat, kFloat, kFloat, kFloat16, kFloat16, kFloat};

}  // namespace

const CustomOp& attention_op() {
  static const CustomOp op = make_op<6, kFloatCache, 3, kAttention, create_attention<false>,
                                     compute_attention<false>, AttentionKernel>();
  return op;
}

const CustomOp& attention_kv16_op() {
  static const CustomOp op = [] {
    CustomOp o = make_op<6, kHalfCache, 3, kAttentionKv16, create_attention<true>, compute_attention<true>,
                         AttentionKernel>();
    o.GetOutputType = [](const CustomOp*, size_t i) { return i == 0 ? kFloat : kFloat16; };  // the caches
    return o;
  }();
  return op;
}

}  // namespace ort
}  // namespace qwen_cpu
