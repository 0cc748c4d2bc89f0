// The dense GEMM launcher (matmul_launch.h): placeholder until common/matmul_triton.py lands.
#include "common/matmul_launch.h"

#include "common/triton_launch.h"

namespace qwen {
namespace launch {

int matmul(const Matmul&, int32_t, bool, cudaStream_t) {
  return fail(QWEN_STATUS_UNSUPPORTED, "matmul: not ported to the Triton kernels yet");
}

}  // namespace launch
}  // namespace qwen
