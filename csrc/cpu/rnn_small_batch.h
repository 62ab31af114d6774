// Small-batch (B <= 4) LSTM time loops and the panels they share with the
// GRU's (rnn_small_batch_gru.h): at batch 1..4 a step is a GEMV that
// streams the whole recurrent weight (256 KB at H = 128) and a few
// microseconds of arithmetic, so a GEMM call, a tensor per step or a fork/join
// per pass cost as much again. Here one OpenMP team lives through all T steps;
// each thread owns a slice of the hidden units, packs the columns of W_hh
// its slice needs into panels once per call (first touched by that thread,
// so they sit in its L2), and the team meets at one spin barrier per step.
// Included three times by csrc/cpu/rnn.cpp, like rnn_rows.h (no include guard
// on purpose), after rnn_rows.h.

// GemvVec, the vector type, comes from the includer (16 lanes where AVX-512 is
// compiled in). A panel is G vectors of columns of a K x N matrix with its K
// rows of G * kGemvLanes values contiguous: a step's product reads each panel
// front to back. G = 4 (kPanel columns) but for the GRU forward's 3 gates.
// Measured at K = 128, N = 512 on the AMD EPYC of BENCHMARKS.md, 1 thread:
// 1.32 us per product from panels vs 2.26 us from the row-major (K, N) weight.
constexpr int64_t kGemvLanes = sizeof(GemvVec) / sizeof(float);
constexpr int64_t kPanel = 4 * kGemvLanes;

inline int64_t panel_count(int64_t cols) { return (cols + kPanel - 1) / kPanel; }

// dst[j * ldd + i] = src[i * lds + j] for an 8 x 8 float block: three rounds of
// shuffles instead of 64 scalar stores strided across the panel.
inline void transpose8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  typedef float V8 __attribute__((vector_size(32)));
  typedef int I8 __attribute__((vector_size(32)));
  V8 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = ld<V8>(src + i * lds);
  for (int i = 0; i < 8; i += 2) {  // interleave row pairs
    t[i] = __builtin_shuffle(r[i], r[i + 1], I8{0, 8, 1, 9, 4, 12, 5, 13});
    t[i + 1] = __builtin_shuffle(r[i], r[i + 1], I8{2, 10, 3, 11, 6, 14, 7, 15});
  }
  for (int i = 0; i < 8; i += 4) {  // then pairs of pairs
    for (int j = 0; j < 2; ++j) {
      r[i + 2 * j] = __builtin_shuffle(t[i + j], t[i + j + 2], I8{0, 1, 8, 9, 4, 5, 12, 13});
      r[i + 2 * j + 1] = __builtin_shuffle(t[i + j], t[i + j + 2], I8{2, 3, 10, 11, 6, 7, 14, 15});
    }
  }
  for (int j = 0; j < 4; ++j) {  // then halves: r[j] and r[j + 4] hold columns j and j + 4
    st(dst + j * ldd, __builtin_shuffle(r[j], r[j + 4], I8{0, 1, 2, 3, 8, 9, 10, 11}));
    st(dst + (j + 4) * ldd, __builtin_shuffle(r[j], r[j + 4], I8{4, 5, 6, 7, 12, 13, 14, 15}));
  }
}

// Steps per block of the backward's transposed gradients (transpose_block).
constexpr int64_t kTileSteps = 16;

// grad_t[(g H + j) * ld_t + r] = src[g][r * lds + j] for gate rows g < 4, units
// j in [u0, u1) and rows r in [r0, r1): the backward's gradients transposed for
// the weight GEMMs, kTileSteps steps at a time in whole cache lines. (Written a
// column per step, the stores went to 4n lines that the step's product had
// just evicted from L1 while streaming W_hh: ~80 us of a 256-step LSTM backward
// at (B, H) = (1, 128), 2 threads, a quarter of its time loop.)
template <typename S>
void transpose_block(const S* const* src, int64_t lds, int64_t H, int64_t u0, int64_t u1, int64_t r0, int64_t r1,
                     S* grad_t, int64_t ld_t) {
  for (int64_t g = 0; g < 4; ++g) {
    const S* s = src[g];
    S* d = grad_t + g * H * ld_t;
    int64_t j = u0;
    if constexpr (std::is_same_v<S, float>) {
      for (; j + 8 <= u1; j += 8) {
        int64_t r = r0;
        for (; r + 8 <= r1; r += 8) transpose8(s + r * lds + j, lds, d + j * ld_t + r, ld_t);
        for (; r < r1; ++r) {
          for (int64_t i = 0; i < 8; ++i) d[(j + i) * ld_t + r] = s[r * lds + j + i];
        }
      }
    }
    for (; j < u1; ++j) {
      for (int64_t r = r0; r < r1; ++r) d[j * ld_t + r] = s[r * lds + j];
    }
  }
}

// The forward's panels: panel p holds units u0 + p L .. + L (L = kGemvLanes) of
// the thread's slice, gate g in its vector g: column g L + l is row
// g H + u0 + p L + l of w_hh (G H, H), transposed. Lanes past n are zero.
template <int G, typename S>
void pack_gate_panels(S* P, const S* w_hh, int64_t H, int64_t u0, int64_t n) {
  constexpr int64_t L = kGemvLanes, W = G * L;
  for (int64_t p = 0; p * L < n; ++p) {
    S* panel = P + p * H * W;
    const int64_t w = std::min(L, n - p * L);
    if (w < L) std::fill(panel, panel + H * W, S(0));
    for (int64_t g = 0; g < G; ++g) {
      const S* rows = w_hh + (g * H + u0 + p * L) * H;
      S* dst = panel + g * L;
      int64_t l = 0, k = 0;
      if constexpr (std::is_same_v<S, float>) {
        for (; l + 8 <= w; l += 8) {
          for (k = 0; k + 8 <= H; k += 8) transpose8(rows + l * H + k, H, dst + k * W + l, W);
          for (; k < H; ++k) {
            for (int64_t i = 0; i < 8; ++i) dst[k * W + l + i] = rows[(l + i) * H + k];
          }
        }
      }
      for (; l < w; ++l) {
        for (k = 0; k < H; ++k) dst[k * W + l] = rows[l * H + k];
      }
    }
  }
}

// The backward's panels: columns u0 .. u0 + n of w_hh (K rows, H columns; K = 4H
// for the LSTM, 3H for the GRU), kPanel at a time, copied row by row; columns
// past n are zero.
template <typename S>
void pack_column_panels(S* P, const S* w_hh, int64_t K, int64_t H, int64_t u0, int64_t n) {
  for (int64_t p = 0; p < panel_count(n); ++p) {
    S* panel = P + p * K * kPanel;
    const int64_t c0 = p * kPanel, width = std::min(kPanel, n - c0);
    if (width < kPanel) std::fill(panel, panel + K * kPanel, S(0));
    for (int64_t k = 0; k < K; ++k) {
      const S* src = w_hh + k * H + u0 + c0;
      std::copy(src, src + width, panel + k * kPanel);
    }
  }
}

// out[m, v0 L .. (v0 + V) L) of one panel of G vectors, m < M: each k
// broadcasts a[m, k] against V vectors of the panel row (no horizontal sums).
// S sets of accumulators take k, k + 1, .. k + S - 1 in turn, summed at the end:
// M V chains of K dependent FMAs (4 for the LSTM at batch 1, 3 for the GRU) are
// fewer than two FMA pipes keep in flight (8). At batch 1, (T, H) = (256, 128),
// builds alternating: LSTM forward 0.356-0.371 -> 0.341-0.346 ms, GRU
// 0.282-0.288 -> 0.277-0.279, training steps 1-2% faster.
template <int M, int V, int G, int S>
inline __attribute__((always_inline)) void panel_block(const float* a, int64_t lda, const float* panel, int64_t K,
                                                       float* out, int64_t ldo, int v0, const float* init) {
  GemvVec acc[S][M][V] = {};
  if (init != nullptr) {
    for (int m = 0; m < M; ++m) {
      for (int v = 0; v < V; ++v) acc[0][m][v] = ld<GemvVec>(init + (v0 + v) * kGemvLanes);
    }
  }
  const auto fma_row = [&](GemvVec(&sum)[M][V], int64_t k) __attribute__((always_inline)) {
    GemvVec w[V];
    for (int v = 0; v < V; ++v) w[v] = ld<GemvVec>(panel + k * G * kGemvLanes + (v0 + v) * kGemvLanes);
    for (int m = 0; m < M; ++m) {
      const float am = a[m * lda + k];
      for (int v = 0; v < V; ++v) sum[m][v] += am * w[v];
    }
  };
  int64_t k = 0;
  for (; k + S <= K; k += S) {
    for (int s = 0; s < S; ++s) fma_row(acc[s], k + s);
  }
  for (; k < K; ++k) fma_row(acc[0], k);
  for (int s = 1; s < S; ++s) {
    for (int m = 0; m < M; ++m) {
      for (int v = 0; v < V; ++v) acc[0][m][v] += acc[s][m][v];
    }
  }
  for (int m = 0; m < M; ++m) {
    for (int v = 0; v < V; ++v) st(out + m * ldo + (v0 + v) * kGemvLanes, acc[0][m][v]);
  }
}

// Accumulator sets for M V chains (panel_block): enough for 8 chains where
// they, the V panel vectors and the broadcast fit AVX2's 16 registers.
constexpr int accumulator_sets(int chains, int V) {
  int sets = 1;
  while (sets * chains < 8 && (sets + 1) * chains + V + 1 <= 16) ++sets;
  return sets;
}

// M rows of a panel of G vectors: all G at once while the accumulators, the G
// panel vectors and the broadcast a[m, k] fit AVX2's 16 registers, else half
// the panel at a time (G = 4: M = 3, 4; G = 3 fits up to M = 4). Forced
// inline, as gcc inlined the LSTM-only code (panel_product too): out-of-line
// blocks cost the LSTM ~3%.
template <int M, int G>
inline __attribute__((always_inline)) void panel_rows(const float* a, int64_t lda, const float* panel, int64_t K,
                                                      float* out, int64_t ldo, const float* init) {
  if constexpr (M * G + G + 1 <= 16) {
    panel_block<M, G, G, accumulator_sets(M * G, G)>(a, lda, panel, K, out, ldo, 0, init);
  } else {
    static_assert(G % 2 == 0, "a panel too wide for the registers splits in halves");
    panel_block<M, G / 2, G, 1>(a, lda, panel, K, out, ldo, 0, init);
    panel_block<M, G / 2, G, 1>(a, lda, panel, K, out, ldo, G / 2, init);
  }
}

// out[m, c] = init[c] + sum_k a[m, k] panel(k, c) for m < M (<= 4) and the panel's G
// kGemvLanes columns; init null: zeros.
template <int G, typename S>
inline __attribute__((always_inline)) void panel_product(const S* a, int64_t M, int64_t lda, const S* panel,
                                                         int64_t K, S* out, int64_t ldo, const S* init = nullptr) {
  constexpr int64_t W = G * kGemvLanes;
  if constexpr (std::is_same_v<S, float>) {
    switch (M) {
      case 1: panel_rows<1, G>(a, lda, panel, K, out, ldo, init); break;
      case 2: panel_rows<2, G>(a, lda, panel, K, out, ldo, init); break;
      case 3: panel_rows<3, G>(a, lda, panel, K, out, ldo, init); break;
      default: panel_rows<4, G>(a, lda, panel, K, out, ldo, init); break;
    }
  } else {
    for (int64_t m = 0; m < M; ++m) {
      S acc[W] = {};
      if (init != nullptr) std::copy(init, init + W, acc);
      for (int64_t k = 0; k < K; ++k) {
        const S am = a[m * lda + k];
        for (int64_t c = 0; c < W; ++c) acc[c] += am * panel[k * W + c];
      }
      std::copy(acc, acc + W, out + m * ldo);
    }
  }
}

// [u0, u1): thread `tid`'s units, in whole vectors.
inline void unit_slice(int64_t H, int threads, int tid, int64_t& u0, int64_t& u1) {
  const int64_t chunk = ((H + threads - 1) / threads + kGemvLanes - 1) / kGemvLanes * kGemvLanes;
  u0 = std::min<int64_t>(H, tid * chunk);
  u1 = std::min<int64_t>(H, u0 + chunk);
}

// The team's once-per-step barrier: a counter and a generation, spinning
// (yielding after a while, for an oversubscribed machine). An OpenMP barrier
// cost 0.15 us more per step here, 40 us of a 256-step call.
struct StepBarrier {
  std::atomic<int> arrived{0};
  std::atomic<unsigned> generation{0};

  void wait(int team) {
    if (team == 1) return;
    const unsigned gen = generation.load(std::memory_order_acquire);
    if (arrived.fetch_add(1, std::memory_order_acq_rel) == team - 1) {
      arrived.store(0, std::memory_order_relaxed);
      generation.store(gen + 1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation.load(std::memory_order_acquire) == gen; ++spins) {
      if (spins < 1000) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }
};

// A thread's share of the team: units [u0, u1) of H, n of them; `team` threads meet at the barrier.
struct Slice {
  int team;
  int64_t u0, u1, n;
};

// The calling thread's slice, inside the team's parallel region. (A run_team(body)
// helper taking a lambda cost the LSTM forward ~2%: the drivers below open the region themselves.)
inline Slice team_slice(int64_t H) {
  int team = 1, tid = 0;
#ifdef _OPENMP
  team = omp_get_num_threads(), tid = omp_get_thread_num();
#endif
  int64_t u0, u1;
  unit_slice(H, team, tid, u0, u1);
  return Slice{team, u0, u1, u1 - u0};
}

// The forward time loop of a G-gate cell (LSTM 4, GRU 3). w_hh (G H, H);
// h_bufs (2, B, H): h0 in slot 0, h_T ends in slot T % 2; out (T, B, H). Each
// step multiplies h_{t-1} by each of the thread's panels, then for units
// j0 .. j0 + w of row b (r = t B + b, o = b H + j0) calls
// cell(r, o, j0, w, gh, h_prev + o, h_next + o), gh the row's product (G
// vectors of kGemvLanes, one per gate). bias_a, bias_b: (G H) each, or null:
// their sum starts each product, so the input projections (one GEMM for all
// steps) need no bias rows (the batch-1 LSTM forward's kernels at (T, H) =
// (256, 128): 0.319-0.327 -> 0.312-0.320 ms). len: per-row lengths or null; a
// stopped row keeps its state, outputs 0 and gets stopped(r, o, j0, w).
// The callbacks capture by value and each thread gets its own copy of them
// and of the sizes (firstprivate), kept in registers: st()'s memcpy stores may
// alias any memory, and reloading captured references after them cost the
// LSTM forward 0.7% more instructions (callgrind, AVX2 path, B = 1, H = 128).
template <int G, typename S, typename Cell, typename Stopped>
void forward_time_loop(const S* w_hh, const S* bias_a, const S* bias_b, S* h_bufs, S* out, const int64_t* len,
                       int64_t T, int64_t B, int64_t H, int threads, Cell cell, Stopped stopped) {
  constexpr int64_t L = kGemvLanes, W = G * L;
  StepBarrier barrier;
#pragma omp parallel num_threads(threads) firstprivate(cell, stopped, h_bufs, out, len, T, B, H)
  {
    const Slice s = team_slice(H);
    const int64_t u0 = s.u0, n = s.n;
    std::vector<S> panels((n + L - 1) / L * H * W), gh(B * W);
    pack_gate_panels<G>(panels.data(), w_hh, H, u0, n);
    const bool biased = bias_a != nullptr || bias_b != nullptr;
    std::vector<S> bias(biased ? (n + L - 1) / L * W : 0);  // panel p's G vectors, as its columns
    for (int64_t p = 0; biased && p * L < n; ++p) {
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t l = 0; l < std::min(L, n - p * L); ++l) {
          const int64_t row = g * H + u0 + p * L + l;
          bias[p * W + g * L + l] = (bias_a != nullptr ? bias_a[row] : S(0)) +
                                    (bias_b != nullptr ? bias_b[row] : S(0));
        }
      }
    }
    for (int64_t t = 0; t < T; ++t) {
      const S* h_prev = h_bufs + (t & 1) * B * H;
      S* h_next = h_bufs + ((t + 1) & 1) * B * H;
      for (int64_t p = 0; p * L < n; ++p) {
        const int64_t j0 = u0 + p * L, w = std::min(L, n - p * L);
        // Stopped rows get a product too (their h is finite): cheaper than compacting the batch.
        const S* bias_p = biased ? bias.data() + p * W : nullptr;
        panel_product<G>(h_prev, B, H, panels.data() + p * H * W, H, gh.data(), W, bias_p);
        for (int64_t b = 0; b < B; ++b) {
          const int64_t o = b * H + j0, r = t * B + b;
          if (len != nullptr && t >= len[b]) {  // stopped: keep the state, output 0
            std::copy(h_prev + o, h_prev + o + w, h_next + o);
            std::fill(out + r * H + j0, out + r * H + j0 + w, S(0));
            stopped(r, o, j0, w);
            continue;
          }
          cell(r, o, j0, w, gh.data() + b * W, h_prev + o, h_next + o);
        }
      }
      barrier.wait(s.team);
    }
  }
}

// The backward time loop, t = T - 1 .. 0, of a cell whose dh_{t-1} takes
// grad_gh(t) (B, K) times w_hh (K, H). step(t, slice) computes the thread's
// units of step t's gradients, grad_gh(t) among them; after the barrier (all
// of grad_gh(t) written), carry(b, slice, product) takes product[0 .. n) =
// grad_gh(t)[b] w_hh[:, u0:u1] into dh for each running row b (stopped rows
// carry dh unchanged). Each thread owns its units of dh and of every gate, so
// only grad_gh(t) crosses threads: grad_gh(t - 1) must be another buffer,
// written while the others still read grad_gh(t) (no second barrier). The
// callbacks as in forward_time_loop.
template <typename S, typename Step, typename GradGh, typename Carry>
void backward_time_loop(const S* w_hh, int64_t K, const int64_t* len, int64_t T, int64_t B, int64_t H, int threads,
                        Step step, GradGh grad_gh, Carry carry) {
  StepBarrier barrier;
#pragma omp parallel num_threads(threads) firstprivate(step, grad_gh, carry, len, T, B, K)
  {
    const Slice s = team_slice(H);
    const int64_t width = panel_count(s.n) * kPanel;
    std::vector<S> panels(panel_count(s.n) * K * kPanel), product(B * width);
    pack_column_panels(panels.data(), w_hh, K, H, s.u0, s.n);
    for (int64_t t = T - 1; t >= 0; --t) {
      if (s.n > 0) step(t, s);
      barrier.wait(s.team);
      if (s.n == 0) continue;
      for (int64_t p = 0; p < panel_count(s.n); ++p) {
        panel_product<4>(grad_gh(t), B, K, panels.data() + p * K * kPanel, K, product.data() + p * kPanel, width);
      }
      for (int64_t b = 0; b < B; ++b) {
        if (len == nullptr || t < len[b]) carry(b, s, product.data() + b * width);
      }
    }
  }
}

// LSTM forward. w_hh (4H, H); b_ih, b_hh (4H) or null. pre (T, B, 4H): input
// projections (without the biases) in, activated gates out; h_bufs, out, len as in forward_time_loop; c (B, H):
// c0 in, c_T out; cs (T, B, H) or null.
template <typename S>
void lstm_forward_small_batch(S* pre, const S* w_hh, const S* b_ih, const S* b_hh, S* h_bufs, S* c, S* out, S* cs,
                              const int64_t* len, int64_t T, int64_t B, int64_t H, int threads) {
  forward_time_loop<4>(
      w_hh, b_ih, b_hh, h_bufs, out, len, T, B, H, threads,
      [=](int64_t r, int64_t o, int64_t j0, int64_t w, const S* gh, const S*, S* h) {
        S* cs_row = cs != nullptr ? cs + r * H + j0 : nullptr;
        // The gate math right after the panel's product (its latency overlaps the next panel's loads).
        lstm_forward_row<S, kGemvLanes == 16>(pre + r * 4 * H + j0, gh, kGemvLanes, c + o, h, out + r * H + j0, cs_row,
                                              nullptr, H, w);
      },
      [=](int64_t r, int64_t o, int64_t j0, int64_t w) {
        if (cs != nullptr) std::copy(c + o, c + o + w, cs + r * H + j0);
      });
}

// Backward of the loop above. gates (T, B, 4H) and cs saved by the forward,
// c0 (B, H); dh / dc (B, H): dL/dh_T, dL/dc_T in, dL/dh_0, dL/dc_0 out;
// grad_pre (T, B, 4H) and its transpose grad_pre_t (4H, T B; row stride ld_t),
// for the weight gradients, get d(pre-activations); db (4H, zeros in) their
// sum over time and batch, in float64; w_hh (4H, H). dh_{t-1} = grad_pre[t] W_hh.
template <typename S>
void lstm_backward_small_batch(const S* gates, const S* cs, const S* c0, const S* grad_output, const S* w_hh, S* dh,
                               S* dc, S* grad_pre, S* grad_pre_t, int64_t ld_t, double* db, const int64_t* len,
                               int64_t T, int64_t B, int64_t H, int threads) {
  const auto step = [=](int64_t t, const Slice& s) {
    const int64_t u0 = s.u0, u1 = s.u1;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t o = b * H, r = t * B + b;
      S* gp = grad_pre + r * 4 * H;
      if (len != nullptr && t >= len[b]) {  // stopped: dh and dc pass through, no gradient to the gates
        for (int64_t g = 0; g < 4; ++g) std::fill(gp + g * H + u0, gp + g * H + u1, S(0));
        continue;
      }
      const S* go = grad_output + r * H;
      for (int64_t j = u0; j < u1; ++j) dh[o + j] += go[j];
      const S* c_prev = t > 0 ? cs + (r - B) * H : c0 + o;
      lstm_backward_row(gates + r * 4 * H + u0, c_prev + u0, cs + r * H + u0, dh + o + u0, dc + o + u0, gp + u0, H,
                        s.n);
      for (int64_t j = u0; j < 4 * H; j += H) {
        for (int64_t i = j; i < j + s.n; ++i) db[i] += gp[i];
      }
    }
    if (t % kTileSteps == 0) {
      const S* rows[4] = {grad_pre, grad_pre + H, grad_pre + 2 * H, grad_pre + 3 * H};
      transpose_block(rows, 4 * H, H, u0, u1, t * B, std::min(t + kTileSteps, T) * B, grad_pre_t, ld_t);
    }
  };
  backward_time_loop(
      w_hh, 4 * H, len, T, B, H, threads, step, [=](int64_t t) { return grad_pre + t * B * 4 * H; },
      [=](int64_t b, const Slice& s, const S* product) { std::copy(product, product + s.n, dh + b * H + s.u0); });
}
