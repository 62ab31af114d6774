// The GRU's rows of the fused time loops (rnn_fused_rows.h): torch's r, z, n
// with gi = x W_ih^T + b_ih and gh = h W_hh^T + b_hh kept apart (b_hn and
// W_hn h sit inside the reset product); saved gates r, z, n, hn (T, B, 4H),
// as rnn_sequence.h's per-step loop and the reference save them. Included
// three times by rnn_fused.cpp after rnn_fused_rows.h (no include guard on purpose).

// One batch row of a unit chunk. gi, gh: the two projections without their
// biases, 3 gates at stride `ldg`; b_ih, b_hh (3 gates at stride H) or null.
// h_next and out get the new hidden state, act (4 rows at stride H) r, z, n, hn unless null.
inline void fused_gru_forward_row(const float* gi, const float* gh, int64_t ldg, const float* b_ih, const float* b_hh,
                                  int64_t H, const float* h_prev, float* h_next, float* out, float* act,
                                  int64_t units) {
  for_wide_units<float>(units, [&](auto lanes, int64_t j) {
    using V = decltype(lanes);
    V i[3], h[3];
    for (int g = 0; g < 3; ++g) {
      i[g] = ld<V>(gi + g * ldg + j) + (b_ih != nullptr ? ld<V>(b_ih + g * H + j) : V{});
      h[g] = ld<V>(gh + g * ldg + j) + (b_hh != nullptr ? ld<V>(b_hh + g * H + j) : V{});
    }
    const auto a = gates::gru_activate<V>(i[0], i[1], i[2], h[0], h[1], h[2]);
    const V h_new = gates::gru_hidden_state<V>(a, ld<V>(h_prev + j));
    if (act != nullptr) {
      st(act + j, a.r);
      st(act + H + j, a.z);
      st(act + 2 * H + j, a.n);
      st(act + 3 * H + j, a.hn);
    }
    st(h_next + j, h_new);
    st(out + j, h_new);
  });
}

// Forward, one thread: gh, the (B, 3 * kChunk) tile of each step's recurrent products.
inline void fused_gru_forward_thread(const FusedForward& f, int64_t k0, int64_t k1, float* xp, float* gh) {
  const int64_t B = f.B, H = f.H;
  fused_forward_thread<3>(
      f, k0, k1, xp, gh,
      [&](int64_t t, int64_t b, int64_t u0, int64_t units, const float* gi, const float* gh_row) {
        const int64_t o = b * H + u0;
        fused_gru_forward_row(gi, gh_row, units, f.bias != nullptr ? f.bias + u0 : nullptr,
                              f.b_hh != nullptr ? f.b_hh + u0 : nullptr, H, f.h_bufs + (t % 2) * B * H + o,
                              f.h_bufs + ((t + 1) % 2) * B * H + o, f.out + t * B * H + o,
                              f.gates != nullptr ? f.gates + (t * B + b) * 4 * H + u0 : nullptr, units);
      },
      [](int64_t, int64_t, int64_t, int64_t) {});
}
