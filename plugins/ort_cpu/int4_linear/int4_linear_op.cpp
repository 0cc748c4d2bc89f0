// The ONNX Runtime wrapper of Int4Linear: attribute and shape checks, output, the row quantization and the
// GEMM tasks on ORT's pool. The arithmetic is int4_gemm.
#include "common/ort_op.h"
#include "int4_linear/int4_gemm.h"

namespace qwen_cpu {
namespace ort {
namespace {

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
    const Tensor s = input(context, 2, kFloat16, kLinear, "packed scales");
    const int64_t groups = (a.n + kGroupRows - 1) / kGroupRows;
    expect(!x.dims.empty() && x.dims.back() == a.k, "Int4Linear: the last dimension of X must be K");
    expect(w.numel() == groups * packed_group_bytes(a.k), "Int4Linear: packed weight size does not match K, N");
    expect(s.numel() == groups * group_scales(a.k, a.block), "Int4Linear: scales size does not match K, N");
    std::vector<int64_t> dims = x.dims;
    dims.back() = a.n;
    float* y = output(context, dims);
    const int64_t rows = x.numel() / a.k;
    if (rows == 0) return;
    const int64_t blocks = a.k / a.block;
    std::vector<int8_t> q(rows * a.k);
    std::vector<float> x_scales(rows * blocks);
    std::vector<int32_t> zero_fix(rows * blocks);
    quantize_rows_parallel(x.data<float>(), rows, a.k, a.block, q.data(), x_scales.data(), zero_fix.data(),
                           pool(context));
    const QuantizedRows xq{q.data(), x_scales.data(), zero_fix.data()};
    const uint8_t* packed = w.data<uint8_t>();
    const Half* scales = s.data<Half>();
    // about 32 tasks: enough to balance the pool, few enough that each streams a long run of weights
    const int64_t per_task = std::max<int64_t>(1, groups / 32);
    parallel_for(context, (groups + per_task - 1) / per_task, [&](int64_t task) {
      const int64_t g0 = task * per_task, g1 = std::min(groups, g0 + per_task);
      int4_gemm(xq, rows, a.k, a.block, packed, scales, a.n, g0, g1, y, a.n);
    });
  });
}

constexpr ElementType kLinearInputs[] = {kFloat, kUint8, kFloat16};

}  // namespace

const CustomOp& int4_linear_op() {
  static const CustomOp op = make_op<3, kLinearInputs, 1, kLinear, create_linear, compute_linear, LinearKernel>();
  return op;
}

}  // namespace ort
}  // namespace qwen_cpu
