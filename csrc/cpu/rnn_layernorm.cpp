// Layer-normalized LSTM / GRU with zoneout on the CPU (see attnkit/rnn_layernorm.h).
//
// Forward: one GEMM for the input projection of every step and one LN pass
// over its (T*B, G) rows; per step one GEMM on W_hh, then one fused pass per
// batch row: LN of the recurrent projection, the sum with the input part and
// biases, the gate math of attnkit/gate_math.h, LN of c (LSTM) and the
// zoneout mix. Backward walks time in reverse with the LN gradients fused the
// same way, keeping the per-step gate gradients; the weight, gamma and beta
// gradients and the input side are whole-sequence GEMMs and reductions at the
// end. Saved: the normalized values and each LN's 1/std per row.
// float32 and float64 (gradcheck); rows in parallel with at::parallel_for.
#include "attnkit/rnn_layernorm.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "attnkit/gate_math.h"

namespace attnkit {
namespace cpu {
namespace {

constexpr double kEps = 1e-5;  // torch.nn.LayerNorm's default

// --------------------------------------------------------------------------- argument checks

const char* kOp = "attnkit._C layer-norm rnn";

void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& like, at::IntArrayRef sizes) {
  TORCH_CHECK(t.defined(), kOp, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), kOp, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), kOp, ": ", name, " has dtype ", t.scalar_type(), ", expected ",
              like.scalar_type());
  TORCH_CHECK(t.sizes() == sizes, kOp, ": ", name, " must have shape ", sizes, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), kOp, ": ", name, " must be contiguous");
}

void check_x(const at::Tensor& x) {
  TORCH_CHECK(x.defined() && x.device().is_cpu(), kOp, ": x must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, kOp,
              ": x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 3 && x.size(0) >= 1, kOp, ": x must be (T, B, I) with T >= 1, got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), kOp, ": x must be contiguous");
}

// Shared checks; returns H from w_hh (gates * H rows).
int64_t check_common(const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& w_hh, int64_t gates,
                     const c10::optional<at::Tensor>& lengths, const c10::optional<at::Tensor>& zoneout) {
  check_x(x);
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2);
  TORCH_CHECK(w_hh.defined() && w_hh.dim() == 2 && w_hh.size(0) % gates == 0 && w_hh.size(0) > 0, kOp,
              ": w_hh must be (", gates, "*H, H), got ", w_hh.sizes());
  const int64_t H = w_hh.size(0) / gates;
  check_tensor(w_hh, "w_hh", x, {gates * H, H});
  check_tensor(w_ih, "w_ih", x, {gates * H, I});
  if (lengths.has_value() && lengths->defined()) {
    const at::Tensor& len = *lengths;
    TORCH_CHECK(len.device().is_cpu() && len.scalar_type() == at::kLong && len.dim() == 1 && len.size(0) == B &&
                    len.is_contiguous(),
                kOp, ": lengths must be a contiguous int64 CPU tensor of shape (", B, ")");
    const int64_t* p = len.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(p[b] >= 0 && p[b] <= T, kOp, ": lengths[", b, "] = ", p[b], " is outside [0, ", T, "]");
    }
  }
  if (zoneout.has_value() && zoneout->defined()) check_tensor(*zoneout, "zoneout", x, {T, B, H});
  return H;
}

void check_vector(const at::Tensor& v, const char* name, const at::Tensor& x, int64_t n) {
  check_tensor(v, name, x, {n});
}

void check_bias(const c10::optional<at::Tensor>& b, const char* name, const at::Tensor& x, int64_t n) {
  if (b.has_value() && b->defined()) check_vector(*b, name, x, n);
}

const int64_t* lengths_ptr(const c10::optional<at::Tensor>& lengths) {
  return lengths.has_value() && lengths->defined() ? lengths->data_ptr<int64_t>() : nullptr;
}

template <typename scalar_t>
const scalar_t* opt_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<scalar_t>() : nullptr;
}

inline bool active(const int64_t* len, int64_t b, int64_t t) { return len == nullptr || t < len[b]; }

int64_t grain(int64_t width) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(1, width)); }

// float rows run 8 units at a time as gates::vfloat8 through the same gate-math
// templates (the tail and double unit by unit), as csrc/cpu/rnn_rows.h does.
#pragma GCC diagnostic ignored "-Wpsabi"

#include "rnn_units.h"

// --------------------------------------------------------------------------- row layer norm

// v (n) -> v_hat (may alias v); returns 1/std. Two passes in double: a row of
// equal values gives v_hat = 0 and rstd = 1/sqrt(eps), finite.
template <typename scalar_t>
scalar_t ln_row(const scalar_t* v, scalar_t* v_hat, int64_t n) {
  double mean = 0;
  for (int64_t k = 0; k < n; ++k) mean += v[k];
  mean /= n;
  double var = 0;
  for (int64_t k = 0; k < n; ++k) var += (v[k] - mean) * (v[k] - mean);
  const double rstd = 1.0 / std::sqrt(var / n + kEps);
  for (int64_t k = 0; k < n; ++k) v_hat[k] = static_cast<scalar_t>((v[k] - mean) * rstd);
  return static_cast<scalar_t>(rstd);
}

// Gradient of the LN input from d(v_hat) (= grad of the LN output * gamma):
// dv = rstd * (dvh - mean(dvh) - v_hat * mean(dvh * v_hat)). dv may alias dvh.
template <typename scalar_t>
void ln_row_backward(const scalar_t* dvh, const scalar_t* v_hat, scalar_t rstd, scalar_t* dv, int64_t n) {
  double s = 0, sv = 0;
  for (int64_t k = 0; k < n; ++k) {
    s += dvh[k];
    sv += dvh[k] * v_hat[k];
  }
  const double m = s / n, mv = sv / n;
  for (int64_t k = 0; k < n; ++k) dv[k] = static_cast<scalar_t>(rstd * (dvh[k] - m - v_hat[k] * mv));
}

// x (T, B, I) @ w_ih^T, normalized row by row in place; rstd into rstd[row * stride].
template <typename scalar_t>
at::Tensor input_projection_ln(const at::Tensor& x, const at::Tensor& w_ih, at::Tensor& rstd, int64_t stride) {
  const int64_t T = x.size(0), B = x.size(1), G = w_ih.size(0);
  at::Tensor xhat = at::mm(x.view({T * B, x.size(2)}), w_ih.t()).view({T, B, G});
  scalar_t* p = xhat.data_ptr<scalar_t>();
  scalar_t* r = rstd.data_ptr<scalar_t>();
  at::parallel_for(0, T * B, grain(G), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) r[row * stride] = ln_row(p + row * G, p + row * G, G);
  });
  return xhat;
}

// Input side of the backward: with dpre (T, B, G) the gradients of gamma*xhat + beta,
// returns {dx, dw_ih, dgamma}; beta's gradient is dpre summed by the caller.
template <typename scalar_t>
std::vector<at::Tensor> input_projection_backward(const at::Tensor& dpre, const at::Tensor& x, const at::Tensor& w_ih,
                                                  const at::Tensor& g_ih, const at::Tensor& xhat,
                                                  const at::Tensor& rstd, int64_t stride) {
  const int64_t T = x.size(0), B = x.size(1), G = w_ih.size(0);
  at::Tensor dgamma = (dpre * xhat).sum(at::IntArrayRef{0, 1});
  at::Tensor dax = (dpre * g_ih).contiguous();
  scalar_t* d = dax.data_ptr<scalar_t>();
  const scalar_t* xh = xhat.data_ptr<scalar_t>();
  const scalar_t* r = rstd.data_ptr<scalar_t>();
  at::parallel_for(0, T * B, grain(G), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) ln_row_backward(d + row * G, xh + row * G, r[row * stride], d + row * G, G);
  });
  const at::Tensor dax2 = dax.view({T * B, G});
  return {at::mm(dax2, w_ih).view({T, B, x.size(2)}), at::mm(dax2.t(), x.view({T * B, x.size(2)})), dgamma};
}

// h_{t-1} for every step (T, B, H): h0, then the outputs. For a row running at
// step t the output at t-1 is its state; rows not running get zero gradients.
at::Tensor previous_states(const at::Tensor& h0, const at::Tensor& output) {
  return at::cat({h0.unsqueeze(0), output.narrow(0, 0, output.size(0) - 1)}, 0);
}

at::Tensor bias_sum(const c10::optional<at::Tensor>& a, const c10::optional<at::Tensor>& b, const at::Tensor& like) {
  at::Tensor sum = at::zeros_like(like);
  if (a.has_value() && a->defined()) sum += *a;
  if (b.has_value() && b->defined()) sum += *b;
  return sum;
}

at::Tensor saved_or_empty(bool save, at::IntArrayRef sizes, const at::Tensor& like) {
  return save ? at::zeros(sizes, like.options()) : at::empty({0}, like.options());
}

}  // namespace

// =========================================================================== LSTM

std::vector<at::Tensor> ln_lstm_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                        const at::Tensor& w_ih, const at::Tensor& w_hh,
                                        const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
                                        const at::Tensor& g_ih, const at::Tensor& be_ih, const at::Tensor& g_hh,
                                        const at::Tensor& be_hh, const at::Tensor& g_c, const at::Tensor& be_c,
                                        const c10::optional<at::Tensor>& lengths,
                                        const c10::optional<at::Tensor>& zoneout, bool save) {
  const int64_t H = check_common(x, w_ih, w_hh, 4, lengths, zoneout);
  const int64_t T = x.size(0), B = x.size(1), G = 4 * H;
  check_tensor(h0, "h0", x, {B, H});
  check_tensor(c0, "c0", x, {B, H});
  check_bias(b_ih, "b_ih", x, G);
  check_bias(b_hh, "b_hh", x, G);
  check_vector(g_ih, "g_ih", x, G);
  check_vector(be_ih, "be_ih", x, G);
  check_vector(g_hh, "g_hh", x, G);
  check_vector(be_hh, "be_hh", x, G);
  check_vector(g_c, "g_c", x, H);
  check_vector(be_c, "be_c", x, H);

  at::Tensor rstd = at::zeros({T, B, 3}, x.options());
  at::Tensor xhat;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ln_lstm_xproj", [&] { xhat = input_projection_ln<scalar_t>(x, w_ih, rstd, 3); });
  // The per-step input part gamma*xhat + beta + biases is added in the fused pass.
  const at::Tensor bias = (bias_sum(b_ih, b_hh, g_ih) + be_ih + be_hh).contiguous();
  at::Tensor output = at::zeros({T, B, H}, x.options());
  at::Tensor h = h0.clone(), c = c0.clone();
  at::Tensor hhat = saved_or_empty(save, {T, B, G}, x), gates = saved_or_empty(save, {T, B, G}, x);
  at::Tensor cs = saved_or_empty(save, {T, B, H}, x), chat = saved_or_empty(save, {T, B, H}, x);
  // Without save, one step's worth of scratch rows is reused.
  at::Tensor scratch = save ? at::Tensor() : at::empty({B, 2 * G + 2 * H}, x.options());
  const int64_t* len = lengths_ptr(lengths);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ln_lstm_forward", [&] {
    const scalar_t *gi = g_ih.data_ptr<scalar_t>(), *gh = g_hh.data_ptr<scalar_t>();
    const scalar_t *gc = g_c.data_ptr<scalar_t>(), *bc = be_c.data_ptr<scalar_t>(), *bs = bias.data_ptr<scalar_t>();
    const scalar_t* zo = opt_ptr<scalar_t>(zoneout);
    const scalar_t* xh = xhat.data_ptr<scalar_t>();
    scalar_t *hp = h.data_ptr<scalar_t>(), *cp = c.data_ptr<scalar_t>(), *out = output.data_ptr<scalar_t>();
    scalar_t* r = rstd.data_ptr<scalar_t>();
    for (int64_t t = 0; t < T; ++t) {
      at::Tensor ah = at::mm(h, w_hh.t());  // (B, G), from the state before this step
      scalar_t* ahp = ah.data_ptr<scalar_t>();
      at::parallel_for(0, B, grain(G), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          if (!active(len, b, t)) continue;  // state kept, output stays 0
          const int64_t row = t * B + b;
          scalar_t* sc = save ? nullptr : scratch.data_ptr<scalar_t>() + b * (2 * G + 2 * H);
          scalar_t* hh = save ? hhat.data_ptr<scalar_t>() + row * G : sc;
          scalar_t* ga = save ? gates.data_ptr<scalar_t>() + row * G : sc + G;
          scalar_t* cn = save ? cs.data_ptr<scalar_t>() + row * H : sc + 2 * G;
          scalar_t* ch = save ? chat.data_ptr<scalar_t>() + row * H : sc + 2 * G + H;
          r[row * 3 + 1] = ln_row(ahp + b * G, hh, G);
          const scalar_t* xr = xh + row * G;
          for_units<scalar_t>(H, [&](auto lanes, int64_t j) {
            using V = decltype(lanes);
            V pre[4];
            for (int q = 0; q < 4; ++q) {
              const int64_t k = q * H + j;
              pre[q] = ld<V>(gi + k) * ld<V>(xr + k) + ld<V>(gh + k) * ld<V>(hh + k) + ld<V>(bs + k);
            }
            const auto a = gates::lstm_activate<V>(pre[0], pre[1], pre[2], pre[3]);
            st(ga + j, a.i), st(ga + H + j, a.f), st(ga + 2 * H + j, a.g), st(ga + 3 * H + j, a.o);
            st(cn + j, gates::lstm_cell_state<V>(a, ld<V>(cp + b * H + j)));
          });
          r[row * 3 + 2] = ln_row(cn, ch, H);
          const scalar_t* m = zo ? zo + row * H : nullptr;
          for_units<scalar_t>(H, [&](auto lanes, int64_t j) {
            using V = decltype(lanes);
            const gates::LstmGates<V> a{ld<V>(ga + j), ld<V>(ga + H + j), ld<V>(ga + 2 * H + j), ld<V>(ga + 3 * H + j)};
            const V h_new = gates::lstm_hidden_state<V>(a, ld<V>(gc + j) * ld<V>(ch + j) + ld<V>(bc + j));
            V hs = ld<V>(hp + b * H + j);
            if (m) {
              const V mj = ld<V>(m + j);
              hs = mj * hs + (1.0f - mj) * h_new;
            } else {
              hs = h_new;
            }
            st(hp + b * H + j, hs);
            st(cp + b * H + j, ld<V>(cn + j));
            st(out + row * H + j, hs);
          });
        }
      });
    }
  });
  if (!save) {  // distinct empties: outputs of a custom op may not alias each other
    std::vector<at::Tensor> out{output, h, c};
    for (int k = 0; k < 6; ++k) out.push_back(at::empty({0}, x.options()));
    return out;
  }
  return {output, h, c, xhat, hhat, gates, cs, chat, rstd};
}

std::vector<at::Tensor> ln_lstm_backward(const at::Tensor& grad_output, const at::Tensor& grad_hn,
                                         const at::Tensor& grad_cn, const at::Tensor& x, const at::Tensor& h0,
                                         const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                         const at::Tensor& g_ih, const at::Tensor& g_hh, const at::Tensor& g_c,
                                         const at::Tensor& be_c, const c10::optional<at::Tensor>& lengths,
                                         const c10::optional<at::Tensor>& zoneout, const at::Tensor& output,
                                         const at::Tensor& xhat, const at::Tensor& hhat, const at::Tensor& gates,
                                         const at::Tensor& cs, const at::Tensor& chat, const at::Tensor& rstd) {
  const int64_t H = check_common(x, w_ih, w_hh, 4, lengths, zoneout);
  const int64_t T = x.size(0), B = x.size(1), G = 4 * H;
  check_tensor(h0, "h0", x, {B, H});
  check_tensor(c0, "c0", x, {B, H});
  check_tensor(grad_output, "grad_output", x, {T, B, H});
  check_tensor(grad_hn, "grad_hn", x, {B, H});
  check_tensor(grad_cn, "grad_cn", x, {B, H});
  check_vector(g_ih, "g_ih", x, G);
  check_vector(g_hh, "g_hh", x, G);
  check_vector(g_c, "g_c", x, H);
  check_vector(be_c, "be_c", x, H);
  check_tensor(output, "output", x, {T, B, H});
  check_tensor(xhat, "xhat (saved; was the forward run with save=false?)", x, {T, B, G});
  check_tensor(hhat, "hhat", x, {T, B, G});
  check_tensor(gates, "gates", x, {T, B, G});
  check_tensor(cs, "cs", x, {T, B, H});
  check_tensor(chat, "chat", x, {T, B, H});
  check_tensor(rstd, "rstd", x, {T, B, 3});

  at::Tensor dh = grad_hn.clone(), dc = grad_cn.clone();
  at::Tensor dpre = at::zeros({T, B, G}, x.options());  // gradient of the summed pre-activations
  at::Tensor dah = at::zeros({T, B, G}, x.options());   // gradient of W_hh h before its LN
  at::Tensor dlc = at::zeros({T, B, H}, x.options());   // gradient of LN_c's output
  const int64_t* len = lengths_ptr(lengths);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ln_lstm_backward", [&] {
    const scalar_t *gh = g_hh.data_ptr<scalar_t>(), *gc = g_c.data_ptr<scalar_t>(), *bc = be_c.data_ptr<scalar_t>();
    const scalar_t* zo = opt_ptr<scalar_t>(zoneout);
    const scalar_t *go = grad_output.data_ptr<scalar_t>(), *hh = hhat.data_ptr<scalar_t>();
    const scalar_t *ga = gates.data_ptr<scalar_t>(), *csp = cs.data_ptr<scalar_t>(), *ch = chat.data_ptr<scalar_t>();
    const scalar_t *c0p = c0.data_ptr<scalar_t>(), *r = rstd.data_ptr<scalar_t>();
    scalar_t *dhp = dh.data_ptr<scalar_t>(), *dcp = dc.data_ptr<scalar_t>();
    scalar_t *dp = dpre.data_ptr<scalar_t>(), *dap = dah.data_ptr<scalar_t>(), *dl = dlc.data_ptr<scalar_t>();
    for (int64_t t = T - 1; t >= 0; --t) {
      at::parallel_for(0, B, grain(G), [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> dch(H);
        for (int64_t b = begin; b < end; ++b) {
          if (!active(len, b, t)) continue;  // dh, dc pass through; the output there is a constant 0
          const int64_t row = t * B + b;
          const scalar_t* g = ga + row * G;
          const scalar_t* cprev = t > 0 ? csp + (row - B) * H : c0p + b * H;
          const scalar_t* m = zo ? zo + row * H : nullptr;
          scalar_t* d = dp + row * G;
          for (int64_t j = 0; j < H; ++j) {
            const scalar_t dht = dhp[b * H + j] + go[row * H + j];
            const scalar_t mj = m ? m[j] : scalar_t(0);
            const scalar_t dhn = (1 - mj) * dht;  // into o * tanh(LN_c(c))
            dhp[b * H + j] = mj * dht;            // the zoned-out part; W_hh's part is added after
            const scalar_t o = g[3 * H + j];
            const scalar_t tl = gates::tanh_(gc[j] * ch[row * H + j] + bc[j]);
            d[3 * H + j] = dhn * tl * o * (1 - o);
            dl[row * H + j] = dhn * o * (1 - tl * tl);
            dch[j] = dl[row * H + j] * gc[j];
          }
          ln_row_backward(dch.data(), ch + row * H, r[row * 3 + 2], dch.data(), H);
          for (int64_t j = 0; j < H; ++j) {
            const gates::LstmGates<scalar_t> a{g[j], g[H + j], g[2 * H + j], g[3 * H + j]};
            // grad_h = 0: the o gate and tanh(LN_c) were handled above.
            const auto u = gates::lstm_backward<scalar_t>(a, cprev[j], csp[row * H + j], 0, dch[j] + dcp[b * H + j]);
            d[j] = u.pre_i, d[H + j] = u.pre_f, d[2 * H + j] = u.pre_g;
            dcp[b * H + j] = u.c_prev;
          }
          scalar_t* da = dap + row * G;
          for (int64_t k = 0; k < G; ++k) da[k] = d[k] * gh[k];
          ln_row_backward(da, hh + row * G, r[row * 3 + 1], da, G);
        }
      });
      dh.addmm_(dah[t], w_hh);
    }
  });

  const at::Tensor hprev = previous_states(h0, output);
  at::Tensor dw_hh = at::mm(dah.view({T * B, G}).t(), hprev.view({T * B, H}));
  std::vector<at::Tensor> in;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ln_lstm_xback", [&] {
    in = input_projection_backward<scalar_t>(dpre, x, w_ih, g_ih, xhat, rstd, 3);
  });
  at::Tensor db = dpre.sum(at::IntArrayRef{0, 1});
  at::Tensor dg_hh = (dpre * hhat).sum(at::IntArrayRef{0, 1});
  at::Tensor dg_c = (dlc * chat).sum(at::IntArrayRef{0, 1});
  at::Tensor dbe_c = dlc.sum(at::IntArrayRef{0, 1});
  return {in[0], dh, dc, in[1], dw_hh, db, in[2], dg_hh, dg_c, dbe_c};
}

// =========================================================================== GRU

std::vector<at::Tensor> ln_gru_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                       const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                                       const c10::optional<at::Tensor>& b_hh, const at::Tensor& g_ih,
                                       const at::Tensor& be_ih, const at::Tensor& g_hh, const at::Tensor& be_hh,
                                       const c10::optional<at::Tensor>& lengths,
                                       const c10::optional<at::Tensor>& zoneout, bool save) {
  const int64_t H = check_common(x, w_ih, w_hh, 3, lengths, zoneout);
  const int64_t T = x.size(0), B = x.size(1), G = 3 * H;
  check_tensor(h0, "h0", x, {B, H});
  check_bias(b_ih, "b_ih", x, G);
  check_bias(b_hh, "b_hh", x, G);
  check_vector(g_ih, "g_ih", x, G);
  check_vector(be_ih, "be_ih", x, G);
  check_vector(g_hh, "g_hh", x, G);
  check_vector(be_hh, "be_hh", x, G);

  at::Tensor rstd = at::zeros({T, B, 2}, x.options());
  at::Tensor xhat;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ln_gru_xproj", [&] { xhat = input_projection_ln<scalar_t>(x, w_ih, rstd, 2); });
  const at::Tensor bias_i = (bias_sum(b_ih, c10::nullopt, g_ih) + be_ih).contiguous();
  const at::Tensor bias_h = (bias_sum(b_hh, c10::nullopt, g_hh) + be_hh).contiguous();
  at::Tensor output = at::zeros({T, B, H}, x.options());
  at::Tensor h = h0.clone();
  at::Tensor hhat = saved_or_empty(save, {T, B, G}, x), gates = saved_or_empty(save, {T, B, 4 * H}, x);
  at::Tensor scratch = save ? at::Tensor() : at::empty({B, G + 4 * H}, x.options());
  const int64_t* len = lengths_ptr(lengths);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ln_gru_forward", [&] {
    const scalar_t *gi = g_ih.data_ptr<scalar_t>(), *gh = g_hh.data_ptr<scalar_t>();
    const scalar_t *bi = bias_i.data_ptr<scalar_t>(), *bh = bias_h.data_ptr<scalar_t>();
    const scalar_t* zo = opt_ptr<scalar_t>(zoneout);
    const scalar_t* xh = xhat.data_ptr<scalar_t>();
    scalar_t *hp = h.data_ptr<scalar_t>(), *out = output.data_ptr<scalar_t>(), *r = rstd.data_ptr<scalar_t>();
    for (int64_t t = 0; t < T; ++t) {
      at::Tensor ah = at::mm(h, w_hh.t());
      scalar_t* ahp = ah.data_ptr<scalar_t>();
      at::parallel_for(0, B, grain(G), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          if (!active(len, b, t)) continue;
          const int64_t row = t * B + b;
          scalar_t* sc = save ? nullptr : scratch.data_ptr<scalar_t>() + b * (G + 4 * H);
          scalar_t* hh = save ? hhat.data_ptr<scalar_t>() + row * G : sc;
          scalar_t* ga = save ? gates.data_ptr<scalar_t>() + row * 4 * H : sc + G;
          r[row * 2 + 1] = ln_row(ahp + b * G, hh, G);
          const scalar_t* xr = xh + row * G;
          const scalar_t* m = zo ? zo + row * H : nullptr;
          for_units<scalar_t>(H, [&](auto lanes, int64_t j) {
            using V = decltype(lanes);
            V in[3], hid[3];
            for (int q = 0; q < 3; ++q) {
              const int64_t k = q * H + j;
              in[q] = ld<V>(gi + k) * ld<V>(xr + k) + ld<V>(bi + k);
              hid[q] = ld<V>(gh + k) * ld<V>(hh + k) + ld<V>(bh + k);
            }
            const auto a = gates::gru_activate<V>(in[0], in[1], in[2], hid[0], hid[1], hid[2]);
            st(ga + j, a.r), st(ga + H + j, a.z), st(ga + 2 * H + j, a.n), st(ga + 3 * H + j, a.hn);
            V hs = ld<V>(hp + b * H + j);
            const V h_new = gates::gru_hidden_state<V>(a, hs);
            if (m) {
              const V mj = ld<V>(m + j);
              hs = mj * hs + (1.0f - mj) * h_new;
            } else {
              hs = h_new;
            }
            st(hp + b * H + j, hs);
            st(out + row * H + j, hs);
          });
        }
      });
    }
  });
  if (!save) {
    std::vector<at::Tensor> out{output, h};
    for (int k = 0; k < 4; ++k) out.push_back(at::empty({0}, x.options()));
    return out;
  }
  return {output, h, xhat, hhat, gates, rstd};
}

std::vector<at::Tensor> ln_gru_backward(const at::Tensor& grad_output, const at::Tensor& grad_hn,
                                        const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                        const at::Tensor& w_hh, const at::Tensor& g_ih, const at::Tensor& g_hh,
                                        const c10::optional<at::Tensor>& lengths,
                                        const c10::optional<at::Tensor>& zoneout, const at::Tensor& output,
                                        const at::Tensor& xhat, const at::Tensor& hhat, const at::Tensor& gates,
                                        const at::Tensor& rstd) {
  const int64_t H = check_common(x, w_ih, w_hh, 3, lengths, zoneout);
  const int64_t T = x.size(0), B = x.size(1), G = 3 * H;
  check_tensor(h0, "h0", x, {B, H});
  check_tensor(grad_output, "grad_output", x, {T, B, H});
  check_tensor(grad_hn, "grad_hn", x, {B, H});
  check_vector(g_ih, "g_ih", x, G);
  check_vector(g_hh, "g_hh", x, G);
  check_tensor(output, "output", x, {T, B, H});
  check_tensor(xhat, "xhat (saved; was the forward run with save=false?)", x, {T, B, G});
  check_tensor(hhat, "hhat", x, {T, B, G});
  check_tensor(gates, "gates", x, {T, B, 4 * H});
  check_tensor(rstd, "rstd", x, {T, B, 2});

  at::Tensor dh = grad_hn.clone();
  at::Tensor dgi = at::zeros({T, B, G}, x.options());  // gradients of the input-side gate terms
  at::Tensor dgh = at::zeros({T, B, G}, x.options());  // ... of the hidden-side ones (after LN)
  at::Tensor dah = at::zeros({T, B, G}, x.options());  // ... of W_hh h before its LN
  const int64_t* len = lengths_ptr(lengths);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ln_gru_backward", [&] {
    const scalar_t* gh = g_hh.data_ptr<scalar_t>();
    const scalar_t* zo = opt_ptr<scalar_t>(zoneout);
    const scalar_t *go = grad_output.data_ptr<scalar_t>(), *hh = hhat.data_ptr<scalar_t>();
    const scalar_t *ga = gates.data_ptr<scalar_t>(), *outp = output.data_ptr<scalar_t>();
    const scalar_t *h0p = h0.data_ptr<scalar_t>(), *r = rstd.data_ptr<scalar_t>();
    scalar_t *dhp = dh.data_ptr<scalar_t>(), *di = dgi.data_ptr<scalar_t>(), *dg = dgh.data_ptr<scalar_t>();
    scalar_t* dap = dah.data_ptr<scalar_t>();
    for (int64_t t = T - 1; t >= 0; --t) {
      at::parallel_for(0, B, grain(G), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          if (!active(len, b, t)) continue;
          const int64_t row = t * B + b;
          const scalar_t* g = ga + row * 4 * H;
          const scalar_t* hprev = t > 0 ? outp + (row - B) * H : h0p + b * H;
          const scalar_t* m = zo ? zo + row * H : nullptr;
          scalar_t *dir = di + row * G, *dgr = dg + row * G, *da = dap + row * G;
          for (int64_t j = 0; j < H; ++j) {
            const scalar_t dht = dhp[b * H + j] + go[row * H + j];
            const scalar_t mj = m ? m[j] : scalar_t(0);
            const gates::GruGates<scalar_t> a{g[j], g[H + j], g[2 * H + j], g[3 * H + j]};
            const auto u = gates::gru_backward<scalar_t>(a, hprev[j], (1 - mj) * dht);
            dir[j] = u.gi_r, dir[H + j] = u.gi_z, dir[2 * H + j] = u.gi_n;
            dgr[j] = u.gi_r, dgr[H + j] = u.gi_z, dgr[2 * H + j] = u.gh_n;
            dhp[b * H + j] = mj * dht + u.h_prev;
          }
          for (int64_t k = 0; k < G; ++k) da[k] = dgr[k] * gh[k];
          ln_row_backward(da, hh + row * G, r[row * 2 + 1], da, G);
        }
      });
      dh.addmm_(dah[t], w_hh);
    }
  });

  const at::Tensor hprev = previous_states(h0, output);
  at::Tensor dw_hh = at::mm(dah.view({T * B, G}).t(), hprev.view({T * B, H}));
  std::vector<at::Tensor> in;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "ln_gru_xback", [&] {
    in = input_projection_backward<scalar_t>(dgi, x, w_ih, g_ih, xhat, rstd, 2);
  });
  return {in[0], dh, in[1], dw_hh, dgi.sum(at::IntArrayRef{0, 1}), dgh.sum(at::IntArrayRef{0, 1}), in[2], (dgh * hhat).sum(at::IntArrayRef{0, 1})};
}

}  // namespace cpu
}  // namespace attnkit
