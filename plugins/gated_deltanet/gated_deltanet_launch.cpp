// qwenLaunchGatedDeltaNet: the Gated DeltaNet block on the Triton kernels, through the loader.
//
//   qkv, z, b, a = x @ W_qkv, W_z, W_b, W_a           common.matmul (activation type, into the workspace)
//   conv = silu(causal conv(qkv)), state carried       gated_deltanet.causal_conv_act_state (act state;
//                                                      the `_decode` variant for T = 1)
//   o = gated delta rule(conv, a, b), fp32 state       gated_deltanet.recurrent_delta_rule (T <= 16 or
//                                                      ruleMode 1) or gated_deltanet.chunk_delta_rule
//   normed = RMSNorm(o) * norm_weight * silu(z)         qwenLaunchGatedRMSNorm (gated_rms_norm_launch.cpp)
//   y = normed @ W_out                                  common.matmul
//
// Both state pairs may alias (present over past): every kernel program reads its state slice before it
// writes it. Padding tokens (0 in the mask) are inert: they leave both states as they were and output 0 in
// the delta rule; transformers zeroes them instead, which agrees wherever a padded row starts from a zero
// state (a first prefill, the only place left padding occurs). Block sizes, DK/DV and the conv width come
// from the resolved cubins. The conv and the rule run over batch segments when the batch (x value heads)
// passes the grid's 65535 limit on y; T = 0 only carries the states over.
#include "gated_deltanet/gated_deltanet_launch.h"

#include <algorithm>
#include <string>
#include <utility>

#include "common/matmul_launch.h"
#include "common/triton_launch.h"
#include "gated_deltanet/gated_deltanet_core.h"
#include "gated_deltanet/gated_deltanet_workspace.h"
#include "gated_rms_norm/gated_rms_norm_launch.h"

namespace {

using namespace qwen::launch;
using qwen::triton::Arg;
namespace dn = qwen::gated_deltanet;

constexpr int64_t kMaxGridY = 65535;
// Batch segments are multiples of this many rows, so that every segment's pointers keep the 16-byte
// alignment the cubins are compiled for (a, b: T x nv fp16 per row; mask: maskLen int32 per row).
constexpr int64_t kSegmentRows = 8;

dn::Attrs attrsOf(const QwenGatedDeltaNetParams& p) {
  return dn::Attrs{p.numKHeads, p.numVHeads, p.headKDim, p.headVDim, p.convKernel, p.epsilon};
}

dn::WorkspaceShape shapeOf(const QwenGatedDeltaNetParams& p) {
  return dn::WorkspaceShape{p.batch, p.tokens, dn::convDim(attrsOf(p)), p.numVHeads, p.headVDim};
}

// The most batch rows one launch takes when each row is `programsPerRow` programs along grid y.
int64_t segmentRows(int64_t programsPerRow) {
  return kMaxGridY / programsPerRow / kSegmentRows * kSegmentRows;
}

const void* advance(const void* p, int64_t bytes) { return static_cast<const char*>(p) + bytes; }
void* advance(void* p, int64_t bytes) { return static_cast<char*>(p) + bytes; }

bool fitsInt32(int64_t v) { return v >= 0 && v <= INT32_MAX; }

struct Pointer {
  const void* pointer;
  const char* name;
};

// The first null pointer of `pointers`, else null.
const char* firstNull(std::initializer_list<Pointer> pointers) {
  for (const Pointer& p : pointers) {
    if (!p.pointer) return p.name;
  }
  return nullptr;
}

// The first of `pointers` (the kernels take them with a 16-byte divisibility hint) not 16-byte aligned.
const char* firstUnaligned(std::initializer_list<Pointer> pointers) {
  for (const Pointer& p : pointers) {
    if (!aligned16({p.pointer}, {})) return p.name;
  }
  return nullptr;
}

int checkParams(const QwenGatedDeltaNetParams& p) {
  const std::string where = "qwenLaunchGatedDeltaNet: ";
  if (!actVariant(p.dtype)) return fail(QWEN_STATUS_UNSUPPORTED, where + "dtype must be fp16 or bf16");
  const std::string invalid = dn::validate(attrsOf(p));
  if (!invalid.empty()) return fail(QWEN_STATUS_UNSUPPORTED, where + invalid);
  if (p.ruleMode < 0 || p.ruleMode > 2) {
    return fail(QWEN_STATUS_BAD_PARAM, where + "ruleMode must be 0, 1 or 2");
  }
  if (p.batch < 0 || p.tokens < 0 || p.hidden <= 0 || p.maskLen < p.tokens) {
    return fail(QWEN_STATUS_BAD_PARAM, where + "needs batch, tokens >= 0, hidden > 0 and maskLen >= tokens");
  }
  // i32 kernel arguments: T, maskLen, C, H, the GEMMs' M = B*T, the gated norm's B*T*nv rows.
  // (tokens <= maskLen; each product is formed only once its factors are known to fit int32.)
  const int64_t c = dn::convDim(attrsOf(p));
  if (!fitsInt32(p.batch) || !fitsInt32(p.maskLen) || !fitsInt32(p.hidden) || !fitsInt32(c) ||
      !fitsInt32(p.batch * p.tokens) || !fitsInt32(p.batch * p.tokens * p.numVHeads)) {
    return fail(QWEN_STATUS_BAD_PARAM, where + "batch x tokens x num_v_heads, maskLen, hidden and the conv " +
                                           "channels must fit int32");
  }
  if (segmentRows(p.numVHeads) < kSegmentRows) {
    return fail(QWEN_STATUS_UNSUPPORTED, where + "num_v_heads " + std::to_string(p.numVHeads) +
                                             " exceeds the delta rule's grid (at most 8191)");
  }
  if (p.batch == 0) return QWEN_STATUS_OK;
  const char* missing = firstNull({{p.pastConv, "pastConv"}, {p.pastRecurrent, "pastRecurrent"},
                                   {p.presentConv, "presentConv"}, {p.presentRecurrent, "presentRecurrent"}});
  if (!missing && p.tokens > 0) {
    missing = firstNull({{p.x, "x"}, {p.mask, "mask"}, {p.qkvWeight, "qkvWeight"}, {p.zWeight, "zWeight"},
                         {p.bWeight, "bWeight"}, {p.aWeight, "aWeight"}, {p.convWeight, "convWeight"},
                         {p.negExpA, "negExpA"}, {p.dtBias, "dtBias"}, {p.normWeight, "normWeight"},
                         {p.outWeight, "outWeight"}, {p.y, "y"}, {p.workspace, "workspace"}});
  }
  if (missing) return fail(QWEN_STATUS_BAD_PARAM, where + missing + " is null");
  if (p.tokens == 0) return QWEN_STATUS_OK;
  const char* unaligned = firstUnaligned({{p.mask, "mask"}, {p.pastConv, "pastConv"},
                                          {p.presentConv, "presentConv"}, {p.pastRecurrent, "pastRecurrent"},
                                          {p.presentRecurrent, "presentRecurrent"},
                                          {p.convWeight, "convWeight"}, {p.negExpA, "negExpA"},
                                          {p.dtBias, "dtBias"}, {p.workspace, "workspace"}});
  if (unaligned) return fail(QWEN_STATUS_BAD_PARAM, where + unaligned + " is not 16-byte aligned");
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

// `each(b0, rows)` over [0, batch) in segments of at most `most` rows; stops at the first failure.
template <class Each>
int overSegments(int64_t batch, int64_t most, Each each) {
  for (int64_t b0 = 0; b0 < batch; b0 += most) {
    const int status = each(b0, std::min(most, batch - b0));
    if (status) return status;
  }
  return QWEN_STATUS_OK;
}

// T = 0: nothing to compute; the present states are the past ones.
int carryStates(const QwenGatedDeltaNetParams& p, cudaStream_t stream) {
  const auto conv = static_cast<size_t>(dn::convDim(attrsOf(p)) * (p.convKernel - 1)) * dn::kActElementBytes;
  const auto recurrent = static_cast<size_t>(p.numVHeads) * p.headKDim * p.headVDim * sizeof(float);
  const auto rows = static_cast<size_t>(p.batch);
  int status = QWEN_STATUS_OK;
  if (p.presentConv != p.pastConv) {
    status = copyRows(p.presentConv, conv, p.pastConv, conv, conv, rows, stream);
  }
  if (!status && p.presentRecurrent != p.pastRecurrent) {
    status = copyRows(p.presentRecurrent, recurrent, p.pastRecurrent, recurrent, recurrent, rows, stream);
  }
  return status;
}

int launch(const QwenGatedDeltaNetParams& p, cudaStream_t stream) {
  const dn::Attrs attrs = attrsOf(p);
  const char* act = actVariant(p.dtype);
  const int64_t rows = p.batch * p.tokens, h = p.hidden, c = dn::convDim(attrs);
  const int64_t nv = p.numVHeads, dv = p.headVDim, zWidth = nv * dv;
  const auto t = static_cast<int32_t>(p.tokens), maskLen = static_cast<int32_t>(p.maskLen);
  const auto c32 = static_cast<int32_t>(c);
  const auto act2 = static_cast<int64_t>(dn::kActElementBytes);
  Workspace workspace(p.workspace);
  const dn::Buffers<void*> ws = dn::carve(workspace, shapeOf(p));

  // Projections.
  const auto project = [&](const void* weight, void* out, int64_t n) {
    return matmul(Matmul{p.x, weight, out, rows, n, h, h, n, n}, p.dtype, false, stream);
  };
  int status = project(p.qkvWeight, ws.qkv, c);
  if (!status) status = project(p.zWeight, ws.z, zWidth);
  if (!status) status = project(p.bWeight, ws.b, nv);
  if (!status) status = project(p.aWeight, ws.a, nv);
  if (status) return status;

  // Causal conv + SiLU, the conv state carried in the activation type: programs (channel block, batch row).
  const std::string convVariant = std::string(act) + (p.tokens == 1 ? "_decode" : "");
  Kernel conv;
  int64_t blockC = 0;
  status = resolveChecked("gated_deltanet.causal_conv_act_state", convVariant.c_str(), &conv,
                          {{"KERNEL", p.convKernel}});
  if (!status) status = constant(conv, "BLOCK_C", &blockC);
  if (!status) {
    const int64_t stateRow = c * (p.convKernel - 1) * act2, tokenRows = p.tokens * c * act2;
    status = overSegments(p.batch, segmentRows(1), [&](int64_t b0, int64_t n) {
      return run(conv, {static_cast<unsigned>(ceilDiv(c, blockC)), static_cast<unsigned>(n)},
                 {Arg::ptr(advance(ws.qkv, b0 * tokenRows)), Arg::ptr(p.convWeight),
                  Arg::ptr(p.mask + b0 * p.maskLen), Arg::ptr(advance(p.pastConv, b0 * stateRow)),
                  Arg::ptr(advance(p.presentConv, b0 * stateRow)), Arg::ptr(advance(ws.conv, b0 * tokenRows)),
                  Arg::i32(t), Arg::i32(c32), Arg::i32(maskLen), Arg::i32(c32), Arg::i32(1)},
                 stream);
    });
  }
  if (status) return status;

  // The gated delta rule from the carried fp32 state: programs (state column block, batch row x value head).
  const bool chunked = dn::usesChunked(static_cast<dn::RuleMode>(p.ruleMode), p.tokens);
  Kernel rule;
  int64_t blockV = 0;
  status = resolveChecked(chunked ? "gated_deltanet.chunk_delta_rule" : "gated_deltanet.recurrent_delta_rule",
                          act, &rule, {{"DK", p.headKDim}, {"DV", p.headVDim}});
  if (!status) status = constant(rule, "BV", &blockV);
  if (!status) {
    const int64_t state = nv * p.headKDim * dv, gates = p.tokens * nv * act2, outs = p.tokens * zWidth * act2;
    status = overSegments(p.batch, segmentRows(nv), [&](int64_t b0, int64_t n) {
      return run(rule, {static_cast<unsigned>(ceilDiv(dv, blockV)), static_cast<unsigned>(n * nv)},
                 {Arg::ptr(advance(ws.conv, b0 * p.tokens * c * act2)), Arg::ptr(advance(ws.a, b0 * gates)),
                  Arg::ptr(advance(ws.b, b0 * gates)), Arg::ptr(p.negExpA), Arg::ptr(p.dtBias),
                  Arg::ptr(p.mask + b0 * p.maskLen), Arg::ptr(p.pastRecurrent + b0 * state),
                  Arg::ptr(p.presentRecurrent + b0 * state), Arg::ptr(advance(ws.o, b0 * outs)), Arg::i32(t),
                  Arg::i32(maskLen), Arg::i32(p.numKHeads), Arg::i32(p.numVHeads), Arg::i32(c32),
                  Arg::i32(p.numVHeads), Arg::i32(1)},
                 stream);
    });
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

  return matmul(Matmul{ws.normed, p.outWeight, p.y, rows, h, zWidth, zWidth, h, h}, p.dtype, false, stream);
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
  if (status || params->batch == 0) return status;
  return params->tokens == 0 ? carryStates(*params, stream) : launch(*params, stream);
}
