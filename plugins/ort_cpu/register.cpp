// The library's entry points: RegisterCustomOps, which ONNX Runtime looks up when
// SessionOptions.register_custom_ops_library loads this library, and QwenCpuKernelsBackend for tools.
// Each op's wrapper is in its folder (int4_linear/, int4_moe/, float_moe/, gated_delta_rule/, attention/,
// dist_collective/).
#include "common/ort_op.h"
#include "float_moe/float_moe.h"
#include "gated_delta_rule/gated_delta_rule.h"
#include "int4_linear/int4_gemm.h"

namespace qwen_cpu::ort {

Api g_api;

const CustomOp& int4_linear_op();
const CustomOp& int4_moe_op();
const CustomOp& float_moe_op();
const CustomOp& gated_delta_rule_op();
const CustomOp& dist_collective_op();
const CustomOp& attention_op();
const CustomOp& attention_kv16_op();

}  // namespace qwen_cpu::ort

// Which int4 tile runs on this CPU ("avx512-vnni", "avx2" or "portable"), for tools and tests (ctypes).
extern "C" __attribute__((visibility("default"))) const char* QwenCpuKernelsBackend() {
  return qwen_cpu::int4_gemm_backend();
}

// Which dot loops FloatMoE runs ("x86-64-v4", "avx2" or "baseline"), for tools and tests (ctypes).
extern "C" __attribute__((visibility("default"))) const char* QwenCpuFloatMoeLoops() {
  return qwen_cpu::float_moe_loops();
}

// Which copy of its loops GatedDeltaRule runs ("avx512f", "avx2" or "baseline"), for tools and tests (ctypes).
extern "C" __attribute__((visibility("default"))) const char* QwenCpuDeltaRuleLoops() {
  return qwen_cpu::delta_rule_loops();
}

extern "C" __attribute__((visibility("default"))) qwen_cpu::ort::Status* RegisterCustomOps(
    qwen_cpu::ort::SessionOptions* options, const qwen_cpu::ort::ApiBase* base) {
  using namespace qwen_cpu::ort;
  ApiTable table = base->GetApi(kApiVersion);
  if (table == nullptr) return nullptr;  // cannot even report: ORT older than 1.17 loads nothing from us
  qwen_cpu::ort::g_api.table = table;
  CustomOpDomain* domain = nullptr;
  if (Status* s = qwen_cpu::ort::g_api.CreateCustomOpDomain("qwen.cpu", &domain)) return s;
  if (Status* s = qwen_cpu::ort::g_api.CustomOpDomainAdd(domain, &qwen_cpu::ort::int4_linear_op())) return s;
  if (Status* s = qwen_cpu::ort::g_api.CustomOpDomainAdd(domain, &qwen_cpu::ort::int4_moe_op())) return s;
  if (Status* s = qwen_cpu::ort::g_api.CustomOpDomainAdd(domain, &qwen_cpu::ort::float_moe_op())) return s;
  if (Status* s = qwen_cpu::ort::g_api.CustomOpDomainAdd(domain, &qwen_cpu::ort::gated_delta_rule_op())) return s;
  if (Status* s = qwen_cpu::ort::g_api.CustomOpDomainAdd(domain, &qwen_cpu::ort::dist_collective_op())) return s;
  if (Status* s = qwen_cpu::ort::g_api.CustomOpDomainAdd(domain, &qwen_cpu::ort::attention_op())) return s;
  if (Status* s = qwen_cpu::ort::g_api.CustomOpDomainAdd(domain, &qwen_cpu::ort::attention_kv16_op())) return s;
  // the domain lives as long as the process: sessions keep using it after registration returns
  return qwen_cpu::ort::g_api.AddCustomOpDomain(options, domain);
}
