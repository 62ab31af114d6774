// The time loops of the fused LSTM steps (csrc/cpu/rnn_fused.cpp), batch 5+:
// each thread of one OpenMP team owns a range of hidden units and runs, per
// step, the recurrent GEMM for those units' four gate columns (oneDNN's brgemm)
// and at once the gate math on the tile it just produced, while it is in
// cache; the team meets at one barrier per step. No include guard on purpose:
// rnn_fused.cpp includes this file three times (AVX-512, AVX2, generic), like
// rnn_rows.h, and picks one at run time. float only (brgemm's type).

#include "rnn_units.h"

// pre: a row's 4 gates at stride H (x W_ih^T + biases in, activated gates
// out); gh: the chunk's h W_hh^T, its 4 gates at stride `ldg`. c: cell state
// in/out; h_next and out get the new hidden state; cs (may be null) keeps c.
inline void fused_forward_row(float* pre, int64_t H, const float* gh, int64_t ldg, float* c, float* h_next,
                              float* out, float* cs, int64_t units) {
  for_units<float>(units, [&](auto lanes, int64_t j) {
    using V = decltype(lanes);
    const auto a = gates::lstm_activate<V>(ld<V>(pre + j) + ld<V>(gh + j), ld<V>(pre + H + j) + ld<V>(gh + ldg + j),
                                           ld<V>(pre + 2 * H + j) + ld<V>(gh + 2 * ldg + j),
                                           ld<V>(pre + 3 * H + j) + ld<V>(gh + 3 * ldg + j));
    const V c_new = gates::lstm_cell_state<V>(a, ld<V>(c + j));
    const V h_new = gates::lstm_hidden_state<V>(a, c_new);
    st(pre + j, a.i);
    st(pre + H + j, a.f);
    st(pre + 2 * H + j, a.g);
    st(pre + 3 * H + j, a.o);
    st(c + j, c_new);
    if (cs != nullptr) st(cs + j, c_new);
    st(h_next + j, h_new);
    st(out + j, h_new);
  });
}

// gpre gets d(pre-activations) (4 gates at stride H); dh + dout is dL/dh_t;
// dc: dL/dc_t in, dL/dc_{t-1} out.
inline void fused_backward_row(const float* gates, int64_t H, const float* c_prev, const float* c_new, const float* dh,
                               const float* dout, float* dc, float* gpre, int64_t units) {
  for_units<float>(units, [&](auto lanes, int64_t j) {
    using V = decltype(lanes);
    const gates::LstmGates<V> a{ld<V>(gates + j), ld<V>(gates + H + j), ld<V>(gates + 2 * H + j),
                                ld<V>(gates + 3 * H + j)};
    const auto d = gates::lstm_backward<V>(a, ld<V>(c_prev + j), ld<V>(c_new + j), ld<V>(dh + j) + ld<V>(dout + j),
                                           ld<V>(dc + j));
    st(gpre + j, d.pre_i);
    st(gpre + H + j, d.pre_f);
    st(gpre + 2 * H + j, d.pre_g);
    st(gpre + 3 * H + j, d.pre_o);
    st(dc + j, d.c_prev);
  });
}

// Forward, one thread of the team: unit chunks [k0, k1) of FusedForward (rnn_fused.cpp).
inline void fused_lstm_forward_thread(const FusedForward& f, int64_t k0, int64_t k1, float* tile) {
  const int64_t T = f.T, B = f.B, H = f.H, nc = f.chunk;
  for (int64_t t = 0; t < T; ++t) {
    const float* h_prev = f.h_bufs + (t % 2) * B * H;
    float* h_next = f.h_bufs + ((t + 1) % 2) * B * H;
    float* pre_t = f.gates + t * B * 4 * H;
    float* out_t = f.out + t * B * H;
    float* cs_t = f.cs != nullptr ? f.cs + t * B * H : nullptr;
    const int64_t m = f.rows[t];  // rows that run the GEMM: all, or the running prefix of sorted lengths
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t u0 = k * nc, units = std::min(nc, H - u0), ldg = 4 * units;
      if (m > 0) {
        at::native::cpublas::brgemm(m, ldg, H, H, ldg, ldg, false, h_prev, f.w_packed + 4 * u0 * H, tile, false);
      }
      for (int64_t b = 0; b < B; ++b) {
        const int64_t o = b * H + u0;
        if (b < m && (f.len == nullptr || t < f.len[b])) {
          fused_forward_row(pre_t + b * 4 * H + u0, H, tile + b * ldg, units, f.c + o, h_next + o, out_t + o,
                            cs_t != nullptr ? cs_t + o : nullptr, units);
          continue;
        }
        // Stopped: keep the state, output 0.
        std::copy(h_prev + o, h_prev + o + units, h_next + o);
        std::fill(out_t + o, out_t + o + units, 0.0f);
        if (cs_t != nullptr) std::copy(f.c + o, f.c + o + units, cs_t + o);
      }
    }
#pragma omp barrier
  }
}

// dh[:, u0:u1) = gp (the first m rows) W_hh[:, u0:u1) for rows running at step t, whose gp it is; stopped
// rows keep dh. `tile` (B x H) takes the product when lengths are unsorted.
inline void fused_dh_gemm(const FusedBackward& f, int64_t t, int64_t u0, int64_t u1, float* tile) {
  const int64_t B = f.B, H = f.H, m = f.rows[t], n = u1 - u0;
  if (m == 0 || n == 0) return;
  const float* gp = f.grad_pre + t * B * 4 * H;
  if (!f.unsorted) {  // rows past m stopped at t: their dh is carried
    at::native::cpublas::brgemm(m, n, 4 * H, 4 * H, H, H, false, gp, f.w_hh + u0, f.dh + u0, false);
    return;
  }
  at::native::cpublas::brgemm(m, n, 4 * H, 4 * H, H, H, false, gp, f.w_hh + u0, tile + u0, false);
  for (int64_t b = 0; b < m; ++b) {
    if (t < f.len[b]) std::copy(tile + b * H + u0, tile + b * H + u1, f.dh + b * H + u0);
  }
}

// Backward, one thread of the team: units [u0, u1). Leaves dh = dL/dh_{-1} and dc = dL/dc_{-1} on its units.
inline void fused_lstm_backward_thread(const FusedBackward& f, int64_t u0, int64_t u1, float* tile) {
  const int64_t T = f.T, B = f.B, H = f.H, n = u1 - u0;
  for (int64_t t = T - 1; t >= 0; --t) {
    if (t + 1 < T) fused_dh_gemm(f, t + 1, u0, u1, tile);  // dh = dL/dh_t less the output's share
    const float* g_t = f.gates + t * B * 4 * H;
    const float* c_prev = t > 0 ? f.cs + (t - 1) * B * H : f.c0;
    const float* c_new = f.cs + t * B * H;
    const float* dout = f.grad_output + t * B * H;
    float* gp_t = f.grad_pre + t * B * 4 * H;
    for (int64_t b = 0; b < B && n > 0; ++b) {
      const int64_t o = b * H + u0, o4 = b * 4 * H + u0;
      if (f.len == nullptr || t < f.len[b]) {
        fused_backward_row(g_t + o4, H, c_prev + o, c_new + o, f.dh + o, dout + o, f.dc + o, gp_t + o4, n);
      } else {  // stopped: dh and dc pass through, the constant 0 output has no gradient
        for (int64_t g = 0; g < 4; ++g) std::fill(gp_t + o4 + g * H, gp_t + o4 + g * H + n, 0.0f);
      }
    }
#pragma omp barrier
  }
  fused_dh_gemm(f, 0, u0, u1, tile);
}
