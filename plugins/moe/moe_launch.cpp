// qwenLaunchMoE: the fused MoE through the Triton kernels (plugins/moe/*_triton.py), launched as
// kernels.moe_block launches them, one segment of at most kSegmentTokens tokens at a time (moe_workspace.h):
//
//   router logits: common matmul, x [S, H] @ routerWeight [H, E], fp32 out
//   moe.router_topk (fp32): softmax, top-k (ties to the lower index), renormalised when `normalize`
//   routed experts, the plugin's [E, K, N] weights (the "*_kn" specs):
//     decode (S * k <= kDecodeMaxPairs and not forceTiled): moe.gate_up_swiglu_decode_kn and
//       moe.down_decode_kn, one program per (N tile, pair)
//     grouped: moe.align_count / align_scan / align_scatter (pairs sorted by expert, padded to the grouped
//       GEMMs' BLOCK_M), moe.gate_up_swiglu_kn and moe.down_kn ("_m16" tiles for few rows per expert)
//   the shared expert through the same GEMM kernels as one dense expert ("*_shared", ROUTED=False)
//   moe.combine: sum of the top-k weighted expert outputs + sigmoid(x . sharedExpertGate) * shared
//
// Kernels, variants, grids and argument order mirror the Python launchers (grouped_gemm_triton's
// experts_swiglu, align_triton's moe_align, router_topk_triton's router_topk, combine_triton's moe_combine);
// tile sizes come from the resolved cubins. The path policy (kDecodeMaxPairs, kSmallBlockRows) mirrors
// grouped_gemm_triton's DECODE_MAX_PAIRS and SMALL_BLOCK_ROWS (tests/test_plugin_launch_moe.py checks both).
#include "moe/moe_launch.h"

#include <algorithm>
#include <climits>
#include <string>

#include "common/matmul_launch.h"
#include "common/triton_launch.h"
#include "moe/moe_core.h"
#include "moe/moe_workspace.h"

namespace qwen {
namespace moe {
namespace {

using launch::Kernel;
using triton::Arg;

constexpr int64_t kDecodeMaxPairs = 64;  // grouped_gemm_triton.DECODE_MAX_PAIRS
constexpr int64_t kSmallBlockRows = 24;  // grouped_gemm_triton.SMALL_BLOCK_ROWS

constexpr char kWho[] = "qwenLaunchMoE: ";

int bad(const std::string& why) { return launch::fail(QWEN_STATUS_BAD_PARAM, kWho + why); }
int unsupported(const std::string& why) { return launch::fail(QWEN_STATUS_UNSUPPORTED, kWho + why); }
int mismatch(const std::string& why) { return launch::fail(QWEN_STATUS_LAUNCH, kWho + why); }
unsigned u(int64_t v) { return static_cast<unsigned>(v); }

WorkspaceShape shapeOf(const QwenMoEParams& p) {
  return WorkspaceShape{p.tokens, p.hidden, p.experts, p.inter, p.sharedInter, p.topK};
}

// Every check that needs no cubin, before anything is resolved or launched.
int checkParams(const QwenMoEParams& p) {
  if (!launch::actVariant(p.dtype)) return unsupported("dtype must be fp16 or bf16");
  if (p.tokens < 0 || p.hidden <= 0 || p.experts <= 0 || p.inter <= 0 || p.sharedInter <= 0) {
    return bad("tokens must be >= 0 and hidden, experts, inter, sharedInter > 0");
  }
  if (p.experts > kMaxExperts) return bad("experts above " + std::to_string(kMaxExperts));
  if (p.topK < 1 || p.topK > p.experts || p.topK > kMaxTopK) {
    return bad("topK must be within 1..min(experts, " + std::to_string(kMaxTopK) + ")");
  }
  if (p.normalize != 0 && p.normalize != 1) return bad("normalize must be 0 or 1");
  if (p.hidden % kWidthMultiple || p.inter % kWidthMultiple || p.sharedInter % kWidthMultiple) {
    return bad("hidden, inter and sharedInter must be multiples of " + std::to_string(kWidthMultiple));
  }
  if (p.hidden > INT32_MAX / 2 / p.inter || p.hidden > INT32_MAX / p.sharedInter) {
    return bad("an expert's matrix (hidden x 2 * inter, hidden x sharedInter) must fit int32 offsets");
  }
  if (p.tokens == 0) return QWEN_STATUS_OK;
  const void* pointers[] = {p.x, p.routerWeight, p.gateUp, p.down, p.sharedGate, p.sharedUp,
                            p.sharedDown, p.sharedExpertGate, p.y, p.workspace};
  for (const void* ptr : pointers) {
    if (!ptr) return bad("null tensor or workspace pointer");
    if (!launch::aligned16({ptr}, {})) return bad("tensors and the workspace must be 16-byte aligned");
  }
  return QWEN_STATUS_OK;
}

// A grid dimension from a program count, or a failure naming it.
int programs(int64_t count, const char* what, unsigned* out) {
  if (count < 0 || count > INT32_MAX) return bad(std::string("too many ") + what + " programs for a launch");
  *out = u(count);
  return QWEN_STATUS_OK;
}

// Resolve kernel/variant and read its constexpr `name` (0 on success).
int resolveWith(const std::string& kernel, const std::string& variant, Kernel* out, const char* name,
                int64_t* value) {
  int status = launch::resolve(kernel.c_str(), variant.c_str(), out);
  if (!status && name) status = launch::constant(*out, name, value);
  return status;
}

// The kernels (and their tile constexprs) one segment of `seg` tokens launches.
struct Plan {
  int64_t seg = 0, pairs = 0;
  bool decode = false;
  Kernel topk, combine, gateUp, down, sharedGateUp, sharedDown, alignCount, alignScan, alignScatter;
  int64_t topkBlockT = 0, combineBlockT = 0, combineBlockH = 0;
  int64_t gateUpBlockN = 0, downBlockN = 0, sharedGateUpBlockN = 0, sharedDownBlockN = 0;
  int64_t blockM = 0, sharedGateUpBlockM = 0, sharedDownBlockM = 0;  // grouped path
  int64_t countChunk = 0, scatterChunk = 0, scatterBlockB = 0;       // grouped path
};

int makePlan(const QwenMoEParams& p, int64_t seg, Plan* plan) {
  const std::string act = launch::actVariant(p.dtype);
  plan->seg = seg;
  plan->pairs = seg * p.topK;
  plan->decode = !p.forceTiled && plan->pairs <= kDecodeMaxPairs;
  int64_t maxTopK = 0, downBlockM = 0, searchSteps = 0;
  int status = resolveWith("moe.router_topk", "fp32", &plan->topk, "BLOCK_T", &plan->topkBlockT);
  if (!status) status = launch::constant(plan->topk, "MAX_TOP_K", &maxTopK);
  if (!status) status = resolveWith("moe.combine", act, &plan->combine, "BLOCK_T", &plan->combineBlockT);
  if (!status) status = launch::constant(plan->combine, "BLOCK_H", &plan->combineBlockH);
  if (status) return status;
  if (p.topK > maxTopK) {
    return unsupported("topK above moe.router_topk's MAX_TOP_K " + std::to_string(maxTopK));
  }
  if (plan->decode) {
    status = resolveWith("moe.gate_up_swiglu_decode_kn", act, &plan->gateUp, "BLOCK_N", &plan->gateUpBlockN);
    if (!status) status = resolveWith("moe.down_decode_kn", act, &plan->down, "BLOCK_N", &plan->downBlockN);
    if (!status) {
      status = resolveWith("moe.gate_up_swiglu_decode_kn", act + "_shared", &plan->sharedGateUp, "BLOCK_N",
                           &plan->sharedGateUpBlockN);
    }
    if (!status) {
      status = resolveWith("moe.down_decode_kn", act + "_shared", &plan->sharedDown, "BLOCK_N",
                           &plan->sharedDownBlockN);
    }
    return status;
  }
  // Few rows per active expert (a short prompt spread over many experts): the BLOCK_M 16 tiles.
  const bool small = plan->pairs < kSmallBlockRows * std::min(p.experts, plan->pairs);
  const std::string routed = act + (small ? "_m16" : "");
  status = resolveWith("moe.gate_up_swiglu_kn", routed, &plan->gateUp, "BLOCK_M", &plan->blockM);
  if (!status) status = launch::constant(plan->gateUp, "BLOCK_N", &plan->gateUpBlockN);
  if (!status) status = resolveWith("moe.down_kn", routed, &plan->down, "BLOCK_M", &downBlockM);
  if (!status) status = launch::constant(plan->down, "BLOCK_N", &plan->downBlockN);
  if (!status) {
    status = resolveWith("moe.gate_up_swiglu_kn", act + "_shared", &plan->sharedGateUp, "BLOCK_M",
                         &plan->sharedGateUpBlockM);
  }
  if (!status) status = launch::constant(plan->sharedGateUp, "BLOCK_N", &plan->sharedGateUpBlockN);
  if (!status) {
    status = resolveWith("moe.down_kn", act + "_shared", &plan->sharedDown, "BLOCK_M",
                         &plan->sharedDownBlockM);
  }
  if (!status) status = launch::constant(plan->sharedDown, "BLOCK_N", &plan->sharedDownBlockN);
  if (!status) status = resolveWith("moe.align_count", "i32", &plan->alignCount, "CHUNK", &plan->countChunk);
  if (!status) status = resolveWith("moe.align_scan", "i32", &plan->alignScan, nullptr, nullptr);
  if (!status) {
    status = resolveWith("moe.align_scatter", "i32", &plan->alignScatter, "CHUNK", &plan->scatterChunk);
  }
  if (!status) status = launch::constant(plan->alignScatter, "BLOCK_B", &plan->scatterBlockB);
  if (!status) status = launch::constant(plan->alignScatter, "SEARCH_STEPS", &searchSteps);
  if (status) return status;
  // What the workspace was sized for (moe_workspace.h) and what align's block map can search.
  if (plan->blockM != downBlockM || plan->blockM < 1 || plan->blockM > kAlignMaxBlockM) {
    return mismatch("moe.gate_up_swiglu_kn and moe.down_kn (" + routed + ") must share one BLOCK_M <= " +
                    std::to_string(kAlignMaxBlockM));
  }
  if (plan->countChunk < kAlignMinChunk) {
    return mismatch("moe.align_count's CHUNK is below " + std::to_string(kAlignMinChunk));
  }
  if (searchSteps < 1 || searchSteps > 30 || p.experts >= (int64_t{1} << searchSteps)) {
    return unsupported("experts beyond moe.align_scatter's block map search");
  }
  return QWEN_STATUS_OK;
}

int launchSegment(const QwenMoEParams& p, const Plan& plan, const Buffers<void*>& b, int64_t tok0,
                  cudaStream_t stream) {
  using launch::ceilDiv;
  const int64_t H = p.hidden, E = p.experts, I = p.inter, Is = p.sharedInter, S = plan.seg;
  const int32_t k = p.topK, pairs = static_cast<int32_t>(plan.pairs);
  const auto i32 = [](int64_t v) { return Arg::i32(static_cast<int32_t>(v)); };
  const char* x = static_cast<const char*>(p.x) + tok0 * H * static_cast<int64_t>(kActElementBytes);
  char* out = static_cast<char*>(p.y) + tok0 * H * static_cast<int64_t>(kActElementBytes);
  const char* up = static_cast<const char*>(p.gateUp) + I * static_cast<int64_t>(kActElementBytes);

  // Router logits [S, E] fp32, then the top-k weights and experts of each token.
  int status = launch::matmul(launch::Matmul{x, p.routerWeight, b.logits, S, E, H, H, E, E}, p.dtype, true,
                              stream);
  unsigned grid = 0;
  if (!status) status = programs(ceilDiv(S, plan.topkBlockT), "router_topk", &grid);
  if (!status) {
    status = launch::run(plan.topk, {grid},
                         {Arg::ptr(b.logits), Arg::ptr(b.weights), Arg::ptr(b.ids), i32(S), i32(E), i32(k),
                          i32(p.normalize)},
                         stream);
  }
  if (status) return status;

  if (plan.decode) {
    // One program per (N tile, pair); the shared expert: per (N tile, token), its `ids` never read.
    status = launch::run(plan.gateUp, {u(ceilDiv(I, plan.gateUpBlockN)), u(pairs)},
                         {Arg::ptr(x), Arg::ptr(p.gateUp), Arg::ptr(up), Arg::ptr(b.h), Arg::ptr(b.ids),
                          i32(k), i32(I), i32(H), i32(H), i32(H * 2 * I), i32(2 * I)},
                         stream);
    if (!status) {
      status = launch::run(plan.down, {u(ceilDiv(H, plan.downBlockN)), u(pairs)},
                           {Arg::ptr(b.h), Arg::ptr(p.down), Arg::ptr(b.y), Arg::ptr(b.ids), i32(H), i32(I),
                            i32(I * H), i32(H)},
                           stream);
    }
    if (!status) {
      status = launch::run(plan.sharedGateUp, {u(ceilDiv(Is, plan.sharedGateUpBlockN)), u(S)},
                           {Arg::ptr(x), Arg::ptr(p.sharedGate), Arg::ptr(p.sharedUp), Arg::ptr(b.sharedH),
                            Arg::ptr(b.ids), i32(1), i32(Is), i32(H), i32(H), i32(0), i32(Is)},
                           stream);
    }
    if (!status) {
      status = launch::run(plan.sharedDown, {u(ceilDiv(H, plan.sharedDownBlockN)), u(S)},
                           {Arg::ptr(b.sharedH), Arg::ptr(p.sharedDown), Arg::ptr(b.sharedY), Arg::ptr(b.ids),
                            i32(H), i32(Is), i32(0), i32(H)},
                           stream);
    }
  } else {
    // Pairs grouped by expert, each group padded to BLOCK_M: sortedRows() rows, one expert per block.
    const int64_t nSorted = sortedRows(plan.pairs, E, plan.blockM), nBlocks = nSorted / plan.blockM;
    const int64_t nChunks = ceilDiv(plan.pairs, plan.countChunk);
    if (nSorted > sortedRowsCapacity(plan.pairs, E) || nBlocks > blocksCapacity(plan.pairs, E)) {
      return mismatch("align outgrew its workspace");
    }
    unsigned count = 0, scatter = 0, gateUp = 0, down = 0, sharedGateUp = 0, sharedDown = 0;
    status = programs(ceilDiv(nSorted, plan.countChunk), "align_count", &count);
    if (!status) {
      const int64_t scatterPrograms =
          std::max(ceilDiv(plan.pairs, plan.scatterChunk), ceilDiv(nBlocks, plan.scatterBlockB));
      status = programs(scatterPrograms, "align_scatter", &scatter);
    }
    if (!status) status = programs(nBlocks * ceilDiv(I, plan.gateUpBlockN), "gate_up_swiglu", &gateUp);
    if (!status) status = programs(nBlocks * ceilDiv(H, plan.downBlockN), "down", &down);
    if (!status) {
      status = programs(ceilDiv(S, plan.sharedGateUpBlockM) * ceilDiv(Is, plan.sharedGateUpBlockN),
                        "shared gate_up_swiglu", &sharedGateUp);
    }
    if (!status) {
      status = programs(ceilDiv(S, plan.sharedDownBlockM) * ceilDiv(H, plan.sharedDownBlockN), "shared down",
                        &sharedDown);
    }
    if (status) return status;
    status = launch::run(plan.alignCount, {count},
                         {Arg::ptr(b.ids), Arg::ptr(b.counts), Arg::ptr(b.sortedIds), i32(pairs), i32(E),
                          i32(nSorted)},
                         stream);
    if (!status) {
      status = launch::run(plan.alignScan, {1},
                           {Arg::ptr(b.counts), Arg::ptr(b.offsets), Arg::ptr(b.cursor), i32(nChunks), i32(E),
                            i32(plan.blockM)},
                           stream);
    }
    if (!status) {
      status = launch::run(plan.alignScatter, {scatter},
                           {Arg::ptr(b.ids), Arg::ptr(b.cursor), Arg::ptr(b.offsets), Arg::ptr(b.sortedIds),
                            Arg::ptr(b.expertIds), i32(pairs), i32(E), i32(plan.blockM), i32(nBlocks)},
                           stream);
    }
    if (!status) {
      status = launch::run(plan.gateUp, {gateUp},
                           {Arg::ptr(x), Arg::ptr(p.gateUp), Arg::ptr(up), Arg::ptr(b.h),
                            Arg::ptr(b.sortedIds), Arg::ptr(b.expertIds), i32(pairs), i32(k), i32(I), i32(H),
                            i32(H), i32(H * 2 * I), i32(2 * I)},
                           stream);
    }
    if (!status) {
      status = launch::run(plan.down, {down},
                           {Arg::ptr(b.h), Arg::ptr(p.down), Arg::ptr(b.y), Arg::ptr(b.sortedIds),
                            Arg::ptr(b.expertIds), i32(pairs), i32(H), i32(I), i32(I * H), i32(H)},
                           stream);
    }
    // The shared expert: rows are tokens, expert 0; the sorted/expert ids are never read.
    if (!status) {
      status = launch::run(plan.sharedGateUp, {sharedGateUp},
                           {Arg::ptr(x), Arg::ptr(p.sharedGate), Arg::ptr(p.sharedUp), Arg::ptr(b.sharedH),
                            Arg::ptr(b.ids), Arg::ptr(b.ids), i32(S), i32(1), i32(Is), i32(H), i32(H), i32(0),
                            i32(Is)},
                           stream);
    }
    if (!status) {
      status = launch::run(plan.sharedDown, {sharedDown},
                           {Arg::ptr(b.sharedH), Arg::ptr(p.sharedDown), Arg::ptr(b.sharedY), Arg::ptr(b.ids),
                            Arg::ptr(b.ids), i32(S), i32(H), i32(Is), i32(0), i32(H)},
                           stream);
    }
  }
  if (status) return status;

  // A few tokens (decode): one BLOCK_H span per program, so a token spreads over H / BLOCK_H programs;
  // a prefill: all of H per program (the gate dot once per token).
  const bool fewTokens = S <= plan.combineBlockT;
  const int64_t hSpan = fewTokens ? plan.combineBlockH : ceilDiv(H, plan.combineBlockH) * plan.combineBlockH;
  return launch::run(plan.combine, {u(ceilDiv(S, plan.combineBlockT)), u(ceilDiv(H, hSpan))},
                     {Arg::ptr(x), Arg::ptr(b.y), Arg::ptr(b.weights), Arg::ptr(b.sharedY),
                      Arg::ptr(p.sharedExpertGate), Arg::ptr(out), i32(S), i32(H), i32(hSpan), i32(k), i32(H),
                      i32(H)},
                     stream);
}

}  // namespace
}  // namespace moe
}  // namespace qwen

extern "C" int64_t qwenMoEParamsSize(void) { return sizeof(QwenMoEParams); }

extern "C" int64_t qwenMoEWorkspaceSize(QwenMoEParams const* params) {
  if (!params) return -1;
  qwen::launch::Workspace counter;
  qwen::moe::carve(counter, qwen::moe::shapeOf(*params));
  return static_cast<int64_t>(counter.used());
}

extern "C" int qwenLaunchMoE(QwenMoEParams const* params, cudaStream_t stream) {
  using namespace qwen::moe;
  if (!params) return bad("null params");
  const QwenMoEParams p = *params;
  int status = checkParams(p);
  if (status || p.tokens == 0) return status;
  // Every kernel a segment launches is resolved before the first launch: the full segments' plan and,
  // when the last segment is shorter, its own (its path or tiles may differ).
  const int64_t full = segmentTokens(p.tokens), tail = p.tokens % full;
  Plan fullPlan, tailPlan;
  status = makePlan(p, full, &fullPlan);
  if (!status && tail) status = makePlan(p, tail, &tailPlan);
  if (status) return status;
  qwen::launch::Workspace workspace(p.workspace);
  const Buffers<void*> buffers = carve(workspace, shapeOf(p));
  for (int64_t tok0 = 0; tok0 < p.tokens && !status; tok0 += full) {
    status = launchSegment(p, p.tokens - tok0 >= full ? fullPlan : tailPlan, buffers, tok0, stream);
  }
  return status;
}
