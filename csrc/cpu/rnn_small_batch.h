// Small-batch (B <= 4) LSTM time loops: at batch 1..4 a step is a few
// microseconds of arithmetic, and a GEMM call, a tensor per step and a
// fork/join per pass cost as much again. Here one OpenMP team lives through
// all T steps; each thread owns a slice of the hidden units (the four gate
// rows of W_hh for those units stay in its cache) and the team meets at one
// barrier per step. Included twice by csrc/cpu/rnn.cpp, like rnn_rows.h (no
// include guard on purpose), after rnn_rows.h.

// out[m, n] = sum_k a[m, k] wt[k, n] for m < M (<= 4), n in [n0, n1): a
// GEMV-shaped product over a K x N weight laid out so that columns are
// contiguous. Lanes run along n and each k broadcasts a[m, k]: no horizontal
// sums, and 8 independent accumulators (VECS vectors per row of a) hide the
// FMA latency. GemvVec, the vector type, comes from the includer (16 lanes
// where AVX-512 is compiled in: twice the FMAs and loads per instruction).
constexpr int64_t kGemvLanes = sizeof(GemvVec) / sizeof(float);

template <typename S, int M, int VECS>
inline void gemv_block(const S* a, int64_t lda, const S* wt, int64_t K, int64_t N, S* out, int64_t ldo, int64_t n) {
  GemvVec acc[M][VECS] = {};
  for (int64_t k = 0; k < K; ++k) {
    const S* w = wt + k * N + n;
    GemvVec wv[VECS];
    for (int v = 0; v < VECS; ++v) wv[v] = ld<GemvVec>(w + kGemvLanes * v);
    for (int m = 0; m < M; ++m) {
      const S am = a[m * lda + k];
      for (int v = 0; v < VECS; ++v) acc[m][v] += am * wv[v];
    }
  }
  for (int m = 0; m < M; ++m) {
    for (int v = 0; v < VECS; ++v) st(out + m * ldo + n + kGemvLanes * v, acc[m][v]);
  }
}

template <typename S>
void gemv_cols(const S* a, int64_t M, int64_t K, const S* wt, int64_t N, S* out, int64_t n0, int64_t n1) {
  constexpr int64_t L = kGemvLanes;
  int64_t n = n0;
  if constexpr (std::is_same_v<S, float>) {
    // Blocks of 8 accumulators first; M is at most 4 here.
    switch (M) {
      case 1:
        for (; n + 8 * L <= n1; n += 8 * L) gemv_block<S, 1, 8>(a, K, wt, K, N, out, N, n);
        for (; n + 2 * L <= n1; n += 2 * L) gemv_block<S, 1, 2>(a, K, wt, K, N, out, N, n);
        break;
      case 2:
        for (; n + 4 * L <= n1; n += 4 * L) gemv_block<S, 2, 4>(a, K, wt, K, N, out, N, n);
        break;
      case 3:
        for (; n + 2 * L <= n1; n += 2 * L) gemv_block<S, 3, 2>(a, K, wt, K, N, out, N, n);
        break;
      default:
        for (; n + 2 * L <= n1; n += 2 * L) gemv_block<S, 4, 2>(a, K, wt, K, N, out, N, n);
        break;
    }
    for (; n + L <= n1; n += L) {
      for (int64_t m = 0; m < M; ++m) gemv_block<S, 1, 1>(a + m * K, K, wt, K, N, out + m * N, N, n);
    }
  }
  for (; n < n1; ++n) {  // the tail (and double)
    for (int64_t m = 0; m < M; ++m) {
      S sum = 0;
      for (int64_t k = 0; k < K; ++k) sum += a[m * K + k] * wt[k * N + n];
      out[m * N + n] = sum;
    }
  }
}

// [u0, u1): thread `tid`'s units, in whole vectors.
inline void unit_slice(int64_t H, int threads, int tid, int64_t& u0, int64_t& u1) {
  const int64_t chunk = ((H + threads - 1) / threads + kGemvLanes - 1) / kGemvLanes * kGemvLanes;
  u0 = std::min<int64_t>(H, tid * chunk);
  u1 = std::min<int64_t>(H, u0 + chunk);
}

// Forward. w_hh_t (H, 4H): W_hh transposed. pre (T, B, 4H): input projections (biases in) in, activated gates
// out; h_bufs (2, B, H): h0 in slot 0, h_T ends in slot T % 2; c (B, H): c0
// in, c_T out; out (T, B, H); cs (T, B, H) or null. len: per-row lengths or
// null; a stopped row keeps its state and outputs 0.
template <typename S>
void lstm_forward_small_batch(S* pre, const S* w_hh_t, S* h_bufs, S* c, S* out, S* cs, const int64_t* len, int64_t T,
                              int64_t B, int64_t H, int threads) {
#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    const int team = omp_get_num_threads(), tid = omp_get_thread_num();
#else
    const int team = 1, tid = 0;
#endif
    int64_t u0, u1;
    unit_slice(H, team, tid, u0, u1);
    const int64_t n = u1 - u0;
    std::vector<S> gh(B * 4 * H);  // this thread's slice of each gate, (B, 4H) layout
    for (int64_t t = 0; t < T; ++t) {
      const S* h_prev = h_bufs + (t & 1) * B * H;
      S* h_next = h_bufs + ((t + 1) & 1) * B * H;
      // Stopped rows get a product too (their h is finite): cheaper than compacting the batch.
      for (int64_t g = 0; g < 4 && n > 0; ++g) gemv_cols(h_prev, B, H, w_hh_t, 4 * H, gh.data(), g * H + u0, g * H + u1);
      for (int64_t b = 0; b < B && n > 0; ++b) {
        const int64_t o = b * H;
        S* out_row = out + (t * B + b) * H;
        S* cs_row = cs != nullptr ? cs + (t * B + b) * H : nullptr;
        if (len != nullptr && t >= len[b]) {
          std::copy(h_prev + o + u0, h_prev + o + u1, h_next + o + u0);
          std::fill(out_row + u0, out_row + u1, S(0));
          if (cs_row != nullptr) std::copy(c + o + u0, c + o + u1, cs_row + u0);
          continue;
        }
        lstm_forward_row(pre + (t * B + b) * 4 * H + u0, gh.data() + b * 4 * H + u0, c + o + u0, h_next + o + u0,
                         out_row + u0, cs_row != nullptr ? cs_row + u0 : nullptr, static_cast<S*>(nullptr), H, n);
      }
#pragma omp barrier
    }
  }
}

// Backward of the loop above, time reversed. gates (T, B, 4H) and cs saved by
// the forward, c0 (B, H); dh / dc (B, H): dL/dh_T, dL/dc_T in, dL/dh_0,
// dL/dc_0 out; grad_pre (T, B, 4H) gets d(pre-activations); w_hh (4H, H).
// Each thread owns units [u0, u1) of dh and dc, so only grad_pre[t] crosses
// threads: one barrier per step, between writing it and reading it.
template <typename S>
void lstm_backward_small_batch(const S* gates, const S* cs, const S* c0, const S* grad_output, const S* w_hh, S* dh,
                               S* dc, S* grad_pre, const int64_t* len, int64_t T, int64_t B, int64_t H, int threads) {
#pragma omp parallel num_threads(threads)
  {
#ifdef _OPENMP
    const int team = omp_get_num_threads(), tid = omp_get_thread_num();
#else
    const int team = 1, tid = 0;
#endif
    int64_t u0, u1;
    unit_slice(H, team, tid, u0, u1);
    const int64_t n = u1 - u0;
    for (int64_t t = T - 1; t >= 0; --t) {
      for (int64_t b = 0; b < B && n > 0; ++b) {
        const int64_t o = b * H, g = (t * B + b) * 4 * H;
        if (len != nullptr && t >= len[b]) {  // stopped: dh and dc pass through, no gradient to the gates
          for (int64_t k = 0; k < 4; ++k) std::fill(grad_pre + g + k * H + u0, grad_pre + g + k * H + u1, S(0));
          continue;
        }
        const S* go = grad_output + (t * B + b) * H;
        for (int64_t j = u0; j < u1; ++j) dh[o + j] += go[j];
        const S* c_prev = t > 0 ? cs + ((t - 1) * B + b) * H : c0 + o;
        lstm_backward_row(gates + g + u0, c_prev + u0, cs + (t * B + b) * H + u0, dh + o + u0, dc + o + u0,
                          grad_pre + g + u0, H, n);
      }
#pragma omp barrier
      // dh_{t-1}[b, j] = grad_pre[t, b, :] . W_hh[:, j] for running rows; reads every thread's grad_pre[t],
      // while the next step writes grad_pre[t - 1]: no second barrier needed.
      if (len == nullptr) {
        if (n > 0) gemv_cols(grad_pre + t * B * 4 * H, B, 4 * H, w_hh, H, dh, u0, u1);
      } else {
        for (int64_t b = 0; b < B && n > 0; ++b) {
          if (t < len[b]) gemv_cols(grad_pre + (t * B + b) * 4 * H, 1, 4 * H, w_hh, H, dh + b * H, u0, u1);
        }
      }
    }
  }
}
