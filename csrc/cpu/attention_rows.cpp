// Row passes of the CPU attention kernels (see attention_rows.h). Written as
// plain loops that GCC vectorizes; `omp simd` allows the reductions to be
// reordered. exp is a Cephes-style polynomial (about 2 ulp) because std::exp
// does not vectorize without -ffast-math; double keeps std::exp (fp64 is for
// gradcheck, not speed).
#include "attention_rows.h"

#include <cmath>
#include <cstring>
#include <limits>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define ATTNKIT_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ATTNKIT_SIMD_CLONES
#endif

namespace attnkit {
namespace cpu {
namespace attn_rows {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// exp(x) for x <= 88; 0 below -87.3 (so exp(-inf) is exactly 0).
inline float exp_poly(float x) {
  const float clamped = std::fmax(std::fmin(x, 88.0f), -87.0f);
  const float n = std::floor(clamped * 1.44269504088896341f + 0.5f);
  float r = clamped - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : y * scale;
}

}  // namespace

ATTNKIT_SIMD_CLONES float row_max(const float* x, int64_t n) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

double row_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

ATTNKIT_SIMD_CLONES float exp_shift_sum(float* x, int64_t n, float shift) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float e = exp_poly(x[j] - shift);
    x[j] = e;
    sum += e;
  }
  return sum;
}

double exp_shift_sum(double* x, int64_t n, double shift) {
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    x[j] = std::exp(x[j] - shift);
    sum += x[j];
  }
  return sum;
}

ATTNKIT_SIMD_CLONES void softcap(float* s, float* t, int64_t n, float cap) {
  const float two_over_cap = 2.0f / cap;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    // tanh(y) = 1 - 2 / (exp(2y) + 1): exact limits +-1, absolute error ~1e-7.
    const float th = 1.0f - 2.0f / (exp_poly(s[j] * two_over_cap) + 1.0f);
    t[j] = th;
    s[j] = cap * th;
  }
}

void softcap(double* s, double* t, int64_t n, double cap) {
  for (int64_t j = 0; j < n; ++j) {
    t[j] = std::tanh(s[j] / cap);
    s[j] = cap * t[j];
  }
}

template <typename T>
inline void softmax_grad_impl(T* ds, const T* p, const T* dp, const T* t, int64_t n, T delta) {
  if (t == nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) ds[j] = p[j] * (dp[j] - delta);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) ds[j] = p[j] * (dp[j] - delta) * (T(1) - t[j] * t[j]);
  }
}

ATTNKIT_SIMD_CLONES void softmax_grad(float* ds, const float* p, const float* dp, const float* t, int64_t n,
                                      float delta) {
  softmax_grad_impl(ds, p, dp, t, n, delta);
}

void softmax_grad(double* ds, const double* p, const double* dp, const double* t, int64_t n, double delta) {
  softmax_grad_impl(ds, p, dp, t, n, delta);
}

ATTNKIT_SIMD_CLONES void dropout_keep(uint8_t* keep, uint64_t seed, int64_t i, int64_t n0, int64_t n, int64_t max_k,
                                      uint32_t threshold) {
  const uint32_t base = static_cast<uint32_t>(static_cast<uint64_t>(i * max_k + n0));
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) keep[j] = (philox(seed, base + static_cast<uint32_t>(j)) >> 8) >= threshold;
}

}  // namespace attn_rows
}  // namespace cpu
}  // namespace attnkit
