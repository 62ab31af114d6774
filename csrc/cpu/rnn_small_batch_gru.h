// Small-batch (B <= 4) GRU time loops: the LSTM's scheme of
// rnn_small_batch.h (one OpenMP team through all T steps, each thread owning a
// slice of the hidden units with its W_hh panels in its L2, one spin barrier
// per step) with the GRU's 3 gates. Included three times by csrc/cpu/rnn.cpp
// (no include guard on purpose), after rnn_rows.h and rnn_small_batch.h.

// One step's gate math on `w` units of a row: rnn_rows.h's gru_forward_row
// with the recurrent products gh kGemvLanes apart per gate instead of H, and
// b_hh added here, before the reset product as the per-step path's
// linear(h, w_hh, b_hh) has it. gates (4H: r, z, n, hn) may be null.
template <typename S>
inline void gru_panel_units(const S* gi, const S* gh, const S* b_hh, const S* h_prev, S* h, S* out, S* gates,
                            int64_t H, int64_t w) {
  constexpr int64_t L = kGemvLanes;
  for_wide_units<S, kGemvLanes == 16>(w, [&](auto lanes, int64_t j) {
    using V = decltype(lanes);
    const auto a = gates::gru_activate<V>(ld<V>(gi + j), ld<V>(gi + H + j), ld<V>(gi + 2 * H + j),
                                          ld<V>(gh + j) + ld<V>(b_hh + j), ld<V>(gh + L + j) + ld<V>(b_hh + H + j),
                                          ld<V>(gh + 2 * L + j) + ld<V>(b_hh + 2 * H + j));
    const V h_new = gates::gru_hidden_state<V>(a, ld<V>(h_prev + j));
    if (gates != nullptr) {
      st(gates + j, a.r);
      st(gates + H + j, a.z);
      st(gates + 2 * H + j, a.n);
      st(gates + 3 * H + j, a.hn);
    }
    st(h + j, h_new);
    st(out + j, h_new);
  });
}

// Forward. gi (T, B, 3H): input projections, b_ih in; w_hh (3H, H); b_hh (3H),
// zeros when absent; h_bufs (2, B, H): h0 in slot 0, h_T ends in slot T % 2;
// out (T, B, H); gates (T, B, 4H) or null. len: per-row lengths or null; a
// stopped row keeps its state, outputs 0 and leaves its gates unwritten (the
// backward does not read them), as the per-step path does.
template <typename S>
void gru_forward_small_batch(const S* gi, const S* w_hh, const S* b_hh, S* h_bufs, S* out, S* gates,
                             const int64_t* len, int64_t T, int64_t B, int64_t H, int threads) {
  constexpr int64_t L = kGemvLanes, W = 3 * L;  // a panel: 3 gates of L units
  StepBarrier barrier;
#pragma omp parallel num_threads(threads)
  {
    int team, tid;
    team_of(team, tid);
    int64_t u0, u1;
    unit_slice(H, team, tid, u0, u1);
    const int64_t n = u1 - u0;
    std::vector<S> panels((n + L - 1) / L * H * W), gh(B * W);
    pack_gate_panels<3>(panels.data(), w_hh, H, u0, n);
    for (int64_t t = 0; t < T; ++t) {
      const S* h_prev = h_bufs + (t & 1) * B * H;
      S* h_next = h_bufs + ((t + 1) & 1) * B * H;
      for (int64_t p = 0; p * L < n; ++p) {
        const int64_t j0 = u0 + p * L, w = std::min(L, n - p * L);
        panel_product<3>(h_prev, B, H, panels.data() + p * H * W, H, gh.data(), W);
        for (int64_t b = 0; b < B; ++b) {
          const int64_t o = b * H + j0, r = t * B + b;
          if (len != nullptr && t >= len[b]) {  // stopped: keep the state, output 0
            std::copy(h_prev + o, h_prev + o + w, h_next + o);
            std::fill(out + r * H + j0, out + r * H + j0 + w, S(0));
            continue;
          }
          gru_panel_units(gi + r * 3 * H + j0, gh.data() + b * W, b_hh + j0, h_prev + o, h_next + o, out + r * H + j0,
                          gates != nullptr ? gates + r * 4 * H + j0 : nullptr, H, w);
        }
      }
      barrier.wait(team);
    }
  }
}

// Backward of the loop above, time reversed. gates (T, B, 4H) saved by the
// forward, h0 (B, H), output (T, B, H) (h_{t-1} of a running row); dh (B, H):
// dL/dh_T in, dL/dh_0 out. grad_gi (T, B, 3H) gets the input projections'
// gradients (for dx); grad_gh_bufs (2, B, 3H) the recurrent ones of steps t
// and t - 1: dh_{t-1} = (part through z) + grad_gh[t] W_hh. grad_t (4H, T B;
// row stride ld_t) gets them transposed for the weight gradients: rows 0..3H
// the recurrent side (r, z, n), rows 3H..4H the input side of n (r and z are
// the same on both sides). db_ih, db_hh (3H): their sums over time and batch.
// Each thread owns units [u0, u1) of dh and of every gate, so only
// grad_gh[t] crosses threads: one barrier per step, between writing it and
// reading it; step t - 1 writes the other buffer meanwhile, and step t - 2
// writes this one only after the next barrier, when every read is done.
template <typename S>
void gru_backward_small_batch(const S* gates, const S* h0, const S* output, const S* grad_output, const S* w_hh, S* dh,
                              S* grad_gi, S* grad_gh_bufs, S* grad_t, int64_t ld_t, S* db_ih, S* db_hh,
                              const int64_t* len, int64_t T, int64_t B, int64_t H, int threads) {
  StepBarrier barrier;
#pragma omp parallel num_threads(threads)
  {
    int team, tid;
    team_of(team, tid);
    int64_t u0, u1;
    unit_slice(H, team, tid, u0, u1);
    const int64_t n = u1 - u0, width = panel_count(n) * kPanel;
    // Columns u0..u1 of W_hh (3H rows): dh_{t-1}[:, u0:u1] += grad_gh[t] W_hh[:, u0:u1].
    std::vector<S> panels(panel_count(n) * 3 * H * kPanel), product(B * width);
    pack_column_panels(panels.data(), w_hh, 3 * H, H, u0, n);
    for (int64_t g = 0; g < 3; ++g) {
      std::fill(db_ih + g * H + u0, db_ih + g * H + u1, S(0));
      std::fill(db_hh + g * H + u0, db_hh + g * H + u1, S(0));
    }
    for (int64_t t = T - 1; t >= 0; --t) {
      S* grad_gh = grad_gh_bufs + (t & 1) * B * 3 * H;
      for (int64_t b = 0; b < B && n > 0; ++b) {
        const int64_t o = b * H, r = t * B + b;
        S *gi = grad_gi + r * 3 * H, *gh = grad_gh + b * 3 * H;
        if (len != nullptr && t >= len[b]) {  // stopped: dh passes through, no gradient to the gates
          for (int64_t g = 0; g < 3; ++g) {
            std::fill(gi + g * H + u0, gi + g * H + u1, S(0));
            std::fill(gh + g * H + u0, gh + g * H + u1, S(0));
          }
        } else {
          const S* h_prev = t > 0 ? output + (r - B) * H : h0 + o;
          gru_backward_row(gates + r * 4 * H + u0, h_prev + u0, grad_output + r * H + u0, dh + o + u0, gi + u0,
                           gh + u0, H, n);
        }
        for (int64_t j = u0; j < u1; ++j) {
          for (int64_t g = 0; g < 3; ++g) {
            grad_t[(g * H + j) * ld_t + r] = gh[g * H + j];
            db_ih[g * H + j] += gi[g * H + j];
            db_hh[g * H + j] += gh[g * H + j];
          }
          grad_t[(3 * H + j) * ld_t + r] = gi[2 * H + j];
        }
      }
      barrier.wait(team);
      if (n == 0) continue;
      for (int64_t p = 0; p < panel_count(n); ++p) {
        panel_product<4>(grad_gh, B, 3 * H, panels.data() + p * 3 * H * kPanel, 3 * H, product.data() + p * kPanel,
                         width);
      }
      for (int64_t b = 0; b < B; ++b) {  // stopped rows carry dh unchanged
        if (len != nullptr && t >= len[b]) continue;
        for (int64_t j = 0; j < n; ++j) dh[b * H + u0 + j] += product[b * width + j];
      }
    }
  }
}
