// The CPU per-row passes of the layer-normalized LSTM / GRU (csrc/cpu/rnn_layernorm.cpp):
// row layer norm and each step's fused pass, as `Rows` for attnkit/rnn_layernorm_sequence.h.
// No include guard on purpose: rnn_layernorm.cpp includes this file three times, into
// namespaces `avx512` and `avx2` under `#pragma GCC target(...)` and into `generic`, and
// picks one at run time (as rnn.cpp does with rnn_rows.h): built for the baseline x86-64
// alone, the gate math's 8-lane vectors ran as SSE2 pairs and the LayerNormLSTM forward at
// (16, 64, 128) took 1.9x as long as with AVX2.
using rnn_ln::kEps;

inline bool active(const int64_t* len, int64_t b, int64_t t) { return len == nullptr || t < len[b]; }

int64_t grain(int64_t width) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(1, width)); }

#include "rnn_units.h"

// --------------------------------------------------------------------------- row layer norm

// Sum of f(k) for k in [0, n) in double, in kChains interleaved partial sums: one chain of
// dependent adds waited on the add latency each element (most of a row's layer norm); the
// independent ones run as vector adds.
constexpr int kChains = 8;

template <typename F>
inline double chained_sum(int64_t n, F&& f) {
  double part[kChains] = {};
  int64_t k = 0;
  for (; k + kChains <= n; k += kChains) {
    for (int i = 0; i < kChains; ++i) part[i] += f(k + i);
  }
  for (; k < n; ++k) part[0] += f(k);
  double sum = 0;
  for (int i = 0; i < kChains; ++i) sum += part[i];
  return sum;
}

// v (n) -> v_hat (may alias v); returns 1/std. Two passes in double: a row of
// equal values gives v_hat = 0 and rstd = 1/sqrt(eps), finite.
template <typename scalar_t>
scalar_t ln_row(const scalar_t* v, scalar_t* v_hat, int64_t n) {
  const double mean = chained_sum(n, [&](int64_t k) { return static_cast<double>(v[k]); }) / n;
  const double var = chained_sum(n, [&](int64_t k) {
    const double d = v[k] - mean;
    return d * d;
  });
  const double rstd = 1.0 / std::sqrt(var / n + kEps);
  for (int64_t k = 0; k < n; ++k) v_hat[k] = static_cast<scalar_t>((v[k] - mean) * rstd);
  return static_cast<scalar_t>(rstd);
}

// Gradient of the LN input from d(v_hat) (= grad of the LN output * gamma):
// dv = rstd * (dvh - mean(dvh) - v_hat * mean(dvh * v_hat)). dv may alias dvh.
template <typename scalar_t>
void ln_row_backward(const scalar_t* dvh, const scalar_t* v_hat, scalar_t rstd, scalar_t* dv, int64_t n) {
  const double m = chained_sum(n, [&](int64_t k) { return static_cast<double>(dvh[k]); }) / n;
  const double mv = chained_sum(n, [&](int64_t k) { return static_cast<double>(dvh[k]) * v_hat[k]; }) / n;
  for (int64_t k = 0; k < n; ++k) dv[k] = static_cast<scalar_t>(rstd * (dvh[k] - m - v_hat[k] * mv));
}

// h_t of units j.. with zoneout: m h_{t-1} + (1 - m) h' where the step has a mask row m, else h'.
template <typename V, typename S>
inline V zoned_out(const S* m, int64_t j, V h_prev, V h_new) {
  if (m == nullptr) return h_new;
  const V mj = ld<V>(m + j);
  return mj * h_prev + (1.0f - mj) * h_new;
}

struct Rows {
  static constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
  static constexpr const char* kOp = "attnkit._C layer-norm rnn";

  static at::Tensor linear(const at::Tensor& a, const at::Tensor& w) { return sequence_linear(a, w); }
  static at::Tensor matmul(const at::Tensor& a, const at::Tensor& w) { return sequence_linear(a, w.t()); }
  static at::Tensor mm_tn(const at::Tensor& a, const at::Tensor& b) { return cpu::mm_tn(a, b); }

  static void ln_rows(at::Tensor& v, at::Tensor& rstd, int64_t stride) {
    const int64_t rows = v.size(0), n = v.size(1);
    AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "ln_rows", [&] {
      scalar_t* p = v.data_ptr<scalar_t>();
      scalar_t* r = rstd.data_ptr<scalar_t>();
      at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) r[row * stride] = ln_row(p + row * n, p + row * n, n);
      });
    });
  }

  static void ln_rows_backward(at::Tensor& d, const at::Tensor& vhat, const at::Tensor& rstd, int64_t stride) {
    const int64_t rows = d.size(0), n = d.size(1);
    AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "ln_rows_backward", [&] {
      scalar_t* dp = d.data_ptr<scalar_t>();
      const scalar_t* vh = vhat.data_ptr<scalar_t>();
      const scalar_t* r = rstd.data_ptr<scalar_t>();
      at::parallel_for(0, rows, grain(n), [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) ln_row_backward(dp + row * n, vh + row * n, r[row * stride], dp + row * n, n);
      });
    });
  }

  static void lstm_forward_step(rnn_ln::LstmStep& s) {
    const int64_t B = s.h.size(0), H = s.h.size(1), G = 4 * H, t = s.t;
    const bool save = s.hhat.defined();
    const int64_t* len = rnn_ln::data_or_null<int64_t>(s.len);
    AT_DISPATCH_FLOATING_TYPES(s.h.scalar_type(), "ln_lstm_forward", [&] {
      const scalar_t *gi = s.g_ih.data_ptr<scalar_t>(), *gh = s.g_hh.data_ptr<scalar_t>();
      const scalar_t *gc = s.g_c.data_ptr<scalar_t>(), *bc = s.be_c.data_ptr<scalar_t>(), *bs = s.bias.data_ptr<scalar_t>();
      const scalar_t* zo = rnn_ln::data_or_null<scalar_t>(s.zoneout);
      const scalar_t *xh = s.xhat.data_ptr<scalar_t>(), *ahp = s.ah.data_ptr<scalar_t>();
      scalar_t *hp = s.h.data_ptr<scalar_t>(), *cp = s.c.data_ptr<scalar_t>(), *out = s.output.data_ptr<scalar_t>();
      scalar_t* r = s.rstd.data_ptr<scalar_t>();
      at::parallel_for(0, B, grain(G), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          if (!active(len, b, t)) continue;  // state kept, output stays 0
          const int64_t row = t * B + b;
          scalar_t* sc = save ? nullptr : s.scratch.data_ptr<scalar_t>() + b * (2 * G + 2 * H);
          scalar_t* hh = save ? s.hhat.data_ptr<scalar_t>() + row * G : sc;
          scalar_t* ga = save ? s.gates.data_ptr<scalar_t>() + row * G : sc + G;
          scalar_t* cn = save ? s.cs.data_ptr<scalar_t>() + row * H : sc + 2 * G;
          scalar_t* ch = save ? s.chat.data_ptr<scalar_t>() + row * H : sc + 2 * G + H;
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
            const V hs = zoned_out(m, j, ld<V>(hp + b * H + j), h_new);
            st(hp + b * H + j, hs);
            st(cp + b * H + j, ld<V>(cn + j));
            st(out + row * H + j, hs);
          });
        }
      });
    });
  }

  static void lstm_backward_step(rnn_ln::LstmBackStep& s) {
    const int64_t B = s.dh.size(0), H = s.dh.size(1), G = 4 * H, t = s.t;
    const int64_t* len = rnn_ln::data_or_null<int64_t>(s.len);
    AT_DISPATCH_FLOATING_TYPES(s.dh.scalar_type(), "ln_lstm_backward", [&] {
      const scalar_t *gh = s.g_hh.data_ptr<scalar_t>(), *gc = s.g_c.data_ptr<scalar_t>(), *bc = s.be_c.data_ptr<scalar_t>();
      const scalar_t* zo = rnn_ln::data_or_null<scalar_t>(s.zoneout);
      const scalar_t *go = s.grad_output.data_ptr<scalar_t>(), *hh = s.hhat.data_ptr<scalar_t>();
      const scalar_t *ga = s.gates.data_ptr<scalar_t>(), *csp = s.cs.data_ptr<scalar_t>(), *ch = s.chat.data_ptr<scalar_t>();
      const scalar_t *c0p = s.c0.data_ptr<scalar_t>(), *r = s.rstd.data_ptr<scalar_t>();
      scalar_t *dhp = s.dh.data_ptr<scalar_t>(), *dcp = s.dc.data_ptr<scalar_t>();
      scalar_t *dp = s.dpre.data_ptr<scalar_t>(), *dap = s.dah.data_ptr<scalar_t>(), *dl = s.dlc.data_ptr<scalar_t>();
      at::parallel_for(0, B, grain(G), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          if (!active(len, b, t)) continue;  // dh, dc pass through; the output there is a constant 0
          const int64_t row = t * B + b;
          const scalar_t* g = ga + row * G;
          const scalar_t* cprev = t > 0 ? csp + (row - B) * H : c0p + b * H;
          const scalar_t* m = zo ? zo + row * H : nullptr;
          scalar_t* d = dp + row * G;
          scalar_t* dch = s.scratch.data_ptr<scalar_t>() + b * H;
          for_units<scalar_t>(H, [&](auto lanes, int64_t j) {
            using V = decltype(lanes);
            const V dht = ld<V>(dhp + b * H + j) + ld<V>(go + row * H + j);
            const V mj = m ? ld<V>(m + j) : V{};
            const V dhn = (scalar_t(1) - mj) * dht;  // into o * tanh(LN_c(c))
            st(dhp + b * H + j, mj * dht);           // the zoned-out part; W_hh's part is added after
            const V o = ld<V>(g + 3 * H + j);
            const V tl = gates::tanh_(ld<V>(gc + j) * ld<V>(ch + row * H + j) + ld<V>(bc + j));
            st(d + 3 * H + j, dhn * tl * o * (scalar_t(1) - o));
            const V dlc = dhn * o * (scalar_t(1) - tl * tl);
            st(dl + row * H + j, dlc);
            st(dch + j, dlc * ld<V>(gc + j));
          });
          ln_row_backward(dch, ch + row * H, r[row * 3 + 2], dch, H);
          for_units<scalar_t>(H, [&](auto lanes, int64_t j) {
            using V = decltype(lanes);
            const gates::LstmGates<V> a{ld<V>(g + j), ld<V>(g + H + j), ld<V>(g + 2 * H + j), ld<V>(g + 3 * H + j)};
            // grad_h = 0: the o gate and tanh(LN_c) were handled above.
            const auto u = gates::lstm_backward<V>(a, ld<V>(cprev + j), ld<V>(csp + row * H + j), V{},
                                                   ld<V>(dch + j) + ld<V>(dcp + b * H + j));
            st(d + j, u.pre_i), st(d + H + j, u.pre_f), st(d + 2 * H + j, u.pre_g);
            st(dcp + b * H + j, u.c_prev);
          });
          scalar_t* da = dap + row * G;
          for (int64_t k = 0; k < G; ++k) da[k] = d[k] * gh[k];
          ln_row_backward(da, hh + row * G, r[row * 3 + 1], da, G);
        }
      });
    });
  }

  static void gru_forward_step(rnn_ln::GruStep& s) {
    const int64_t B = s.h.size(0), H = s.h.size(1), G = 3 * H, t = s.t;
    const bool save = s.hhat.defined();
    const int64_t* len = rnn_ln::data_or_null<int64_t>(s.len);
    AT_DISPATCH_FLOATING_TYPES(s.h.scalar_type(), "ln_gru_forward", [&] {
      const scalar_t *gi = s.g_ih.data_ptr<scalar_t>(), *gh = s.g_hh.data_ptr<scalar_t>();
      const scalar_t *bi = s.bias_i.data_ptr<scalar_t>(), *bh = s.bias_h.data_ptr<scalar_t>();
      const scalar_t* zo = rnn_ln::data_or_null<scalar_t>(s.zoneout);
      const scalar_t *xh = s.xhat.data_ptr<scalar_t>(), *ahp = s.ah.data_ptr<scalar_t>();
      scalar_t *hp = s.h.data_ptr<scalar_t>(), *out = s.output.data_ptr<scalar_t>(), *r = s.rstd.data_ptr<scalar_t>();
      at::parallel_for(0, B, grain(G), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          if (!active(len, b, t)) continue;
          const int64_t row = t * B + b;
          scalar_t* sc = save ? nullptr : s.scratch.data_ptr<scalar_t>() + b * (G + 4 * H);
          scalar_t* hh = save ? s.hhat.data_ptr<scalar_t>() + row * G : sc;
          scalar_t* ga = save ? s.gates.data_ptr<scalar_t>() + row * 4 * H : sc + G;
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
            const V h_prev = ld<V>(hp + b * H + j);
            const V hs = zoned_out(m, j, h_prev, gates::gru_hidden_state<V>(a, h_prev));
            st(hp + b * H + j, hs);
            st(out + row * H + j, hs);
          });
        }
      });
    });
  }

  static void gru_backward_step(rnn_ln::GruBackStep& s) {
    const int64_t B = s.dh.size(0), H = s.dh.size(1), G = 3 * H, t = s.t;
    const int64_t* len = rnn_ln::data_or_null<int64_t>(s.len);
    AT_DISPATCH_FLOATING_TYPES(s.dh.scalar_type(), "ln_gru_backward", [&] {
      const scalar_t* gh = s.g_hh.data_ptr<scalar_t>();
      const scalar_t* zo = rnn_ln::data_or_null<scalar_t>(s.zoneout);
      const scalar_t *go = s.grad_output.data_ptr<scalar_t>(), *hh = s.hhat.data_ptr<scalar_t>();
      const scalar_t *ga = s.gates.data_ptr<scalar_t>(), *outp = s.output.data_ptr<scalar_t>();
      const scalar_t *h0p = s.h0.data_ptr<scalar_t>(), *r = s.rstd.data_ptr<scalar_t>();
      scalar_t *dhp = s.dh.data_ptr<scalar_t>(), *di = s.dgi.data_ptr<scalar_t>(), *dg = s.dgh.data_ptr<scalar_t>();
      scalar_t* dap = s.dah.data_ptr<scalar_t>();
      at::parallel_for(0, B, grain(G), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          if (!active(len, b, t)) continue;
          const int64_t row = t * B + b;
          const scalar_t* g = ga + row * 4 * H;
          const scalar_t* hprev = t > 0 ? outp + (row - B) * H : h0p + b * H;
          const scalar_t* m = zo ? zo + row * H : nullptr;
          scalar_t *dir = di + row * G, *dgr = dg + row * G, *da = dap + row * G;
          for_units<scalar_t>(H, [&](auto lanes, int64_t j) {
            using V = decltype(lanes);
            const V dht = ld<V>(dhp + b * H + j) + ld<V>(go + row * H + j);
            const V mj = m ? ld<V>(m + j) : V{};
            const gates::GruGates<V> a{ld<V>(g + j), ld<V>(g + H + j), ld<V>(g + 2 * H + j), ld<V>(g + 3 * H + j)};
            const auto u = gates::gru_backward<V>(a, ld<V>(hprev + j), (scalar_t(1) - mj) * dht);
            st(dir + j, u.gi_r), st(dir + H + j, u.gi_z), st(dir + 2 * H + j, u.gi_n);
            st(dgr + j, u.gi_r), st(dgr + H + j, u.gi_z), st(dgr + 2 * H + j, u.gh_n);
            st(dhp + b * H + j, mj * dht + u.h_prev);
          });
          for (int64_t k = 0; k < G; ++k) da[k] = dgr[k] * gh[k];
          ln_row_backward(da, hh + row * G, r[row * 2 + 1], da, G);
        }
      });
    });
  }
};
