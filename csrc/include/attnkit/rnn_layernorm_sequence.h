// The layer-normalized LSTM / GRU time loops (attnkit/rnn_layernorm.h), shared by
// the CPU (csrc/cpu/rnn_layernorm.cpp) and CUDA (csrc/cuda/rnn_layernorm.cu) code,
// as attnkit/rnn_sequence.h is for the plain RNNs: the GEMMs, reductions and
// argument checks are ATen calls here; `Rows`, the device's part, supplies the
// per-row passes:
//
//   Rows::kDevice, Rows::kOp                    the device type and the name errors give
//   Rows::linear(a, w), matmul(a, w), mm_tn(a, b)  the whole-sequence GEMMs a w^T, a w, a^T b
//   Rows::ln_rows(v, rstd, stride)              v (R, n) normalized in place, 1/std to rstd[r * stride]
//   Rows::ln_rows_backward(d, vhat, rstd, stride)  d (R, n): gradient of LN's output -> of its input, in place
//   Rows::lstm_forward_step(LstmStep) / lstm_backward_step(LstmBackStep)
//   Rows::gru_forward_step(GruStep) / gru_backward_step(GruBackStep)
//
// One step's pass takes each running batch row through LN of its recurrent
// projection, the gate math of attnkit/gate_math.h, LN of c (LSTM) and the
// zoneout mix (forward), or back through them (backward); rows past their length
// are left alone. The same tensors are saved on both devices, so a forward on one
// and a backward on the other agree.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace attnkit {
namespace rnn_ln {

constexpr double kEps = 1e-5;  // torch.nn.LayerNorm's default

// One forward step's tensors (t: the step). Saved tensors are (T, B, ...), or undefined
// when not saving, with `scratch` (B, ...) holding the step's rows instead.
struct LstmStep {
  at::Tensor ah;                            // (B, G): W_hh h_{t-1}
  at::Tensor xhat, g_ih, g_hh, bias;        // (T, B, G) normalized input projections, (G) x 3
  at::Tensor g_c, be_c, zoneout;            // (H), (H), (T, B, H) or undefined
  at::Tensor h, c, output;                  // (B, H) x 2 updated in place, (T, B, H)
  at::Tensor hhat, gates, cs, chat, rstd;   // saved; rstd (T, B, 3) always
  at::Tensor scratch, len;                  // (B, 2G + 2H) without saving; int64 (B) on the device or undefined
  int64_t t;
};

struct LstmBackStep {
  at::Tensor grad_output, gates, cs, chat, hhat, c0, rstd, zoneout;  // as saved by the forward
  at::Tensor g_hh, g_c, be_c;
  at::Tensor dh, dc;           // (B, H): carried gradients, updated in place
  at::Tensor dpre, dah, dlc;   // (T, B, G), (T, B, G), (T, B, H): this step's rows written
  at::Tensor scratch, len;     // (B, H) for the rows' LN_c gradients
  int64_t t;
};

struct GruStep {
  at::Tensor ah, xhat, g_ih, g_hh, bias_i, bias_h, zoneout;
  at::Tensor h, output;
  at::Tensor hhat, gates, rstd;  // gates (T, B, 4H): r, z, n, hn; rstd (T, B, 2)
  at::Tensor scratch, len;       // (B, G + 4H) without saving
  int64_t t;
};

struct GruBackStep {
  at::Tensor grad_output, gates, output, h0, hhat, rstd, zoneout, g_hh;
  at::Tensor dh;             // (B, H), in place
  at::Tensor dgi, dgh, dah;  // (T, B, G) each: this step's rows written
  at::Tensor len;
  int64_t t;
};

// --------------------------------------------------------------------------- argument checks

template <typename Rows>
void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& like, at::IntArrayRef sizes) {
  TORCH_CHECK(t.defined(), Rows::kOp, ": ", name, " is undefined");
  TORCH_CHECK(t.device() == like.device(), Rows::kOp, ": ", name, " is on ", t.device(), " but x is on ", like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), Rows::kOp, ": ", name, " has dtype ", t.scalar_type(),
              ", expected ", like.scalar_type());
  TORCH_CHECK(t.sizes() == sizes, Rows::kOp, ": ", name, " must have shape ", sizes, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), Rows::kOp, ": ", name, " must be contiguous");
}

template <typename Rows>
void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.defined() && x.device().type() == Rows::kDevice, Rows::kOp, ": x must be a ",
              c10::DeviceTypeName(Rows::kDevice), " tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, Rows::kOp,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 3 && x.size(0) >= 1, Rows::kOp, ": x must be (T, B, I) with T >= 1, got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), Rows::kOp, ": x must be contiguous");
}

// Shared checks; returns H from w_hh (gates * H rows).
template <typename Rows>
int64_t check_common(const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh, int64_t gates,
                     const c10::optional<at::Tensor>& lengths, const c10::optional<at::Tensor>& zoneout) {
  check_x<Rows>(x);
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2);
  TORCH_CHECK(w_hh.defined() && w_hh.dim() == 2 && w_hh.size(0) % gates == 0 && w_hh.size(0) > 0, Rows::kOp,
              ": w_hh must be (", gates, "*H, H), got ", w_hh.sizes());
  const int64_t H = w_hh.size(0) / gates;
  check_tensor<Rows>(w_hh, "w_hh", x, {gates * H, H});
  check_tensor<Rows>(w_ih, "w_ih", x, {gates * H, I});
  if (lengths.has_value() && lengths->defined()) {
    const at::Tensor& len = *lengths;
    TORCH_CHECK(len.device().is_cpu() && len.scalar_type() == at::kLong && len.dim() == 1 && len.size(0) == B &&
                    len.is_contiguous(),
                Rows::kOp, ": lengths must be a contiguous int64 CPU tensor of shape (", B, ")");
    const int64_t* p = len.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(p[b] >= 0 && p[b] <= T, Rows::kOp, ": lengths[", b, "] = ", p[b], " is outside [0, ", T, "]");
    }
  }
  if (zoneout.has_value() && zoneout->defined()) check_tensor<Rows>(*zoneout, "zoneout", x, {T, B, H});
  return H;
}

template <typename Rows>
void check_vector(const at::Tensor& v, const char* name, const at::Tensor& x, int64_t n) {
  check_tensor<Rows>(v, name, x, {n});
}

template <typename Rows>
void check_bias(const c10::optional<at::Tensor>& b, const char* name, const at::Tensor& x, int64_t n) {
  if (b.has_value() && b->defined()) check_vector<Rows>(*b, name, x, n);
}

// --------------------------------------------------------------------------- shared pieces

inline at::Tensor defined_or_none(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? *t : at::Tensor();
}

// t's data, or null where t is undefined (zoneout, lengths, the saved tensors of a forward
// that keeps none), for the devices' row passes; data_ptr checks the dtype.
template <typename T>
T* data_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// The lengths where the kernels read them: on x's device (int64), or undefined.
inline at::Tensor kernel_lengths(const c10::optional<at::Tensor>& lengths, const at::Tensor& x) {
  return lengths.has_value() && lengths->defined() ? lengths->to(x.device()) : at::Tensor();
}

// x (T, B, I) @ w_ih^T, normalized row by row; 1/std into rstd[row * stride].
template <typename Rows>
at::Tensor input_projection_ln(const at::Tensor& x, const at::Tensor& w_ih, at::Tensor& rstd, int64_t stride) {
  const int64_t T = x.size(0), B = x.size(1), G = w_ih.size(0);
  at::Tensor xhat = Rows::linear(x.view({T * B, x.size(2)}), w_ih);
  Rows::ln_rows(xhat, rstd, stride);
  return xhat.view({T, B, G});
}

// Input side of the backward: with dpre (T, B, G) the gradients of gamma*xhat + beta,
// returns {dx, dw_ih, dgamma}; beta's gradient is dpre summed by the caller.
template <typename Rows>
std::vector<at::Tensor> input_projection_backward(const at::Tensor& dpre, const at::Tensor& x, const at::Tensor& w_ih,
                                                  const at::Tensor& g_ih, const at::Tensor& xhat,
                                                  const at::Tensor& rstd, int64_t stride) {
  const int64_t T = x.size(0), B = x.size(1), G = w_ih.size(0);
  at::Tensor dgamma = (dpre * xhat).sum(at::IntArrayRef{0, 1});
  at::Tensor dax = (dpre * g_ih).contiguous().view({T * B, G});
  Rows::ln_rows_backward(dax, xhat.view({T * B, G}), rstd, stride);
  return {Rows::matmul(dax, w_ih).view({T, B, x.size(2)}), Rows::mm_tn(dax, x.view({T * B, x.size(2)})), dgamma};
}

// h_{t-1} for every step (T, B, H): h0, then the outputs. For a row running at
// step t the output at t-1 is its state; rows not running get zero gradients.
inline at::Tensor previous_states(const at::Tensor& h0, const at::Tensor& output) {
  return at::cat({h0.unsqueeze(0), output.narrow(0, 0, output.size(0) - 1)}, 0);
}

inline at::Tensor bias_sum(const c10::optional<at::Tensor>& a, const c10::optional<at::Tensor>& b,
                           const at::Tensor& like) {
  at::Tensor sum = at::zeros_like(like);
  if (a.has_value() && a->defined()) sum += *a;
  if (b.has_value() && b->defined()) sum += *b;
  return sum;
}

inline at::Tensor saved_or_empty(bool save, at::IntArrayRef sizes, const at::Tensor& like) {
  return save ? at::zeros(sizes, like.options()) : at::Tensor();
}

// Outputs of a forward run without `save`: `kept`, then `empties` distinct empty
// tensors (outputs of a custom op may not alias each other).
inline std::vector<at::Tensor> without_saved(std::vector<at::Tensor> kept, int empties, const at::Tensor& x) {
  for (int k = 0; k < empties; ++k) kept.push_back(at::empty({0}, x.options()));
  return kept;
}

// =========================================================================== LSTM

template <typename Rows>
std::vector<at::Tensor> lstm_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                     const at::Tensor& w_ih, const at::Tensor& w_hh,
                                     const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
                                     const at::Tensor& g_ih, const at::Tensor& be_ih, const at::Tensor& g_hh,
                                     const at::Tensor& be_hh, const at::Tensor& g_c, const at::Tensor& be_c,
                                     const c10::optional<at::Tensor>& lengths,
                                     const c10::optional<at::Tensor>& zoneout, bool save) {
  const int64_t H = check_common<Rows>(x, w_ih, w_hh, 4, lengths, zoneout);
  const int64_t T = x.size(0), B = x.size(1), G = 4 * H;
  check_tensor<Rows>(h0, "h0", x, {B, H});
  check_tensor<Rows>(c0, "c0", x, {B, H});
  check_bias<Rows>(b_ih, "b_ih", x, G);
  check_bias<Rows>(b_hh, "b_hh", x, G);
  check_vector<Rows>(g_ih, "g_ih", x, G);
  check_vector<Rows>(be_ih, "be_ih", x, G);
  check_vector<Rows>(g_hh, "g_hh", x, G);
  check_vector<Rows>(be_hh, "be_hh", x, G);
  check_vector<Rows>(g_c, "g_c", x, H);
  check_vector<Rows>(be_c, "be_c", x, H);

  LstmStep s;
  s.rstd = at::zeros({T, B, 3}, x.options());
  s.xhat = input_projection_ln<Rows>(x, w_ih, s.rstd, 3);
  // The per-step input part gamma*xhat + beta + biases is added in the fused pass.
  s.bias = (bias_sum(b_ih, b_hh, g_ih) + be_ih + be_hh).contiguous();
  s.g_ih = g_ih, s.g_hh = g_hh, s.g_c = g_c, s.be_c = be_c, s.zoneout = defined_or_none(zoneout);
  s.output = at::zeros({T, B, H}, x.options());
  s.h = h0.clone(), s.c = c0.clone();
  s.hhat = saved_or_empty(save, {T, B, G}, x), s.gates = saved_or_empty(save, {T, B, G}, x);
  s.cs = saved_or_empty(save, {T, B, H}, x), s.chat = saved_or_empty(save, {T, B, H}, x);
  // Without save, one step's worth of scratch rows is reused.
  s.scratch = save ? at::Tensor() : at::empty({B, 2 * G + 2 * H}, x.options());
  s.len = kernel_lengths(lengths, x);
  for (int64_t t = 0; t < T; ++t) {
    s.t = t;
    s.ah = at::mm(s.h, w_hh.t());  // (B, G), from the state before this step
    Rows::lstm_forward_step(s);
  }
  if (!save) return without_saved({s.output, s.h, s.c}, 6, x);
  return {s.output, s.h, s.c, s.xhat, s.hhat, s.gates, s.cs, s.chat, s.rstd};
}

template <typename Rows>
std::vector<at::Tensor> lstm_backward(const at::Tensor& grad_output, const at::Tensor& grad_hn,
                                      const at::Tensor& grad_cn, const at::Tensor& x, const at::Tensor& h0,
                                      const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                      const at::Tensor& g_ih, const at::Tensor& g_hh, const at::Tensor& g_c,
                                      const at::Tensor& be_c, const c10::optional<at::Tensor>& lengths,
                                      const c10::optional<at::Tensor>& zoneout, const at::Tensor& output,
                                      const at::Tensor& xhat, const at::Tensor& hhat, const at::Tensor& gates,
                                      const at::Tensor& cs, const at::Tensor& chat, const at::Tensor& rstd) {
  const int64_t H = check_common<Rows>(x, w_ih, w_hh, 4, lengths, zoneout);
  const int64_t T = x.size(0), B = x.size(1), G = 4 * H;
  check_tensor<Rows>(h0, "h0", x, {B, H});
  check_tensor<Rows>(c0, "c0", x, {B, H});
  check_tensor<Rows>(grad_output, "grad_output", x, {T, B, H});
  check_tensor<Rows>(grad_hn, "grad_hn", x, {B, H});
  check_tensor<Rows>(grad_cn, "grad_cn", x, {B, H});
  check_vector<Rows>(g_ih, "g_ih", x, G);
  check_vector<Rows>(g_hh, "g_hh", x, G);
  check_vector<Rows>(g_c, "g_c", x, H);
  check_vector<Rows>(be_c, "be_c", x, H);
  check_tensor<Rows>(output, "output", x, {T, B, H});
  check_tensor<Rows>(xhat, "xhat (saved; was the forward run with save=false?)", x, {T, B, G});
  check_tensor<Rows>(hhat, "hhat", x, {T, B, G});
  check_tensor<Rows>(gates, "gates", x, {T, B, G});
  check_tensor<Rows>(cs, "cs", x, {T, B, H});
  check_tensor<Rows>(chat, "chat", x, {T, B, H});
  check_tensor<Rows>(rstd, "rstd", x, {T, B, 3});

  LstmBackStep s;
  s.grad_output = grad_output, s.gates = gates, s.cs = cs, s.chat = chat, s.hhat = hhat, s.c0 = c0, s.rstd = rstd;
  s.zoneout = defined_or_none(zoneout), s.g_hh = g_hh, s.g_c = g_c, s.be_c = be_c;
  s.dh = grad_hn.clone(), s.dc = grad_cn.clone();
  s.dpre = at::zeros({T, B, G}, x.options());  // gradient of the summed pre-activations
  s.dah = at::zeros({T, B, G}, x.options());   // gradient of W_hh h before its LN
  s.dlc = at::zeros({T, B, H}, x.options());   // gradient of LN_c's output
  s.scratch = at::empty({B, H}, x.options());
  s.len = kernel_lengths(lengths, x);
  for (int64_t t = T - 1; t >= 0; --t) {
    s.t = t;
    Rows::lstm_backward_step(s);
    s.dh.addmm_(s.dah[t], w_hh);
  }

  const at::Tensor hprev = previous_states(h0, output);
  at::Tensor dw_hh = Rows::mm_tn(s.dah.view({T * B, G}), hprev.view({T * B, H}));
  std::vector<at::Tensor> in = input_projection_backward<Rows>(s.dpre, x, w_ih, g_ih, xhat, rstd, 3);
  at::Tensor db = s.dpre.sum(at::IntArrayRef{0, 1});
  at::Tensor dg_hh = (s.dpre * hhat).sum(at::IntArrayRef{0, 1});
  at::Tensor dg_c = (s.dlc * chat).sum(at::IntArrayRef{0, 1});
  at::Tensor dbe_c = s.dlc.sum(at::IntArrayRef{0, 1});
  return {in[0], s.dh, s.dc, in[1], dw_hh, db, in[2], dg_hh, dg_c, dbe_c};
}

// =========================================================================== GRU

template <typename Rows>
std::vector<at::Tensor> gru_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                    const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                                    const c10::optional<at::Tensor>& b_hh, const at::Tensor& g_ih,
                                    const at::Tensor& be_ih, const at::Tensor& g_hh, const at::Tensor& be_hh,
                                    const c10::optional<at::Tensor>& lengths,
                                    const c10::optional<at::Tensor>& zoneout, bool save) {
  const int64_t H = check_common<Rows>(x, w_ih, w_hh, 3, lengths, zoneout);
  const int64_t T = x.size(0), B = x.size(1), G = 3 * H;
  check_tensor<Rows>(h0, "h0", x, {B, H});
  check_bias<Rows>(b_ih, "b_ih", x, G);
  check_bias<Rows>(b_hh, "b_hh", x, G);
  check_vector<Rows>(g_ih, "g_ih", x, G);
  check_vector<Rows>(be_ih, "be_ih", x, G);
  check_vector<Rows>(g_hh, "g_hh", x, G);
  check_vector<Rows>(be_hh, "be_hh", x, G);

  GruStep s;
  s.rstd = at::zeros({T, B, 2}, x.options());
  s.xhat = input_projection_ln<Rows>(x, w_ih, s.rstd, 2);
  s.bias_i = (bias_sum(b_ih, c10::nullopt, g_ih) + be_ih).contiguous();
  s.bias_h = (bias_sum(b_hh, c10::nullopt, g_hh) + be_hh).contiguous();
  s.g_ih = g_ih, s.g_hh = g_hh, s.zoneout = defined_or_none(zoneout);
  s.output = at::zeros({T, B, H}, x.options());
  s.h = h0.clone();
  s.hhat = saved_or_empty(save, {T, B, G}, x), s.gates = saved_or_empty(save, {T, B, 4 * H}, x);
  s.scratch = save ? at::Tensor() : at::empty({B, G + 4 * H}, x.options());
  s.len = kernel_lengths(lengths, x);
  for (int64_t t = 0; t < T; ++t) {
    s.t = t;
    s.ah = at::mm(s.h, w_hh.t());
    Rows::gru_forward_step(s);
  }
  if (!save) return without_saved({s.output, s.h}, 4, x);
  return {s.output, s.h, s.xhat, s.hhat, s.gates, s.rstd};
}

template <typename Rows>
std::vector<at::Tensor> gru_backward(const at::Tensor& grad_output, const at::Tensor& grad_hn, const at::Tensor& x,
                                     const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                     const at::Tensor& g_ih, const at::Tensor& g_hh,
                                     const c10::optional<at::Tensor>& lengths,
                                     const c10::optional<at::Tensor>& zoneout, const at::Tensor& output,
                                     const at::Tensor& xhat, const at::Tensor& hhat, const at::Tensor& gates,
                                     const at::Tensor& rstd) {
  const int64_t H = check_common<Rows>(x, w_ih, w_hh, 3, lengths, zoneout);
  const int64_t T = x.size(0), B = x.size(1), G = 3 * H;
  check_tensor<Rows>(h0, "h0", x, {B, H});
  check_tensor<Rows>(grad_output, "grad_output", x, {T, B, H});
  check_tensor<Rows>(grad_hn, "grad_hn", x, {B, H});
  check_vector<Rows>(g_ih, "g_ih", x, G);
  check_vector<Rows>(g_hh, "g_hh", x, G);
  check_tensor<Rows>(output, "output", x, {T, B, H});
  check_tensor<Rows>(xhat, "xhat (saved; was the forward run with save=false?)", x, {T, B, G});
  check_tensor<Rows>(hhat, "hhat", x, {T, B, G});
  check_tensor<Rows>(gates, "gates", x, {T, B, 4 * H});
  check_tensor<Rows>(rstd, "rstd", x, {T, B, 2});

  GruBackStep s;
  s.grad_output = grad_output, s.gates = gates, s.output = output, s.h0 = h0, s.hhat = hhat, s.rstd = rstd;
  s.zoneout = defined_or_none(zoneout), s.g_hh = g_hh;
  s.dh = grad_hn.clone();
  s.dgi = at::zeros({T, B, G}, x.options());  // gradients of the input-side gate terms
  s.dgh = at::zeros({T, B, G}, x.options());  // ... of the hidden-side ones (after LN)
  s.dah = at::zeros({T, B, G}, x.options());  // ... of W_hh h before its LN
  s.len = kernel_lengths(lengths, x);
  for (int64_t t = T - 1; t >= 0; --t) {
    s.t = t;
    Rows::gru_backward_step(s);
    s.dh.addmm_(s.dah[t], w_hh);
  }

  const at::Tensor hprev = previous_states(h0, output);
  at::Tensor dw_hh = Rows::mm_tn(s.dah.view({T * B, G}), hprev.view({T * B, H}));
  std::vector<at::Tensor> in = input_projection_backward<Rows>(s.dgi, x, w_ih, g_ih, xhat, rstd, 2);
  return {in[0], s.dh, in[1], dw_hh, s.dgi.sum(at::IntArrayRef{0, 1}), s.dgh.sum(at::IntArrayRef{0, 1}), in[2],
          (s.dgh * hhat).sum(at::IntArrayRef{0, 1})};
}

}  // namespace rnn_ln
}  // namespace attnkit
