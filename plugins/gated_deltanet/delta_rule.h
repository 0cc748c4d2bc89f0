// Gated delta rule kernels (internal to the GatedDeltaNet plugin), fp32 throughout.
//
// Inputs are the prepared per-token tensors: q, k [B, nk, T, dk] (l2-normed, q scaled), v inside the conv
// output [B*T, C] at column offset 2*nk*dk, beta and g [B, nv, T]. Output o [B, T, nv, dv]; the state
// goes from stateIn to stateOut [B, nv, dk, dv] (the two may be the same buffer).
#pragma once

#include "../common/qwen_launch.h"

namespace qwen
{
namespace gated_deltanet
{

struct RuleParams
{
    float const* q;
    float const* k;
    float const* conv;   // [B*T, C]; v of value head h at column vOffset + h * dv
    float const* beta;
    float const* g;
    float const* stateIn;
    float* stateOut;
    float* o;
    // chunk workspace (chunked path only)
    float* u;
    float* w;
    float* aqk;
    float* gcum;
    int64_t batch;
    int64_t tokens;
    int64_t convDim; // C
    int64_t vOffset; // 2 * nk * dk
    int32_t nk;
    int32_t nv;
    int32_t dk;
    int32_t dv;
};

// Token-by-token recurrence (decode, few tokens).
int launchRecurrent(RuleParams const& p, cudaStream_t stream);

// Chunked evaluation (64-token chunks) over [chunkBegin, chunkBegin + chunks) of the sequence; the state
// enters from stateIn and leaves through stateOut. Runs the chunk-parallel preparation, then the
// sequential state pass.
int launchChunkedSegment(RuleParams const& p, int64_t chunkBegin, int64_t chunks, cudaStream_t stream);

} // namespace gated_deltanet
} // namespace qwen
