// Row passes of the CPU attention kernels (see attention_rows.h). The float
// passes use GCC vector types (exp as a Cephes-style polynomial: std::exp does
// not vectorize; tanh from simd.h); double keeps plain loops and std::exp
// (fp64 is for gradcheck, not speed).
#include "attention_rows.h"

#include "simd.h"

#include <cmath>
#include <cstring>
#include <limits>

namespace attnkit {
namespace cpu {
namespace attn_rows {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

using namespace simd;  // vf (16 floats: one zmm, two ymm or four xmm per clone), W, load/store, fast_tanh
typedef int32_t vi __attribute__((vector_size(64)));

// p 2^n for integral n, by adding n to p's exponent bits: for products that stay normal floats.
ATTNKIT_INLINE vf times_pow2(vf p, vf n) {
  vi bits;
  std::memcpy(&bits, &p, sizeof(bits));
  bits += __builtin_convertvector(n, vi) << 23;
  vf e;
  std::memcpy(&e, &bits, sizeof(e));
  return e;
}

// exp(x) to about 1 ulp for x <= 88 (exp(88) above); exactly 0 below -87 (so exp(-inf) = 0).
// 2^n e^r with n = round(x / ln 2) and r = x - n ln 2 in two parts (Cody-Waite), |r| <= ln 2 / 2,
// e^r by a degree-6 minimax polynomial (relative error 2e-8) and 2^n added to its exponent bits:
// 19 operations a vector against the 26 of the Cephes form before (floor by conversion, a
// degree-7 polynomial, a multiply by 2^n), 1.27x the throughput in a row pass on this Xeon.
// x >= -87 keeps n >= -126 with e^r >= 1 there, so the sum of the bits stays a normal float.
ATTNKIT_INLINE vf vexp(vf x) {
  constexpr float kLog2e = 1.44269504088896341f, kRound = 12582912.0f;  // 1.5 * 2^23: adds round to nearest
  vf c = x < splat(88.0f) ? x : splat(88.0f);
  c = c > splat(-87.0f) ? c : splat(-87.0f);
  const vf n = (c * kLog2e + kRound) - kRound;
  const vf r = (c - n * 0.693359375f) + n * 2.12194440e-4f;  // ln 2 = 0.693359375 - 2.12194440e-4 + ...
  vf p = splat(1.3836834114e-3f);
  p = p * r + 8.3748130128e-3f;
  p = p * r + 4.1668225080e-2f;
  p = p * r + 1.6666419804e-1f;
  p = p * r + 4.9999991059e-1f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  vf e = times_pow2(p, n);
  e = x < splat(-87.0f) ? splat(0.0f) : e;
  return x != x ? x : e;  // NaN stays NaN (the clamps above would turn it into exp(88))
}

}  // namespace

ATTNKIT_SIMD_CLONES float row_max(const float* x, int64_t n) {
  vf m = splat(kNegInf);
  vi nan = vi{};
  int64_t j = 0;
  // A NaN score makes the row NaN, as in the reference. Tracked apart from the
  // max: GCC lowers a select on an OR of two vector compares to per-lane scalar code.
  for (; j + W <= n; j += W) {
    const vf v = load(x + j);
    m = v > m ? v : m;
    nan |= v != v;
  }
  if (j < n) {
    const vf v = load_tail(x + j, n - j, kNegInf);
    m = v > m ? v : m;
    nan |= v != v;
  }
  float best = kNegInf;
  int32_t any_nan = 0;
  for (int64_t l = 0; l < W; ++l) {
    best = m[l] > best ? m[l] : best;
    any_nan |= nan[l];
  }
  return any_nan ? std::numeric_limits<float>::quiet_NaN() : best;
}

double row_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t j = 0; j < n; ++j) m = x[j] > m || std::isnan(x[j]) ? x[j] : m;
  return m;
}

ATTNKIT_SIMD_CLONES float exp_shift_sum(float* x, int64_t n, float shift) {
  vf sum = splat(0.0f);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const vf e = vexp(load(x + j) - shift);
    store(x + j, e);
    sum += e;
  }
  if (j < n) {
    const vf e = vexp(load_tail(x + j, n - j, kNegInf) - shift);  // padding gives 0
    store_tail(x + j, e, n - j);
    sum += e;
  }
  return hsum(sum);
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
  const float inv = 1.0f / cap;
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const vf th = simd::fast_tanh(load(s + j) * inv);
    if (t != nullptr) store(t + j, th);
    store(s + j, th * cap);
  }
  if (j < n) {
    const vf th = simd::fast_tanh(load_tail(s + j, n - j, 0.0f) * inv);
    if (t != nullptr) store_tail(t + j, th, n - j);
    store_tail(s + j, th * cap, n - j);
  }
}

void softcap(double* s, double* t, int64_t n, double cap) {
  for (int64_t j = 0; j < n; ++j) {
    const double th = std::tanh(s[j] / cap);
    if (t != nullptr) t[j] = th;
    s[j] = cap * th;
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

// bfloat16 bits of 16 floats: to nearest, ties to even; NaN a quiet NaN (c10::BFloat16's rounding).
typedef uint32_t vu32 __attribute__((vector_size(64)));
typedef uint16_t vu16 __attribute__((vector_size(32)));
ATTNKIT_INLINE vu16 bf16_bits(vf v) {
  vu32 bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const vu32 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return __builtin_convertvector(v != v ? vu32{} + 0x7FC0u : rounded, vu16);
}

// exp(x * factor - shift) for P that is rounded to bfloat16 next: 2^y, y = (x * factor - shift)
// log2(e), as 2^round(y) times 2^f's Taylor polynomial of degree 5 (|f| <= 1/2: relative error under
// 3e-6, against bfloat16's 4e-3 rounding of P; lse moves by as much). About 17 operations a vector
// against vexp's 19: this pass took 35% of a bf16 forward. 0 below 2^-126, NaN stays NaN; y <= ~0
// here (shift is the row's max), so 2^round(y) needs no clamp from above. The shift comes off
// before the log2(e): scaled first, scores near float's limit (an additive mask of
// finfo(bfloat16).min) overflowed to -inf - -inf. x * factor - shift contracts to one FMA, whose
// exact product differs from the rounded max by ~ulp(max): callers pass factor 1 past |max| = 2^16.
ATTNKIT_INLINE vf vexp_scaled(vf x, float factor, float shift) {
  constexpr float kLog2e = 1.44269504088896341f, kRound = 12582912.0f;  // 1.5 * 2^23: adds round to nearest
  const vf y = (x * factor - shift) * kLog2e;
  const vf yc = y > splat(-127.0f) ? y : splat(-127.0f);  // keeps n's exponent bits in range (-inf too)
  const vf n = (yc + kRound) - kRound;
  const vf f = yc - n;
  vf p = splat(1.3333558146e-3f);
  p = p * f + 9.6181291076e-3f;
  p = p * f + 5.5504108665e-2f;
  p = p * f + 2.4022650696e-1f;
  p = p * f + 6.9314718056e-1f;
  p = p * f + 1.0f;
  vf e = times_pow2(p, n);
  e = y < splat(-126.0f) ? splat(0.0f) : e;
  return y != y ? y : e;
}

ATTNKIT_SIMD_CLONES float exp_sum_to_bf16(const float* x, int64_t n, float factor, float shift, uint16_t* out) {
  vf sum = splat(0.0f);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const vf e = vexp_scaled(load(x + j), factor, shift);
    const vu16 low = bf16_bits(e);
    std::memcpy(out + j, &low, sizeof(low));
    sum += e;
  }
  if (j < n) {
    const vf e = vexp_scaled(load_tail(x + j, n - j, kNegInf), factor, shift);  // padding gives 0
    const vu16 low = bf16_bits(e);
    std::memcpy(out + j, &low, (n - j) * sizeof(uint16_t));
    sum += e;
  }
  return hsum(sum);
}

ATTNKIT_SIMD_CLONES void scale(float* x, int64_t n, float factor) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] *= factor;
}

ATTNKIT_SIMD_CLONES void round_to_bf16(const float* x, int64_t n, uint16_t* out) {
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const vu16 low = bf16_bits(load(x + j));
    std::memcpy(out + j, &low, sizeof(low));
  }
  if (j < n) {
    const vu16 low = bf16_bits(load_tail(x + j, n - j, 0.0f));
    std::memcpy(out + j, &low, (n - j) * sizeof(uint16_t));
  }
}

ATTNKIT_SIMD_CLONES void dropout_keep(uint8_t* keep, uint64_t seed, int64_t i, int64_t n0, int64_t n,
                                      uint32_t threshold) {
  const uint32_t base = static_cast<uint32_t>(n0), row = static_cast<uint32_t>(i);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) keep[j] = (philox(seed, base + static_cast<uint32_t>(j), row) >> 8) >= threshold;
}

}  // namespace attn_rows
}  // namespace cpu
}  // namespace attnkit
