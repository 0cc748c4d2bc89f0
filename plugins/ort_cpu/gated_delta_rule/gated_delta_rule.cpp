#include "gated_delta_rule/gated_delta_rule.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/vector_math.h"

namespace qwen_cpu {

namespace {

// x86: one copy per instruction set, picked at load time; elsewhere the plain build
#if defined(__x86_64__) && !defined(QWEN_CPU_PORTABLE_ONLY)
#define QWEN_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define QWEN_CPU_CLONES
#endif

inline float sigmoid(float x) { return 1.f / (1.f + std::exp(-x)); }
inline float softplus(float x) { return x > 20.f ? x : std::log1p(std::exp(x)); }  // torch's threshold

// x / sqrt(sum x^2 + 1e-6) * scale
void l2norm(const float* x, int64_t n, float scale, float* out) {
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += x[i] * x[i];
  const float factor = scale / std::sqrt(sum + 1e-6f);
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * factor;
}

// One value head for one token: the state update and read-out in two passes over S [dk, dv], the first
// reading `from` (the past state, or S itself after the first token) and writing S. Cloned for AVX-512 and AVX2
// so the dv-wide rows vectorise where the CPU has it.
QWEN_CPU_CLONES void delta_step(const float* from, float* state,
                                                                     const float* q, const float* k,
                                                                     const float* v, float decay, float beta,
                                                                     int64_t dk, int64_t dv, float* kv, float* o) {
  std::fill(kv, kv + dv, 0.f);
  for (int64_t i = 0; i < dk; ++i) {  // S = decay * S; kv = S^T k
    const float* in = from + i * dv;
    float* row = state + i * dv;
    const float ki = k[i];
    for (int64_t j = 0; j < dv; ++j) {
      row[j] = in[j] * decay;
      kv[j] += row[j] * ki;
    }
  }
  for (int64_t j = 0; j < dv; ++j) kv[j] = (v[j] - kv[j]) * beta;  // delta
  std::fill(o, o + dv, 0.f);
  for (int64_t i = 0; i < dk; ++i) {  // S += k delta^T; o = S^T q
    float* row = state + i * dv;
    const float ki = k[i], qi = q[i];
    for (int64_t j = 0; j < dv; ++j) {
      row[j] += ki * kv[j];
      o[j] += row[j] * qi;
    }
  }
}

// out[c] = sum_j w[c, j] * window(c, t + j) for channels [0, n) of a block, where window position i is
// state[c, i] for i < keep and token i - keep of x (row stride `stride`) after. Loops run over channels
// (strided loads) so they vectorise.
QWEN_CPU_CLONES void conv_token(const float* w, int64_t kernel,
                                                                     const float* state, int64_t keep,
                                                                     const float* x, int64_t stride, int64_t t,
                                                                     int64_t n, float* out) {
  std::fill(out, out + n, 0.f);
  for (int64_t j = 0; j < kernel; ++j) {
    const int64_t i = t + j;
    if (i < keep) {
      for (int64_t c = 0; c < n; ++c) out[c] += w[c * kernel + j] * state[c * keep + i];
    } else {
      const float* xi = x + (i - keep) * stride;
      for (int64_t c = 0; c < n; ++c) out[c] += w[c * kernel + j] * xi[c];
    }
  }
}

}  // namespace

const char* delta_rule_shape_error(const DeltaRuleShape& s) {
  if (s.nk <= 0 || s.nv <= 0 || s.nv % s.nk) return "value heads must be a multiple of key heads";
  if (s.dk <= 0 || s.dv <= 0 || s.kernel < 1) return "head sizes and the conv kernel must be positive";
  return "";
}

void gated_delta_rule(const float* proj, const float* conv_w, const float* past_conv, const float* past_state,
                      const float* dt_bias, const float* neg_exp_a, const float* norm_w, const DeltaRuleShape& s,
                      float* out, float* present_conv, float* present_state, const ParallelFor& parallel_for) {
  const int64_t B = s.batch, T = s.tokens, C = s.channels(), K = s.kernel, W = s.proj_width();
  const int64_t keep = K - 1;
  if (T == 0) {  // no tokens: the states pass through
    std::copy_n(past_conv, B * C * keep, present_conv);
    std::copy_n(past_state, B * s.nv * s.dk * s.dv, present_state);
    return;
  }

  // 1. causal conv + SiLU, per sequence and block of channels. Position i of the window is the state's
  // input i for i < K-1, else this call's token i - (K-1).
  std::vector<float> conv(B * T * C);
  constexpr int64_t kChannelsPerTask = 512;
  const int64_t chunks = (C + kChannelsPerTask - 1) / kChannelsPerTask;
  parallel_for(B * chunks, [&](int64_t task) {
    const int64_t b = task / chunks, c0 = (task % chunks) * kChannelsPerTask;
    const int64_t c1 = std::min(C, c0 + kChannelsPerTask);
    const float* state = past_conv + (b * C + c0) * keep;
    const float* x = proj + b * T * W + c0;
    for (int64_t t = 0; t < T; ++t) {
      float* out = conv.data() + (b * T + t) * C + c0;
      conv_token(conv_w + c0 * K, K, state, keep, x, W, t, c1 - c0, out);
      silu_inplace(out, c1 - c0);
    }
    float* next = present_conv + (b * C + c0) * keep;
    for (int64_t c = 0; c < c1 - c0; ++c)
      for (int64_t i = 0; i < keep; ++i) {
        const int64_t at = T + i;  // window position
        next[c * keep + i] = at < keep ? state[c * keep + at] : x[(at - keep) * W + c];
      }
  });

  // 2. the delta rule and the gated norm, per sequence and value head, tokens in order
  const int64_t group = s.nv / s.nk;
  const float q_scale = 1.f / std::sqrt(static_cast<float>(s.dk));
  parallel_for(B * s.nv, [&](int64_t task) {
    const int64_t b = task / s.nv, h = task % s.nv, hk = h / group;
    float* state = present_state + (b * s.nv + h) * s.dk * s.dv;
    const float* from = past_state + (b * s.nv + h) * s.dk * s.dv;
    std::vector<float> q(s.dk), k(s.dk), kv(s.dv), o(s.dv);
    for (int64_t t = 0; t < T; ++t) {
      const float* c = conv.data() + (b * T + t) * C;
      const float* p = proj + (b * T + t) * W;
      l2norm(c + hk * s.dk, s.dk, q_scale, q.data());
      l2norm(c + s.nk * s.dk + hk * s.dk, s.dk, 1.f, k.data());
      const float* v = c + 2 * s.nk * s.dk + h * s.dv;
      const float beta = sigmoid(p[C + s.nv * s.dv + h]);
      const float decay = std::exp(neg_exp_a[h] * softplus(p[C + s.nv * s.dv + s.nv + h] + dt_bias[h]));
      delta_step(t == 0 ? from : state, state, q.data(), k.data(), v, decay, beta, s.dk, s.dv, kv.data(), o.data());
      float power = 0.f;
      for (int64_t j = 0; j < s.dv; ++j) power += o[j] * o[j];
      const float inv_rms = 1.f / std::sqrt(power / static_cast<float>(s.dv) + s.epsilon);
      float* y = out + (b * T + t) * s.nv * s.dv + h * s.dv;
      for (int64_t j = 0; j < s.dv; ++j) y[j] = o[j] * inv_rms * norm_w[j];
      mul_silu(y, p + C + h * s.dv, y, s.dv);  // * silu(z)
    }
  });
}

}  // namespace qwen_cpu
