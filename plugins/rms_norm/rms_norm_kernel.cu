// RMSNorm: one warp per row, fp32 statistics, 128-bit loads when the row allows.
#include "../common/norm.cuh"
#include "rms_norm_kernel.h"

namespace qwen
{
namespace
{

constexpr int kWarpsPerBlock = 8;

template <typename T>
__global__ void __launch_bounds__(kWarpsPerBlock * 32) rmsNormKernel(QwenRMSNormParams p, bool vec)
{
    int const lane = threadIdx.x & 31;
    int64_t const row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
    if (row >= p.rows)
    {
        return;
    }
    T const* x = static_cast<T const*>(p.x) + row * p.dim;
    T* y = static_cast<T*>(p.y) + row * p.dim;
    warpRmsNormRow<T, T, T>(x, static_cast<T const*>(nullptr), p.scale, y, p.dim, p.epsilon, lane, vec);
}

} // namespace
} // namespace qwen

extern "C" int64_t qwenRMSNormParamsSize(void)
{
    return sizeof(QwenRMSNormParams);
}

extern "C" int qwenLaunchRMSNorm(QwenRMSNormParams const* params, cudaStream_t stream)
{
    using namespace qwen;
    if (params == nullptr || params->dim <= 0 || params->rows < 0)
    {
        return QWEN_STATUS_BAD_PARAM;
    }
    QwenRMSNormParams const p = *params;
    if (p.rows == 0)
    {
        return 0;
    }
    bool const vec = p.dim % 8 == 0 && isAligned16(p.x) && isAligned16(p.y);
    unsigned const blocks = static_cast<unsigned>(ceilDiv(p.rows, kWarpsPerBlock));
    return QWEN_DISPATCH_ACT(p.dtype, T, [&] {
        rmsNormKernel<T><<<blocks, kWarpsPerBlock * 32, 0, stream>>>(p, vec);
        QWEN_CHECK_LAUNCH();
        return 0;
    });
}
