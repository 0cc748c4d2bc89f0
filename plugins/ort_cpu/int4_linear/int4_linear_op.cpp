// The ONNX Runtime wrapper of Int4Linear: attribute and shape checks, output, the row quantization and the
// GEMM tasks on ORT's pool. The arithmetic is int4_gemm.
#include "common/ort_op.h"
#include "common/scratch.h"
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
    // the int8 rows live in this thread's scratch, a pass of at most kRowsPerPass rows at a time
    constexpr int64_t kRowsPerPass = 4096;
    const int64_t pass = std::min(rows, kRowsPerPass);
    thread_local std::vector<int8_t> q_buffer;
    thread_local std::vector<float> scale_buffer;
    thread_local std::vector<int32_t> fix_buffer;
    int8_t* q = grow(q_buffer, pass * a.k);
    float* x_scales = grow(scale_buffer, pass * blocks);
    int32_t* zero_fix = grow(fix_buffer, pass * blocks);
    const QuantizedRows xq{q, x_scales, zero_fix};
    for (int64_t r0 = 0; r0 < rows; r0 += pass) {
      const int64_t count = std::min(pass, rows - r0);
      quantize_rows_parallel(x.data<float>() + r0 * a.k, count, a.k, a.block, q, x_scales, zero_fix, pool(context));
      int4_gemm_parallel(xq, count, a.k, a.block, w.data<uint8_t>(), s.data<Half>(), a.n, y + r0 * a.n, a.n,
                         pool(context));
    }
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
