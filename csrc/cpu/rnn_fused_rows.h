// The time loops of the fused LSTM / GRU steps (csrc/cpu/rnn_fused.cpp), batch
// 5+: each thread of one OpenMP team owns a range of hidden units and runs, per
// step, the recurrent GEMM for those units' G gate columns (G = 4 LSTM, 3 GRU;
// oneDNN's brgemm) and at once the gate math on the tile it just produced,
// while it is in cache; the team meets at one barrier per step. The LSTM's
// rows and threads are here, the GRU's threads in rnn_fused_gru.h (its rows
// are rnn_rows.h's). No include guard on purpose:
// rnn_fused.cpp includes this file three times (AVX-512, AVX2, generic), like
// rnn_rows.h, and picks one at run time. float only (brgemm's type).

#include "rnn_rows.h"  // rnn_units.h and the GRU's row math

// One batch row of a unit chunk. pre: x W_ih^T + h W_hh^T, its 4 gates at
// stride `ldp`; bias (4H, gates at stride H) or null. c: cell state in/out;
// h_next and out get the new hidden state; act (4 gates at stride H) the
// activated gates and cs the cell state, each unless null.
inline void fused_forward_row(const float* pre, int64_t ldp, const float* bias, int64_t H, float* act, float* c,
                              float* h_next, float* out, float* cs, int64_t units) {
  for_wide_units<float>(units, [&](auto lanes, int64_t j) {
    using V = decltype(lanes);
    V p[4];
    for (int g = 0; g < 4; ++g) p[g] = ld<V>(pre + g * ldp + j) + (bias != nullptr ? ld<V>(bias + g * H + j) : V{});
    const auto a = gates::lstm_activate<V>(p[0], p[1], p[2], p[3]);
    const V c_new = gates::lstm_cell_state<V>(a, ld<V>(c + j));
    const V h_new = gates::lstm_hidden_state<V>(a, c_new);
    if (act != nullptr) {
      st(act + j, a.i);
      st(act + H + j, a.f);
      st(act + 2 * H + j, a.g);
      st(act + 3 * H + j, a.o);
    }
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
  for_wide_units<float>(units, [&](auto lanes, int64_t j) {
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

// c (+)= a b for one chunk: brgemm on float operands, or on FusedForward's bfloat16 ones where
// a_low is set (b_low VNNI-packed; K = lda).
inline void chunk_gemm(int64_t m, int64_t n, int64_t k, bool add, const float* a, const float* b,
                       const at::BFloat16* a_low, const at::BFloat16* b_low, float* c) {
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  if (a_low != nullptr) {
    at::native::cpublas::brgemm(m, n, k, k, ldb_low(n), n, add, a_low, b_low, c);
    return;
  }
#endif
  at::native::cpublas::brgemm(m, n, k, k, n, n, add, a, b, c, false);
}

// dst[0, n) = src rounded to bfloat16 (to nearest, ties to even).
inline void round_low(const float* src, at::BFloat16* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    dst[j] = c10::BFloat16(c10::detail::round_to_nearest_even(src[j]), c10::BFloat16::from_bits());
  }
}

// h_low's rows b < B, units [u0, u0 + units) of slot `slot`: the float h_bufs rounded to bfloat16.
inline void round_h_low(const FusedForward& f, int64_t slot, int64_t u0, int64_t units) {
  const float* src = f.h_bufs + slot * f.B * f.H;
  at::BFloat16* dst = f.h_low + slot * f.B * f.H;
  for (int64_t b = 0; b < f.B; ++b) round_low(src + b * f.H + u0, dst + b * f.H + u0, units);
}

// Forward, one thread of the team: unit chunks [k0, k1) of FusedForward
// (rnn_fused.cpp), G gates a unit. Every `block` steps it first projects those
// steps' inputs for its chunks into `xp` (brgemm on the packed W_ih): they are
// in cache when each step's GEMM adds h W_hh^T onto them (gh null: the LSTM
// sums the two) or writes it into gh, a (B, G * units) tile (the GRU keeps
// them apart for the reset product), and no (T, B, G H) tensor of projections
// is written and read back. row(t, b, u0, units, pre, gh_row) runs the gate
// math of a running row; a stopped row keeps its state, outputs 0 and saves 0
// gates here (no backward reads them), and stopped(t, b, u0, units) does the rest.
template <int G, typename Row, typename Stopped>
inline void fused_forward_thread(const FusedForward& f, int64_t k0, int64_t k1, float* xp, float* gh, Row&& row,
                                 Stopped&& stopped) {
  const int64_t T = f.T, B = f.B, H = f.H, I = f.I, nc = f.chunk, nb = f.block;
  for (int64_t t0 = 0; t0 < T; t0 += nb) {
    const int64_t steps = std::min(nb, T - t0);
    const bool all_rows = f.rows[t0 + steps - 1] == B;  // else sorted lengths stop rows within the block
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t u0 = k * nc, ldp = G * std::min(nc, H - u0);
      float* xp_k = xp + (k - k0) * nb * B * G * nc;
      const auto x_at = [&](int64_t t) { return f.x_low != nullptr ? f.x_low + t * B * I : nullptr; };
      const float* x_f = f.x_low != nullptr ? nullptr : f.x;
      const float* w_f = f.x_low != nullptr ? nullptr : f.w_ih + G * u0 * I;
      const at::BFloat16* w_low = f.x_low != nullptr ? f.w_ih_low + G * u0 * I : nullptr;
      if (all_rows) {
        chunk_gemm(steps * B, ldp, I, false, x_f != nullptr ? x_f + t0 * B * I : nullptr, w_f, x_at(t0), w_low, xp_k);
        continue;
      }
      for (int64_t s = 0; s < steps; ++s) {  // only the rows still running (the others' rows are never read)
        const int64_t m = f.rows[t0 + s];
        if (m > 0) {
          chunk_gemm(m, ldp, I, false, x_f != nullptr ? x_f + (t0 + s) * B * I : nullptr, w_f, x_at(t0 + s), w_low,
                     xp_k + s * B * ldp);
        }
      }
    }
    for (int64_t t = t0; t < t0 + steps; ++t) {
      const float* h_prev = f.h_bufs + (t % 2) * B * H;
      float* h_next = f.h_bufs + ((t + 1) % 2) * B * H;
      float* act_t = f.gates != nullptr ? f.gates + t * B * 4 * H : nullptr;
      float* out_t = f.out + t * B * H;
      const int64_t m = f.rows[t];  // rows that run the GEMM: all, or the running prefix of sorted lengths
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t u0 = k * nc, units = std::min(nc, H - u0), ldp = G * units;
        float* pre = xp + (k - k0) * nb * B * G * nc + (t - t0) * B * ldp;  // the block's rows are ldp apart
        float* acc = gh != nullptr ? gh : pre;
        if (m > 0 && f.h_low != nullptr) {
          chunk_gemm(m, ldp, H, gh == nullptr, nullptr, nullptr, f.h_low + (t % 2) * B * H, f.w_hh_low + G * u0 * H,
                     acc);
        } else if (m > 0) {
          chunk_gemm(m, ldp, H, gh == nullptr, h_prev, f.w_hh + G * u0 * H, nullptr, nullptr, acc);
        }
        for (int64_t b = 0; b < B; ++b) {
          if (b < m && (f.len == nullptr || t < f.len[b])) {
            row(t, b, u0, units, pre + b * ldp, acc + b * ldp);
            continue;
          }
          const int64_t o = b * H + u0;
          std::copy(h_prev + o, h_prev + o + units, h_next + o);
          for (int64_t g = 0; g < 4 && act_t != nullptr; ++g) {  // both save 4 rows: LSTM i f g o, GRU r z n hn
            std::fill(act_t + b * 4 * H + g * H + u0, act_t + b * 4 * H + g * H + u0 + units, 0.0f);
          }
          std::fill(out_t + o, out_t + o + units, 0.0f);
          stopped(t, b, u0, units);
        }
        if (f.h_low != nullptr) round_h_low(f, (t + 1) % 2, u0, units);  // the next step's GEMM operand
      }
#pragma omp barrier
    }
  }
}

inline void fused_lstm_forward_thread(const FusedForward& f, int64_t k0, int64_t k1, float* xp, float*) {
  const int64_t B = f.B, H = f.H;
  fused_forward_thread<4>(
      f, k0, k1, xp, nullptr,
      [&](int64_t t, int64_t b, int64_t u0, int64_t units, const float* pre, const float*) {
        const int64_t o = b * H + u0;
        fused_forward_row(pre, units, f.bias != nullptr ? f.bias + u0 : nullptr, H,
                          f.gates != nullptr ? f.gates + (t * B + b) * 4 * H + u0 : nullptr, f.c + o,
                          f.h_bufs + ((t + 1) % 2) * B * H + o, f.out + t * B * H + o,
                          f.cs != nullptr ? f.cs + t * B * H + o : nullptr, units);
      },
      [&](int64_t t, int64_t b, int64_t u0, int64_t units) {
        const int64_t o = b * H + u0;
        if (f.cs != nullptr) std::copy(f.c + o, f.c + o + units, f.cs + t * B * H + o);
      });
}

// dh[:, u0:u1) = gp (the first m rows) W_hh[:, u0:u1) for rows running at step t, whose gp (G H wide) it
// is; stopped rows keep dh. kAdd (the GRU, whose dh already holds the part through z): added onto dh
// for all m rows (a stopped row's gp is 0); else (LSTM) `tile` (B x H) takes the product when lengths
// are unsorted. W_hh comes in panels of kPanel columns, each a contiguous (G H, kPanel) matrix (u0 is a
// multiple of kPanel).
template <int G, bool kAdd>
inline void fused_dh_gemm(const FusedBackward& f, int64_t t, int64_t u0, int64_t u1, float* tile) {
  const int64_t B = f.B, H = f.H, K = G * H, m = f.rows[t];
  if (m == 0) return;
  const float* gp = f.grad_pre + t * B * K;
  float* dst = f.unsorted && !kAdd ? tile : f.dh;  // sorted: rows past m stopped at t and keep their dh
  // Float operands past kDhLongK in K blocks (see kDhBlockK); bfloat16 ones whole (VNNI pairs along K).
  const int64_t kb = f.grad_pre_low == nullptr && K > kDhLongK ? kDhBlockK : K;
  for (int64_t k0 = 0; k0 < K; k0 += kb) {
    const int64_t k = std::min(kb, K - k0);
    for (int64_t p0 = u0; p0 < u1; p0 += kPanel) {
      const int64_t n = std::min(kPanel, u1 - p0);
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
      if (f.grad_pre_low != nullptr) {
        at::native::cpublas::brgemm(m, n, K, K, ldb_low(n), H, kAdd, f.grad_pre_low + (t % 2) * B * K,
                                    f.w_hh_low + K * p0, dst + p0);
        continue;
      }
#endif
      at::native::cpublas::brgemm(m, n, k, K, n, H, kAdd || k0 > 0, gp + k0, f.w_hh + K * p0 + k0 * n, dst + p0,
                                  false);
    }
  }
  if (kAdd || !f.unsorted) return;
  for (int64_t b = 0; b < m; ++b) {
    if (t < f.len[b]) std::copy(tile + b * H + u0, tile + b * H + u1, f.dh + b * H + u0);
  }
}

// Step t's gate gradients (rows b < B, this thread's units of each of the G gates) rounded into
// grad_pre_low's slot t % 2, for the bfloat16 dh product of the next step back.
template <int G>
inline void round_grad_pre_low(const FusedBackward& f, int64_t t, int64_t u0, int64_t u1) {
  const int64_t K = G * f.H;
  for (int64_t b = 0; b < f.B; ++b) {
    const float* src = f.grad_pre + (t * f.B + b) * K;
    at::BFloat16* dst = f.grad_pre_low + ((t % 2) * f.B + b) * K;
    for (int64_t g = 0; g < G; ++g) round_low(src + g * f.H + u0, dst + g * f.H + u0, u1 - u0);
  }
}

// Backward, one thread of the team: units [u0, u1). row(t, b, u0, u1 - u0) runs (or, for a stopped
// row, zeroes) step t's gate gradients of row b. Leaves dh = dL/dh_{-1} on its units.
template <int G, bool kAdd, typename Row>
inline void fused_backward_thread(const FusedBackward& f, int64_t u0, int64_t u1, float* tile, Row&& row) {
  for (int64_t t = f.T - 1; t >= 0; --t) {
    if (t + 1 < f.T) fused_dh_gemm<G, kAdd>(f, t + 1, u0, u1, tile);  // dh = dL/dh_t less the output's share
    for (int64_t b = 0; b < f.B && u1 > u0; ++b) row(t, b, u0, u1 - u0);
    // Slot t % 2 was last read by step t + 2's product, before the previous barrier.
    if (f.grad_pre_low != nullptr) round_grad_pre_low<G>(f, t, u0, u1);
#pragma omp barrier
  }
  fused_dh_gemm<G, kAdd>(f, 0, u0, u1, tile);
}

// The LSTM's: also leaves dc = dL/dc_{-1}.
inline void fused_lstm_backward_thread(const FusedBackward& f, int64_t u0, int64_t u1, float* tile) {
  const int64_t B = f.B, H = f.H;
  fused_backward_thread<4, false>(f, u0, u1, tile, [&](int64_t t, int64_t b, int64_t j0, int64_t n) {
    const int64_t o = (t * B + b) * H + j0, o4 = (t * B + b) * 4 * H + j0;
    float* gp = f.grad_pre + o4;
    if (f.len == nullptr || t < f.len[b]) {
      const float* c_prev = t > 0 ? f.cs + o - B * H : f.c0 + b * H + j0;
      fused_backward_row(f.gates + o4, H, c_prev, f.cs + o, f.dh + b * H + j0, f.grad_output + o, f.dc + b * H + j0,
                         gp, n);
    } else {  // stopped: dh and dc pass through, the constant 0 output has no gradient
      for (int64_t g = 0; g < 4; ++g) std::fill(gp + g * H, gp + g * H + n, 0.0f);
    }
  });
}
