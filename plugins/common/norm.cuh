// One-warp-per-row RMSNorm (optionally gated by silu(z)), shared by the norm plugins and the fused blocks.
#pragma once

#include "qwen_cuda.cuh"

namespace qwen
{

// y = x * rsqrt(mean(x^2) + eps) * scale  [* silu(z)], statistics in fp32. Called by all 32 lanes.
// `vec`: x, z, y are 16-bit, 16-byte aligned and dim % 8 == 0 (128-bit path); otherwise lane-strided.
template <typename TX, typename TZ, typename TY>
__device__ __forceinline__ void warpRmsNormRow(TX const* x, TZ const* z, float const* scale, TY* y,
    int64_t dim, float eps, int lane, bool vec)
{
    float ss = 0.0F;
    if constexpr (sizeof(TX) == 2)
    {
        if (vec)
        {
            for (int64_t c = lane * 8; c < dim; c += 256)
            {
                float v[8];
                load8(x + c, v);
#pragma unroll
                for (int i = 0; i < 8; ++i)
                {
                    ss = fmaf(v[i], v[i], ss);
                }
            }
        }
    }
    if (!vec || sizeof(TX) != 2)
    {
        for (int64_t i = lane; i < dim; i += 32)
        {
            float const v = toFloat(x[i]);
            ss = fmaf(v, v, ss);
        }
    }
    ss = warpSum(ss);
    float const inv = rsqrtf(ss / static_cast<float>(dim) + eps);

    if constexpr (sizeof(TX) == 2 && sizeof(TY) == 2 && (sizeof(TZ) == 2))
    {
        if (vec)
        {
            for (int64_t c = lane * 8; c < dim; c += 256)
            {
                float v[8];
                load8(x + c, v);
                float g[8];
                if (z != nullptr)
                {
                    load8(z + c, g);
                }
#pragma unroll
                for (int i = 0; i < 8; ++i)
                {
                    v[i] = v[i] * inv * scale[c + i];
                    if (z != nullptr)
                    {
                        v[i] *= siluf(g[i]);
                    }
                }
                store8(y + c, v);
            }
            return;
        }
    }
    for (int64_t i = lane; i < dim; i += 32)
    {
        float out = toFloat(x[i]) * inv * scale[i];
        if (z != nullptr)
        {
            out *= siluf(toFloat(z[i]));
        }
        y[i] = fromFloat<TY>(out);
    }
}

} // namespace qwen
