// 16-float vector primitives and a vectorized tanh shared by the CPU row
// kernels (attention_rows.cpp, additive_attention.cpp). The extension is built
// without -march flags, so std::tanh/std::exp stay scalar and at::vec is its
// generic code; callers are ATTNKIT_SIMD_CLONES functions (AVX-512, AVX2,
// baseline, picked at load time) and these helpers are always inlined so that
// each clone lowers them to its own registers.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define ATTNKIT_SIMD_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ATTNKIT_SIMD_CLONES
#endif
// Inlined into each target clone: an out-of-line helper would be compiled for baseline x86-64.
#define ATTNKIT_INLINE inline __attribute__((always_inline))

namespace attnkit {
namespace cpu {
namespace simd {

// 16 floats as a GCC vector: one zmm, two ymm or four xmm depending on the clone.
typedef float vf16 __attribute__((vector_size(64)));
using vf = vf16;
constexpr int64_t W = 16;

ATTNKIT_INLINE vf splat(float a) { return vf{} + a; }

ATTNKIT_INLINE vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

ATTNKIT_INLINE void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

// The last n < W elements, padded with `fill`.
ATTNKIT_INLINE vf load_tail(const float* p, int64_t n, float fill) {
  float buf[W];
  for (int64_t j = 0; j < W; ++j) buf[j] = j < n ? p[j] : fill;
  return load(buf);
}

ATTNKIT_INLINE void store_tail(float* p, vf v, int64_t n) {
  float buf[W];
  store(buf, v);
  for (int64_t j = 0; j < n; ++j) p[j] = buf[j];
}

ATTNKIT_INLINE float hsum(vf v) {
  float s = 0;
  for (int64_t j = 0; j < W; ++j) s += v[j];
  return s;
}

// tanh(x) as a [13/6] rational minimax approximation on |x| <= 7.905 (the
// coefficients of Eigen's fast float tanh; a few ulp, checked against
// std::tanh by the tests), x itself below 4e-4, +-1 past the clamp (the
// approximation is monotone and reaches 1 in float there). NaN stays NaN.
// Cheaper than 1 - 2 / (exp(2x) + 1): one division and no exponent tricks.
ATTNKIT_INLINE vf16 fast_tanh(vf16 x) {
  const vf16 hi = vf16{} + 7.90531110763549805f, lo = -hi;
  const vf16 c = x < lo ? lo : x > hi ? hi : x;
  const vf16 x2 = c * c;
  vf16 p = vf16{} - 2.76076847742355e-16f;
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 - 8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  vf16 q = vf16{} + 1.19825839466702e-06f;
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  const vf16 r = c * p / q;
  const vf16 ax = x < vf16{} ? -x : x;
  return ax < vf16{} + 4e-4f ? x : r;
}

}  // namespace simd
}  // namespace cpu
}  // namespace attnkit
