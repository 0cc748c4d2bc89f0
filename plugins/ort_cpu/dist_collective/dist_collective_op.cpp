// The ONNX Runtime wrapper of the loopback DistCollective: attributes, the group input, the output shape.
// The meeting itself is dist_collective/loopback.
#include "common/ort_op.h"
#include "dist_collective/loopback.h"

namespace qwen_cpu {
namespace ort {
namespace {

struct CollectiveKernel {
  Collective op;
  int64_t nb_rank, rank, tag;
};

constexpr const char* kDistCollective = "DistCollective";

Status* create_collective(const CustomOp*, ApiTable, const KernelInfo* info, void** kernel) {
  return guarded(kDistCollective, [&] {
    CollectiveKernel k{};
    std::string why;
    const std::string name = string_attribute(info, kDistCollective, "collective_operation");
    expect(parse_collective(name, &k.op, &why), std::string("DistCollective: ") + why);
    const std::string reduce = string_attribute(info, kDistCollective, "reduce_op");
    const char* expected = k.op == Collective::kAllReduce ? "sum" : "none";
    expect(reduce == expected, "DistCollective: " + name + " takes reduce_op " + expected + ", got " + reduce);
    k.nb_rank = attribute(info, kDistCollective, "nb_rank");
    k.rank = attribute(info, kDistCollective, "rank");
    k.tag = attribute(info, kDistCollective, "tag");
    expect(k.nb_rank >= 1 && k.rank >= 0 && k.rank < k.nb_rank, "DistCollective: rank must be in 0..nb_rank-1");
    *kernel = new CollectiveKernel(k);
  });
}

Status* compute_collective(void* kernel, KernelContext* context) {
  return guarded(kDistCollective, [&] {
    const CollectiveKernel& k = *static_cast<const CollectiveKernel*>(kernel);
    const Tensor x = input(context, 0, kFloat, kDistCollective, "x");
    const Tensor group = input(context, 1, kInt64, kDistCollective, "group");
    expect(group.numel() == 1, "DistCollective: group must hold one id");
    float* y = output(context, collective_output_dims(k.op, x.dims, k.nb_rank));
    loopback_collective(group.data<int64_t>()[0], k.tag, k.rank, k.nb_rank, k.op, x.data<float>(), x.dims, y,
                        collective_timeout_s());
  });
}

constexpr ElementType kCollectiveInputs[] = {kFloat, kInt64};

}  // namespace

const CustomOp& dist_collective_op() {
  static const CustomOp op = make_op<2, kCollectiveInputs, 1, kDistCollective, create_collective,
                                     compute_collective, CollectiveKernel>();
  return op;
}

}  // namespace ort
}  // namespace qwen_cpu
