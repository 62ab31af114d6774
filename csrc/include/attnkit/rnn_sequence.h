// The time loop of the whole-sequence LSTM / GRU, shared by the CPU and CUDA
// code. The GEMMs are `K::linear(a, w, bias)` = a w^T + bias (the device
// picks oneDNN / BLAS / cuBLAS); the fused elementwise steps also come from
// `K`, the device's kernels (see csrc/cpu/rnn.cpp for the contract).
//
// Forward: the input projection of all T steps is one GEMM; each step is one
// GEMM on the recurrent weight plus one fused pass that adds the two. Backward: walks time in reverse with one GEMM and one fused
// pass per step; the weight gradients are whole-sequence GEMMs at the end.
// With sorted (non-increasing) lengths, as PackedSequence gives, each step's
// GEMMs cover only the rows still running.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace attnkit {
namespace rnn {

inline at::Tensor none_like(const at::Tensor& x) { return at::empty({0}, x.options()); }

inline bool present(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// ---------------------------------------------------------------- argument checks

inline void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& x, int64_t dim) {
  TORCH_CHECK(t.defined(), name, " must be a tensor");
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " has dtype ", t.scalar_type(), " but x has ",
              x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, name, " must have shape ", expected, ", got ", t.sizes());
}

// Checks the forward arguments; `gates` is 4 (LSTM) or 3 (GRU).
inline void check_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor* c0, const at::Tensor& w_ih,
                          const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                          const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& w_hr,
                          const c10::optional<at::Tensor>& lengths, int64_t gates) {
  TORCH_CHECK(x.dim() == 3, "x must be 3-D (T, B, input_size), got ", x.sizes());
  TORCH_CHECK(x.size(0) >= 1, "x must have at least one time step");
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x must be floating point, got ", x.scalar_type());
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2);
  check_tensor(w_hh, "w_hh", x, 2);
  const int64_t P = w_hh.size(1), H = w_hh.size(0) / gates;
  TORCH_CHECK(w_hh.size(0) == gates * H && H > 0, "w_hh must have ", gates, "*hidden_size rows, got ", w_hh.sizes());
  check_tensor(w_ih, "w_ih", x, 2);
  check_shape(w_ih, "w_ih", {gates * H, I});
  if (present(w_hr)) {
    check_tensor(*w_hr, "w_hr", x, 2);
    check_shape(*w_hr, "w_hr", {P, H});
  } else {
    TORCH_CHECK(P == H, "w_hh must have shape (", gates, "*hidden_size, hidden_size), got ", w_hh.sizes());
  }
  check_tensor(h0, "h0", x, 2);
  check_shape(h0, "h0", {B, P});
  if (c0 != nullptr) {
    check_tensor(*c0, "c0", x, 2);
    check_shape(*c0, "c0", {B, H});
  }
  if (present(b_ih)) {
    check_tensor(*b_ih, "b_ih", x, 1);
    check_shape(*b_ih, "b_ih", {gates * H});
  }
  if (present(b_hh)) {
    check_tensor(*b_hh, "b_hh", x, 1);
    check_shape(*b_hh, "b_hh", {gates * H});
  }
  if (present(lengths)) {
    const at::Tensor& len = *lengths;
    TORCH_CHECK(len.scalar_type() == at::kLong && len.device().is_cpu() && len.dim() == 1 && len.size(0) == B,
                "lengths must be a 1-D int64 CPU tensor of size batch = ", B, ", got ", len.scalar_type(), " ",
                len.sizes(), " on ", len.device());
    TORCH_CHECK(len.is_contiguous(), "lengths must be contiguous");
    if (B > 0) {
      TORCH_CHECK(len.min().item<int64_t>() >= 0 && len.max().item<int64_t>() <= T,
                  "lengths must lie in [0, T = ", T, "]");
    }
  }
}

inline void check_grad(const at::Tensor& g, const char* name, const at::Tensor& x, at::IntArrayRef shape) {
  check_tensor(g, name, x, static_cast<int64_t>(shape.size()));
  check_shape(g, name, shape);
}

// Rows of the batch that step t must compute: all of them, or with sorted
// lengths the prefix still running.
inline std::vector<int64_t> active_rows(const c10::optional<at::Tensor>& lengths, int64_t T, int64_t B) {
  std::vector<int64_t> rows(T, B);
  if (!present(lengths) || B == 0) return rows;
  const int64_t* len = lengths->data_ptr<int64_t>();
  for (int64_t b = 1; b < B; ++b) {
    if (len[b] > len[b - 1]) return rows;  // unsorted: every row, masked in the fused pass
  }
  int64_t running = B;
  for (int64_t t = 0; t < T; ++t) {
    while (running > 0 && len[running - 1] <= t) --running;
    rows[t] = running;
  }
  return rows;
}

// [x | h_{t-1}]^T, (I + P, T * B): the A of the weight gradients [dw_ih | dw_hh]^T = A gp,
// with h_{-1} = h0 and h_{t-1} = output[t-1] (equal while a row runs; a stopped row's gp is 0).
// K::transpose_into(src, dst) writes src^T into dst (2-D views). Not returned: a workspace.
template <typename K>
at::Tensor inputs_transposed(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& output) {
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), P = h0.size(1);
  at::Tensor a = K::workspace(1, {I + P, T * B}, x.options());
  K::transpose_into(x.view({T * B, I}), a.narrow(0, 0, I));
  K::transpose_into(h0, a.narrow(0, I, P).narrow(1, 0, B));
  if (T > 1) K::transpose_into(output.narrow(0, 0, T - 1).reshape({-1, P}), a.narrow(0, I, P).narrow(1, B, (T - 1) * B));
  return a;
}

// Whether the backward's GEMMs after the time loop (dx, the weight gradients) should take the
// running rows only: sorted lengths (rows[t] < B once some row stopped) and more than 1/8 of the
// T B rows stopped (a stopped row's gradients are 0; packing costs less than the rows it saves).
template <typename K>
bool pack_running(const c10::optional<at::Tensor>& lengths, const std::vector<int64_t>& rows, int64_t B) {
  if (!K::kPacksRunningRows || !present(lengths)) return false;
  int64_t running = 0;
  for (const int64_t r : rows) running += r;
  return running * 8 <= static_cast<int64_t>(rows.size()) * B * 7;
}

// dx, dW_ih, dW_hh of a single step (T = 1: nn.GRUCell, a decoder's steps) from the
// gate gradients of its input side gi and recurrent side gh (B, G H; the same
// tensor for the LSTM): three GEMMs (K::matmul, K::mm_tn), without the sequence
// path's transposed copies of x, h0 and the weight gradients (GRUCell's training
// step at (B, I, H) = (64, 256, 256) spent more in those than in its GEMMs).
template <typename K>
std::tuple<at::Tensor, at::Tensor, at::Tensor> single_step_grads(const at::Tensor& gi, const at::Tensor& gh,
                                                                 const at::Tensor& x, const at::Tensor& h0,
                                                                 const at::Tensor& w_ih) {
  return {K::matmul(gi, w_ih).unsqueeze(0), K::mm_tn(gi, x[0]), K::mm_tn(gh, h0)};
}

template <typename K>
at::Tensor transposed(const at::Tensor& a) {
  at::Tensor out = at::empty({a.size(1), a.size(0)}, a.options());
  K::transpose_into(a, out);
  return out;
}

// ---------------------------------------------------------------- LSTM

template <typename K>
std::vector<at::Tensor> lstm_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                     const at::Tensor& w_ih, const at::Tensor& w_hh,
                                     const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
                                     const c10::optional<at::Tensor>& w_hr, const c10::optional<at::Tensor>& lengths,
                                     bool save) {
  check_forward(x, h0, &c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, 4);
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = w_hh.size(0) / 4, P = w_hh.size(1);
  const bool proj = present(w_hr);
  const std::vector<int64_t> rows = active_rows(lengths, T, B);
  const at::Tensor len = K::device_lengths(lengths, x);

  // Input projection of every step, both biases folded in; the steps turn it
  // into the activated gates in place.
  c10::optional<at::Tensor> bias;
  if (present(b_ih) || present(b_hh)) {
    bias = present(b_ih) && present(b_hh) ? *b_ih + *b_hh : (present(b_ih) ? *b_ih : *b_hh);
  }
  at::Tensor output = at::empty({T, B, P}, x.options());
  at::Tensor h = h0.clone(), c = c0.clone();
  at::Tensor cs = save ? at::empty({T, B, H}, x.options()) : none_like(x);
  at::Tensor hc = proj ? (save ? at::empty({T, B, H}, x.options()) : at::empty({1, B, H}, x.options())) : none_like(x);
  // The device may run the whole layer itself, input projections included (CPU float32, batch 5+).
  at::Tensor gates;
  if (!proj && K::lstm_forward_fused(x, w_ih, bias, w_hh, h, c, output, gates, cs, len, rows, save)) {
    return {output, h, c, save ? gates : none_like(x), cs, none_like(x)};
  }
  gates = K::linear(x.view({T * B, I}), w_ih, bias).view({T, B, 4 * H});
  const at::Tensor w_hh_step = T > 1 ? K::step_weight(w_hh, B) : at::Tensor();  // reordered for many steps
  for (int64_t t = 0; t < T; ++t) {
    at::Tensor pre = gates[t];
    // Rows past rows[t] have stopped: the step does not read their gh.
    const at::Tensor gh = rows[t] > 0 ? K::step_linear(h.narrow(0, 0, rows[t]), w_hh, w_hh_step, c10::nullopt) : at::Tensor();
    at::Tensor hc_t = proj ? hc[save ? t : 0] : at::Tensor();
    K::lstm_forward_step(pre, gh, c, proj ? at::Tensor() : h, proj ? at::Tensor() : output[t],
                         save ? cs[t] : at::Tensor(), hc_t, len, t);
    if (proj) {
      at::Tensor out_t = output[t];
      out_t.copy_(K::linear(hc_t, *w_hr, c10::nullopt));  // rows that stopped have hc = 0, so output 0
      K::copy_active_rows(h, out_t, len, t);
    }
  }
  return {output, h, c, save ? gates : none_like(x), cs, save ? hc : none_like(x)};
}

template <typename K>
std::vector<at::Tensor> lstm_backward(const at::Tensor& grad_output, const at::Tensor& grad_hn,
                                      const at::Tensor& grad_cn, const at::Tensor& x, const at::Tensor& h0,
                                      const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                      const c10::optional<at::Tensor>& w_hr, const c10::optional<at::Tensor>& lengths,
                                      const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cs,
                                      const at::Tensor& hc) {
  check_forward(x, h0, &c0, w_ih, w_hh, c10::nullopt, c10::nullopt, w_hr, lengths, 4);
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = w_hh.size(0) / 4, P = w_hh.size(1);
  const bool proj = present(w_hr);
  check_grad(grad_output, "grad_output", x, {T, B, P});
  check_grad(grad_hn, "grad_hn", x, {B, P});
  check_grad(grad_cn, "grad_cn", x, {B, H});
  check_grad(output, "output", x, {T, B, P});
  check_grad(gates, "gates", x, {T, B, 4 * H});
  check_grad(cs, "cs", x, {T, B, H});
  if (proj) check_grad(hc, "hc", x, {T, B, H});
  const std::vector<int64_t> rows = active_rows(lengths, T, B);
  const at::Tensor len = K::device_lengths(lengths, x);

  at::Tensor grad_pre = K::workspace(0, gates.sizes(), gates.options());  // internal: never returned
  at::Tensor dh = grad_hn.clone(), dc = grad_cn.clone();
  at::Tensor grad_h_all = proj ? at::empty({T, B, P}, x.options()) : none_like(x);  // dL/dh_t, for dw_hr
  const at::Tensor w_hr_t = proj ? w_hr->t().contiguous() : at::Tensor();
  const bool fused_loop = !proj && K::lstm_backward_fused(gates, cs, c0, grad_output, w_hh, dh, dc, grad_pre, len, rows);
  // One step: W_hh's transposed view (the GEMM takes it as it is), not a copy used once.
  const at::Tensor w_hh_t = fused_loop ? at::Tensor() : T == 1 ? w_hh.t() : transposed<K>(w_hh);
  const at::Tensor w_hh_t_step = fused_loop || T == 1 ? at::Tensor() : K::step_weight(w_hh_t, B);
  for (int64_t t = T - 1; t >= 0 && !fused_loop; --t) {
    K::add_active_rows(dh, grad_output[t], len, t);  // dh = dL/dh_t
    at::Tensor dhc = dh;
    if (proj) {
      grad_h_all[t].copy_(dh);
      dhc = K::linear(dh, w_hr_t, c10::nullopt);
    }
    at::Tensor gp = grad_pre[t];
    K::lstm_backward_step(gates[t], t > 0 ? cs[t - 1] : c0, cs[t], dhc, dc, gp, len, t);
    // dh_{t-1}: through W_hh for running rows, carried unchanged for stopped ones.
    if (!len.defined()) {
      dh = K::step_linear(gp, w_hh_t, w_hh_t_step, c10::nullopt);
    } else {
      K::zero_active_rows(dh, len, t);
      if (rows[t] > 0) {
        dh.narrow(0, 0, rows[t]).add_(K::step_linear(gp.narrow(0, 0, rows[t]), w_hh_t, w_hh_t_step, c10::nullopt));
      }
    }
  }
  if (T == 1 && !proj) {  // one step: see single_step_grads
    const at::Tensor gp = grad_pre[0];
    auto [dx, dw_ih, dw_hh] = single_step_grads<K>(gp, gp, x, h0, w_ih);
    return {dx, dh, dc, dw_ih, dw_hh, gp.sum(0), none_like(x)};
  }
  at::Tensor gp2 = grad_pre.view({T * B, 4 * H});
  at::Tensor dx, dw_t;
  if constexpr (K::kPacksRunningRows) {
    if (pack_running<K>(lengths, rows, B)) {  // PackedSequence: the running rows only (grad_pre is internal)
      gp2 = K::pack_running_rows(gp2, rows, B);
      dx = K::unpack_running_rows(K::matmul(gp2, w_ih), rows, B).view({T, B, I});
      dw_t = K::mm(K::running_inputs_transposed(x, h0, output, rows), gp2);
    }
  }
  if (!dx.defined()) {
    dx = K::matmul(gp2, w_ih).view({T, B, I});
    // [dw_ih | dw_hh]^T = [x | h_{t-1}]^T gp: one GEMM on inputs transposed once (h_{t-1} = output[t-1] while running).
    dw_t = K::mm(inputs_transposed<K>(x, h0, output), gp2);
  }
  at::Tensor dw_ih = transposed<K>(dw_t.narrow(0, 0, I)), dw_hh = transposed<K>(dw_t.narrow(0, I, P));
  at::Tensor db = gp2.sum(0);
  at::Tensor dw_hr = proj ? at::mm(grad_h_all.view({T * B, P}).t(), hc.view({T * B, H})) : none_like(x);
  return {dx, dh, dc, dw_ih, dw_hh, db, dw_hr};
}

// ---------------------------------------------------------------- GRU

template <typename K>
std::vector<at::Tensor> gru_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                                    const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& lengths,
                                    bool save) {
  check_forward(x, h0, nullptr, w_ih, w_hh, b_ih, b_hh, c10::nullopt, lengths, 3);
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = w_hh.size(1);
  const std::vector<int64_t> rows = active_rows(lengths, T, B);
  const at::Tensor len = K::device_lengths(lengths, x);

  at::Tensor output = at::empty({T, B, H}, x.options());
  at::Tensor h = h0.clone();
  // The device may run the whole layer itself, input projections included (CPU float32, batch 5+).
  at::Tensor gates;
  if (K::gru_forward_fused(x, w_ih, b_ih, w_hh, b_hh, h, output, gates, len, rows, save)) {
    return {output, h, save ? gates : none_like(x)};
  }
  const at::Tensor gi = K::linear(x.view({T * B, I}), w_ih, b_ih).view({T, B, 3 * H});
  gates = at::empty({save ? T : 1, B, 4 * H}, x.options());
  const at::Tensor w_hh_step = T > 1 ? K::step_weight(w_hh, B) : at::Tensor();  // reordered for many steps
  for (int64_t t = 0; t < T; ++t) {
    // Rows past rows[t] have stopped: the step does not read their gh.
    const at::Tensor gh = rows[t] > 0 ? K::step_linear(h.narrow(0, 0, rows[t]), w_hh, w_hh_step, b_hh) : at::Tensor();
    K::gru_forward_step(gi[t], gh, h, output[t], gates[save ? t : 0], len, t);
  }
  return {output, h, save ? gates : none_like(x)};
}

template <typename K>
std::vector<at::Tensor> gru_backward(const at::Tensor& grad_output, const at::Tensor& grad_hn, const at::Tensor& x,
                                     const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                     const c10::optional<at::Tensor>& lengths, const at::Tensor& output,
                                     const at::Tensor& gates) {
  check_forward(x, h0, nullptr, w_ih, w_hh, c10::nullopt, c10::nullopt, c10::nullopt, lengths, 3);
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = w_hh.size(1);
  check_grad(grad_output, "grad_output", x, {T, B, H});
  check_grad(grad_hn, "grad_hn", x, {B, H});
  check_grad(output, "output", x, {T, B, H});
  check_grad(gates, "gates", x, {T, B, 4 * H});
  const std::vector<int64_t> rows = active_rows(lengths, T, B);
  const at::Tensor len = K::device_lengths(lengths, x);

  at::Tensor dgi = at::empty({T, B, 3 * H}, x.options());
  at::Tensor dgh = at::empty({T, B, 3 * H}, x.options());
  at::Tensor dh = grad_hn.clone();
  const bool fused_loop = K::gru_backward_fused(gates, h0, output, grad_output, w_hh, dh, dgi, dgh, len, rows);
  // Blocked (K::transpose_into): ATen's transposing copy ran at ~1 GB/s on the CPU.
  // One step: W_hh's transposed view (the GEMM takes it as it is), not a copy used once.
  const at::Tensor w_hh_t = fused_loop ? at::Tensor() : T == 1 ? w_hh.t() : transposed<K>(w_hh);
  const at::Tensor w_hh_t_step = fused_loop || T == 1 ? at::Tensor() : K::step_weight(w_hh_t, B);
  for (int64_t t = T - 1; t >= 0 && !fused_loop; --t) {
    at::Tensor dgh_t = dgh[t];
    // Leaves in dh the part of dh_{t-1} through z (or all of it for stopped rows).
    K::gru_backward_step(gates[t], t > 0 ? output[t - 1] : h0, grad_output[t], dh, dgi[t], dgh_t, len, t);
    if (rows[t] > 0) {
      dh.narrow(0, 0, rows[t]).add_(K::step_linear(dgh_t.narrow(0, 0, rows[t]), w_hh_t, w_hh_t_step, c10::nullopt));
    }
  }
  if (T == 1) {  // one step: see single_step_grads
    auto [dx, dw_ih, dw_hh] = single_step_grads<K>(dgi[0], dgh[0], x, h0, w_ih);
    return {dx, dh, dw_ih, dw_hh, dgi[0].sum(0), dgh[0].sum(0)};
  }
  at::Tensor dgi2 = dgi.view({T * B, 3 * H}), dgh2 = dgh.view({T * B, 3 * H});
  at::Tensor dx, xh_t;
  if constexpr (K::kPacksRunningRows) {
    if (pack_running<K>(lengths, rows, B)) {  // PackedSequence: the running rows only (dgi, dgh are internal)
      dgi2 = K::pack_running_rows(dgi2, rows, B);
      dgh2 = K::pack_running_rows(dgh2, rows, B);
      dx = K::unpack_running_rows(K::matmul(dgi2, w_ih), rows, B).view({T, B, I});
      xh_t = K::running_inputs_transposed(x, h0, output, rows);
    }
  }
  if (!dx.defined()) {
    dx = K::matmul(dgi2, w_ih).view({T, B, I});
    xh_t = inputs_transposed<K>(x, h0, output);
  }
  at::Tensor dw_ih = transposed<K>(K::mm(xh_t.narrow(0, 0, I), dgi2));
  at::Tensor dw_hh = transposed<K>(K::mm(xh_t.narrow(0, I, H), dgh2));
  return {dx, dh, dw_ih, dw_hh, dgi2.sum(0), dgh2.sum(0)};
}

}  // namespace rnn
}  // namespace attnkit
