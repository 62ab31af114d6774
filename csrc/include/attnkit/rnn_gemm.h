// The GEMM parts of an RNN cell step, shared by the CPU and CUDA kernels;
// ATen sends them to BLAS or cuBLAS.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace attnkit {

// The GEMM parts shared by the CPU and CUDA cells (ATen picks BLAS/cuBLAS):
// gates = x W_ih^T + h W_hh^T (+ b_ih + b_hh), layout (B, 4H) in i, f, g, o order.
inline at::Tensor linear_gates(const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_ih,
                               const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                               const c10::optional<at::Tensor>& b_hh) {
  const bool has_ih = b_ih.has_value() && b_ih->defined();
  const bool has_hh = b_hh.has_value() && b_hh->defined();
  // Biases ride in the first GEMM's epilogue (addmm), not in extra passes.
  at::Tensor pre;
  if (has_ih || has_hh) {
    const at::Tensor bias = has_ih && has_hh ? *b_ih + *b_hh : (has_ih ? *b_ih : *b_hh);
    pre = at::addmm(bias, x, w_ih.t());
  } else {
    pre = at::mm(x, w_ih.t());
  }
  pre.addmm_(h, w_hh.t());
  return pre;
}

// Given d(pre-activations), returns {dx, dh, dc, dW_ih, dW_hh, db}; db is the
// gradient of each bias (the two biases get the same one).
inline std::vector<at::Tensor> linear_gates_backward(const at::Tensor& grad_pre,
                                                     const at::Tensor& grad_c_prev,
                                                     const at::Tensor& x, const at::Tensor& h,
                                                     const at::Tensor& w_ih,
                                                     const at::Tensor& w_hh) {
  return {at::mm(grad_pre, w_ih), at::mm(grad_pre, w_hh), grad_c_prev,
          at::mm(grad_pre.t(), x), at::mm(grad_pre.t(), h), grad_pre.sum(0)};
}

}  // namespace attnkit
