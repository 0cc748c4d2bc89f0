// Calls of fewer than kStepTokens tokens compute each token as a one-token call at its position would, bit
// for bit: the attention decode loops, the delta rule's recurrence. A speculative verify step, or the re-run
// of its accepted tokens, then leaves the logits and states of plain one-token decoding, so greedy
// speculative decoding gives exactly its tokens (runtime/speculative.py keeps its steps under this width:
// STEP_TOKENS there, equal by tests/test_mtp.py). Longer calls (prefill) take the blocked forms, equal up to
// fp32 rounding.
#pragma once

#include <cstdint>

namespace qwen_cpu {

constexpr int64_t kStepTokens = 16;

}  // namespace qwen_cpu
