// Fused LSTM cell step on the CPU: the GEMMs go to linear.h's routes for float
// (the few-row GEMV, oneDNN: 1.5-2.3x the MKL sgemm that at::mm calls on this
// AMD CPU), to ATen for the other types; the gate nonlinearities and state
// update run as one fused pass over the (batch x hidden) units with
// at::parallel_for: for float and double the vectorized row kernels of the
// whole-sequence LSTM (lstm_rows.h), for half types the unit loop below.
#include "attnkit/lstm_cell.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>

#include "attnkit/gate_math.h"
#include "attnkit/linear.h"
#include "lstm_rows.h"
#include "rnn_fused.h"  // transpose_into

namespace attnkit {
namespace cpu {

namespace {

// Units below this count run on one thread: the fork/join costs more.
constexpr int64_t kGrainSize = 4096;

template <typename scalar_t>
void lstm_pointwise_forward(const at::Tensor& pre, const at::Tensor& c, at::Tensor& gates,
                            at::Tensor& h_new, at::Tensor& c_new) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t hidden = c.size(1);
  const scalar_t* pre_p = pre.data_ptr<scalar_t>();
  const scalar_t* c_p = c.data_ptr<scalar_t>();
  scalar_t* gates_p = gates.data_ptr<scalar_t>();
  scalar_t* h_p = h_new.data_ptr<scalar_t>();
  scalar_t* cn_p = c_new.data_ptr<scalar_t>();
  at::parallel_for(0, c.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / hidden, j = u % hidden;
      const int64_t row = b * 4 * hidden + j;
      const auto a = gates::lstm_activate<acc_t>(pre_p[row], pre_p[row + hidden],
                                                 pre_p[row + 2 * hidden], pre_p[row + 3 * hidden]);
      const acc_t c_next = gates::lstm_cell_state<acc_t>(a, c_p[u]);
      gates_p[row] = a.i;
      gates_p[row + hidden] = a.f;
      gates_p[row + 2 * hidden] = a.g;
      gates_p[row + 3 * hidden] = a.o;
      cn_p[u] = c_next;
      h_p[u] = gates::lstm_hidden_state<acc_t>(a, c_next);
    }
  });
}

template <typename scalar_t>
void lstm_pointwise_backward(const at::Tensor& gates, const at::Tensor& c, const at::Tensor& c_new,
                             const at::Tensor& grad_h, const at::Tensor& grad_c,
                             at::Tensor& grad_pre, at::Tensor& grad_c_prev) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t hidden = c.size(1);
  const scalar_t* gates_p = gates.data_ptr<scalar_t>();
  const scalar_t* c_p = c.data_ptr<scalar_t>();
  const scalar_t* cn_p = c_new.data_ptr<scalar_t>();
  const scalar_t* gh_p = grad_h.data_ptr<scalar_t>();
  const scalar_t* gc_p = grad_c.data_ptr<scalar_t>();
  scalar_t* gpre_p = grad_pre.data_ptr<scalar_t>();
  scalar_t* gcp_p = grad_c_prev.data_ptr<scalar_t>();
  at::parallel_for(0, c.numel(), kGrainSize, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / hidden, j = u % hidden;
      const int64_t row = b * 4 * hidden + j;
      const gates::LstmGates<acc_t> a{gates_p[row], gates_p[row + hidden],
                                      gates_p[row + 2 * hidden], gates_p[row + 3 * hidden]};
      const auto d = gates::lstm_backward<acc_t>(a, c_p[u], cn_p[u], gh_p[u], gc_p[u]);
      gpre_p[row] = d.pre_i;
      gpre_p[row + hidden] = d.pre_f;
      gpre_p[row + 2 * hidden] = d.pre_g;
      gpre_p[row + 3 * hidden] = d.pre_o;
      gcp_p[u] = d.c_prev;
    }
  });
}

}  // namespace

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
  at::Tensor pre = linear_gates(x, h, w_ih, w_hh, b_ih, b_hh);
  at::Tensor gates = at::empty_like(pre);
  at::Tensor h_new = at::empty_like(c);
  at::Tensor c_new = at::empty_like(c);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lstm_cell_forward_cpu",
                                  [&] { lstm_pointwise_forward<scalar_t>(pre, c, gates, h_new, c_new); });
  return {h_new, c_new, gates};
}

std::vector<at::Tensor> lstm_cell_backward(const at::Tensor& grad_h, const at::Tensor& grad_c,
                                           const at::Tensor& x, const at::Tensor& h,
                                           const at::Tensor& c, const at::Tensor& w_ih,
                                           const at::Tensor& w_hh, const at::Tensor& gates,
                                           const at::Tensor& c_new) {
  check_lstm_cell_backward(grad_h, grad_c, x, h, c, w_ih, w_hh, gates, c_new);
  at::Tensor grad_pre = at::empty_like(gates);
  if (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) {
    at::Tensor grad_c_prev = grad_c.clone();
    lstm_rows_backward(gates, c, c_new, grad_h, grad_c_prev, grad_pre);
    if (x.scalar_type() == at::kFloat && x.size(0) > kFewRows && onednn_linear_available()) {
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
  at::Tensor grad_c_prev = at::empty_like(c);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lstm_cell_backward_cpu", [&] {
    lstm_pointwise_backward<scalar_t>(gates, c, c_new, grad_h, grad_c, grad_pre, grad_c_prev);
  });
  return linear_gates_backward(grad_pre, grad_c_prev, x, h, w_ih, w_hh);
}

}  // namespace cpu
}  // namespace attnkit
