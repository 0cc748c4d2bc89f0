// Per-thread scratch buffers that only grow: a kernel's temporaries (int8 rows, expert products) are
// reused from call to call instead of being allocated, zeroed and page-faulted in again each time. The
// callers bound their size (they work in passes of a few thousand rows).
#pragma once

#include <cstddef>
#include <vector>

namespace qwen_cpu {

// v's storage, at least n elements (contents unspecified).
template <class T>
T* grow(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

}  // namespace qwen_cpu
