// Elementwise passes over one row of an attention score tile, and the Philox
// generator of the dropout mask. The float passes are compiled for AVX-512,
// AVX2 and baseline x86-64 (target_clones, picked at load time): the
// extension is built without -march flags, and a scalar std::exp per score
// would cost more than the tile GEMMs themselves.
#pragma once

#include <cstdint>

namespace attnkit {
namespace cpu {
namespace attn_rows {

// max over x[0, n); -inf for n = 0, NaN if any x is NaN.
float row_max(const float* x, int64_t n);
double row_max(const double* x, int64_t n);

// x = exp(x - shift) in place (exp(-inf) = 0 exactly); returns the sum.
float exp_shift_sum(float* x, int64_t n, float shift);
double exp_shift_sum(double* x, int64_t n, double shift);

// t = tanh(s / cap), s = cap * t (Gemma 2's soft-capping; t kept for the backward,
// not stored when t = nullptr).
void softcap(float* s, float* t, int64_t n, float cap);
void softcap(double* s, double* t, int64_t n, double cap);

// ds = p * (dp - delta) * (1 - t^2), t = nullptr without soft-capping.
void softmax_grad(float* ds, const float* p, const float* dp, const float* t, int64_t n, float delta);
void softmax_grad(double* ds, const double* p, const double* dp, const double* t, int64_t n, double delta);

// out = exp(x * factor - shift) rounded to bfloat16 (as round_to_bf16; x is left as it is);
// returns the sum of the unrounded exponentials. For x * factor <= shift (shift: the row's max);
// exp to ~3e-6 relative, which the rounding to bfloat16 hides.
float exp_sum_to_bf16(const float* x, int64_t n, float factor, float shift, uint16_t* out);

// x *= factor.
void scale(float* x, int64_t n, float factor);

// out = x rounded to bfloat16 (nearest, ties to even; the bits of c10::BFloat16(x)).
void round_to_bf16(const float* x, int64_t n, uint16_t* out);

// Triton's tl.philox(seed, c0, c1, 0, 0): Philox 4x32-10, first output word.
inline uint32_t philox(uint64_t seed, uint32_t c0, uint32_t c1) {
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t prod_b = uint64_t(0xCD9E8D57u) * c2;
    const uint64_t prod_a = uint64_t(0xD2511F53u) * c0;
    const uint32_t next0 = static_cast<uint32_t>(prod_b >> 32) ^ c1 ^ k0;
    const uint32_t next2 = static_cast<uint32_t>(prod_a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(prod_b);
    c3 = static_cast<uint32_t>(prod_a);
    c0 = next0;
    c2 = next2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// keep[j] = 1 iff element (i, n0 + j) of stream `seed` survives dropout:
// philox(seed, n0 + j, i) >> 8 >= threshold: the key and query index in two counter words, so no
// two elements of a head share one, however long the sequences.
void dropout_keep(uint8_t* keep, uint64_t seed, int64_t i, int64_t n0, int64_t n, uint32_t threshold);

}  // namespace attn_rows
}  // namespace cpu
}  // namespace attnkit
