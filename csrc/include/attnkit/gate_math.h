// Gate math of the recurrent cells, written once and shared by the CPU (C++)
// and CUDA kernels. Gate order follows PyTorch: LSTM (i, f, g, o), GRU (r, z, n).
//
// Every function works on one hidden unit in the accumulation type (float or
// double); callers load/store their storage type around it. On the host the
// same templates also take `vfloat8` (8 float lanes, GCC vector extension), so
// the CPU kernels evaluate eight units at once with the very same formulas;
// constants are written as float literals (not T(1)) for that reason.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define ATTNKIT_HOST_DEVICE __host__ __device__ __forceinline__
#else
// always_inline: the vector instantiations must inline into each target clone of their
// callers; an out-of-line copy is compiled for baseline x86-64 and passes vectors
// in memory, while an AVX/AVX-512 caller passes them in registers (seen at -O1).
#define ATTNKIT_HOST_DEVICE inline __attribute__((always_inline))
#endif

namespace attnkit {
namespace gates {

ATTNKIT_HOST_DEVICE float exp_(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return std::exp(x);
#endif
}
ATTNKIT_HOST_DEVICE double exp_(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}
ATTNKIT_HOST_DEVICE float tanh_(float x) {
#if defined(__CUDA_ARCH__)
  return ::tanhf(x);
#else
  return std::tanh(x);
#endif
}
ATTNKIT_HOST_DEVICE double tanh_(double x) {
#if defined(__CUDA_ARCH__)
  return ::tanh(x);
#else
  return std::tanh(x);
#endif
}

#if !defined(__CUDACC__)
// The vector ABI note gcc prints for 32-byte vectors is moot: these inline.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
// Host SIMD: 8 float lanes. std::exp is a libm call per element that no
// compiler vectorizes, so the lanes use Cephes' expf polynomial (relative
// error ~1e-7) with the exponent set by bit arithmetic.
typedef float vfloat8 __attribute__((vector_size(32)));
typedef int vint8 __attribute__((vector_size(32)));

// The same formulas on 16 lanes (one zmm where AVX-512 is compiled in).
typedef float vfloat16 __attribute__((vector_size(64)));
typedef int vint16 __attribute__((vector_size(64)));

// e^x for x <= 0, as the gates take it (e^-|x|): nothing can overflow, NaN carries through the
// polynomial, and the clamp at -88 gives 0 below -87.7 (where 2^n's exponent field is 0; e^x
// there is a denormal), so sigmoid(-inf) is 0 and 0 * inf NaN, as torch's. (A general e^x,
// clamped at both ends and selecting inf, 0 and NaN afterwards, put five more compares and
// selects on the chain that each step's gate math waits on: the LSTM forward's gate passes at
// (32, 128, 256) took 2.95-2.98 Mcycles a thread against 2.37-2.46.)
template <typename V, typename VI>
inline __attribute__((always_inline)) V vec_exp_nonpositive(V x) {
  x = x < -88.0f ? V{} - 88.0f : x;
  const V n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  const V r = x - n * 0.693359375f + n * 2.12194440e-4f;                // x - n ln 2, two parts
  const V p = ((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) * r +
               1.6666665459e-1f) * r + 5.0000001201e-1f;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;  // 2^n
  V scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return (p * r * r + r + 1.0f) * scale;
}

template <typename V, typename VI>
inline __attribute__((always_inline)) V vec_tanh(V x) {
  // Small |x|: Cephes' odd polynomial (no cancellation); else 1 - 2/(e^2|x| + 1).
  const V ax = x < 0.0f ? -x : x;
  const V e = vec_exp_nonpositive<V, VI>(-2.0f * ax);
  V large = (1.0f - e) / (1.0f + e);
  large = x < 0.0f ? -large : large;
  const V z = x * x;
  const V small = ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z + 1.33314422036e-1f) * z -
                   3.33332819422e-1f) * z * x + x;
  return ax < 0.625f ? small : large;
}

// 1 / (1 + e^-x) from e = e^-|x| <= 1: 1 / (1 + e) for x >= 0, e / (1 + e) below (no overflow to
// guard; 0 below -87.7, 0 at -inf).
template <typename V, typename VI>
inline __attribute__((always_inline)) V vec_sigmoid(V x) {
  const V e = vec_exp_nonpositive<V, VI>(x < 0.0f ? x : -x);
  const V s = 1.0f / (1.0f + e);
  return x < 0.0f ? e * s : s;
}

ATTNKIT_HOST_DEVICE vfloat8 tanh_(vfloat8 x) { return vec_tanh<vfloat8, vint8>(x); }
ATTNKIT_HOST_DEVICE vfloat16 tanh_(vfloat16 x) { return vec_tanh<vfloat16, vint16>(x); }
// Chosen over the sigmoid template below for the vector types.
ATTNKIT_HOST_DEVICE vfloat8 sigmoid(vfloat8 x) { return vec_sigmoid<vfloat8, vint8>(x); }
ATTNKIT_HOST_DEVICE vfloat16 sigmoid(vfloat16 x) { return vec_sigmoid<vfloat16, vint16>(x); }
#pragma GCC diagnostic pop
#endif

// 1 / (1 + e^-x) overflows gracefully: e^-x -> inf gives 0, never NaN.
template <typename T>
ATTNKIT_HOST_DEVICE T sigmoid(T x) {
  return 1.0f / (1.0f + exp_(-x));
}

// Activated LSTM gates of one hidden unit.
template <typename T>
struct LstmGates {
  T i, f, g, o;
};

// Forward of one unit: pre-activations (i, f, g, o) and the previous cell
// state give the activated gates, the new cell state and the new hidden state.
template <typename T>
ATTNKIT_HOST_DEVICE LstmGates<T> lstm_activate(T pre_i, T pre_f, T pre_g, T pre_o) {
  return {sigmoid(pre_i), sigmoid(pre_f), tanh_(pre_g), sigmoid(pre_o)};
}

template <typename T>
ATTNKIT_HOST_DEVICE T lstm_cell_state(const LstmGates<T>& a, T c_prev) {
  return a.f * c_prev + a.i * a.g;
}

template <typename T>
ATTNKIT_HOST_DEVICE T lstm_hidden_state(const LstmGates<T>& a, T c_new) {
  return a.o * tanh_(c_new);
}

// Backward of one unit. Given the activated gates, c_prev, c_new and the
// incoming gradients of h_new and c_new, returns the gradients of the four
// pre-activations and of c_prev. Uses only saved activations (no re-GEMM).
template <typename T>
struct LstmUnitGrad {
  T pre_i, pre_f, pre_g, pre_o, c_prev;
};

template <typename T>
ATTNKIT_HOST_DEVICE LstmUnitGrad<T> lstm_backward(const LstmGates<T>& a, T c_prev, T c_new,
                                                  T grad_h, T grad_c) {
  const T tanh_c = tanh_(c_new);
  const T grad_c_total = grad_c + grad_h * a.o * (1.0f - tanh_c * tanh_c);
  LstmUnitGrad<T> d;
  d.pre_o = grad_h * tanh_c * a.o * (1.0f - a.o);
  d.pre_i = grad_c_total * a.g * a.i * (1.0f - a.i);
  d.pre_f = grad_c_total * c_prev * a.f * (1.0f - a.f);
  d.pre_g = grad_c_total * a.i * (1.0f - a.g * a.g);
  d.c_prev = grad_c_total * a.f;
  return d;
}

// GRU, one unit. PyTorch's formulation: the hidden part of the candidate,
// hn = W_hn h + b_hn, is multiplied by the reset gate (b_hn inside the product):
//   r = sigmoid(gi_r + gh_r), z = sigmoid(gi_z + gh_z), n = tanh(gi_n + r * hn),
//   h' = (1 - z) * n + z * h.
// hn is kept with the activated gates: the backward needs it for dr.
template <typename T>
struct GruGates {
  T r, z, n, hn;
};

template <typename T>
ATTNKIT_HOST_DEVICE GruGates<T> gru_activate(T gi_r, T gi_z, T gi_n, T gh_r, T gh_z, T gh_n) {
  const T r = sigmoid(gi_r + gh_r);
  return {r, sigmoid(gi_z + gh_z), tanh_(gi_n + r * gh_n), gh_n};
}

template <typename T>
ATTNKIT_HOST_DEVICE T gru_hidden_state(const GruGates<T>& a, T h_prev) {
  return a.n + a.z * (h_prev - a.n);
}

// Gradients of the input-side pre-activations (gi_r, gi_z, gi_n), of the
// hidden-side ones (gh_r = gi_r, gh_z = gi_z, gh_n = gi_n * r, returned as
// gh_n) and the direct part of dh_prev (through z; the part through W_hh is a GEMM).
template <typename T>
struct GruUnitGrad {
  T gi_r, gi_z, gi_n, gh_n, h_prev;
};

template <typename T>
ATTNKIT_HOST_DEVICE GruUnitGrad<T> gru_backward(const GruGates<T>& a, T h_prev, T grad_h) {
  const T grad_n = grad_h * (1.0f - a.z);
  GruUnitGrad<T> d;
  d.gi_n = grad_n * (1.0f - a.n * a.n);
  d.gh_n = d.gi_n * a.r;
  d.gi_r = d.gi_n * a.hn * a.r * (1.0f - a.r);
  d.gi_z = grad_h * (h_prev - a.n) * a.z * (1.0f - a.z);
  d.h_prev = grad_h * a.z;
  return d;
}

}  // namespace gates
}  // namespace attnkit
