// qwenLaunchGatedDeltaNet: the Gated DeltaNet block on the Triton kernels, through the loader.
//
//   qkv, z, b, a = x @ W_qkv, W_z, W_b, W_a           common.matmul (activation type, into the workspace)
//   conv = silu(causal conv(qkv)), state carried       gated_deltanet.causal_conv_act_state (act state)
//   o = gated delta rule(conv, a, b), fp32 state       gated_deltanet.recurrent_delta_rule (T <= 16 or
//                                                      ruleMode 1) or gated_deltanet.chunk_delta_rule
//   normed = RMSNorm(o) * norm_weight * silu(z)         qwenLaunchGatedRMSNorm (gated_rms_norm_launch.cpp)
//   y = normed @ W_out                                  common.matmul
//
// Both state pairs may alias (present over past): every kernel program reads its state slice before it
// writes it. Padding tokens (0 in the mask) are inert: they leave both states as they were and output 0 in
// the delta rule; transformers zeroes them instead, which agrees wherever a padded row starts from a zero
// state (a first prefill, the only place left padding occurs). Block sizes, DK/DV and the conv width come
// from the resolved cubins.
#include "gated_deltanet/gated_deltanet_launch.h"

#include <string>

#include "common/matmul_launch.h"
#include "common/triton_launch.h"
#include "gated_deltanet/gated_deltanet_core.h"
#include "gated_deltanet/gated_deltanet_workspace.h"
#include "gated_rms_norm/gated_rms_norm_launch.h"

namespace {

using namespace qwen::launch;
using qwen::triton::Arg;
namespace dn = qwen::gated_deltanet;

dn::Attrs attrsOf(const QwenGatedDeltaNetParams& p) {
  return dn::Attrs{p.numKHeads, p.numVHeads, p.headKDim, p.headVDim, p.convKernel, p.epsilon};
}

dn::WorkspaceShape shapeOf(const QwenGatedDeltaNetParams& p) {
  return dn::WorkspaceShape{p.batch, p.tokens, dn::convDim(attrsOf(p)), p.numVHeads, p.headVDim};
}

const char* missingPointer(const QwenGatedDeltaNetParams& p) {
  const struct {
    const void* pointer;
    const char* name;
  } required[] = {{p.x, "x"}, {p.mask, "mask"}, {p.pastConv, "pastConv"}, {p.pastRecurrent, "pastRecurrent"},
                  {p.qkvWeight, "qkvWeight"}, {p.zWeight, "zWeight"}, {p.bWeight, "bWeight"},
                  {p.aWeight, "aWeight"}, {p.convWeight, "convWeight"}, {p.negExpA, "negExpA"},
                  {p.dtBias, "dtBias"}, {p.normWeight, "normWeight"}, {p.outWeight, "outWeight"}, {p.y, "y"},
                  {p.presentConv, "presentConv"}, {p.presentRecurrent, "presentRecurrent"},
                  {p.workspace, "workspace"}};
  for (const auto& r : required) {
    if (!r.pointer) return r.name;
  }
  return nullptr;
}

int checkParams(const QwenGatedDeltaNetParams& p) {
  const std::string where = "qwenLaunchGatedDeltaNet: ";
  if (!actVariant(p.dtype)) return fail(QWEN_STATUS_UNSUPPORTED, where + "dtype must be fp16 or bf16");
  const std::string invalid = dn::validate(attrsOf(p));
  if (!invalid.empty()) return fail(QWEN_STATUS_UNSUPPORTED, where + invalid);
  if (p.batch < 0 || p.tokens < 0 || p.hidden <= 0 || p.maskLen < p.tokens) {
    return fail(QWEN_STATUS_BAD_PARAM, where + "needs batch, tokens >= 0, hidden > 0 and maskLen >= tokens");
  }
  if (p.ruleMode < 0 || p.ruleMode > 2) {
    return fail(QWEN_STATUS_BAD_PARAM, where + "ruleMode must be 0, 1 or 2");
  }
  const int64_t rows = p.batch * p.tokens, c = dn::convDim(attrsOf(p));
  if (rows > INT32_MAX || rows * c > INT32_MAX || p.maskLen > INT32_MAX || p.batch * p.numVHeads > 65535) {
    return fail(QWEN_STATUS_BAD_PARAM, where + "batch x tokens is too large for one launch");
  }
  if (rows == 0) return QWEN_STATUS_OK;
  const char* missing = missingPointer(p);
  if (missing) return fail(QWEN_STATUS_BAD_PARAM, where + missing + " is null");
  return QWEN_STATUS_OK;
}

// A kernel resolved with the constexprs the launch needs, checked against the plugin's attributes.
int resolveChecked(const char* name, const char* variant, Kernel* kernel,
                   std::initializer_list<std::pair<const char*, int64_t>> expected) {
  int status = resolve(name, variant, kernel);
  for (const auto& e : expected) {
    int64_t value = 0;
    if (!status) status = constant(*kernel, e.first, &value);
    if (!status && value != e.second) {
      return fail(QWEN_STATUS_UNSUPPORTED, std::string(name) + " is compiled for " + e.first + " " +
                                               std::to_string(value) + ", the layer has " +
                                               std::to_string(e.second));
    }
  }
  return status;
}

int launch(const QwenGatedDeltaNetParams& p, cudaStream_t stream) {
  const dn::Attrs attrs = attrsOf(p);
  const char* act = actVariant(p.dtype);
  const int64_t rows = p.batch * p.tokens, h = p.hidden, c = dn::convDim(attrs);
  const int64_t nv = p.numVHeads, dv = p.headVDim;
  Workspace workspace(p.workspace);
  const dn::Buffers<void*> ws = dn::carve(workspace, shapeOf(p));

  // Projections.
  int status = matmul(Matmul{p.x, p.qkvWeight, ws.qkv, rows, c, h, h, c, c}, p.dtype, false, stream);
  const int64_t zWidth = nv * dv;
  if (!status) status = matmul(Matmul{p.x, p.zWeight, ws.z, rows, zWidth, h, h, zWidth, zWidth}, p.dtype, false, stream);
  if (!status) status = matmul(Matmul{p.x, p.bWeight, ws.b, rows, nv, h, h, nv, nv}, p.dtype, false, stream);
  if (!status) status = matmul(Matmul{p.x, p.aWeight, ws.a, rows, nv, h, h, nv, nv}, p.dtype, false, stream);
  if (status) return status;

  // Causal conv + SiLU, the conv state carried in the activation type.
  const std::string convVariant = std::string(act) + (p.tokens == 1 ? "_decode" : "");
  Kernel conv;
  int64_t blockC = 0;
  status = resolveChecked("gated_deltanet.causal_conv_act_state", convVariant.c_str(), &conv,
                          {{"KERNEL", p.convKernel}});
  if (!status) status = constant(conv, "BLOCK_C", &blockC);
  if (!status) {
    status = run(conv, {static_cast<unsigned>(ceilDiv(c, blockC)), static_cast<unsigned>(p.batch)},
                 {Arg::ptr(ws.qkv), Arg::ptr(p.convWeight), Arg::ptr(p.mask), Arg::ptr(p.pastConv),
                  Arg::ptr(p.presentConv), Arg::ptr(ws.conv), Arg::i32(static_cast<int32_t>(p.tokens)),
                  Arg::i32(static_cast<int32_t>(c)), Arg::i32(static_cast<int32_t>(p.maskLen)),
                  Arg::i32(static_cast<int32_t>(c)), Arg::i32(1)},
                 stream);
  }
  if (status) return status;

  // The gated delta rule from the carried fp32 state.
  const bool chunked = dn::usesChunked(static_cast<dn::RuleMode>(p.ruleMode), p.tokens);
  Kernel rule;
  int64_t blockV = 0;
  const char* ruleKernel = chunked ? "gated_deltanet.chunk_delta_rule" : "gated_deltanet.recurrent_delta_rule";
  status = resolveChecked(ruleKernel, act, &rule, {{"DK", p.headKDim}, {"DV", p.headVDim}});
  if (!status) status = constant(rule, "BV", &blockV);
  if (!status) {
    status = run(rule, {static_cast<unsigned>(ceilDiv(dv, blockV)), static_cast<unsigned>(p.batch * nv)},
                 {Arg::ptr(ws.conv), Arg::ptr(ws.a), Arg::ptr(ws.b), Arg::ptr(p.negExpA), Arg::ptr(p.dtBias),
                  Arg::ptr(p.mask), Arg::ptr(p.pastRecurrent), Arg::ptr(p.presentRecurrent), Arg::ptr(ws.o),
                  Arg::i32(static_cast<int32_t>(p.tokens)), Arg::i32(static_cast<int32_t>(p.maskLen)),
                  Arg::i32(p.numKHeads), Arg::i32(p.numVHeads), Arg::i32(static_cast<int32_t>(c)),
                  Arg::i32(static_cast<int32_t>(nv)), Arg::i32(1)},
                 stream);
  }
  if (status) return status;

  // Gated RMSNorm per value head: rows of dv over (token, head), z read with the same layout.
  QwenGatedRMSNormParams norm{};
  norm.x = ws.o;
  norm.z = ws.z;
  norm.scale = p.normWeight;
  norm.y = ws.normed;
  norm.rows = rows * nv;
  norm.dim = dv;
  norm.epsilon = p.epsilon;
  norm.dtype = p.dtype;
  status = qwenLaunchGatedRMSNorm(&norm, stream);
  if (status) return status;

  return matmul(Matmul{ws.normed, p.outWeight, p.y, rows, h, nv * dv, nv * dv, h, h}, p.dtype, false, stream);
}

}  // namespace

extern "C" int64_t qwenGatedDeltaNetParamsSize(void) { return sizeof(QwenGatedDeltaNetParams); }

extern "C" int64_t qwenGatedDeltaNetWorkspaceSize(QwenGatedDeltaNetParams const* params) {
  if (!params) return -1;
  Workspace counter;
  dn::carve(counter, shapeOf(*params));
  return static_cast<int64_t>(counter.used());
}

extern "C" int qwenLaunchGatedDeltaNet(QwenGatedDeltaNetParams const* params, cudaStream_t stream) {
  if (!params) return fail(QWEN_STATUS_BAD_PARAM, "qwenLaunchGatedDeltaNet: params is null");
  const int status = checkParams(*params);
  if (status || params->batch * params->tokens == 0) return status;
  return launch(*params, stream);
}
