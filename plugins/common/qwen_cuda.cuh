// Device helpers shared by the kernels: 16-bit <-> fp32 conversion, 128-bit vector loads, warp/block
// reductions, activations, dtype dispatch and error plumbing.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "qwen_core.h"
#include "qwen_launch.h"

namespace qwen
{

using bf16 = __nv_bfloat16;

template <typename T>
__device__ __forceinline__ float toFloat(T v);
template <>
__device__ __forceinline__ float toFloat<half>(half v)
{
    return __half2float(v);
}
template <>
__device__ __forceinline__ float toFloat<bf16>(bf16 v)
{
    return __bfloat162float(v);
}
template <>
__device__ __forceinline__ float toFloat<float>(float v)
{
    return v;
}

template <typename T>
__device__ __forceinline__ T fromFloat(float v);
template <>
__device__ __forceinline__ half fromFloat<half>(float v)
{
    return __float2half_rn(v);
}
template <>
__device__ __forceinline__ bf16 fromFloat<bf16>(float v)
{
    return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ float fromFloat<float>(float v)
{
    return v;
}

// 8 x 16-bit elements <-> 8 floats through one 128-bit access. `p` must be 16-byte aligned.
template <typename T>
__device__ __forceinline__ void load8(T const* p, float (&out)[8])
{
    uint4 const raw = __ldg(reinterpret_cast<uint4 const*>(p));
    T const* e = reinterpret_cast<T const*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i)
    {
        out[i] = toFloat(e[i]);
    }
}

// Same, through the coherent path: for buffers written earlier in the same kernel or by aliasing outputs.
template <typename T>
__device__ __forceinline__ void load8Coherent(T const* p, float (&out)[8])
{
    uint4 const raw = *reinterpret_cast<uint4 const*>(p);
    T const* e = reinterpret_cast<T const*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i)
    {
        out[i] = toFloat(e[i]);
    }
}

template <typename T>
__device__ __forceinline__ void store8(T* p, float const (&v)[8])
{
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i)
    {
        e[i] = fromFloat<T>(v[i]);
    }
    *reinterpret_cast<uint4*>(p) = raw;
}

__device__ __forceinline__ float warpSum(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
    {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}

__device__ __forceinline__ float warpMax(float v)
{
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
    {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    }
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024). `scratch` holds 32 floats.
// Every thread gets the result. Contains __syncthreads(): call it from all threads.
__device__ __forceinline__ float blockSum(float v, float* scratch)
{
    int const lane = threadIdx.x & 31;
    int const warp = threadIdx.x >> 5;
    int const warps = blockDim.x >> 5;
    v = warpSum(v);
    __syncthreads(); // scratch may still be read by a previous call
    if (lane == 0)
    {
        scratch[warp] = v;
    }
    __syncthreads();
    float total = lane < warps ? scratch[lane] : 0.0F;
    return warpSum(total);
}

__device__ __forceinline__ float sigmoidf(float x)
{
    return 1.0F / (1.0F + __expf(-x));
}

__device__ __forceinline__ float siluf(float x)
{
    return x * sigmoidf(x);
}

// torch.nn.functional.softplus with beta 1 and threshold 20.
__device__ __forceinline__ float softplusf(float x)
{
    return x > 20.0F ? x : log1pf(__expf(x));
}

inline bool isAligned16(void const* p)
{
    return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Grid-stride loop bounds helper.
inline unsigned int gridFor(int64_t work, int threads, int64_t maxBlocks = 65535LL * 16)
{
    int64_t blocks = (work + threads - 1) / threads;
    if (blocks < 1)
    {
        blocks = 1;
    }
    return static_cast<unsigned int>(blocks > maxBlocks ? maxBlocks : blocks);
}

int multiProcessorCount();
int maxSharedMemoryOptin();

} // namespace qwen

// Runs `body` with `T` bound to the activation type of `dtype` (QWEN_DTYPE_*).
#define QWEN_DISPATCH_ACT(dtype, T, ...)                                                                      \
    [&]() -> int {                                                                                             \
        if ((dtype) == QWEN_DTYPE_F16)                                                                         \
        {                                                                                                      \
            using T = half;                                                                                    \
            return __VA_ARGS__();                                                                              \
        }                                                                                                      \
        if ((dtype) == QWEN_DTYPE_BF16)                                                                        \
        {                                                                                                      \
            using T = ::qwen::bf16;                                                                            \
            return __VA_ARGS__();                                                                              \
        }                                                                                                      \
        return QWEN_STATUS_UNSUPPORTED;                                                                        \
    }()

// Returns the error of the last launch (or an earlier asynchronous error) from the enclosing function.
#define QWEN_CHECK_LAUNCH()                                                                                    \
    do                                                                                                         \
    {                                                                                                          \
        cudaError_t const qwenErr_ = cudaGetLastError();                                                       \
        if (qwenErr_ != cudaSuccess)                                                                           \
        {                                                                                                      \
            return static_cast<int>(qwenErr_);                                                                 \
        }                                                                                                      \
    } while (0)

#define QWEN_CHECK_CUDA(call)                                                                                  \
    do                                                                                                         \
    {                                                                                                          \
        cudaError_t const qwenErr_ = (call);                                                                   \
        if (qwenErr_ != cudaSuccess)                                                                           \
        {                                                                                                      \
            return static_cast<int>(qwenErr_);                                                                 \
        }                                                                                                      \
    } while (0)

#define QWEN_CHECK_STATUS(expr)                                                                                \
    do                                                                                                         \
    {                                                                                                          \
        int const qwenStatus_ = (expr);                                                                        \
        if (qwenStatus_ != 0)                                                                                  \
        {                                                                                                      \
            return qwenStatus_;                                                                                \
        }                                                                                                      \
    } while (0)
