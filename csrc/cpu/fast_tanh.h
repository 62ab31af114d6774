// Vectorized float tanh shared by the CPU kernels (additive attention's
// scores, attention's soft-cap). The extension is built without -march flags,
// so std::tanh stays scalar; callers are target_clones functions (AVX-512,
// AVX2, baseline) and this helper is always inlined so that each clone lowers
// it to its own registers.
#pragma once

namespace attnkit {
namespace cpu {
namespace simd {

// 16 floats as a GCC vector: one zmm, two ymm or four xmm depending on the clone.
typedef float vf16 __attribute__((vector_size(64)));

// tanh(x) as a [13/6] rational minimax approximation on |x| <= 7.905 (the
// coefficients of Eigen's fast float tanh; a few ulp, checked against
// std::tanh by the tests), x itself below 4e-4, +-1 past the clamp (the
// approximation is monotone and reaches 1 in float there). NaN stays NaN.
// Cheaper than 1 - 2 / (exp(2x) + 1): one division and no exponent tricks.
inline __attribute__((always_inline)) vf16 fast_tanh(vf16 x) {
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
