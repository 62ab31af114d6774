// Flash attention on the CPU: the structure of triton_kernels/flash_attention.py
// with GEMMs on tiles instead of tl.dot.
//
// Forward: one task per (batch, head, block of BM queries) walks the visible key
// blocks with an online softmax; S = Q (scale K^T) and acc += P V are GEMMs into
// per-thread buffers, the row passes (max, exp, soft-cap) are vectorized
// (attention_rows.cpp). Backward recomputes P from the saved log-sum-exp. With
// enough (batch, kv-head) pairs to keep every thread busy, one task per pair
// walks its key blocks and also accumulates dQ of the group's heads (5 GEMMs per
// tile, no race: the task owns those rows). Otherwise dK/dV run one task per
// key block and dQ one per query block (7 GEMMs per tile). No atomics either
// way, and a fixed summation order, so the result is deterministic.
//
// Every tile product is a plain row-major A B (gemm_nn: oneDNN's brgemm, BLAS
// for double): operands that would need a transpose (K^T, V^T, Q^T, dO^T) are
// transposed once per call, O(N D). Statistics, accumulators and GEMMs are
// float (double for double inputs); fp16/bf16 inputs are converted to float
// once per call and the results back.
//
// Fused RoPE (attention_rope.h, entered from attention_rotary.cpp) rotates q
// and k in those same copies: K while scale * K^T is formed, each Q tile as a
// forward task loads it, Q and K while the backward transposes them (K per key
// block inside the dK/dV kernel on the one-task-per-pair schedule), and writes
// dQ, dK rotated back where it scales them.
#include "attnkit/attention.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_rope.h"
#include "attention_rows.h"

// BLAS as linked into libtorch_cpu (MKL on x86 builds). Weak, so that a torch
// without these symbols still loads the extension and falls back to ATen.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*, const int*,
            const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

namespace attnkit {
namespace cpu {

namespace {

constexpr int64_t kUnbounded = int64_t(1) << 40;  // a window side of -1

// ------------------------------------------------------------------ GEMM on row-major tiles
// C (m x n) = alpha * op(A) op(B) + beta * C; op(A) is m x k; all row-major with leading dims.

template <typename T, typename C>
void aten_gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const T* a, int64_t lda, const T* b,
               int64_t ldb, float beta, C* c, int64_t ldc) {
  const auto in = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto out = at::TensorOptions().dtype(c10::CppTypeToScalarType<C>::value);
  at::Tensor A = at::from_blob(const_cast<T*>(a), {ta ? k : m, ta ? m : k}, {lda, 1}, in);
  at::Tensor B = at::from_blob(const_cast<T*>(b), {tb ? n : k, tb ? k : n}, {ldb, 1}, in);
  at::Tensor Ct = at::from_blob(c, {m, n}, {ldc, 1}, out);
  at::Tensor prod = at::mm((ta ? A.t() : A).to(out.dtype()), (tb ? B.t() : B).to(out.dtype()));
  if (beta == 0) {
    Ct.copy_(prod.mul_(alpha));
  } else {
    Ct.mul_(beta).add_(prod, alpha);
  }
}

// Unused where gemm_nn has brgemm.
[[maybe_unused]] void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                           const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (sgemm_ == nullptr) return aten_gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  // Column-major BLAS sees each row-major matrix transposed: C^T = op(B)^T op(A)^T.
  const char tA = ta ? 'T' : 'N', tB = tb ? 'T' : 'N';
  const int M = int(n), N = int(m), K = int(k), LA = int(ldb), LB = int(lda), LC = int(ldc);
  sgemm_(&tB, &tA, &M, &N, &K, &alpha, b, &LA, a, &LB, &beta, c, &LC);
}

void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
          const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  if (dgemm_ == nullptr) {
    const auto opts = at::TensorOptions().dtype(at::kDouble);
    at::Tensor A = at::from_blob(const_cast<double*>(a), {ta ? k : m, ta ? m : k}, {lda, 1}, opts);
    at::Tensor B = at::from_blob(const_cast<double*>(b), {tb ? n : k, tb ? k : n}, {ldb, 1}, opts);
    at::Tensor C = at::from_blob(c, {m, n}, {ldc, 1}, opts);
    at::Tensor prod = at::mm(ta ? A.t() : A, tb ? B.t() : B);
    beta == 0 ? C.copy_(prod.mul_(alpha)) : C.mul_(beta).add_(prod, alpha);
    return;
  }
  const char tA = ta ? 'T' : 'N', tB = tb ? 'T' : 'N';
  const int M = int(n), N = int(m), K = int(k), LA = int(ldb), LB = int(lda), LC = int(ldc);
  dgemm_(&tB, &tA, &M, &N, &K, &alpha, b, &LA, a, &LB, &beta, c, &LC);
}

// C (m x n) = A B (+ C when `add`), row-major, no transposes, float. oneDNN's
// batch-reduce GEMM where torch's headers declare it (CPUBLAS_BRGEMM_F32F32F32;
// else BLAS): on the AMD EPYC of BENCHMARKS.md, 16.8 us vs MKL sgemm's 41 us for
// a 64 x 512 x 64 tile, 1 thread (MKL seems to take a slower path off Intel CPUs).
void gemm_nn(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, bool add,
             float* c, int64_t ldc) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, add, a, b, c, /*is_vnni=*/false);
#else
  gemm(false, false, m, n, k, 1.0f, a, lda, b, ldb, add ? 1.0f : 0.0f, c, ldc);
#endif
}

void gemm_nn(int64_t m, int64_t n, int64_t k, const double* a, int64_t lda, const double* b, int64_t ldb, bool add,
             double* c, int64_t ldc) {
  gemm(false, false, m, n, k, 1.0, a, lda, b, ldb, add ? 1.0 : 0.0, c, ldc);
}

// Ends a thread's brgemm use (frees hardware state on CPUs where it holds any).
void gemm_nn_release() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  at::native::cpublas::brgemm_release(/*is_vnni=*/false);
#endif
}

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
  // BLAS wants a leading dim >= the row length; a single row's stride is free.
  const int64_t row = varlen ? 0 : 2;
  const int64_t sm = t.size(row) <= 1 ? std::max<int64_t>(t.stride(row), t.size(-1)) : t.stride(row);
  if (varlen) return {data, 0, t.stride(1), sm};
  return {data, t.stride(0), t.stride(1), sm};
}

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

uint64_t stream_of(const Spec& sp, int64_t b, int64_t h) { return sp.seed + uint64_t(b * sp.heads + h); }

// x[j] *= drop_scale where kept, 0 where dropped.
template <typename acc_t>
void apply_dropout(acc_t* x, const uint8_t* keep, int64_t n, acc_t drop_scale) {
  for (int64_t j = 0; j < n; ++j) x[j] = keep[j] ? x[j] * drop_scale : acc_t(0);
}

struct Blocks {
  int64_t m, n;  // queries x keys per tile
};

// ------------------------------------------------------------------ fused RoPE operands

// n rows of x (leading dim x_ld) from position `pos` on, rotated by `rope` into
// `rows` (leading dim rows_ld) and, times `factor`, stored as columns into
// `col` (leading dim ld). What the unfused form does in two passes (rotate,
// then transpose) is one here, the columns written from rows still in L1.
template <typename A, typename T>
void rotate_block(const rope::Rope<A>& rope, const T* x, int64_t x_ld, int64_t pos, int64_t n, int64_t D, A factor,
                  A* rows, int64_t rows_ld, A* col, int64_t ld) {
  constexpr int64_t kChunk = 16;  // rows per transposed store: 16 floats of a column, one cache line
  for (int64_t j = 0; j < n; ++j) rope::row(rope, pos + j, false, x + j * x_ld, rows + j * rows_ld, D, A(1));
  for (int64_t j0 = 0; j0 < n; j0 += kChunk) {
    const int64_t m = std::min(kChunk, n - j0);
    if constexpr (std::is_same_v<A, float>) {
      if (m == kChunk && D % 8 == 0 && rows_ld == D) {
        rope::columns16_f32(rows + j0 * D, D, col + j0, ld, factor);
        continue;
      }
    }
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t j = j0; j < j0 + m; ++j) col[d * ld + j] = rows[j * rows_ld + d] * factor;
    }
  }
}

// One pass over q or k (`queries`: positions i + diag + offset, else j + offset):
// times `factor`, the transposes of the rotated rows laid out as transposed()
// does into `cols`, and the rotated rows themselves into `rows` when given.
template <typename A, typename T>
void rotate_to_columns(const Spec& sp, bool queries, Rows<const T> x, int64_t heads, const rope::Rope<A>& rope,
                       A factor, Rows<A> cols, int64_t ld, const Rows<A>* rows) {
  constexpr int64_t kChunk = 64;
  const int64_t D = sp.dim;
  at::parallel_for(0, sp.batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<A> tmp(rows == nullptr ? kChunk * D : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, h = task % heads;
      const Seq sq = sp.seq(b);
      const int64_t start = queries ? sq.q_start : sq.k_start, len = queries ? sq.q_len : sq.k_len;
      const int64_t pos = (queries ? sq.diag : 0) + rope.offsets[b];
      for (int64_t j0 = 0; j0 < len; j0 += kChunk) {
        const int64_t i = start + j0;
        rotate_block(rope, x.at(b, h, i), x.sm, pos + j0, std::min(kChunk, len - j0), D, factor,
                     rows != nullptr ? rows->at(b, h, i) : tmp.data(), rows != nullptr ? rows->sm : D,
                     cols.at(b, h, i), ld);
      }
    }
  });
}

// ------------------------------------------------------------------ forward

// In the accumulation type (fp16/bf16 inputs arrive converted to float). `kt`
// holds scale * K^T, keys as columns, so that both tile products are plain A B
// GEMMs (gemm_nn). With `rope`, each task rotates its Q tile (q in its own
// dtype, q_t) into a BM x D buffer once, before its key loop; kt arrives rotated.
template <typename scalar_t, typename q_t = scalar_t>
void forward_kernel(const Spec& sp, Rows<const q_t> q, const rope::Rope<scalar_t>* rope, Rows<const scalar_t> kt,
                    int64_t ld_kt, Rows<const scalar_t> v, Rows<scalar_t> out, Rows<scalar_t> lse, Blocks blk) {
  using acc_t = scalar_t;
  TORCH_INTERNAL_ASSERT(rope != nullptr || (std::is_same_v<q_t, acc_t>), "attention: q must arrive in acc_t");
  const int64_t BM = blk.m, BN = blk.n, D = sp.dim, DV = sp.dim_v;
  const int64_t m_blocks = (sp.max_q + BM - 1) / BM;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  at::parallel_for(0, sp.batch * sp.heads * m_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s(BM * BN), acc(BM * DV), m(BM), l(BM), q_buf(rope != nullptr ? BM * D : 0);
    std::vector<uint8_t> keep(BN);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t mb = task % m_blocks, b = task / m_blocks / sp.heads, h = task / m_blocks % sp.heads;
      const Seq sq = sp.seq(b);
      const int64_t m0 = mb * BM;
      if (m0 >= sq.q_len) continue;
      const int64_t rows = std::min(BM, sq.q_len - m0), kvh = h / sp.group;
      const acc_t* qt = q_buf.data();
      int64_t ld_q = D;
      if (rope != nullptr) {
        const int64_t pos = sq.diag + rope->offsets[b] + m0;
        for (int64_t r = 0; r < rows; ++r) {
          rope::row(*rope, pos + r, false, q.at(b, h, sq.q_start + m0 + r), q_buf.data() + r * D, D, acc_t(1));
        }
      } else if constexpr (std::is_same_v<q_t, acc_t>) {
        qt = q.at(b, h, sq.q_start + m0);
        ld_q = q.sm;
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      std::fill(m.begin(), m.end(), neg_inf);
      std::fill(l.begin(), l.end(), acc_t(0));
      const auto [k_lo, k_hi] = sp.key_range(sq, m0, rows);
      for (int64_t n0 = k_lo; n0 < k_hi; n0 += BN) {
        const int64_t cols = std::min(BN, k_hi - n0);
        gemm_nn(rows, cols, D, qt, ld_q, kt.at(b, kvh, sq.k_start + n0), ld_kt, false, s.data(), BN);
        tile_scores(sp, sq, b, h, m0, rows, n0, cols, s.data(), static_cast<acc_t*>(nullptr), BN);  // no tanh kept
        for (int64_t r = 0; r < rows; ++r) {
          acc_t* row = s.data() + r * BN;
          const acc_t tile_max = attn_rows::row_max(row, cols);  // NaN propagates: std::max would drop it
          const acc_t m_new = std::isnan(tile_max) ? tile_max : std::max(m[r], tile_max);
          const acc_t m_use = m_new == neg_inf ? acc_t(0) : m_new;  // nothing visible yet
          const acc_t sum = attn_rows::exp_shift_sum(row, cols, m_use);
          const acc_t alpha = std::exp(m[r] - m_use);
          l[r] = l[r] * alpha + sum;  // counts every probability; dropout only touches the output
          m[r] = m_new;
          if (alpha != acc_t(1)) {
            for (int64_t d = 0; d < DV; ++d) acc[r * DV + d] *= alpha;
          }
          if (sp.dropout) {
            attn_rows::dropout_keep(keep.data(), stream_of(sp, b, h), m0 + r, n0, cols, sp.max_k, sp.threshold);
            apply_dropout(row, keep.data(), cols, acc_t(sp.drop_scale));
          }
        }
        gemm_nn(rows, DV, cols, s.data(), BN, v.at(b, kvh, sq.k_start + n0), v.sm, true, acc.data(), DV);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const bool empty = l[r] == acc_t(0);
        const acc_t inv = empty ? acc_t(0) : acc_t(1) / l[r];
        scalar_t* o = out.at(b, h, sq.q_start + m0 + r);
        for (int64_t d = 0; d < DV; ++d) o[d] = static_cast<scalar_t>(acc[r * DV + d] * inv);
        *lse.at(b, h, sq.q_start + m0 + r) = empty ? neg_inf : m[r] + std::log(l[r]);
      }
    }
    gemm_nn_release();
  });
}

// ------------------------------------------------------------------ backward
// In the accumulation type throughout (fp16/bf16 arrive converted). Every tile
// product is a plain A B GEMM (gemm_nn) on operands transposed once per call
// (Operands): dV and dK are accumulated transposed, dV^T += dO^T P and
// dK^T += Q^T dS, so no tile is ever transposed.

template <typename T>
struct Operands {
  Rows<const T> q, k, dout;         // rows, as given (k for dQ += dS K)
  Rows<const T> qT, kT, vT, doutT;  // columns of the transposed copies (kT holds scale * K^T)
  int64_t ld_q, ld_k, ld_v, ld_do;  // their leading dims
};

// What both backward kernels share: the buffers of one thread and the tile step.
template <typename T>
struct BackwardTile {
  const Spec& sp;
  const Operands<T>& op;
  int64_t BN;
  std::vector<T> s, t, dp, ds;
  std::vector<uint8_t> keep;

  BackwardTile(const Spec& spec, const Operands<T>& ops, Blocks blk)
      : sp(spec), op(ops), BN(blk.n), s(blk.m * blk.n), t(spec.softcap > 0 ? blk.m * blk.n : 0), dp(blk.m * blk.n),
        ds(blk.m * blk.n), keep(blk.n) {}

  // P (in s) and dP (in dp, dropout applied) of a (rows x cols) tile, `kt`
  // holding its scale * K^T columns (leading dim ld_kt); with `p_out`, also the
  // dropped-out P for the dV GEMM (returned).
  const T* probabilities(const Seq& sq, int64_t b, int64_t h, int64_t m0, int64_t rows, int64_t n0, int64_t cols,
                         const T* kt, int64_t ld_kt, const Rows<T>& lse, bool p_out) {
    const int64_t kvh = h / sp.group, i0 = sq.q_start + m0, j0 = sq.k_start + n0;
    gemm_nn(rows, cols, sp.dim, op.q.at(b, h, i0), op.q.sm, kt, ld_kt, false, s.data(), BN);
    tile_scores(sp, sq, b, h, m0, rows, n0, cols, s.data(), t.data(), BN);
    gemm_nn(rows, cols, sp.dim_v, op.dout.at(b, h, i0), op.dout.sm, op.vT.at(b, kvh, j0), op.ld_v, false, dp.data(),
            BN);
    for (int64_t r = 0; r < rows; ++r) {
      T* row = s.data() + r * BN;
      T stat = *lse.at(b, h, i0 + r);
      stat = std::isinf(stat) ? T(0) : stat;  // an empty row's scores are all -inf: P = 0
      attn_rows::exp_shift_sum(row, cols, stat);
      if (sp.dropout) {
        T* out_row = ds.data() + r * BN;  // ds holds the dropped-out P until dS is formed
        attn_rows::dropout_keep(keep.data(), stream_of(sp, b, h), m0 + r, n0, cols, sp.max_k, sp.threshold);
        apply_dropout(dp.data() + r * BN, keep.data(), cols, T(sp.drop_scale));
        if (p_out) {
          std::copy(row, row + cols, out_row);
          apply_dropout(out_row, keep.data(), cols, T(sp.drop_scale));
        }
      }
    }
    return sp.dropout ? ds.data() : s.data();
  }

  // dS = P * (dP - delta) (* soft-cap derivative).
  const T* score_grad(const Seq& sq, int64_t b, int64_t h, int64_t m0, int64_t rows, int64_t cols,
                      const Rows<T>& delta) {
    for (int64_t r = 0; r < rows; ++r) {
      attn_rows::softmax_grad(ds.data() + r * BN, s.data() + r * BN, dp.data() + r * BN,
                              t.empty() ? nullptr : t.data() + r * BN, cols, *delta.at(b, h, sq.q_start + m0 + r));
    }
    return ds.data();
  }
};

// dK, dV (and dQ when `dq_acc` is given, owning whole (batch, kv-head) pairs).
// With `rope`, dK is rotated back as it is written (the gradient of a rotation
// is the opposite rotation), and with `k_raw` (k unrotated) each key block's
// rotated K rows and scale * K^T are built here, once per block, instead of
// read from op.k and op.kT.
template <typename T>
void backward_dkdv_kernel(const Spec& sp, const Operands<T>& op, Rows<T> lse, Rows<T> delta, Rows<T> dk, Rows<T> dv,
                          Rows<T>* dq_acc, const rope::Rope<T>* rope, const Rows<const T>* k_raw, Blocks blk) {
  const int64_t BM = blk.m, BN = blk.n, D = sp.dim, DV = sp.dim_v;
  const int64_t n_blocks = dq_acc != nullptr ? 1 : (sp.max_k + BN - 1) / BN;
  at::parallel_for(0, sp.batch * sp.heads_kv * n_blocks, 1, [&](int64_t begin, int64_t end) {
    BackwardTile<T> tile(sp, op, blk);
    std::vector<T> dkT(D * BN), dvT(DV * BN), dk_tmp(D);  // (D x cols), leading dim BN
    std::vector<T> k_tile(k_raw != nullptr ? BN * D : 0), kt_tile(k_raw != nullptr ? D * BN : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t nb = task % n_blocks, b = task / n_blocks / sp.heads_kv, kvh = task / n_blocks % sp.heads_kv;
      const Seq sq = sp.seq(b);
      const int64_t first = nb * BN, last = dq_acc != nullptr ? sq.k_len : std::min(first + BN, sq.k_len);
      for (int64_t n0 = first; n0 < last; n0 += BN) {
        const int64_t cols = std::min(BN, sq.k_len - n0);
        const T* k_rows = op.k.at(b, kvh, sq.k_start + n0);
        const T* kt = op.kT.at(b, kvh, sq.k_start + n0);
        int64_t ld_k_rows = op.k.sm, ld_kt = op.ld_k;
        if (k_raw != nullptr) {
          rotate_block(*rope, k_raw->at(b, kvh, sq.k_start + n0), k_raw->sm, rope->offsets[b] + n0, cols, D,
                       T(sp.scale), k_tile.data(), D, kt_tile.data(), BN);
          k_rows = k_tile.data(), kt = kt_tile.data(), ld_k_rows = D, ld_kt = BN;
        }
        std::fill(dkT.begin(), dkT.end(), T(0));
        std::fill(dvT.begin(), dvT.end(), T(0));
        const auto [q_lo, q_hi] = sp.query_range(sq, n0, cols);
        for (int64_t h = kvh * sp.group; h < (kvh + 1) * sp.group; ++h) {
          for (int64_t m0 = q_lo; m0 < q_hi; m0 += BM) {
            const int64_t rows = std::min(BM, q_hi - m0), i0 = sq.q_start + m0;
            const T* p = tile.probabilities(sq, b, h, m0, rows, n0, cols, kt, ld_kt, lse, true);
            gemm_nn(DV, cols, rows, op.doutT.at(b, h, i0), op.ld_do, p, BN, true, dvT.data(), BN);
            const T* dst = tile.score_grad(sq, b, h, m0, rows, cols, delta);
            gemm_nn(D, cols, rows, op.qT.at(b, h, i0), op.ld_q, dst, BN, true, dkT.data(), BN);
            if (dq_acc != nullptr) {
              gemm_nn(rows, D, cols, dst, BN, k_rows, ld_k_rows, true, dq_acc->at(b, h, i0), dq_acc->sm);
            }
          }
        }
        for (int64_t c = 0; c < cols; ++c) {
          T* dk_row = dk.at(b, kvh, sq.k_start + n0 + c);
          T* dv_row = dv.at(b, kvh, sq.k_start + n0 + c);
          if (rope != nullptr) {
            for (int64_t d = 0; d < D; ++d) dk_tmp[d] = dkT[d * BN + c];
            rope::row(*rope, rope->offsets[b] + n0 + c, true, dk_tmp.data(), dk_row, D, T(sp.scale));
          } else {
            for (int64_t d = 0; d < D; ++d) dk_row[d] = dkT[d * BN + c] * T(sp.scale);
          }
          for (int64_t d = 0; d < DV; ++d) dv_row[d] = dvT[d * BN + c];
        }
      }
    }
    gemm_nn_release();
  });
}

template <typename T>
void backward_dq_kernel(const Spec& sp, const Operands<T>& op, Rows<T> lse, Rows<T> delta, Rows<T> dq,
                        const rope::Rope<T>* rope, Blocks blk) {
  const int64_t BM = blk.m, BN = blk.n, D = sp.dim;
  const int64_t m_blocks = (sp.max_q + BM - 1) / BM;
  at::parallel_for(0, sp.batch * sp.heads * m_blocks, 1, [&](int64_t begin, int64_t end) {
    BackwardTile<T> tile(sp, op, blk);
    std::vector<T> dq_acc(BM * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t mb = task % m_blocks, b = task / m_blocks / sp.heads, h = task / m_blocks % sp.heads;
      const Seq sq = sp.seq(b);
      const int64_t m0 = mb * BM;
      if (m0 >= sq.q_len) continue;
      const int64_t rows = std::min(BM, sq.q_len - m0), kvh = h / sp.group;
      std::fill(dq_acc.begin(), dq_acc.end(), T(0));
      const auto [k_lo, k_hi] = sp.key_range(sq, m0, rows);
      for (int64_t n0 = k_lo; n0 < k_hi; n0 += BN) {
        const int64_t cols = std::min(BN, k_hi - n0);
        tile.probabilities(sq, b, h, m0, rows, n0, cols, op.kT.at(b, kvh, sq.k_start + n0), op.ld_k, lse, false);
        const T* dst = tile.score_grad(sq, b, h, m0, rows, cols, delta);
        gemm_nn(rows, D, cols, dst, BN, op.k.at(b, kvh, sq.k_start + n0), op.k.sm, true, dq_acc.data(), D);
      }
      for (int64_t r = 0; r < rows; ++r) {
        T* dq_row = dq.at(b, h, sq.q_start + m0 + r);
        if (rope != nullptr) {
          rope::row(*rope, sq.diag + rope->offsets[b] + m0 + r, true, dq_acc.data() + r * D, dq_row, D, T(sp.scale));
        } else {
          for (int64_t d = 0; d < D; ++d) dq_row[d] = dq_acc[r * D + d] * T(sp.scale);
        }
      }
    }
    gemm_nn_release();
  });
}

// dq *= scale, rotated back in the same pass: the end of the fused backward,
// which accumulates dQ in place.
template <typename T>
void finish_dq_rope(const Spec& sp, Rows<T> dq, const rope::Rope<T>& rope) {
  at::parallel_for(0, sp.batch * sp.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / sp.heads, h = task % sp.heads;
      const Seq sq = sp.seq(b);
      const int64_t pos = sq.diag + rope.offsets[b];
      for (int64_t i = 0; i < sq.q_len; ++i) {
        T* row = dq.at(b, h, sq.q_start + i);
        rope::row(rope, pos + i, true, row, row, sp.dim, T(sp.scale));
      }
    }
  });
}

// delta_i = sum_d dO_id O_id, the row term of the softmax backward.
template <typename T>
void backward_delta(const Spec& sp, Rows<const T> out, Rows<const T> dout, Rows<T> delta) {
  at::parallel_for(0, sp.batch * sp.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / sp.heads, h = task % sp.heads;
      const Seq sq = sp.seq(b);
      for (int64_t i = sq.q_start; i < sq.q_start + sq.q_len; ++i) {
        const T* o = out.at(b, h, i);
        const T* g = dout.at(b, h, i);
        T sum = 0;
        for (int64_t d = 0; d < sp.dim_v; ++d) sum += o[d] * g[d];
        *delta.at(b, h, i) = sum;
      }
    }
  });
}

// ------------------------------------------------------------------ tile sizes

// Chosen on AMD EPYC, B=4 H=8 D=64: time varies by a few percent between
// 64..256 x 256..512 tiles; BN = 512 keys cuts GEMM calls, BM = 64 queries keeps
// enough tasks for the threads at short N. D > 128 halves BN to keep a thread's
// buffers in L2. Rechecked with brgemm (1 thread, N = 512 and 4096): forward
// 32..128 x 256..1024 and backward 32..128 x 64..256 within ~5-8 %, these best or tied.
Blocks forward_blocks(const Spec& sp) {
  return {64, sp.dim > 128 ? 256 : 512};
}

Blocks backward_blocks(const Spec& sp) {
  return {64, sp.dim > 128 ? 64 : 128};
}

// ------------------------------------------------------------------ argument checks

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Makes rows addressable with a BLAS leading dimension: last dim contiguous and
// rows not overlapping (an expanded k, say, is copied).
at::Tensor rows_ready(const at::Tensor& t, int64_t row_dim) {
  if (t.stride(-1) != 1 || (t.size(row_dim) > 1 && t.stride(row_dim) < t.size(-1))) return t.contiguous();
  return t;
}

void check_cu_seqlens(const at::Tensor& cu, const char* name, int64_t total, int64_t max_seqlen) {
  TORCH_CHECK(cu.device().is_cpu() && cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.numel() >= 2,
              "attention: ", name, " must be a 1-D int32 CPU tensor of batch + 1 >= 2 entries");
  const at::Tensor c = cu.contiguous();
  const int32_t* p = c.data_ptr<int32_t>();
  TORCH_CHECK(p[0] == 0 && p[cu.numel() - 1] == total, "attention: ", name, " must run from 0 to ", total);
  for (int64_t b = 0; b + 1 < cu.numel(); ++b) {
    TORCH_CHECK(p[b + 1] >= p[b], "attention: ", name, " must be non-decreasing");
    TORCH_CHECK(p[b + 1] - p[b] <= max_seqlen, "attention: a sequence of ", name, " is longer than max_seqlen ",
                max_seqlen);
  }
}

Call prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& cu_q,
             const c10::optional<at::Tensor>& cu_k, int64_t max_q, int64_t max_k,
             const c10::optional<at::Tensor>& attn_mask, const c10::optional<at::Tensor>& key_padding_mask,
             const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left, int64_t window_right,
             bool bottom_right, double softcap, double scale, double dropout_p, int64_t seed) {
  TORCH_CHECK(q.defined() && k.defined() && v.defined(), "attention: q, k and v must be tensors");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "attention: tensors must be on the CPU");
  TORCH_CHECK(is_float_type(q.scalar_type()), "attention: q must be float16, bfloat16, float32 or float64, got ",
              q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "attention: q, k and v must have one dtype");
  TORCH_CHECK(cu_q.has_value() == cu_k.has_value(), "attention: give both cu_seqlens_q and cu_seqlens_k or neither");
  Call c;
  Spec& sp = c.spec;
  sp.varlen = cu_q.has_value();
  const int64_t ndim = sp.varlen ? 3 : 4, heads_dim = 1, row_dim = sp.varlen ? 0 : 2;
  TORCH_CHECK(q.dim() == ndim && k.dim() == ndim && v.dim() == ndim, "attention: q, k, v must be ", ndim,
              "-D (", sp.varlen ? "packed (total, H, D)" : "(B, H, N, D)", ")");
  sp.heads = q.size(heads_dim);
  sp.heads_kv = k.size(heads_dim);
  TORCH_CHECK(v.size(heads_dim) == sp.heads_kv && sp.heads_kv > 0 && sp.heads % sp.heads_kv == 0,
              "attention: q heads must be a multiple of k/v heads, and k, v must have the same heads");
  sp.group = sp.heads / sp.heads_kv;
  sp.dim = q.size(-1);
  sp.dim_v = v.size(-1);
  TORCH_CHECK(k.size(-1) == sp.dim && sp.dim >= 1 && sp.dim_v >= 1, "attention: q and k need one head dim >= 1");
  TORCH_CHECK(k.size(row_dim) == v.size(row_dim), "attention: k and v must have the same length");
  TORCH_CHECK(max_q >= 0 && max_k >= 0 && max_q < INT_MAX && max_k < INT_MAX, "attention: bad max_seqlen");
  if (sp.varlen) {
    check_cu_seqlens(*cu_q, "cu_seqlens_q", q.size(0), max_q);
    check_cu_seqlens(*cu_k, "cu_seqlens_k", k.size(0), max_k);
    TORCH_CHECK(cu_q->numel() == cu_k->numel(), "attention: cu_seqlens_q and cu_seqlens_k differ in batch");
    TORCH_CHECK(!attn_mask.has_value() && !key_padding_mask.has_value(),
                "attention: attn_mask and key_padding_mask are dense-only");
    c.cu_q = cu_q->contiguous();
    c.cu_k = cu_k->contiguous();
    sp.cu_q = c.cu_q.data_ptr<int32_t>();
    sp.cu_k = c.cu_k.data_ptr<int32_t>();
    sp.batch = cu_q->numel() - 1;
  } else {
    sp.batch = q.size(0);
    TORCH_CHECK(k.size(0) == sp.batch && v.size(0) == sp.batch, "attention: q, k, v must have one batch size");
    TORCH_CHECK(max_q == q.size(2) && max_k == k.size(2), "attention: dense max_seqlen must be Nq and Nk");
  }
  sp.max_q = max_q;
  sp.max_k = max_k;
  c.q = rows_ready(q, row_dim);
  c.k = rows_ready(k, row_dim);
  c.v = rows_ready(v, row_dim);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (attn_mask.has_value()) {
    const at::Tensor& mask = *attn_mask;
    TORCH_CHECK(mask.device().is_cpu() && mask.dim() == 4 &&
                    mask.sizes() == at::IntArrayRef({sp.batch, sp.heads, max_q, max_k}),
                "attention: attn_mask must be a CPU tensor of shape (B, H, Nq, Nk), usually an expanded view");
    if (mask.scalar_type() == at::kBool || mask.scalar_type() == at::kByte) {
      c.keep_mask = mask.scalar_type() == at::kBool ? mask.view(at::kByte) : mask;
      sp.keep_mask = c.keep_mask.data_ptr<uint8_t>();
    } else {
      TORCH_CHECK(is_float_type(mask.scalar_type()), "attention: attn_mask must be bool, uint8 or floating");
      // Convert only the distinct values (broadcast dims narrowed to 1), then
      // broadcast again: never an (Nq, Nk) copy per batch and head.
      at::Tensor compact = mask;
      for (int64_t d = 0; d < 4; ++d) {
        if (compact.stride(d) == 0) compact = compact.narrow(d, 0, 1);
      }
      c.add_mask = compact.to(acc).expand(mask.sizes());
      sp.add_mask = c.add_mask.data_ptr();
    }
    const at::Tensor& used = c.keep_mask.defined() ? c.keep_mask : c.add_mask;
    for (int64_t d = 0; d < 4; ++d) sp.mask_stride[d] = used.size(d) == 1 ? 0 : used.stride(d);
  }
  if (key_padding_mask.has_value()) {
    const at::Tensor& pad = *key_padding_mask;
    TORCH_CHECK(pad.device().is_cpu() && (pad.scalar_type() == at::kBool || pad.scalar_type() == at::kByte) &&
                    pad.sizes() == at::IntArrayRef({sp.batch, max_k}),
                "attention: key_padding_mask must be a bool CPU tensor of shape (B, Nk)");
    c.pad = (pad.scalar_type() == at::kBool ? pad.view(at::kByte) : pad).contiguous();
    sp.pad = c.pad.data_ptr<uint8_t>();
  }
  if (alibi_slopes.has_value()) {
    const at::Tensor& slopes = *alibi_slopes;
    TORCH_CHECK(slopes.device().is_cpu() && slopes.scalar_type() == at::kFloat &&
                    slopes.sizes() == at::IntArrayRef({sp.batch, sp.heads}),
                "attention: alibi_slopes must be a float32 CPU tensor of shape (B, H)");
    c.alibi = slopes.contiguous();
    sp.alibi = c.alibi.data_ptr<float>();
  }
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "attention: window sides must be >= -1");
  sp.left = window_left < 0 ? kUnbounded : window_left;
  sp.right = window_right < 0 ? kUnbounded : window_right;
  sp.bottom_right = bottom_right;
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0, "attention: softcap must be finite and >= 0");
  TORCH_CHECK(std::isfinite(scale), "attention: scale must be finite");
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, "attention: dropout_p must be in [0, 1)");
  sp.softcap = softcap;
  sp.scale = scale;
  sp.dropout = dropout_p > 0;
  sp.threshold = static_cast<uint32_t>(std::nearbyint(dropout_p * double(1 << 24)));  // Python's round
  sp.drop_scale = sp.dropout ? 1.0 / (1.0 - dropout_p) : 1.0;
  sp.seed = static_cast<uint64_t>(seed);
  return c;
}

std::vector<int64_t> out_shape(const at::Tensor& q, int64_t dim_v) {
  std::vector<int64_t> shape(q.sizes().begin(), q.sizes().end());
  shape.back() = dim_v;
  return shape;
}

std::vector<int64_t> stat_shape(const Spec& sp, const at::Tensor& q) {
  if (sp.varlen) return {sp.heads, q.size(0)};
  return {sp.batch, sp.heads, sp.max_q};
}

// factor * x^T per head in `dtype`, rows as columns: dense (B, H, D, N), varlen
// (H, D, total). One O(N D) pass per call, so that tile products need no transposes.
at::Tensor transposed(const at::Tensor& x, bool varlen, double factor, at::ScalarType dtype) {
  const at::Tensor view = varlen ? x.permute({1, 2, 0}) : x.transpose(2, 3);
  at::Tensor t = at::empty(view.sizes(), x.options().dtype(dtype));
  t.copy_(view);
  if (factor != 1.0) t.mul_(factor);
  return t;
}

// Rows<> addressing column `key` of head (b, h) in transposed(), and its leading dim.
template <typename T>
Rows<T> columns_of(const at::Tensor& t, bool varlen) {
  T* data = static_cast<T*>(t.data_ptr());
  if (varlen) return {data, 0, t.stride(0), 1};
  return {data, t.stride(0), t.stride(1), 1};
}

int64_t column_ld(const at::Tensor& t) { return t.stride(-2); }

at::Tensor as_type(const at::Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

// An empty tensor shaped as transposed(x) would make it.
at::Tensor columns_like(const at::Tensor& x, bool varlen, at::ScalarType dtype) {
  const at::Tensor view = varlen ? x.permute({1, 2, 0}) : x.transpose(2, 3);
  return at::empty(view.sizes(), x.options().dtype(dtype));
}

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

}  // namespace

std::vector<at::Tensor> attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& cu_seqlens_q,
    const c10::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const c10::optional<at::Tensor>& attn_mask, const c10::optional<at::Tensor>& key_padding_mask,
    const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left, int64_t window_right, bool bottom_right,
    double softcap, double scale, double dropout_p, int64_t seed) {
  return attention_forward_rope(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask,
                                key_padding_mask, alibi_slopes, window_left, window_right, bottom_right, softcap, scale,
                                dropout_p, seed, nullptr);
}

std::vector<at::Tensor> attention_forward_rope(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& cu_seqlens_q,
    const c10::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const c10::optional<at::Tensor>& attn_mask, const c10::optional<at::Tensor>& key_padding_mask,
    const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left, int64_t window_right, bool bottom_right,
    double softcap, double scale, double dropout_p, int64_t seed, const RopeTables* rope_tables) {
  Call c = prepare(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask, key_padding_mask,
                   alibi_slopes, window_left, window_right, bottom_right, softcap, scale, dropout_p, seed);
  const Spec& sp = c.spec;
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty(out_shape(q, sp.dim_v), q.options());
  at::Tensor lse = at::empty(stat_shape(sp, q), q.options().dtype(acc));
  const bool vl = sp.varlen;
  // fp16/bf16 run as float: converting q, v (and k, transposed anyway) once
  // beats BLAS's 16-bit GEMMs, which widen every tile to float themselves.
  const at::Tensor va = as_type(c.v, acc);
  at::Tensor outa = q.scalar_type() == acc ? out : at::empty(out.sizes(), out.options().dtype(acc));
  if (rope_tables == nullptr) {
    const at::Tensor qa = as_type(c.q, acc), kt = transposed(c.k, vl, scale, acc);
    AT_DISPATCH_FLOATING_TYPES(acc, "attention_forward_cpu", [&] {
      forward_kernel<scalar_t>(sp, rows_of<const scalar_t>(qa, vl), nullptr, columns_of<const scalar_t>(kt, vl),
                               column_ld(kt), rows_of<const scalar_t>(va, vl), rows_of<scalar_t>(outa, vl),
                               stats_of<scalar_t>(lse, vl), forward_blocks(sp));
    });
  } else {
    // Fused RoPE: k rotated while scale * K^T is formed, q tile by tile in the
    // kernel, straight from q's dtype (no rotated or converted copy of q).
    const RopeIn rin(*rope_tables, acc);
    const at::Tensor kt = columns_like(c.k, vl, acc);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_rope_forward_cpu", [&] {
      using A = acc_of<scalar_t>;
      const rope::Rope<A> r = rin.view<A>();
      rotate_to_columns<A>(sp, false, rows_of<const scalar_t>(c.k, vl), sp.heads_kv, r, A(scale),
                           columns_of<A>(kt, vl), column_ld(kt), nullptr);
      forward_kernel<A, scalar_t>(sp, rows_of<const scalar_t>(c.q, vl), &r, columns_of<const A>(kt, vl),
                                  column_ld(kt), rows_of<const A>(va, vl), rows_of<A>(outa, vl), stats_of<A>(lse, vl),
                                  forward_blocks(sp));
    });
  }
  if (!outa.is_same(out)) out.copy_(outa);
  return {out, lse};
}

std::vector<at::Tensor> attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, const c10::optional<at::Tensor>& attn_mask,
    const c10::optional<at::Tensor>& key_padding_mask, const c10::optional<at::Tensor>& alibi_slopes,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap, double scale, double dropout_p,
    int64_t seed) {
  return attention_backward_rope(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 attn_mask, key_padding_mask, alibi_slopes, window_left, window_right, bottom_right,
                                 softcap, scale, dropout_p, seed, nullptr);
}

std::vector<at::Tensor> attention_backward_rope(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, const c10::optional<at::Tensor>& attn_mask,
    const c10::optional<at::Tensor>& key_padding_mask, const c10::optional<at::Tensor>& alibi_slopes,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap, double scale, double dropout_p,
    int64_t seed, const RopeTables* rope_tables) {
  Call c = prepare(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask, key_padding_mask,
                   alibi_slopes, window_left, window_right, bottom_right, softcap, scale, dropout_p, seed);
  const Spec& sp = c.spec;
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto o_shape = out_shape(q, sp.dim_v);
  TORCH_CHECK(grad_out.defined() && out.defined() && grad_out.sizes() == at::IntArrayRef(o_shape) &&
                  out.sizes() == at::IntArrayRef(o_shape),
              "attention_backward: grad_out and out must have the output's shape");
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type() &&
                  grad_out.device().is_cpu() && out.device().is_cpu(),
              "attention_backward: grad_out and out must be CPU tensors of q's dtype");
  TORCH_CHECK(lse.defined() && lse.device().is_cpu() && lse.scalar_type() == acc &&
                  lse.sizes() == at::IntArrayRef(stat_shape(sp, q)),
              "attention_backward: lse must be the forward's log-sum-exp (", acc, ")");
  const int64_t row_dim = sp.varlen ? 0 : 2;
  const at::Tensor dout_r = rows_ready(grad_out, row_dim), out_r = rows_ready(out, row_dim);
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor delta = at::empty(stat_shape(sp, q), q.options().dtype(acc));
  const bool vl = sp.varlen, same = q.scalar_type() == acc;
  // fp16/bf16 run as float (see attention_forward); the gradients are computed in acc and converted at the end.
  const at::Tensor doa = as_type(dout_r, acc), oa = as_type(out_r, acc);
  const at::Tensor vT = transposed(c.v, vl, 1.0, acc), doT = transposed(dout_r, vl, 1.0, acc);
  const auto acc_opts = q.options().dtype(acc);
  // One task per (batch, kv-head) when there are enough of them for the threads.
  const bool fused = sp.batch * sp.heads_kv >= 4 * at::get_num_threads();
  // Fused RoPE on that schedule: the dK/dV kernel rotates each key block itself
  // (k_raw), so rotated K and K^T are never materialized.
  const bool k_tiles = rope_tables != nullptr && fused;
  at::Tensor qa, ka, qT, kT, k_raw;
  c10::optional<RopeIn> rin;
  if (rope_tables == nullptr) {
    qa = as_type(c.q, acc), ka = as_type(c.k, acc), qT = transposed(c.q, vl, 1.0, acc);
    kT = transposed(c.k, vl, scale, acc);
  } else {
    // Fused RoPE: one pass over q (and one over k) writes the rotated rows and
    // their transposes, where the plain backward converts and transposes.
    rin.emplace(*rope_tables, acc);
    qa = at::empty(c.q.sizes(), acc_opts), qT = columns_like(c.q, vl, acc);
    if (k_tiles) {
      ka = k_raw = as_type(c.k, acc), kT = k_raw;  // op.k/op.kT: placeholders, unread with k_raw
    } else {
      ka = at::empty(c.k.sizes(), acc_opts), kT = columns_like(c.k, vl, acc);
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_rope_operands_cpu", [&] {
      using A = acc_of<scalar_t>;
      const rope::Rope<A> r = rin->view<A>();
      const Rows<A> q_rows = rows_of<A>(qa, vl), k_rows = rows_of<A>(ka, vl);
      rotate_to_columns<A>(sp, true, rows_of<const scalar_t>(c.q, vl), sp.heads, r, A(1), columns_of<A>(qT, vl),
                           column_ld(qT), &q_rows);
      if (!k_tiles) {
        rotate_to_columns<A>(sp, false, rows_of<const scalar_t>(c.k, vl), sp.heads_kv, r, A(scale),
                             columns_of<A>(kT, vl), column_ld(kT), &k_rows);
      }
    });
  }
  at::Tensor dq = at::empty(q.sizes(), acc_opts), dk = at::empty(k.sizes(), acc_opts),
             dv = at::empty(v.sizes(), acc_opts);
  if (fused) dq.zero_();
  AT_DISPATCH_FLOATING_TYPES(acc, "attention_backward_cpu", [&] {
    using T = scalar_t;
    const Operands<T> op{rows_of<const T>(qa, vl),    rows_of<const T>(ka, vl),    rows_of<const T>(doa, vl),
                         columns_of<const T>(qT, vl), columns_of<const T>(kT, vl), columns_of<const T>(vT, vl),
                         columns_of<const T>(doT, vl), column_ld(qT), column_ld(kT), column_ld(vT), column_ld(doT)};
    const Rows<const T> k_raw_rows = k_tiles ? rows_of<const T>(k_raw, vl) : Rows<const T>{};
    const auto lse_r = stats_of<T>(lse_c, vl), delta_r = stats_of<T>(delta, vl);
    backward_delta<T>(sp, rows_of<const T>(oa, vl), op.dout, delta_r);
    auto dq_rows = rows_of<T>(dq, vl);
    const rope::Rope<T> r = rin.has_value() ? rin->view<T>() : rope::Rope<T>{};
    const rope::Rope<T>* rp = rin.has_value() ? &r : nullptr;
    backward_dkdv_kernel<T>(sp, op, lse_r, delta_r, rows_of<T>(dk, vl), rows_of<T>(dv, vl),
                            fused ? &dq_rows : nullptr, rp, k_tiles ? &k_raw_rows : nullptr, backward_blocks(sp));
    if (!fused) backward_dq_kernel<T>(sp, op, lse_r, delta_r, dq_rows, rp, backward_blocks(sp));
    if (fused && rp != nullptr) finish_dq_rope<T>(sp, dq_rows, *rp);
  });
  if (fused && !rin.has_value()) dq.mul_(scale);
  if (!same) return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
  return {dq, dk, dv};
}

at::Tensor attention_dropout_keep_mask(int64_t batch, int64_t heads, int64_t max_q, int64_t max_k, double dropout_p,
                                       int64_t seed) {
  TORCH_CHECK(batch >= 0 && heads >= 0 && max_q >= 0 && max_k >= 0, "attention_dropout_keep_mask: negative size");
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, "attention_dropout_keep_mask: dropout_p must be in [0, 1)");
  const uint32_t threshold = static_cast<uint32_t>(std::nearbyint(dropout_p * double(1 << 24)));
  at::Tensor keep = at::empty({batch, heads, max_q, max_k}, at::TensorOptions().dtype(at::kByte));
  uint8_t* p = keep.data_ptr<uint8_t>();
  at::parallel_for(0, batch * heads * max_q, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      attn_rows::dropout_keep(p + row * max_k, static_cast<uint64_t>(seed) + uint64_t(row / max_q), row % max_q, 0,
                              max_k, max_k, threshold);
    }
  });
  return keep.view(at::kBool);
}

}  // namespace cpu
}  // namespace attnkit
