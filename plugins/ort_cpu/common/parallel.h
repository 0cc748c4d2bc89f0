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

// Below this much work (multiply-adds, or elements touched) handing tasks to another thread costs more than it
// saves (a few microseconds a call): a decode step of the trained reference model ran slower on two threads
// than on one. The call then runs on the caller's thread.
constexpr int64_t kMinParallelWork = int64_t{1} << 18;

inline ParallelFor for_work(const ParallelFor& parallel_for, int64_t work) {
  return work < kMinParallelWork ? ParallelFor(serial_for) : parallel_for;
}

}  // namespace qwen_cpu
