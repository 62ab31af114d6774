// What the files of the CPU flash attention share (the scheme is described in
// attention.cpp): the layout of a call (Rows, Seq, Spec, Call), the score pass
// of a tile, the dropout helpers, the fused-RoPE operand passes and the tile
// sizes; declared here, the GEMM wrappers (attention_gemm.cpp) and the call's
// preparation (attention.cpp). The kernels: attention_forward.cpp and
// attention_backward.cpp. Namespace flash keeps these generic names (Rows,
// Spec, gemm_nn, prepare) apart from the other kernel families' in attnkit::cpu.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "attention_rope.h"
#include "attention_rows.h"

namespace attnkit {
namespace cpu {
namespace flash {

constexpr int64_t kUnbounded = int64_t(1) << 40;  // a window side of -1

// ------------------------------------------------------------------ GEMM on row-major tiles (attention_gemm.cpp)

// Columns a panel of a transposed operand holds (Panels below): the tile GEMMs' leading
// dimension there, whatever the sequence length.
constexpr int64_t kPanel = 64;

// Which of a tile GEMM's sizes are the head dim (a model's constant, passed whole); the others
// follow the sequence lengths and are cut into pieces of a bounded set of sizes.
enum GemmFixed : int { kNoneFixed = 0, kFixedN = 1, kFixedK = 2 };

// C (m x n) = A B (+ C when `add`), row-major, no transposes. With b_panel > 0, B's columns
// come in panels of kPanel (ldb == kPanel), column j at b + (j / kPanel) * b_panel + j % kPanel.
// Why the pieces: oneDNN's brgemm JIT-compiles a kernel per (M, N, K, lda, ldb, ldc), which
// ATen caches per thread for good (~20 KB each); sizes and leading dims taken from the
// sequence lengths kept ~0.45 MB per new length. M runs in 64s, then a multiple of 16, then
// the rest; K (unless fixed) in 64s, then a multiple of 16, then the rest zero-padded to 16 in
// a copy; N (unless fixed) in 64s, the last rounded up to 16: B and C must have that room, and
// C's columns past n are scratch. The pieces cost nothing measurable at full tiles (64 x 512 x
// 64 in eight N = 64 calls: 15.9 vs 16.2 us); small calls on two threads ran 1.15-1.24x slower
// (BENCHMARKS.md, 2026-11-29).
void gemm_nn(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, bool add,
             float* c, int64_t ldc, int fixed, int64_t b_panel = 0);
void gemm_nn(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b, int64_t ldb, bool add,
             double* c, int64_t ldc, int fixed, int64_t b_panel = 0);
// Ends a thread's brgemm use, once the thread's last gemm_nn is done.
void gemm_nn_release();

// ------------------------------------------------------------------ layouts and the call

// Rows of a dense (B, H, N, D) or packed (total, H, D) tensor; D contiguous.
template <typename T>
struct Rows {
  T* data;
  int64_t sb, sh, sm;
  T* at(int64_t b, int64_t h, int64_t row) const { return data + b * sb + h * sh + row * sm; }
};

template <typename T>
Rows<T> rows_of(const at::Tensor& t, bool varlen) {
  T* data = static_cast<T*>(t.data_ptr());
  // BLAS wants a leading dim >= the row length; a single row's stride is free (and may be
  // any size: the row length then, rows_ready keeps the others under 2 GiB).
  const int64_t row = varlen ? 0 : 2;
  const int64_t sm = t.size(row) <= 1 ? t.size(-1) : t.stride(row);
  if (varlen) return {data, 0, t.stride(1), sm};
  return {data, t.stride(0), t.stride(1), sm};
}

// Columns of a transposed operand (Columns, below), addressed from a sequence's start.
template <typename T>
struct Panels {
  T* data;
  const int64_t* start;
  int64_t sh, stride;  // elements between heads, between panels
  // Column j (from the sequence's start) of head h of sequence b.
  T* at(int64_t b, int64_t h, int64_t j) const {
    return data + start[b] + h * sh + (j / kPanel) * stride + j % kPanel;
  }
};

// lse / delta: dense (B, H, Nq), varlen (H, total_q).
template <typename T>
Rows<T> stats_of(const at::Tensor& t, bool varlen) {
  T* data = static_cast<T*>(t.data_ptr());
  if (varlen) return {data, 0, t.stride(0), t.stride(1)};
  return {data, t.stride(0), t.stride(1), t.stride(2)};
}

struct Seq {
  int64_t q_start, q_len, k_start, k_len, diag;
};

struct Spec {
  bool varlen = false;
  int64_t batch = 0, heads = 0, heads_kv = 0, group = 1, dim = 0, dim_v = 0, max_q = 0, max_k = 0;
  const int32_t* cu_q = nullptr;
  const int32_t* cu_k = nullptr;
  bool bottom_right = true;
  int64_t left = kUnbounded, right = kUnbounded;
  double softcap = 0, scale = 1;
  const uint8_t* keep_mask = nullptr;  // bool attn_mask, nonzero = attend
  const void* add_mask = nullptr;      // additive attn_mask in the accumulation type
  int64_t mask_stride[4] = {0, 0, 0, 0};
  const uint8_t* pad = nullptr;  // (B, Nk) contiguous, nonzero = padding
  const float* alibi = nullptr;  // (B, H) contiguous
  bool dropout = false;
  uint32_t threshold = 0;
  double drop_scale = 1;
  uint64_t seed = 0;

  Seq seq(int64_t b) const {
    Seq s{0, max_q, 0, max_k, 0};
    if (varlen) {
      s = {cu_q[b], cu_q[b + 1] - cu_q[b], cu_k[b], cu_k[b + 1] - cu_k[b], 0};
    }
    s.diag = bottom_right ? s.k_len - s.q_len : 0;
    return s;
  }
  // Task `task` of a loop over (batch, head, block of `block` queries), m_blocks
  // blocks a head: its batch b, head h, KV head, first query m0, sequence and
  // query rows (0 when the block starts past the sequence's queries).
  struct QueryBlock {
    int64_t b, h, kvh, m0, rows;
    Seq sq;
  };
  QueryBlock query_block(int64_t task, int64_t m_blocks, int64_t block) const {
    const int64_t b = task / m_blocks / heads, h = task / m_blocks % heads, m0 = task % m_blocks * block;
    const Seq sq = seq(b);
    return {b, h, h / group, m0, std::max<int64_t>(0, std::min(block, sq.q_len - m0)), sq};
  }
  // The dK/dV kernels' tasks: per (batch, kv head) one task per key block of `block`, or
  // with `whole_pair` (the fused schedule, dQ accumulated by the task) one task for all its keys.
  int64_t key_block_count(int64_t block, bool whole_pair) const {
    return whole_pair ? 1 : (max_k + block - 1) / block;
  }
  // Task `task`'s pair and the keys [first, last) it walks, `block` at a time.
  struct KeyBlocks {
    int64_t b, kvh, first, last;
    Seq sq;
  };
  KeyBlocks key_blocks(int64_t task, int64_t n_blocks, int64_t block, bool whole_pair) const {
    const int64_t b = task / n_blocks / heads_kv, kvh = task / n_blocks % heads_kv, first = task % n_blocks * block;
    const Seq sq = seq(b);
    return {b, kvh, first, whole_pair ? sq.k_len : std::min(first + block, sq.k_len), sq};
  }
  // Keys [lo, hi) inside the window of some query of [m0, m0 + rows).
  std::pair<int64_t, int64_t> key_range(const Seq& s, int64_t m0, int64_t rows) const {
    return {std::max<int64_t>(m0 + s.diag - left, 0), std::min<int64_t>(m0 + rows + s.diag + right, s.k_len)};
  }
  // Queries [lo, hi) whose window reaches some key of [n0, n0 + cols).
  std::pair<int64_t, int64_t> query_range(const Seq& s, int64_t n0, int64_t cols) const {
    return {std::max<int64_t>(n0 - s.diag - right, 0), std::min<int64_t>(n0 + cols - s.diag + left, s.q_len)};
  }
};

// The inputs as the kernels read them, with the tensors that back Spec's pointers.
struct Call {
  at::Tensor q, k, v, cu_q, cu_k, add_mask, keep_mask, pad, alibi;
  Spec spec;
};

// ------------------------------------------------------------------ tiles

// Turns scale * Q K^T of a (rows x cols) tile into the scores of
// reference.attention: soft-cap (tanh kept in t for the backward; the forward
// passes t = nullptr), ALiBi, additive mask, then -inf outside the window,
// where the bool mask is False and on padding keys.
template <typename acc_t>
void tile_scores(const Spec& sp, const Seq& sq, int64_t b, int64_t h, int64_t m0, int64_t rows, int64_t n0,
                 int64_t cols, acc_t* s, acc_t* t, int64_t ld) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const int64_t* ms = sp.mask_stride;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t i = m0 + r;
    acc_t* row = s + r * ld;
    if (sp.softcap > 0) attn_rows::softcap(row, t == nullptr ? nullptr : t + r * ld, cols, acc_t(sp.softcap));
    if (sp.alibi != nullptr) {
      const acc_t slope = sp.alibi[b * sp.heads + h];
      const int64_t rel0 = n0 - (i + sq.diag);
      for (int64_t j = 0; j < cols; ++j) row[j] -= slope * acc_t(std::abs(rel0 + j));
    }
    if (sp.add_mask != nullptr) {
      const acc_t* add = static_cast<const acc_t*>(sp.add_mask) + b * ms[0] + h * ms[1] + i * ms[2] + n0 * ms[3];
      for (int64_t j = 0; j < cols; ++j) row[j] += add[j * ms[3]];
    }
    const int64_t lo = std::clamp<int64_t>(i + sq.diag - sp.left - n0, 0, cols);
    const int64_t hi = std::clamp<int64_t>(i + sq.diag + sp.right + 1 - n0, lo, cols);
    std::fill(row, row + lo, neg_inf);
    std::fill(row + hi, row + cols, neg_inf);
    if (sp.keep_mask != nullptr) {
      const uint8_t* keep = sp.keep_mask + b * ms[0] + h * ms[1] + i * ms[2] + n0 * ms[3];
      for (int64_t j = lo; j < hi; ++j) row[j] = keep[j * ms[3]] ? row[j] : neg_inf;
    }
    if (sp.pad != nullptr) {
      const uint8_t* pad = sp.pad + b * sp.max_k + n0;
      for (int64_t j = lo; j < hi; ++j) row[j] = pad[j] ? neg_inf : row[j];
    }
  }
}

inline uint64_t stream_of(const Spec& sp, int64_t b, int64_t h) { return sp.seed + uint64_t(b * sp.heads + h); }

// x[j] *= drop_scale where kept, 0 where dropped.
template <typename acc_t>
void apply_dropout(acc_t* x, const uint8_t* keep, int64_t n, acc_t drop_scale) {
  for (int64_t j = 0; j < n; ++j) x[j] = keep[j] ? x[j] * drop_scale : acc_t(0);
}

struct Blocks {
  int64_t m, n;  // queries x keys per tile
};

// The online softmax of a forward tile: rows x cols scores in s (leading dim ld), times
// `factor` (> 0; 1 where s holds the scores themselves), become their exponentials (dropped
// ones 0), m / l (the rows' running max and sum, of the scores) move on, and each row of acc
// (rows x DV) is rescaled to the new max (not while the row's max is -inf); the caller then adds
// P V. keep: cols bytes of room.
// With `low` (float only), the exponentials also go there rounded to bfloat16 (same leading
// dim): in the same pass as exp where there is no dropout.
template <typename acc_t>
void online_softmax_tile(const Spec& sp, int64_t b, int64_t h, int64_t m0, int64_t rows, int64_t n0, int64_t cols,
                         acc_t* s, int64_t ld, acc_t* m, acc_t* l, acc_t* acc, int64_t DV, uint8_t* keep,
                         acc_t factor = acc_t(1), uint16_t* low = nullptr) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* row = s + r * ld;
    const acc_t tile_max = attn_rows::row_max(row, cols) * factor;  // NaN propagates: std::max would drop it
    const acc_t m_new = std::isnan(tile_max) ? tile_max : std::max(m[r], tile_max);
    const acc_t m_use = m_new == neg_inf ? acc_t(0) : m_new;  // nothing visible yet
    acc_t sum;
    if constexpr (std::is_same_v<acc_t, float>) {
      const bool to_bf16 = low != nullptr && !sp.dropout;  // exp and its bf16 copy in one pass
      // The fused pass computes x * factor - shift as one FMA (the product exact, the max
      // rounded): ~ulp(|max|) apart, harmless below 2^16, overflowing exp at |scores| ~ 1e9.
      if (to_bf16 && (factor == 1.0f || std::abs(m_use) <= 65536.0f)) {
        sum = attn_rows::exp_sum_to_bf16(row, cols, factor, m_use, low + r * ld);
      } else if (to_bf16) {
        attn_rows::scale(row, cols, factor);
        sum = attn_rows::exp_sum_to_bf16(row, cols, 1.0f, m_use, low + r * ld);
      } else {
        if (factor != 1.0f) attn_rows::scale(row, cols, factor);
        sum = attn_rows::exp_shift_sum(row, cols, m_use);
      }
    } else {
      sum = attn_rows::exp_shift_sum(row, cols, m_use);  // factor is 1: the double kernels scale K
    }
    const acc_t alpha = std::exp(m[r] - m_use);
    l[r] = l[r] * alpha + sum;  // counts every probability; dropout only touches the output
    // Until a row sees a finite score its acc row holds only zero products (or, before the
    // first tile, whatever the caller's first P V product overwrites): nothing to rescale.
    if (alpha != acc_t(1) && m[r] != neg_inf) {
      for (int64_t d = 0; d < DV; ++d) acc[r * DV + d] *= alpha;
    }
    m[r] = m_new;
    if (sp.dropout) {
      attn_rows::dropout_keep(keep, stream_of(sp, b, h), m0 + r, n0, cols, sp.threshold);
      apply_dropout(row, keep, cols, acc_t(sp.drop_scale));
    }
    if constexpr (std::is_same_v<acc_t, float>) {
      if (low != nullptr && sp.dropout) attn_rows::round_to_bf16(row, cols, low + r * ld);
    }
  }
}

// delta_i = sum_d dO_id O_id (summed in A), the row term of the softmax backward.
template <typename A, typename T>
void backward_delta(const Spec& sp, Rows<const T> out, Rows<const T> dout, Rows<A> delta) {
  at::parallel_for(0, sp.batch * sp.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / sp.heads, h = task % sp.heads;
      const Seq sq = sp.seq(b);
      for (int64_t i = sq.q_start; i < sq.q_start + sq.q_len; ++i) {
        const T* o = out.at(b, h, i);
        const T* g = dout.at(b, h, i);
        A sum = 0;
        for (int64_t d = 0; d < sp.dim_v; ++d) sum += A(o[d]) * A(g[d]);
        *delta.at(b, h, i) = sum;
      }
    }
  });
}

// The additive mask's gradient of a (rows x cols) tile, P * (dP - delta) (p, dp: leading dim ld;
// delta of the tile's rows from row i0 on), into d_mask at (m0, n0) of head (b, h): dS before the
// soft-cap derivative, the mask being added after soft-capping. Dense calls only.
template <typename T>
void mask_grad_tile(const T* p, const T* dp, int64_t ld, const Rows<const T>& delta, int64_t i0, const Rows<T>& d_mask,
                    int64_t b, int64_t h, int64_t m0, int64_t rows, int64_t n0, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    const T row_delta = *delta.at(b, h, i0 + r);
    T* out = d_mask.at(b, h, m0 + r) + n0;
    for (int64_t c = 0; c < cols; ++c) out[c] = p[r * ld + c] * (dp[r * ld + c] - row_delta);
  }
}

// Columns [n0, n0 + cols) of d_mask's rows of head (b, h) outside [q_lo, q_hi): 0. The backward
// kernels write every element of d_mask once, these for the tiles no query block visits (causal,
// window), rather than zeroing the whole buffer first (44-52 ms of page faults and zeroing at
// (4, 8, 1024, 1024), float).
template <typename T>
void zero_unvisited_rows(const Rows<T>& d_mask, int64_t b, int64_t h, int64_t q_lo, int64_t q_hi, int64_t q_len,
                         int64_t n0, int64_t cols) {
  for (int64_t i = 0; i < q_len; ++i) {
    if (i < q_lo || i >= q_hi) std::fill_n(d_mask.at(b, h, i) + n0, cols, T(0));
  }
}

// The bfloat16 tiles' brgemm (attention_*_bf16.cpp) takes N (and ldb) of at most 64 columns.
constexpr int64_t kBf16Cols = 64;

inline int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// Where the tiles over the visible range [first, hi) of queries or keys start: on the panel
// holding `first` (the transposed operands' panels), or at `first` when the range is empty. The
// queries or keys between that start and `first` are masked in the tile (tile_scores).
inline int64_t panel_start(int64_t first, int64_t hi) { return first < hi ? first / kPanel * kPanel : first; }

// ------------------------------------------------------------------ fused RoPE operands

// rope::transpose_scaled in strips of 16 dims: the 16 rows of col that a strip's 8 x 8 blocks
// fill (4 KB of a panel) stay in L1 between the blocks, where a whole panel (D rows) may not.
template <typename A>
void transpose_in_strips(const A* rows, int64_t rows_ld, int64_t n, int64_t dim, A* col, int64_t ld, A factor) {
  for (int64_t d0 = 0; d0 < dim; d0 += 16) {
    rope::transpose_scaled(rows + d0, rows_ld, n, std::min<int64_t>(16, dim - d0), col + d0 * ld, ld, factor);
  }
}

// n rows of x (leading dim x_ld) from position `pos` on, rotated by `rope` into
// `rows` (leading dim rows_ld) and, times `factor`, stored as columns into
// `col` (leading dim ld). What the unfused form does in two passes (rotate,
// then transpose) is one here, the columns written from rows still in L1.
template <typename A, typename T>
void rotate_block(const rope::Rope<A>& rope, const T* x, int64_t x_ld, int64_t pos, int64_t n, int64_t D, A factor,
                  A* rows, int64_t rows_ld, A* col, int64_t ld) {
  for (int64_t j = 0; j < n; ++j) rope::row(rope, pos + j, false, x + j * x_ld, rows + j * rows_ld, D, A(1));
  transpose_in_strips(rows, rows_ld, n, D, col, ld, factor);
}

// The first panel of each sequence's columns (queries' or keys'), counted over the
// sequences before it; B + 1 entries, the last the total.
inline std::vector<int64_t> panel_starts(const Spec& sp, bool queries) {
  std::vector<int64_t> first(sp.batch + 1, 0);
  for (int64_t b = 0; b < sp.batch; ++b) {
    const Seq sq = sp.seq(b);
    first[b + 1] = first[b] + ((queries ? sq.q_len : sq.k_len) + kPanel - 1) / kPanel;
  }
  return first;
}

// fn(b, h, j0, n, tmp) for every panel of every (sequence, head), in parallel: the n <= kPanel
// rows from j0 on of sequence b (queries or keys), tmp a thread's `scratch` elements of A.
template <typename A, typename F>
void for_each_panel(const Spec& sp, bool queries, int64_t heads, int64_t scratch, const F& fn) {
  const std::vector<int64_t> first = panel_starts(sp, queries);
  const int64_t panels = first.back();
  at::parallel_for(0, heads * panels, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> tmp(scratch);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / panels, g = task % panels;
      const int64_t b = std::upper_bound(first.begin(), first.end(), g) - first.begin() - 1;
      const Seq sq = sp.seq(b);
      const int64_t j0 = (g - first[b]) * kPanel;
      fn(b, h, j0, std::min(kPanel, (queries ? sq.q_len : sq.k_len) - j0), tmp.data());
    }
  });
}

// factor * x (q's rows when `queries`, else k's or v's; `dim` wide) into `cols`.
template <typename A>
void rows_to_columns(const Spec& sp, bool queries, Rows<const A> x, int64_t heads, int64_t dim, A factor,
                     Panels<A> cols) {
  for_each_panel<A>(sp, queries, heads, 0, [&](int64_t b, int64_t h, int64_t j0, int64_t n, A*) {
    const Seq sq = sp.seq(b);
    transpose_in_strips<A>(x.at(b, h, (queries ? sq.q_start : sq.k_start) + j0), x.sm, n, dim, cols.at(b, h, j0),
                           kPanel, factor);
  });
}

// One pass over q or k (`queries`: positions i + diag + offset, else j + offset):
// times `factor`, the transposes of the rotated rows into `cols`, and the rotated
// rows themselves into `rows` when given.
template <typename A, typename T>
void rotate_to_columns(const Spec& sp, bool queries, Rows<const T> x, int64_t heads, const rope::Rope<A>& rope,
                       A factor, Panels<A> cols, const Rows<A>* rows) {
  const int64_t D = sp.dim;
  for_each_panel<A>(sp, queries, heads, rows == nullptr ? kPanel * D : 0,
                    [&](int64_t b, int64_t h, int64_t j0, int64_t n, A* tmp) {
                      const Seq sq = sp.seq(b);
                      const int64_t i = (queries ? sq.q_start : sq.k_start) + j0;
                      const int64_t pos = (queries ? sq.diag : 0) + rope.offsets[b] + j0;
                      rotate_block(rope, x.at(b, h, i), x.sm, pos, n, D, factor,
                                   rows != nullptr ? rows->at(b, h, i) : tmp, rows != nullptr ? rows->sm : D,
                                   cols.at(b, h, j0), kPanel);
                    });
}

// ------------------------------------------------------------------ tile sizes

// Chosen on AMD EPYC, B=4 H=8 D=64: time varies by a few percent between
// 64..256 x 256..512 tiles; BN = 512 keys cuts GEMM calls, BM = 64 queries keeps
// enough tasks for the threads at short N. D > 128 halves BN to keep a thread's
// buffers in L2. Rechecked with brgemm (1 thread, N = 512 and 4096): forward
// 32..128 x 256..1024 and backward 32..128 x 64..256 within ~5-8 %, these best or tied.
//
// Cut to the call's lengths, in powers of two from the 64 keys that the bfloat16 packing takes (16
// queries): each thread's tile buffers (BM x BN, value-initialized) shrink with a short call
// (128 KB zeroed per thread per call at N = 16 before). A length below the full block has one
// block either way, so the tiles, and the results, are the same.
inline Blocks fitted(const Spec& sp, int64_t bm, int64_t bn) {
  int64_t keys = 64;  // a power of two: BN is the tiles' leading dim, so a few values at any length (gemm_nn)
  while (keys < std::min(bn, sp.max_k)) keys *= 2;
  return {std::min(bm, std::max<int64_t>(16, round_up(sp.max_q, 16))), std::min(bn, keys)};
}

inline Blocks forward_blocks(const Spec& sp) {
  return fitted(sp, 64, sp.dim > 128 ? 256 : 512);
}

inline Blocks backward_blocks(const Spec& sp) {
  return fitted(sp, 64, sp.dim > 128 ? 64 : 128);
}

// ------------------------------------------------------------------ the call (attention.cpp)

Call prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& cu_q,
             const c10::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k,
             const c10::optional<at::Tensor>& attn_mask, const c10::optional<at::Tensor>& key_padding_mask,
             const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left, int64_t window_right,
             bool bottom_right, double softcap, double scale, double dropout_p, int64_t seed);
at::Tensor rows_ready(const at::Tensor& t, int64_t row_dim);
std::vector<int64_t> out_shape(const at::Tensor& q, int64_t dim_v);
std::vector<int64_t> stat_shape(const Spec& sp, const at::Tensor& q);
// Scratch slots for per-call operand copies: kNoScratch allocates a tensor; 0 ..
// kScratchSlots - 1 lend one of the calling thread's kept buffers (scratch()).
constexpr int kNoScratch = -1, kScratchSlots = 4;
at::Tensor as_type(const at::Tensor& t, at::ScalarType dtype);

// A transposed operand (K^T, V^T, Q^T, dO^T): each sequence's rows of a head as columns, in
// panels of kPanel columns (dim x kPanel, leading dim kPanel), a sequence's first column at the
// start of a panel. Laid out (heads, panels of all sequences, dim, kPanel): the tile GEMMs read
// them with a leading dim of kPanel at any length (see gemm_nn).
struct Columns {
  at::Tensor data;
  at::Tensor start;  // int64 (B,): sequence b's first panel of head 0, in elements
  int64_t head_stride = 0, panel_stride = 0;
};

template <typename T>
Panels<T> panels_of(const Columns& c) {
  return {static_cast<T*>(c.data.data_ptr()), c.start.data_ptr<int64_t>(), c.head_stride, c.panel_stride};
}

// Room for the columns of x (q's rows when `queries`, else k's or v's) in `dtype`.
Columns columns_like(const Spec& sp, bool queries, const at::Tensor& x, at::ScalarType dtype, int slot = kNoScratch);
// factor * x^T as Columns in `dtype`: one O(N D) pass per call, so that no tile is transposed.
Columns transposed(const Spec& sp, bool queries, const at::Tensor& x, double factor, at::ScalarType dtype,
                   int slot = kNoScratch);

// The forward with bfloat16 tile GEMMs (attention_forward_bf16.cpp) into out (q's shape, bfloat16)
// and lse (float): false, nothing written, where it does not apply (inputs other than bfloat16, an
// odd head dim, no bfloat16 brgemm in this torch or CPU); the caller then runs the float kernel.
bool forward_bf16_tiles(const Call& c, const at::Tensor& out, const at::Tensor& lse);
// The backward's counterpart (attention_backward_bf16.cpp): {dq, dk, dv} in bfloat16 into
// `grads`, or false where it does not apply (as above, or an odd value head dim).
// With mask_grad also the additive mask's gradient (float), as attention_backward.
bool backward_bf16_tiles(const Call& c, const at::Tensor& dout, const at::Tensor& out, const at::Tensor& lse,
                         bool mask_grad, std::vector<at::Tensor>& grads);
bool bf16_tiles_available();
bool bf16_tiles_wanted();  // ATTNKIT_CPU_BF16_TILES is not "0"
// Whether a call of `dtype` runs on the bfloat16 tiles: bfloat16, even head dims (VNNI pairs; the
// value head dim too for the backward, where dO V^T pairs it), a bfloat16 brgemm, not switched off.
inline bool bf16_tiles_take(const Spec& sp, at::ScalarType dtype, bool backward) {
  return dtype == at::kBFloat16 && sp.dim % 2 == 0 && (!backward || sp.dim_v % 2 == 0) && bf16_tiles_available() &&
         bf16_tiles_wanted();
}
// x (q when `queries`, else k, dense or packed as the call holds them) rotated by `rope` at the
// fused kernels' positions into a fresh tensor of x's dtype (attention_rotary.cpp); `conjugate`
// rotates back (dq, dk). The bfloat16 tiles take fused RoPE this way: q and k rotated once.
at::Tensor rotated_copy(const Call& c, const RopeTables& rope, const at::Tensor& x, bool queries, bool conjugate);

// The caller's RoPE tables in the accumulation type (positions x R/2: small).
struct RopeIn {
  at::Tensor cos, sin, offsets;
  bool interleaved;
  RopeIn(const RopeTables& t, at::ScalarType acc)
      : cos(t.cos.to(acc).contiguous()), sin(t.sin.to(acc).contiguous()), offsets(t.offsets.to(at::kLong).contiguous()),
        interleaved(t.interleaved) {}
  template <typename A>
  rope::Rope<A> view() const {
    return {cos.data_ptr<A>(), sin.data_ptr<A>(), cos.size(1), cos.size(0), interleaved, offsets.data_ptr<int64_t>()};
  }
};

template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

}  // namespace flash
}  // namespace cpu
}  // namespace attnkit
