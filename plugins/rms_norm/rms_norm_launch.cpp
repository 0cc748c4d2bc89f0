// qwenLaunchRMSNorm: the Triton RMSNorm (rms_norm_triton.py) through the loader. The width class and the
// aligned (`_a16`) cubin are chosen as rms_norm_triton.select_spec chooses them; the grid comes from the
// chosen cubin's own BLOCK_M.
#include "common/triton_launch.h"
#include "rms_norm/rms_norm_launch.h"

extern "C" int64_t qwenRMSNormParamsSize(void) { return sizeof(QwenRMSNormParams); }

extern "C" int qwenLaunchRMSNorm(QwenRMSNormParams const* params, cudaStream_t stream) {
  using namespace qwen::launch;
  using qwen::triton::Arg;
  if (!params || params->dim <= 0 || params->rows < 0 || params->rows > INT32_MAX || params->dim > INT32_MAX) {
    return fail(QWEN_STATUS_BAD_PARAM, "qwenLaunchRMSNorm: rows and dim must fit int32, dim > 0");
  }
  const QwenRMSNormParams p = *params;
  const char* variant = actVariant(p.dtype);
  if (!variant) return fail(QWEN_STATUS_UNSUPPORTED, "qwenLaunchRMSNorm: dtype must be fp16 or bf16");
  if (p.rows == 0) return QWEN_STATUS_OK;
  const bool a16 = aligned16({p.x, p.y, p.scale}, {p.dim});
  std::string name;
  Kernel kernel;
  int64_t blockM = 0;
  int status = widthClass("rms_norm.rms_norm_n", a16 ? "_a16" : "", p.dim, &name);
  if (!status) status = resolve(name.c_str(), variant, &kernel);
  if (!status) status = constant(kernel, "BLOCK_M", &blockM);
  if (status) return status;
  const auto rows = static_cast<int32_t>(p.rows), dim = static_cast<int32_t>(p.dim);
  // No residual: its pointers and strides are unused by the kernel; any valid ones will do.
  return run(kernel, {static_cast<unsigned>(ceilDiv(p.rows, blockM))},
             {Arg::ptr(p.x), Arg::ptr(p.x), Arg::ptr(p.scale), Arg::ptr(p.y), Arg::ptr(p.y), Arg::i32(rows),
              Arg::i32(dim), Arg::i32(dim), Arg::i32(dim), Arg::i32(dim), Arg::i32(dim), Arg::fp32(p.epsilon)},
             stream);
}
