// Gated RMSNorm: RMSNorm(x) * silu(z), one warp per row, fp32 statistics.
#include "../common/norm.cuh"
#include "gated_rms_norm_kernel.h"

namespace qwen
{
namespace
{

constexpr int kWarpsPerBlock = 8;

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) gatedRmsNormKernel(QwenGatedRMSNormParams p, bool vec)
{
    int const lane = threadIdx.x & 31;
    int64_t const row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
    if (row >= p.rows)
    {
        return;
    }
    int64_t const offset = row * p.dim;
    warpRmsNormRow<T, T, T>(static_cast<T const*>(p.x) + offset, static_cast<T const*>(p.z) + offset, p.scale,
        static_cast<T*>(p.y) + offset, p.dim, p.epsilon, lane, vec);
}

} // namespace
} // namespace qwen

extern "C" int64_t qwenGatedRMSNormParamsSize(void)
{
    return sizeof(QwenGatedRMSNormParams);
}

extern "C" int qwenLaunchGatedRMSNorm(QwenGatedRMSNormParams const* params, cudaStream_t stream)
{
    using namespace qwen;
    if (params == nullptr || params->dim <= 0 || params->rows < 0 || params->z == nullptr)
    {
        return QWEN_STATUS_BAD_PARAM;
    }
    QwenGatedRMSNormParams const p = *params;
    if (p.rows == 0)
    {
        return 0;
    }
    bool const vec = p.dim % 8 == 0 && isAligned16(p.x) && isAligned16(p.z) && isAligned16(p.y);
    unsigned const blocks = static_cast<unsigned>(ceilDiv(p.rows, kWarpsPerBlock));
    return QWEN_DISPATCH_ACT(p.dtype, T, [&] {
        gatedRmsNormKernel<T><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(p, vec);
        QWEN_CHECK_LAUNCH();
        return 0;
    });
}
