// Software prefetch for loops that stream weights or a cache from memory faster than the hardware
// prefetcher alone feeds them (the AVX2 int4 row tile, the AVX2 attention decode loops).
#pragma once

#include <cstdint>

namespace qwen_cpu {

// Asks for the cache lines of [x + ahead, x + ahead + bytes), into L1 (prefetches do not fault past a
// buffer's end).
inline void prefetch_ahead(const void* x, int64_t bytes, int64_t ahead) {
  const char* from = static_cast<const char*>(x) + ahead;
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(from + o, 0, 3);
}

}  // namespace qwen_cpu
