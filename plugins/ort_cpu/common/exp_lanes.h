// The vector exp of vector_math_avx512.cpp and vector_math_avx2.cpp, written once: x = n ln2 + r with
// ln2 in two parts (the high one exact in float, so n * kLn2High has no rounding error for |n| < 2^15),
// the degree-7 Taylor polynomial on |r| <= ln2/2 (relative error < 2e-8 before rounding), then p * 2^n.
// `Ops` is the instruction set's: vector type V, set, min, max, add, sub, mul, div, fmadd, fnmadd, round
// (to nearest) and scale_pow2 (p * 2^n, n whole), plus the clamp of x that its scale_pow2 needs. silu_lanes
// is g / (1 + exp(-g)) on top of it.
#pragma once

namespace qwen_cpu::detail {

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2High = 0.693359375f;
constexpr float kLn2Low = -2.12194440e-4f;  // ln2 - kLn2High

template <typename Ops>
inline typename Ops::V exp_lanes(typename Ops::V x) {
  x = Ops::max(Ops::min(x, Ops::set(Ops::kHighest)), Ops::set(Ops::kLowest));
  const typename Ops::V n = Ops::round(Ops::mul(x, Ops::set(kLog2e)));
  typename Ops::V r = Ops::fnmadd(n, Ops::set(kLn2High), x);
  r = Ops::fnmadd(n, Ops::set(kLn2Low), r);
  typename Ops::V p = Ops::set(1.f / 5040.f);
  p = Ops::fmadd(p, r, Ops::set(1.f / 720.f));
  p = Ops::fmadd(p, r, Ops::set(1.f / 120.f));
  p = Ops::fmadd(p, r, Ops::set(1.f / 24.f));
  p = Ops::fmadd(p, r, Ops::set(1.f / 6.f));
  p = Ops::fmadd(p, r, Ops::set(0.5f));
  p = Ops::fmadd(p, r, Ops::set(1.f));
  p = Ops::fmadd(p, r, Ops::set(1.f));
  return Ops::scale_pow2(p, n);
}

template <typename Ops>
inline typename Ops::V silu_lanes(typename Ops::V g) {
  return Ops::div(g, Ops::add(Ops::set(1.f), exp_lanes<Ops>(Ops::sub(Ops::set(0.f), g))));
}

}  // namespace qwen_cpu::detail
