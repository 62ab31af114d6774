// LSTM cell step entry points, declared once for each device namespace
// (attnkit::cpu in csrc/cpu, attnkit::cuda in csrc/cuda). Inputs are
// validated and made contiguous in Python before they get here.
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

ATTNKIT_DECLARE_LSTM_CELL(cpu)
ATTNKIT_DECLARE_LSTM_CELL(cuda)
