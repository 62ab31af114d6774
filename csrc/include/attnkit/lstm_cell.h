// LSTM cell step entry points, declared once for each device namespace
// (attnkit::cpu in csrc/cpu, attnkit::cuda in csrc/cuda). Inputs are
// validated and made contiguous in Python before they get here; the entry
// points check them again (check_lstm_cell below), so a direct call with bad
// arguments raises instead of reading out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "attnkit/rnn_gemm.h"

#define ATTNKIT_DECLARE_LSTM_CELL(device)                                                      \
  namespace attnkit {                                                                          \
  namespace device {                                                                           \
  /* Returns {h_new, c_new, gates}; gates are the activated (i, f, g, o), saved for backward. */ \
  std::vector<at::Tensor> lstm_cell_forward(const at::Tensor& x, const at::Tensor& h,           \
                                            const at::Tensor& c, const at::Tensor& w_ih,        \
                                            const at::Tensor& w_hh,                             \
                                            const c10::optional<at::Tensor>& b_ih,              \
                                            const c10::optional<at::Tensor>& b_hh);             \
  /* Returns {dx, dh, dc, dW_ih, dW_hh, db}. */                                                 \
  std::vector<at::Tensor> lstm_cell_backward(                                                  \
      const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& x,                 \
      const at::Tensor& h, const at::Tensor& c, const at::Tensor& w_ih, const at::Tensor& w_hh, \
      const at::Tensor& gates, const at::Tensor& c_new);                                       \
  }                                                                                            \
  }

namespace attnkit {

inline void check_cell_tensor(const at::Tensor& t, const char* name, const at::Tensor& x, at::IntArrayRef shape) {
  TORCH_CHECK(t.defined(), "lstm_cell: ", name, " must be a tensor");
  TORCH_CHECK(t.sizes() == shape, "lstm_cell: ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "lstm_cell: ", name, " has dtype ", t.scalar_type(),
              " but x has ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "lstm_cell: ", name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.is_contiguous(), "lstm_cell: ", name, " must be contiguous");
}

// x (B, I), h and c (B, H), w_ih (4H, I), w_hh (4H, H), biases (4H,); with
// the backward's tensors when `grad_h` is defined. Returns H.
inline int64_t check_lstm_cell(const at::Tensor& x, const at::Tensor& h, const at::Tensor& c, const at::Tensor& w_ih,
                               const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                               const c10::optional<at::Tensor>& b_hh) {
  TORCH_CHECK(x.defined() && x.dim() == 2, "lstm_cell: x must be 2-D (batch, input_size)");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "lstm_cell: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(c.defined() && c.dim() == 2, "lstm_cell: c must be 2-D (batch, hidden_size)");
  const int64_t B = x.size(0), I = x.size(1), H = c.size(1);
  check_cell_tensor(x, "x", x, {B, I});
  check_cell_tensor(h, "h", x, {B, H});
  check_cell_tensor(c, "c", x, {B, H});
  check_cell_tensor(w_ih, "w_ih", x, {4 * H, I});
  check_cell_tensor(w_hh, "w_hh", x, {4 * H, H});
  if (b_ih.has_value() && b_ih->defined()) check_cell_tensor(*b_ih, "b_ih", x, {4 * H});
  if (b_hh.has_value() && b_hh->defined()) check_cell_tensor(*b_hh, "b_hh", x, {4 * H});
  return H;
}

inline void check_lstm_cell_backward(const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& x,
                                     const at::Tensor& h, const at::Tensor& c, const at::Tensor& w_ih,
                                     const at::Tensor& w_hh, const at::Tensor& gates, const at::Tensor& c_new) {
  const int64_t H = check_lstm_cell(x, h, c, w_ih, w_hh, c10::nullopt, c10::nullopt), B = x.size(0);
  check_cell_tensor(grad_h, "grad_h", x, {B, H});
  check_cell_tensor(grad_c, "grad_c", x, {B, H});
  check_cell_tensor(gates, "gates", x, {B, 4 * H});
  check_cell_tensor(c_new, "c_new", x, {B, H});
}

}  // namespace attnkit

ATTNKIT_DECLARE_LSTM_CELL(cpu)
ATTNKIT_DECLARE_LSTM_CELL(cuda)
