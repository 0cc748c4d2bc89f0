// How the cores run independent tasks: a ParallelFor the caller provides (ORT's intra-op pool in the op
// wrappers, serial_for in tests), so the cores themselves know nothing of ORT.
#pragma once

#include <cstdint>
#include <functional>

namespace qwen_cpu {

// Runs fn(i) for i in [0, count), possibly on several threads; returns when all are done.
using ParallelFor = std::function<void(int64_t count, const std::function<void(int64_t)>& fn)>;

inline void serial_for(int64_t count, const std::function<void(int64_t)>& fn) {
  for (int64_t i = 0; i < count; ++i) fn(i);
}

}  // namespace qwen_cpu
