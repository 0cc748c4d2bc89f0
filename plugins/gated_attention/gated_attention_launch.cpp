// qwenLaunchGatedAttention: the gated attention block through the Triton kernels
// (plugins/gated_attention/*_triton.py), launched as their Python launchers launch them:
//
//   q_proj = x @ qWeight [B*T, nh * 2 * hd] (per head: query, then gate), k = x @ kWeight, v = x @ vWeight:
//     the common matmul, in the activation type, into the workspace
//   present[:, :, :P] = past: one 2-D copy each for K and V (B * kv rows of P * hd elements)
//   gated_attention.qk_norm_rope_hd<hd> ("<act>_scale": q_norm/k_norm are the multipliers themselves, as
//     docs/ops.md stores them): q normed + rotated into the workspace, K (normed + rotated) and V written
//     into present at positions P .. P+T-1; grid (cdiv(B*T, BLOCK_T), nh + kv)
//   T > 1: gated_attention.flash_prefill_hd<hd>, the sigmoid gate from q_proj fused; grid
//     (cdiv(T * group, BLOCK_M), B * kv)
//   T == 1: gated_attention.split_kv_decode_hd<hd>, grid (splits, B * kv * cdiv(group, BLOCK_H)), then
//     gated_attention.split_kv_combine_hd<hd> with the gate fused, grid (B * nh); the splits as
//     split_kv_decode_triton.decode_plan chooses them (kvSplits > 0 asks for that many, up to MAX_SPLITS)
//   y = attn @ oWeight: the common matmul, straight into Y
//
// Tile sizes (BLOCK_T, BLOCK_M, BLOCK_N, BLOCK_H, MAX_SPLITS) come from the resolved cubins. The workspace
// is carved by gated_attention_workspace.h, as the core sizes it.
#include "gated_attention/gated_attention_launch.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <string>
#include <utility>

#include "common/matmul_launch.h"
#include "common/triton_launch.h"
#include "gated_attention/gated_attention_core.h"
#include "gated_attention/gated_attention_workspace.h"

namespace qwen {
namespace gated_attention {
namespace {

using launch::ceilDiv;
using launch::Kernel;
using triton::Arg;

constexpr char kWho[] = "qwenLaunchGatedAttention: ";
constexpr int64_t kMaxGridYZ = 65535;  // CUDA's limit on grid y and z

int bad(const std::string& why) { return launch::fail(QWEN_STATUS_BAD_PARAM, kWho + why); }
int unsupported(const std::string& why) { return launch::fail(QWEN_STATUS_UNSUPPORTED, kWho + why); }
int mismatch(const std::string& why) { return launch::fail(QWEN_STATUS_LAUNCH, kWho + why); }
unsigned u(int64_t v) { return static_cast<unsigned>(v); }
int32_t i32(int64_t v) { return static_cast<int32_t>(v); }
bool fitsInt32(int64_t v) { return v >= 0 && v <= INT32_MAX; }

Attrs attrsOf(const QwenGatedAttentionParams& p) {
  return Attrs{p.numHeads, p.numKvHeads, p.headDim, p.rotaryDim, p.epsilon, p.scale};
}

WorkspaceShape shapeOf(const QwenGatedAttentionParams& p) {
  return WorkspaceShape{p.batch, p.tokens, p.numHeads, p.numKvHeads, p.headDim};
}

// validate()'s message without its "QwenGatedAttention: " prefix and trailing "; ".
std::string attrProblems(const QwenGatedAttentionParams& p) {
  std::string why = validate(attrsOf(p));
  const std::string prefix = std::string(kPluginName) + ": ";
  if (why.compare(0, prefix.size(), prefix) == 0) why.erase(0, prefix.size());
  while (!why.empty() && (why.back() == ' ' || why.back() == ';')) why.pop_back();
  return why;
}

// Every check that needs no cubin, before anything is resolved or launched.
int checkParams(const QwenGatedAttentionParams& p) {
  if (!launch::actVariant(p.dtype)) return unsupported("dtype must be fp16 or bf16");
  const std::string why = attrProblems(p);
  if (!why.empty()) return bad(why);
  if (p.batch < 0 || p.tokens < 0 || p.past < 0 || p.hidden <= 0) {
    return bad("batch, tokens and past must be >= 0 and hidden > 0");
  }
  if (p.kvSplits < 0) return bad("kvSplits must be >= 0 (0: automatic)");
  // i32 kernel arguments (B*T rows, T * nh packed rows, S keys) and the kernels' 32-bit key offsets within
  // one (batch, kv head) slice of the cache (flash_prefill / split_kv_decode refuse S * hd >= 2^31 too).
  if (p.batch > INT32_MAX || p.tokens > INT32_MAX || p.past > INT32_MAX || !fitsInt32(p.batch * p.tokens) ||
      !fitsInt32(p.tokens * p.numHeads) || (p.past + p.tokens) * p.headDim > INT32_MAX) {
    return unsupported("B*T, T*num_heads and (past + T) * head_dim must fit int32");
  }
  if (p.batch * p.numKvHeads > kMaxGridYZ) {
    return unsupported("batch * num_kv_heads (" + std::to_string(p.batch * p.numKvHeads) + ") over " +
                       std::to_string(kMaxGridYZ) + ", the grid's y limit");
  }
  // Empty tensors may have null addresses: what a call touches must not. B*T > 0 touches every input and
  // output; T == 0 copies the past into present only.
  const std::pair<const char*, const void*> required[] = {
      {"presentKey", p.presentKey}, {"presentValue", p.presentValue}, {"x", p.x}, {"mask", p.mask},
      {"cos", p.cos}, {"sin", p.sin}, {"qWeight", p.qWeight}, {"kWeight", p.kWeight}, {"vWeight", p.vWeight},
      {"oWeight", p.oWeight}, {"qNorm", p.qNorm}, {"kNorm", p.kNorm}, {"y", p.y}, {"workspace", p.workspace}};
  const size_t all = sizeof(required) / sizeof(required[0]);
  const size_t touched = p.batch == 0 || p.past + p.tokens == 0 ? 0 : p.tokens == 0 ? 2 : all;
  for (size_t i = 0; i < touched; ++i) {
    if (!required[i].second) return bad(std::string("null ") + required[i].first);
  }
  if (p.batch > 0 && p.past > 0 && (!p.pastKey || !p.pastValue)) {
    return bad("null pastKey or pastValue with past > 0");
  }
  return QWEN_STATUS_OK;
}

// The attention kernels of this launch, resolved before anything runs.
struct Plan {
  Kernel normRope, prefill, decode, combine;
  int64_t blockT = 0, blockM = 0;
  int64_t blockH = 0, splits = 0, keysPerSplit = 0;
  bool isDecode = false;
};

int resolvePlan(const QwenGatedAttentionParams& p, Plan* plan) {
  const std::string act = launch::actVariant(p.dtype);
  const std::string hd = std::to_string(p.headDim);
  int status = launch::resolve(("gated_attention.qk_norm_rope_hd" + hd).c_str(), (act + "_scale").c_str(),
                               &plan->normRope);
  if (!status) status = launch::constant(plan->normRope, "BLOCK_T", &plan->blockT);
  if (status) return status;
  plan->isDecode = p.tokens == 1;
  if (!plan->isDecode) {
    status = launch::resolve(("gated_attention.flash_prefill_hd" + hd).c_str(), act.c_str(), &plan->prefill);
    return status ? status : launch::constant(plan->prefill, "BLOCK_M", &plan->blockM);
  }
  int64_t blockN = 0, maxSplits = 0, combineMaxSplits = 0;
  status = launch::resolve(("gated_attention.split_kv_decode_hd" + hd).c_str(), act.c_str(), &plan->decode);
  if (!status) status = launch::constant(plan->decode, "BLOCK_N", &blockN);
  if (!status) status = launch::constant(plan->decode, "BLOCK_H", &plan->blockH);
  if (!status) status = launch::constant(plan->decode, "MAX_SPLITS", &maxSplits);
  if (!status) {
    const std::string combine = "gated_attention.split_kv_combine_hd" + hd;
    status = launch::resolve(combine.c_str(), act.c_str(), &plan->combine);
  }
  if (!status) status = launch::constant(plan->combine, "MAX_SPLITS", &combineMaxSplits);
  if (status) return status;
  if (maxSplits != combineMaxSplits || maxSplits < 1 || maxSplits > kMaxDecodeSplits || blockN < 1) {
    return mismatch("the split-KV cubins' MAX_SPLITS (decode " + std::to_string(maxSplits) + ", combine " +
                    std::to_string(combineMaxSplits) + ") differ or exceed the workspace's " +
                    std::to_string(kMaxDecodeSplits));
  }
  // split_kv_decode_triton.decode_plan: as many splits as MAX_SPLITS allows with one key tile each, or the
  // forced count (clamped to 1 .. MAX_SPLITS); each split a whole number of BLOCK_N-key tiles.
  const int64_t keys = p.past + 1;
  int64_t wanted = p.kvSplits > 0 ? p.kvSplits : ceilDiv(keys, blockN);
  wanted = std::max<int64_t>(1, std::min(maxSplits, wanted));
  plan->keysPerSplit = ceilDiv(ceilDiv(keys, wanted), blockN) * blockN;
  plan->splits = ceilDiv(keys, plan->keysPerSplit);
  if (p.batch * p.numKvHeads * ceilDiv(p.numHeads / p.numKvHeads, plan->blockH) > kMaxGridYZ) {
    return unsupported("batch * num_kv_heads * head chunks over the grid's y limit");
  }
  return QWEN_STATUS_OK;
}

// present[:, :, :P] = past: B * kv rows of P * hd elements each for K and V (nothing without a past).
int copyPast(const QwenGatedAttentionParams& p, cudaStream_t stream) {
  const size_t pastRow = static_cast<size_t>(p.past * p.headDim) * kActElementBytes;
  const size_t presentRow = static_cast<size_t>((p.past + p.tokens) * p.headDim) * kActElementBytes;
  const size_t rows = static_cast<size_t>(p.batch * p.numKvHeads);
  const int status = launch::copyRows(p.presentKey, presentRow, p.pastKey, pastRow, pastRow, rows, stream);
  if (status) return status;
  return launch::copyRows(p.presentValue, presentRow, p.pastValue, pastRow, pastRow, rows, stream);
}

// Attention over present with the sigmoid gate fused, into ws.attn [B*T, nh * hd].
int attend(const QwenGatedAttentionParams& p, const Plan& plan, const Buffers<void*>& ws,
           cudaStream_t stream) {
  const int64_t b = p.batch, t = p.tokens, keys = p.past + p.tokens;
  const int64_t nh = p.numHeads, kv = p.numKvHeads, hd = p.headDim, group = nh / kv;
  const float scale = p.scale > 0.0F ? p.scale : 1.0F / std::sqrt(static_cast<float>(hd));
  // The gate: the second half of each head's q_proj row (the kernels step 2 * hd per head from there).
  const void* gate = static_cast<const char*>(ws.qProj) + hd * kActElementBytes;
  if (!plan.isDecode) {
    return launch::run(plan.prefill, {u(ceilDiv(t * group, plan.blockM)), u(b * kv)},
                       {Arg::ptr(ws.q), Arg::ptr(gate), Arg::ptr(p.presentKey), Arg::ptr(p.presentValue),
                        Arg::ptr(p.mask), Arg::ptr(ws.attn), Arg::i32(i32(t)), Arg::i32(i32(nh)),
                        Arg::i32(i32(kv)), Arg::i32(i32(group)), Arg::i32(i32(p.past)), Arg::i32(i32(keys)),
                        Arg::fp32(scale)},
                       stream);
  }
  const int status =
      launch::run(plan.decode, {u(plan.splits), u(b * kv * ceilDiv(group, plan.blockH))},
                  {Arg::ptr(ws.q), Arg::ptr(p.presentKey), Arg::ptr(p.presentValue), Arg::ptr(p.mask),
                   Arg::ptr(ws.acc), Arg::ptr(ws.m), Arg::ptr(ws.l), Arg::i32(i32(keys)), Arg::i32(i32(keys)),
                   Arg::i32(i32(nh)), Arg::i32(i32(kv)), Arg::i32(i32(group)),
                   Arg::i32(i32(plan.keysPerSplit)), Arg::fp32(scale)},
                  stream);
  if (status) return status;
  return launch::run(plan.combine, {u(b * nh)},
                     {Arg::ptr(ws.acc), Arg::ptr(ws.m), Arg::ptr(ws.l), Arg::ptr(gate), Arg::ptr(ws.attn),
                      Arg::i32(i32(plan.splits))},
                     stream);
}

int launchGatedAttention(const QwenGatedAttentionParams& p, cudaStream_t stream) {
  using launch::Matmul;
  const int64_t b = p.batch, t = p.tokens, past = p.past, keys = past + t, bt = b * t;
  const int64_t nh = p.numHeads, kv = p.numKvHeads, hd = p.headDim, h = p.hidden;
  if (b == 0) return QWEN_STATUS_OK;
  if (t == 0) return copyPast(p, stream);  // nothing new: present is the past
  Plan plan;
  int status = resolvePlan(p, &plan);
  if (status) return status;
  launch::Workspace workspace(p.workspace);
  const Buffers<void*> ws = carve(workspace, shapeOf(p));

  // q/k/v projections, in the activation type.
  const Matmul projections[] = {
      {p.x, p.qWeight, ws.qProj, bt, nh * 2 * hd, h, h, nh * 2 * hd, nh * 2 * hd},
      {p.x, p.kWeight, ws.k, bt, kv * hd, h, h, kv * hd, kv * hd},
      {p.x, p.vWeight, ws.v, bt, kv * hd, h, h, kv * hd, kv * hd},
  };
  for (const Matmul& m : projections) {
    if ((status = launch::matmul(m, p.dtype, false, stream))) return status;
  }
  if ((status = copyPast(p, stream))) return status;

  // q/k RMSNorm + partial RoPE; K and V appended to present at P .. P+T-1.
  status = launch::run(plan.normRope, {u(ceilDiv(bt, plan.blockT)), u(nh + kv)},
                       {Arg::ptr(ws.qProj), Arg::ptr(ws.k), Arg::ptr(ws.v), Arg::ptr(p.qNorm),
                        Arg::ptr(p.kNorm), Arg::ptr(p.cos), Arg::ptr(p.sin), Arg::ptr(ws.q),
                        Arg::ptr(p.presentKey), Arg::ptr(p.presentValue), Arg::i32(i32(bt)), Arg::i32(i32(t)),
                        Arg::i32(i32(nh)), Arg::i32(i32(kv)), Arg::i32(i32(past)), Arg::i32(i32(keys)),
                        Arg::i32(p.rotaryDim), Arg::fp32(p.epsilon)},
                       stream);
  if (status || (status = attend(p, plan, ws, stream))) return status;

  // o_proj, straight into Y.
  const Matmul oProj{ws.attn, p.oWeight, p.y, bt, h, nh * hd, nh * hd, h, h};
  return launch::matmul(oProj, p.dtype, false, stream);
}

}  // namespace
}  // namespace gated_attention
}  // namespace qwen

extern "C" int64_t qwenGatedAttentionParamsSize(void) { return sizeof(QwenGatedAttentionParams); }

extern "C" int64_t qwenGatedAttentionWorkspaceSize(QwenGatedAttentionParams const* params) {
  if (!params) return -1;
  qwen::launch::Workspace sizing;
  qwen::gated_attention::carve(sizing, qwen::gated_attention::shapeOf(*params));
  return static_cast<int64_t>(sizing.used());
}

extern "C" int qwenLaunchGatedAttention(QwenGatedAttentionParams const* params, cudaStream_t stream) {
  using namespace qwen::gated_attention;
  if (!params) return bad("null params");
  const QwenGatedAttentionParams p = *params;
  const int status = checkParams(p);
  return status ? status : launchGatedAttention(p, stream);
}
