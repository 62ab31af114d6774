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

// dh: dL/dh_t less the output's share dout in, the part of dL/dh_{t-1} through
// z out (the part through W_hh is the next step's GEMM); dgi, dgh (3 gates at
// stride H) get the gradients of the two projections.
inline void fused_gru_backward_row(const float* act, int64_t H, const float* h_prev, const float* dout, float* dh,
                                   float* dgi, float* dgh, int64_t units) {
  for_wide_units<float>(units, [&](auto lanes, int64_t j) {
    using V = decltype(lanes);
    const gates::GruGates<V> a{ld<V>(act + j), ld<V>(act + H + j), ld<V>(act + 2 * H + j), ld<V>(act + 3 * H + j)};
    const auto d = gates::gru_backward<V>(a, ld<V>(h_prev + j), ld<V>(dh + j) + ld<V>(dout + j));
    st(dgi + j, d.gi_r);
    st(dgi + H + j, d.gi_z);
    st(dgi + 2 * H + j, d.gi_n);
    st(dgh + j, d.gi_r);
    st(dgh + H + j, d.gi_z);
    st(dgh + 2 * H + j, d.gh_n);
    st(dh + j, d.h_prev);
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

// Backward, one thread: grad_pre gets the recurrent side's gradients (T, B, 3H), grad_gi the input side's.
inline void fused_gru_backward_thread(const FusedBackward& f, int64_t u0, int64_t u1, float* tile) {
  const int64_t B = f.B, H = f.H;
  fused_backward_thread<3, true>(f, u0, u1, tile, [&](int64_t t, int64_t b, int64_t j0, int64_t n) {
    const int64_t o = (t * B + b) * H + j0, o3 = (t * B + b) * 3 * H + j0;
    float *dgi = f.grad_gi + o3, *dgh = f.grad_pre + o3;
    if (f.len == nullptr || t < f.len[b]) {
      const float* h_prev = t > 0 ? f.output + o - B * H : f.h0 + b * H + j0;
      fused_gru_backward_row(f.gates + (t * B + b) * 4 * H + j0, H, h_prev, f.grad_output + o, f.dh + b * H + j0, dgi,
                             dgh, n);
      return;
    }
    for (int64_t g = 0; g < 3; ++g) {  // stopped: dh passes through, the constant 0 output has no gradient
      std::fill(dgi + g * H, dgi + g * H + n, 0.0f);
      std::fill(dgh + g * H, dgh + g * H + n, 0.0f);
    }
  });
}
