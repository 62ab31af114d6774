// The fused elementwise passes of the CPU LSTM / GRU, one batch row each.
// No include guard on purpose: csrc/cpu/rnn.cpp (and rnn_fused.cpp, through
// rnn_fused_rows.h) includes this file three times, into namespaces `avx512`
// and `avx2` under `#pragma GCC target(...)` and into namespace `generic`, and
// picks one at run time by what the CPU supports.
//
// float rows run 8 units per iteration as `vfloat8` through the gate math of
// gate_math.h (the same templates the CUDA kernels use); the tail and double
// run unit by unit.

#include "rnn_units.h"

// pre: (4H) input projection in, activated gates out; gh (4H): the recurrent
// projection, added here. c carries the cell state.
// Without projection h and out get the new hidden state; with it (h == null)
// hc gets o * tanh(c) for the projection GEMM. cs (may be null) keeps c.
// `units` (H for a whole row) runs a slice of the row: pointers offset to its first
// unit, H still the distance between gates of pre, `ldh` between those of gh (H
// for a whole row, the panel width for rnn_small_batch.h's per-panel products);
// `wide` runs 16-lane vectors first (for_wide_units).
template <typename S, bool wide = false>
void lstm_forward_row(S* pre, const S* gh, int64_t ldh, S* c, S* h, S* out, S* cs, S* hc, int64_t H, int64_t units) {
  for_wide_units<S, wide>(units, [&](auto lanes, int64_t j) {
    using V = decltype(lanes);
    const auto a = gates::lstm_activate<V>(ld<V>(pre + j) + ld<V>(gh + j), ld<V>(pre + H + j) + ld<V>(gh + ldh + j),
                                           ld<V>(pre + 2 * H + j) + ld<V>(gh + 2 * ldh + j),
                                           ld<V>(pre + 3 * H + j) + ld<V>(gh + 3 * ldh + j));
    const V c_new = gates::lstm_cell_state<V>(a, ld<V>(c + j));
    const V h_new = gates::lstm_hidden_state<V>(a, c_new);
    st(pre + j, a.i);
    st(pre + H + j, a.f);
    st(pre + 2 * H + j, a.g);
    st(pre + 3 * H + j, a.o);
    st(c + j, c_new);
    if (cs != nullptr) st(cs + j, c_new);
    if (h != nullptr) {
      st(h + j, h_new);
      st(out + j, h_new);
    } else {
      st(hc + j, h_new);
    }
  });
}

// gpre gets d(pre-activations) (4H); dc: dL/dc_t in, dL/dc_{t-1} out.
template <typename S>
void lstm_backward_row(const S* gates, const S* c_prev, const S* c_new, const S* dh, S* dc, S* gpre, int64_t H,
                       int64_t units) {
  for_units<S>(units, [&](auto lanes, int64_t j) {
    using V = decltype(lanes);
    const gates::LstmGates<V> a{ld<V>(gates + j), ld<V>(gates + H + j), ld<V>(gates + 2 * H + j),
                                ld<V>(gates + 3 * H + j)};
    const auto d = gates::lstm_backward<V>(a, ld<V>(c_prev + j), ld<V>(c_new + j), ld<V>(dh + j), ld<V>(dc + j));
    st(gpre + j, d.pre_i);
    st(gpre + H + j, d.pre_f);
    st(gpre + 2 * H + j, d.pre_g);
    st(gpre + 3 * H + j, d.pre_o);
    st(dc + j, d.c_prev);
  });
}

// gi: the input projection, its gates `ldi` apart, b_ih in, or added here
// from b_ih when not null. gh: the hidden projection, its gates `ldh` apart,
// b_hh in, or added here from b_hh when not null (before the reset product, as
// torch has it); the biases' gates are H apart. h_prev -> h (may be the same)
// and out; gates (4H, may be null) gets r, z, n, hn. `units` as in
// lstm_forward_row; `wide` runs 16-lane vectors first (for_wide_units).
template <typename S, bool wide = false>
void gru_forward_units(const S* gi, int64_t ldi, const S* b_ih, const S* gh, int64_t ldh, const S* b_hh,
                       const S* h_prev, S* h, S* out, S* gates, int64_t H, int64_t units) {
  for_wide_units<S, wide>(units, [&](auto lanes, int64_t j) {
    using V = decltype(lanes);
    V ig[3], hg[3];
    for (int g = 0; g < 3; ++g) {
      ig[g] = ld<V>(gi + g * ldi + j) + (b_ih != nullptr ? ld<V>(b_ih + g * H + j) : V{});
      hg[g] = ld<V>(gh + g * ldh + j) + (b_hh != nullptr ? ld<V>(b_hh + g * H + j) : V{});
    }
    const auto a = gates::gru_activate<V>(ig[0], ig[1], ig[2], hg[0], hg[1], hg[2]);
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

// gru_forward_units for a whole row's gi (3H, b_ih in).
template <typename S, bool wide = false>
void gru_forward_row(const S* gi, const S* gh, int64_t ldh, const S* b_hh, const S* h_prev, S* h, S* out, S* gates,
                     int64_t H, int64_t units) {
  gru_forward_units<S, wide>(gi, H, nullptr, gh, ldh, b_hh, h_prev, h, out, gates, H, units);
}

// dh: dL/dh_t minus the output's share in, the part of dL/dh_{t-1} through z
// out; dgi / dgh (3H) get the gradients of the two projections. `units` as in
// lstm_forward_row (H for a whole row); `wide` runs 16-lane vectors first.
template <typename S, bool wide = false>
void gru_backward_row(const S* gates, const S* h_prev, const S* grad_out, S* dh, S* dgi, S* dgh, int64_t H,
                      int64_t units) {
  for_wide_units<S, wide>(units, [&](auto lanes, int64_t j) {
    using V = decltype(lanes);
    const gates::GruGates<V> a{ld<V>(gates + j), ld<V>(gates + H + j), ld<V>(gates + 2 * H + j),
                               ld<V>(gates + 3 * H + j)};
    const auto d = gates::gru_backward<V>(a, ld<V>(h_prev + j), ld<V>(dh + j) + ld<V>(grad_out + j));
    st(dgi + j, d.gi_r);
    st(dgi + H + j, d.gi_z);
    st(dgi + 2 * H + j, d.gi_n);
    st(dgh + j, d.gi_r);
    st(dgh + H + j, d.gi_z);
    st(dgh + 2 * H + j, d.gh_n);
    st(dh + j, d.h_prev);
  });
}

// out[m, n] = a[m, :] . w[n, :] (+ bias[n]) for n in [n0, n1): the GEMV-like
// products of small-batch steps, where a BLAS / oneDNN call costs more than
// the arithmetic. w rows are contiguous, so each dot product streams one row.
template <typename S>
void small_linear_cols(const S* a, const S* w, const S* bias, S* out, int64_t M, int64_t K, int64_t N, int64_t n0,
                       int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const S* wr = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const S* ar = a + m * K;
      S sum = 0;
      int64_t k = 0;
      if constexpr (std::is_same_v<S, float>) {
        gates::vfloat8 acc0{}, acc1{};
        for (; k + 16 <= K; k += 16) {
          acc0 += ld<gates::vfloat8>(ar + k) * ld<gates::vfloat8>(wr + k);
          acc1 += ld<gates::vfloat8>(ar + k + 8) * ld<gates::vfloat8>(wr + k + 8);
        }
        acc0 += acc1;
        for (int i = 0; i < 8; ++i) sum += acc0[i];
      }
      for (; k < K; ++k) sum += ar[k] * wr[k];
      out[m * N + n] = bias != nullptr ? sum + bias[n] : sum;
    }
  }
}
