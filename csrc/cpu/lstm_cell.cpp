// Fused LSTM cell step on the CPU: the GEMMs go to linear.h's routes for float
// (the few-row GEMV; oneDNN, 1.5-2.3x the MKL sgemm that at::mm calls on an
// AMD CPU; MKL on Intel CPUs, see gemms_on_aten in linear.h), to
// ATen for the other types; the gate nonlinearities and state
// update run as one fused pass over the (batch x hidden) units with
// at::parallel_for: the vectorized row kernels of the whole-sequence LSTM
// (lstm_rows.h), in float for the half types.
#include "attnkit/lstm_cell.h"

#include <ATen/ATen.h>

#include "attnkit/linear.h"
#include "lstm_rows.h"
#include "rnn_fused.h"  // transpose_into

namespace attnkit {
namespace cpu {
std::vector<at::Tensor> lstm_cell_forward(const at::Tensor& x, const at::Tensor& h,
                                          const at::Tensor& c, const at::Tensor& w_ih,
                                          const at::Tensor& w_hh,
                                          const c10::optional<at::Tensor>& b_ih,
                                          const c10::optional<at::Tensor>& b_hh) {
  check_lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh);
  if (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) {
    // The row kernel adds the two projections, so each carries its own bias
    // (linear_rows: ATen's addmm for double).
    at::Tensor gates = linear_rows(x, w_ih, b_ih);
    at::Tensor c_new = c.clone(), h_new = at::empty_like(c);
    lstm_rows_forward(gates, linear_rows(h, w_hh, b_hh), c_new, h_new);
    return {h_new, c_new, gates};
  }
  // Half types: the GEMMs in that type (oneDNN's bf16/fp16 kernels), the gate math in float through
  // the same row kernels (a scalar unit loop on libm's expm1f and tanhf took twice the plain-PyTorch
  // reference at (B, H) = (64, 256) in bfloat16, Xeon Sapphire Rapids), the results rounded back.
  at::Tensor gates = at::linear(x, w_ih, b_ih).to(at::kFloat);
  at::Tensor c_new = c.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();
  at::Tensor h_new = at::empty_like(c_new);
  lstm_rows_forward(gates, at::linear(h, w_hh, b_hh).to(at::kFloat), c_new, h_new);
  const auto type = x.scalar_type();
  return {h_new.to(type), c_new.to(type), gates.to(type)};
}

std::vector<at::Tensor> lstm_cell_backward(const at::Tensor& grad_h, const at::Tensor& grad_c,
                                           const at::Tensor& x, const at::Tensor& h,
                                           const at::Tensor& c, const at::Tensor& w_ih,
                                           const at::Tensor& w_hh, const at::Tensor& gates,
                                           const at::Tensor& c_new) {
  check_lstm_cell_backward(grad_h, grad_c, x, h, c, w_ih, w_hh, gates, c_new);
  if (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) {
    at::Tensor grad_pre = at::empty_like(gates);
    at::Tensor grad_c_prev = grad_c.clone();
    lstm_rows_backward(gates, c, c_new, grad_h, grad_c_prev, grad_pre);
    if (x.scalar_type() == at::kFloat && x.size(0) > kFewRows && onednn_linear_available() &&
        !gemms_on_aten()) {
      // oneDNN packs its operands anyway and takes the weights' transposed views
      // as they are (2.3x MKL at (B, I, H) = (256, 512, 512)); the weight
      // gradients read grad_pre transposed, copied once.
      at::Tensor grad_pre_t = at::empty({grad_pre.size(1), grad_pre.size(0)}, grad_pre.options());
      transpose_into(grad_pre, grad_pre_t);
      return {onednn_linear(grad_pre, w_ih.t(), c10::nullopt), onednn_linear(grad_pre, w_hh.t(), c10::nullopt),
              grad_c_prev, onednn_linear(grad_pre_t, x.t(), c10::nullopt),
              onednn_linear(grad_pre_t, h.t(), c10::nullopt), grad_pre.sum(0)};
    }
    if (x.size(0) == 1) {
      // One row: the weight gradients are outer products, written at memory speed
      // by a broadcast multiply (6 us for 1 MB here; a K = 1 GEMM took 14 us).
      const at::Tensor grad_pre_col = grad_pre.t();
      return {at::mm(grad_pre, w_ih), at::mm(grad_pre, w_hh), grad_c_prev, grad_pre_col * x, grad_pre_col * h,
              grad_pre.sum(0)};
    }
    return linear_gates_backward(grad_pre, grad_c_prev, x, h, w_ih, w_hh);
  }
  // Half types, as the forward: the gate gradients in float, the GEMMs in the input's type.
  const auto wide = [](const at::Tensor& t) { return t.to(at::kFloat).contiguous(); };
  at::Tensor grad_c_prev = grad_c.to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();
  at::Tensor grad_pre_wide = at::empty(gates.sizes(), gates.options().dtype(at::kFloat));
  lstm_rows_backward(wide(gates), wide(c), wide(c_new), wide(grad_h), grad_c_prev, grad_pre_wide);
  const auto type = x.scalar_type();
  return linear_gates_backward(grad_pre_wide.to(type), grad_c_prev.to(type), x, h, w_ih, w_hh);
}

}  // namespace cpu
}  // namespace attnkit
