// The GRU's threads of the fused time loops (rnn_fused_rows.h), on rnn_rows.h's
// GRU rows: torch's r, z, n with gi = x W_ih^T + b_ih and gh = h W_hh^T + b_hh
// kept apart (b_hn and W_hn h sit inside the reset product); saved gates r, z,
// n, hn (T, B, 4H), as rnn_sequence.h's per-step loop and the reference save
// them. Included three times by rnn_fused.cpp after rnn_fused_rows.h (no
// include guard on purpose).

// Forward, one thread: gh, the (B, 3 * kChunk) tile of each step's recurrent products.
inline void fused_gru_forward_thread(const FusedForward& f, int64_t k0, int64_t k1, float* xp, float* gh) {
  const int64_t B = f.B, H = f.H;
  fused_forward_thread<3>(
      f, k0, k1, xp, gh,
      [&](int64_t t, int64_t b, int64_t u0, int64_t units, const float* gi, const float* gh_row) {
        const int64_t o = b * H + u0;
        // gi and gh: the chunk's 3 gates `units` apart, biases not in.
        gru_forward_units<float, true>(gi, units, f.bias != nullptr ? f.bias + u0 : nullptr, gh_row, units,
                                       f.b_hh != nullptr ? f.b_hh + u0 : nullptr, f.h_bufs + (t % 2) * B * H + o,
                                       f.h_bufs + ((t + 1) % 2) * B * H + o, f.out + t * B * H + o,
                                       f.gates != nullptr ? f.gates + (t * B + b) * 4 * H + u0 : nullptr, H, units);
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
      gru_backward_row<float, true>(f.gates + (t * B + b) * 4 * H + j0, h_prev, f.grad_output + o, f.dh + b * H + j0,
                                    dgi, dgh, H, n);
      return;
    }
    for (int64_t g = 0; g < 3; ++g) {  // stopped: dh passes through, the constant 0 output has no gradient
      std::fill(dgi + g * H, dgi + g * H + n, 0.0f);
      std::fill(dgh + g * H, dgh + g * H + n, 0.0f);
    }
  });
}
