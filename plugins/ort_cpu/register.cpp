// The library's entry points: RegisterCustomOps, which ONNX Runtime looks up when
// SessionOptions.register_custom_ops_library loads this library, and QwenCpuKernelsBackend for tools.
// Each op's wrapper is in its folder (int4_linear/, int4_moe/, float_moe/, gated_delta_rule/, attention/,
// dist_collective/).
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "common/ort_op.h"
#include "float_moe/float_moe.h"
#include "gated_delta_rule/gated_delta_rule.h"
#include "int4_linear/int4_gemm.h"

namespace qwen_cpu::ort {

Api g_api;

// Whether the ops read their inputs' shapes without allocating (ONNX Runtime 1.24 or newer, asked of its
// version string "1.31.1": GetApi logs an error for a version the runtime lacks). QWEN_CPU_ORT_API=17
// keeps the calls of API 17 on any runtime (tests compare the two ways).
bool reads_shape_references(const char* version) {
  const char* forced = std::getenv("QWEN_CPU_ORT_API");
  if (forced != nullptr && std::strcmp(forced, "17") == 0) return false;
  int major = 0, minor = 0;
  if (version == nullptr || std::sscanf(version, "%d.%d", &major, &minor) != 2) return false;
  return major > 1 || (major == 1 && minor >= 24);
}

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

// Whether the ops read input shapes through ONNX Runtime 1.24's reference call (reads_shape_references;
// set when a session registers the library), for tests (ctypes).
extern "C" __attribute__((visibility("default"))) int QwenCpuReadsShapeReferences() {
  return qwen_cpu::ort::g_api.shape_references ? 1 : 0;
}

extern "C" __attribute__((visibility("default"))) qwen_cpu::ort::Status* RegisterCustomOps(
    qwen_cpu::ort::SessionOptions* options, const qwen_cpu::ort::ApiBase* base) {
  using namespace qwen_cpu::ort;
  ApiTable table = base->GetApi(kApiVersion);
  if (table == nullptr) return nullptr;  // cannot even report: ORT older than 1.17 loads nothing from us
  qwen_cpu::ort::g_api.table = table;
  qwen_cpu::ort::g_api.shape_references = qwen_cpu::ort::reads_shape_references(base->GetVersionString());
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
