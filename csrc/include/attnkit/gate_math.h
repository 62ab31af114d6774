// Gate math of the recurrent cells, written once and shared by the CPU (C++)
// and CUDA kernels. Gate order follows PyTorch: LSTM (i, f, g, o).
//
// Every function works on one hidden unit in the accumulation type (float or
// double); callers load/store their storage type around it.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define ATTNKIT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ATTNKIT_HOST_DEVICE inline
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

// 1 / (1 + e^-x) overflows gracefully: e^-x -> inf gives 0, never NaN.
template <typename T>
ATTNKIT_HOST_DEVICE T sigmoid(T x) {
  return T(1) / (T(1) + exp_(-x));
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
  const T grad_c_total = grad_c + grad_h * a.o * (T(1) - tanh_c * tanh_c);
  LstmUnitGrad<T> d;
  d.pre_o = grad_h * tanh_c * a.o * (T(1) - a.o);
  d.pre_i = grad_c_total * a.g * a.i * (T(1) - a.i);
  d.pre_f = grad_c_total * c_prev * a.f * (T(1) - a.f);
  d.pre_g = grad_c_total * a.i * (T(1) - a.g * a.g);
  d.c_prev = grad_c_total * a.f;
  return d;
}

}  // namespace gates
}  // namespace attnkit
