// The dense GEMM launcher (matmul_launch.h) over common/matmul_triton.py, choosing as its Python launcher
// does: the decode class while M fits one decode tile, else prefill; the `_a16` cubin when the pointers, N,
// K and the row strides allow 16-byte vectors; the `_f32out` variant for fp32 outputs. The grid is the
// chosen cubin's own tiles: cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N) programs (grouped ordering is in-kernel).
#include "common/matmul_launch.h"

#include <string>

#include "common/triton_launch.h"

namespace qwen {
namespace launch {

namespace {

bool fitsInt32(int64_t v) { return v >= 0 && v <= INT32_MAX; }

}  // namespace

int matmul(const Matmul& m, int32_t dtype, bool fp32Out, cudaStream_t stream) {
  using triton::Arg;
  const char* act = actVariant(dtype);
  if (!act) return fail(QWEN_STATUS_UNSUPPORTED, "matmul: dtype must be fp16 or bf16");
  for (int64_t v : {m.M, m.N, m.K, m.strideX, m.strideW, m.strideY}) {
    if (!fitsInt32(v)) return fail(QWEN_STATUS_BAD_PARAM, "matmul: sizes and strides must fit int32");
  }
  if (m.strideX < m.K || m.strideW < m.N || m.strideY < m.N) {
    return fail(QWEN_STATUS_BAD_PARAM, "matmul: a row stride is shorter than its row");
  }
  if (m.M == 0 || m.N == 0) return QWEN_STATUS_OK;
  if (!m.x || !m.w || !m.y) return fail(QWEN_STATUS_BAD_PARAM, "matmul: null operand");
  const std::string variant = std::string(act) + (fp32Out ? "_f32out" : "");
  const bool a16 = aligned16({m.x, m.w, m.y}, {m.N, m.K, m.strideX, m.strideW, m.strideY});
  const char* suffix = a16 ? "_a16" : "";

  Kernel kernel;
  int64_t blockM = 0, blockN = 0;
  int status = resolve((std::string("common.matmul_decode") + suffix).c_str(), variant.c_str(), &kernel);
  if (!status) status = constant(kernel, "BLOCK_M", &blockM);
  if (!status && m.M > blockM) {
    status = resolve((std::string("common.matmul_prefill") + suffix).c_str(), variant.c_str(), &kernel);
    if (!status) status = constant(kernel, "BLOCK_M", &blockM);
  }
  if (!status) status = constant(kernel, "BLOCK_N", &blockN);
  if (status) return status;
  const int64_t programs = ceilDiv(m.M, blockM) * ceilDiv(m.N, blockN);
  if (programs > INT32_MAX) return fail(QWEN_STATUS_BAD_PARAM, "matmul: too many tiles for one launch");
  return run(kernel, {static_cast<unsigned>(programs)},
             {Arg::ptr(m.x), Arg::ptr(m.w), Arg::ptr(m.y), Arg::i32(static_cast<int32_t>(m.M)),
              Arg::i32(static_cast<int32_t>(m.N)), Arg::i32(static_cast<int32_t>(m.K)),
              Arg::i32(static_cast<int32_t>(m.strideX)), Arg::i32(static_cast<int32_t>(m.strideW)),
              Arg::i32(static_cast<int32_t>(m.strideY))},
             stream);
}

}  // namespace launch
}  // namespace qwen
