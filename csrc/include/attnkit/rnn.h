// Whole-sequence LSTM / GRU entry points (one layer, one direction), declared
// once for each device namespace (attnkit::cpu in csrc/cpu/rnn.cpp,
// attnkit::cuda in csrc/cuda/rnn.cu). Layout is time-major: x (T, B, I).
//
// `lengths` (optional, int64 on the CPU, (B,)) gives each sequence's length:
// at steps t >= lengths[b] row b keeps its state and outputs zeros, so h_n/c_n
// are the states after each sequence's last step (PackedSequence semantics).
// `save` = false (inference) skips keeping what only the backward needs.
// Tensors that are not produced come back empty (numel 0).
#pragma once

#include <ATen/ATen.h>

#include <vector>

#define ATTNKIT_DECLARE_RNN(device)                                                                  \
  namespace attnkit {                                                                                \
  namespace device {                                                                                 \
  /* Returns {output (T,B,P), h_n (B,P), c_n (B,H), gates (T,B,4H) activated i,f,g,o,             \
     cs (T,B,H) cell states, hc (T,B,H) o*tanh(c) before the projection}; P = H without w_hr. */    \
  std::vector<at::Tensor> lstm_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, \
                                       const at::Tensor& w_ih, const at::Tensor& w_hh,              \
                                       const c10::optional<at::Tensor>& b_ih,                       \
                                       const c10::optional<at::Tensor>& b_hh,                       \
                                       const c10::optional<at::Tensor>& w_hr,                       \
                                       const c10::optional<at::Tensor>& lengths, bool save);        \
  /* Returns {dx, dh0, dc0, dw_ih, dw_hh, db (each bias's gradient), dw_hr (empty without w_hr)}. */ \
  std::vector<at::Tensor> lstm_backward(                                                           \
      const at::Tensor& grad_output, const at::Tensor& grad_hn, const at::Tensor& grad_cn,         \
      const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_ih,     \
      const at::Tensor& w_hh, const c10::optional<at::Tensor>& w_hr,                              \
      const c10::optional<at::Tensor>& lengths, const at::Tensor& output, const at::Tensor& gates, \
      const at::Tensor& cs, const at::Tensor& hc);                                                 \
  /* Returns {output (T,B,H), h_n (B,H), gates (T,B,4H) as r, z, n, hn = W_hn h + b_hn}. */         \
  std::vector<at::Tensor> gru_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih, \
                                      const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih, \
                                      const c10::optional<at::Tensor>& b_hh,                        \
                                      const c10::optional<at::Tensor>& lengths, bool save);         \
  /* Returns {dx, dh0, dw_ih, dw_hh, db_ih, db_hh}. */                                              \
  std::vector<at::Tensor> gru_backward(const at::Tensor& grad_output, const at::Tensor& grad_hn,   \
                                       const at::Tensor& x, const at::Tensor& h0,                  \
                                       const at::Tensor& w_ih, const at::Tensor& w_hh,             \
                                       const c10::optional<at::Tensor>& lengths,                   \
                                       const at::Tensor& output, const at::Tensor& gates);         \
  }                                                                                                \
  }

ATTNKIT_DECLARE_RNN(cpu)
ATTNKIT_DECLARE_RNN(cuda)
