// Small-batch (B <= 4) GRU time loops: the LSTM's scheme of
// rnn_small_batch.h (one OpenMP team through all T steps, each thread owning a
// slice of the hidden units with its W_hh panels in its L2, one spin barrier
// per step) with the GRU's 3 gates, on that file's forward_time_loop /
// backward_time_loop. Included three times by csrc/cpu/rnn.cpp (no include
// guard on purpose), after rnn_rows.h and rnn_small_batch.h.

// Forward. gi (T, B, 3H): input projections, without b_ih; w_hh (3H, H);
// b_ih, b_hh (3H) or null: b_hh starts the recurrent products (the per-step
// path's linear(h, w_hh, b_hh)), b_ih is added to gi in the gate math (its n
// part sits outside the reset product), so the projection needs no bias rows
// (as the LSTM's); h_bufs, out, len as in forward_time_loop;
// gates (T, B, 4H: r, z, n, hn) or null. A stopped row leaves its gates
// unwritten (the backward does not read them), as the per-step path does.
template <typename S>
void gru_forward_small_batch(const S* gi, const S* w_hh, const S* b_ih, const S* b_hh, S* h_bufs, S* out, S* gates,
                             const int64_t* len, int64_t T, int64_t B, int64_t H, int threads) {
  forward_time_loop<3>(
      w_hh, b_hh, static_cast<const S*>(nullptr), h_bufs, out, len, T, B, H, threads,
      [=](int64_t r, int64_t, int64_t j0, int64_t w, const S* gh, const S* h_prev, S* h) {
        gru_forward_units<S, kGemvLanes == 16>(gi + r * 3 * H + j0, H, b_ih != nullptr ? b_ih + j0 : nullptr, gh,
                                               kGemvLanes, static_cast<const S*>(nullptr), h_prev, h, out + r * H + j0,
                                               gates != nullptr ? gates + r * 4 * H + j0 : nullptr, H, w);
      },
      [](int64_t, int64_t, int64_t, int64_t) {});
}

// Backward of the loop above. gates (T, B, 4H) saved by the forward, h0 (B,
// H), output (T, B, H) (h_{t-1} of a running row); dh (B, H): dL/dh_T in,
// dL/dh_0 out. grad_gi (T, B, 3H) gets the input projections' gradients (for
// dx), grad_gh (T, B, 3H) the recurrent ones: dh_{t-1} = (the part through z)
// + grad_gh[t] W_hh. grad_t (4H, T B; row stride ld_t) gets them transposed
// for the weight gradients: rows 0..3H the recurrent side (r, z, n), rows
// 3H..4H the input side of n (r and z are the same on both sides). db_ih,
// db_hh (3H, zeros in): their sums over time and batch, in float64.
template <typename S>
void gru_backward_small_batch(const S* gates, const S* h0, const S* output, const S* grad_output, const S* w_hh, S* dh,
                              S* grad_gi, S* grad_gh, S* grad_t, int64_t ld_t, double* db_ih, double* db_hh,
                              const int64_t* len, int64_t T, int64_t B, int64_t H, int threads) {
  const auto step = [=](int64_t t, const Slice& s) {
    const int64_t u0 = s.u0, u1 = s.u1;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t o = b * H, r = t * B + b;
      S *gi = grad_gi + r * 3 * H, *gh = grad_gh + r * 3 * H;
      if (len != nullptr && t >= len[b]) {  // stopped: dh passes through, no gradient to the gates
        for (int64_t g = 0; g < 3; ++g) {
          std::fill(gi + g * H + u0, gi + g * H + u1, S(0));
          std::fill(gh + g * H + u0, gh + g * H + u1, S(0));
        }
        continue;
      }
      const S* h_prev = t > 0 ? output + (r - B) * H : h0 + o;
      gru_backward_row(gates + r * 4 * H + u0, h_prev + u0, grad_output + r * H + u0, dh + o + u0, gi + u0, gh + u0, H,
                       s.n);
      for (int64_t j = u0; j < 3 * H; j += H) {
        for (int64_t i = j; i < j + s.n; ++i) {
          db_ih[i] += gi[i];
          db_hh[i] += gh[i];
        }
      }
    }
    if (t % kTileSteps == 0) {
      const S* rows[4] = {grad_gh, grad_gh + H, grad_gh + 2 * H, grad_gi + 2 * H};
      transpose_block(rows, 3 * H, H, u0, u1, t * B, std::min(t + kTileSteps, T) * B, grad_t, ld_t);
    }
  };
  backward_time_loop(w_hh, 3 * H, len, T, B, H, threads, step, [=](int64_t t) { return grad_gh + t * B * 3 * H; },
                     [=](int64_t b, const Slice& s, const S* product) {
                       S* d = dh + b * H + s.u0;
                       for (int64_t j = 0; j < s.n; ++j) d[j] += product[j];
                     });
}
