// The CPU flash attention's backward on bfloat16 tile GEMMs, the counterpart of
// attention_forward_bf16.cpp: the five tile products (S = Q K^T, dP = dO V^T, dV += P^T dO,
// dK += dS^T Q, dQ += dS K) through oneDNN's bfloat16 brgemm with float accumulation; the
// scores, probabilities, dropout and dS = P (dP - delta) in float32 through the float kernel's
// tile code (tile_scores, attn_rows), so every score feature behaves as there. As in
// FlashAttention, P and dS are rounded to bfloat16 for the products they feed.
//
// As the float kernel, dV and dK accumulate transposed (dV^T += dO^T P, dK^T += Q^T dS), so that
// no tile is transposed: P and dS are the B operands there, which the brgemm reads in VNNI pairs
// along its K dimension (here the queries): element (r, j) of a 64-column chunk at
// (r / 2) * 128 + 2 j + r % 2, two rows interleaved as they are rounded to bfloat16. The
// operands that do not change within a call are laid out once: K^T and V^T as ColPack, K as
// RowPack (attention_bf16_pack.h, shared with the forward), and Q^T and dO^T (A operands, K =
// queries) per head, rows padded to an even length. Rows past a sequence are zeros, so odd
// tiles round their K up to even for free.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "attention_bf16_pack.h"
#include "attention_kernel.h"

namespace attnkit {
namespace cpu {
namespace flash {

#ifdef CPUBLAS_BRGEMM_BF16BF16F32
namespace {

using bf16_pack::bf16;
using bf16_pack::ColPack;
using bf16_pack::kCols;
using bf16_pack::pack_cols;
using bf16_pack::pack_rows;
using bf16_pack::RowPack;

// x^T of each (batch, query head), dim x rows, rows an even count >= every sequence.
struct Transposed {
  at::Tensor data;
  int64_t rows = 0, dim = 0;
  const bf16* at(int64_t head, int64_t i0) const { return data.data_ptr<bf16>() + head * dim * rows + i0; }
};

Transposed pack_transposed(const Spec& sp, Rows<const bf16> x, int64_t dim) {
  Transposed p{at::Tensor(), round_up(std::max<int64_t>(sp.max_q, 1), 2), dim};
  p.data = at::zeros({sp.batch * sp.heads * dim * p.rows}, at::TensorOptions().dtype(at::kBFloat16));
  at::parallel_for(0, sp.batch * sp.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t head = begin; head < end; ++head) {
      const int64_t b = head / sp.heads, h = head % sp.heads;
      const Seq sq = sp.seq(b);
      bf16* dst = const_cast<bf16*>(p.at(head, 0));
      for (int64_t i = 0; i < sq.q_len; ++i) {
        const bf16* row = x.at(b, h, sq.q_start + i);
        for (int64_t d = 0; d < dim; ++d) dst[d * p.rows + i] = row[d];
      }
    }
  });
  return p;
}

struct Operands {
  Rows<const bf16> q, dout;
  ColPack kt, vt;         // S = Q K^T, dP = dO V^T
  Transposed qt, dout_t;  // dK^T += Q^T dS, dV^T += dO^T P
  RowPack k_rows;         // dQ += dS K
  Rows<const float> lse, delta;
};

// One thread's buffers and the tile steps both kernels share.
struct Tile {
  const Spec& sp;
  const Operands& op;
  int64_t BM, BN;
  std::vector<float> s, t, dp, ds;  // rows x BN
  std::vector<uint32_t> pairs;      // P or dS as the VNNI B operand: BM / 2 x BN row pairs
  std::vector<uint16_t> bits_a, bits_b, low;  // two rows rounded to bfloat16; dS (BM x BN)
  std::vector<uint8_t> keep;

  Tile(const Spec& spec, const Operands& ops, Blocks blk)
      : sp(spec), op(ops), BM(blk.m), BN(blk.n), s(BM * BN), t(spec.softcap > 0 ? BM * BN : 0), dp(BM * BN),
        ds(BM * BN), pairs(BM / 2 * BN), bits_a(BN), bits_b(BN), low(BM * BN), keep(BN) {}

  // P (in s; dropped out in ds when dropout) and dP (dropout applied) of queries [m0, m0 + rows)
  // against keys [n0, n0 + cols) of head (b, h); n0 a multiple of 64.
  void probabilities(const Seq& sq, int64_t b, int64_t h, int64_t m0, int64_t rows, int64_t n0, int64_t cols) {
    const int64_t kvh = h / sp.group, head = b * sp.heads_kv + kvh, i0 = sq.q_start + m0;
    for (int64_t c0 = 0; c0 < cols; c0 += kCols) {  // whole blocks: the packed padding is zeros
      at::native::cpublas::brgemm(rows, kCols, sp.dim, op.q.sm, kCols, BN, false, op.q.at(b, h, i0),
                                  op.kt.at(head, n0 + c0), s.data() + c0);
      at::native::cpublas::brgemm(rows, kCols, sp.dim_v, op.dout.sm, kCols, BN, false, op.dout.at(b, h, i0),
                                  op.vt.at(head, n0 + c0), dp.data() + c0);
    }
    for (int64_t r = 0; r < rows; ++r) attn_rows::scale(s.data() + r * BN, cols, float(sp.scale));
    tile_scores(sp, sq, b, h, m0, rows, n0, cols, s.data(), t.empty() ? nullptr : t.data(), BN);
    for (int64_t r = 0; r < rows; ++r) {
      float* row = s.data() + r * BN;
      const float stat = *op.lse.at(b, h, i0 + r);
      attn_rows::exp_shift_sum(row, cols, std::isinf(stat) ? 0.0f : stat);  // an empty row: all -inf, P = 0
      if (sp.dropout) {
        attn_rows::dropout_keep(keep.data(), stream_of(sp, b, h), m0 + r, n0, cols, sp.threshold);
        apply_dropout(dp.data() + r * BN, keep.data(), cols, float(sp.drop_scale));
        float* dropped = ds.data() + r * BN;
        std::copy(row, row + cols, dropped);
        apply_dropout(dropped, keep.data(), cols, float(sp.drop_scale));
      }
    }
  }

  // x (rows x cols, leading dim BN) rounded to bfloat16 as the VNNI B operand in `pairs`: per
  // chunk of 64 columns (N = 64), rows interleaved in pairs (one 32-bit store a pair); the row
  // past an odd `rows` and the columns past `cols` are zeros.
  void interleaved(const float* x, int64_t rows, int64_t cols) {
    const int64_t cols64 = round_up(cols, kCols);
    for (int64_t r = 0; r < rows; r += 2) {
      attn_rows::round_to_bf16(x + r * BN, cols, bits_a.data());
      std::fill(bits_a.begin() + cols, bits_a.begin() + cols64, uint16_t(0));
      if (r + 1 < rows) {
        attn_rows::round_to_bf16(x + (r + 1) * BN, cols, bits_b.data());
        std::fill(bits_b.begin() + cols, bits_b.begin() + cols64, uint16_t(0));
      } else {
        std::fill(bits_b.begin(), bits_b.begin() + cols64, uint16_t(0));
      }
      for (int64_t c0 = 0; c0 < cols64; c0 += kCols) {
        uint32_t* dst = pairs.data() + c0 * (BM / 2) + r / 2 * kCols;
        for (int64_t j = 0; j < kCols; ++j) dst[j] = uint32_t(bits_a[c0 + j]) | uint32_t(bits_b[c0 + j]) << 16;
      }
    }
  }

  // C^T (dim x BN, float) += A (dim x rows2, leading dim a.rows) times the operand in `pairs`.
  void transposed_update(const Transposed& a, int64_t bh, int64_t m0, int64_t rows, int64_t cols, float* c_t) {
    for (int64_t c0 = 0; c0 < cols; c0 += kCols) {
      at::native::cpublas::brgemm(a.dim, kCols, round_up(rows, 2), a.rows, kCols, BN, true, a.at(bh, m0),
                                  reinterpret_cast<const bf16*>(pairs.data() + c0 * (BM / 2)), c_t + c0);
    }
  }

  // dV^T (DV x BN) += dO^T P_dropped, then dS = P (dP - delta) (* soft-cap derivative) into ds,
  // and dK^T (D x BN) += Q^T dS; both unscaled.
  void key_grads(const Seq& sq, int64_t b, int64_t h, int64_t m0, int64_t rows, int64_t cols, float* dk_t,
                 float* dv_t) {
    const int64_t bh = b * sp.heads + h;
    interleaved(sp.dropout ? ds.data() : s.data(), rows, cols);
    transposed_update(op.dout_t, bh, m0, rows, cols, dv_t);
    score_grad(sq, b, h, m0, rows, cols);
    interleaved(ds.data(), rows, cols);
    transposed_update(op.qt, bh, m0, rows, cols, dk_t);
  }

  void score_grad(const Seq& sq, int64_t b, int64_t h, int64_t m0, int64_t rows, int64_t cols) {
    for (int64_t r = 0; r < rows; ++r) {
      attn_rows::softmax_grad(ds.data() + r * BN, s.data() + r * BN, dp.data() + r * BN,
                              t.empty() ? nullptr : t.data() + r * BN, cols, *op.delta.at(b, h, sq.q_start + m0 + r));
    }
  }

  // dQ (rows x D, leading dim ldq) += dS K, unscaled, from ds.
  void query_grads(int64_t b, int64_t h, int64_t rows, int64_t n0, int64_t cols, float* dq, int64_t ldq) {
    const int64_t cols2 = round_up(cols, 2);
    for (int64_t r = 0; r < rows; ++r) {
      uint16_t* dst = low.data() + r * BN;
      attn_rows::round_to_bf16(ds.data() + r * BN, cols, dst);
      if (cols2 > cols) dst[cols] = 0;
    }
    const RowPack& k = op.k_rows;
    const int64_t head = b * sp.heads_kv + h / sp.group;
    for (int64_t c = 0; c < k.chunks(); ++c) {
      at::native::cpublas::brgemm(rows, k.width(c), cols2, BN, k.ldb(c), ldq, true,
                                  reinterpret_cast<const bf16*>(low.data()), k.at(head, c, n0), dq + c * kCols);
    }
  }
};

// dK, dV per (batch, KV head, key block), or per (batch, KV head) with dQ too (`dq_acc`,
// float, owned whole by the task then); the additive mask's gradient into `d_mask` when given.
void dkdv_kernel(const Spec& sp, const Operands& op, Rows<bf16> dk, Rows<bf16> dv, Rows<float>* dq_acc,
                 const Rows<float>* d_mask, Blocks blk) {
  const int64_t BM = blk.m, BN = blk.n, D = sp.dim, DV = sp.dim_v;
  const int64_t n_blocks = sp.key_block_count(BN, dq_acc != nullptr);
  at::parallel_for(0, sp.batch * sp.heads_kv * n_blocks, 1, [&](int64_t begin, int64_t end) {
    Tile tile(sp, op, blk);
    std::vector<float> dk_t(D * BN), dv_t(DV * BN);  // transposed: (D x cols), leading dim BN
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, kvh, first, last, sq] = sp.key_blocks(task, n_blocks, BN, dq_acc != nullptr);
      for (int64_t n0 = first; n0 < last; n0 += BN) {
        const int64_t cols = std::min(BN, sq.k_len - n0);
        std::fill(dk_t.begin(), dk_t.end(), 0.0f);
        std::fill(dv_t.begin(), dv_t.end(), 0.0f);
        const auto [q_lo, q_hi] = sp.query_range(sq, n0, cols);
        for (int64_t h = kvh * sp.group; h < (kvh + 1) * sp.group; ++h) {
          if (d_mask != nullptr) zero_unvisited_rows(*d_mask, b, h, q_lo, q_hi, sq.q_len, n0, cols);
          for (int64_t m0 = q_lo / 2 * 2; m0 < q_hi; m0 += BM) {  // even: the packed query pairs
            const int64_t rows = std::min(BM, q_hi - m0);
            tile.probabilities(sq, b, h, m0, rows, n0, cols);
            if (d_mask != nullptr) {  // (a row before q_lo sees no key of this block: P = 0, written 0)
              mask_grad_tile<float>(tile.s.data(), tile.dp.data(), BN, op.delta, sq.q_start + m0, *d_mask, b, h, m0,
                                    rows, n0, cols);
            }
            tile.key_grads(sq, b, h, m0, rows, cols, dk_t.data(), dv_t.data());
            if (dq_acc != nullptr) {
              tile.query_grads(b, h, rows, n0, cols, dq_acc->at(b, h, sq.q_start + m0), dq_acc->sm);
            }
          }
        }
        for (int64_t j = 0; j < cols; ++j) {
          bf16* dk_row = dk.at(b, kvh, sq.k_start + n0 + j);
          bf16* dv_row = dv.at(b, kvh, sq.k_start + n0 + j);
          for (int64_t d = 0; d < D; ++d) dk_row[d] = bf16(dk_t[d * BN + j] * float(sp.scale));
          for (int64_t d = 0; d < DV; ++d) dv_row[d] = bf16(dv_t[d * BN + j]);
        }
      }
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/true);
  });
}

void dq_kernel(const Spec& sp, const Operands& op, Rows<bf16> dq, Blocks blk) {
  const int64_t BM = blk.m, BN = blk.n, D = sp.dim;
  const int64_t m_blocks = (sp.max_q + BM - 1) / BM;
  at::parallel_for(0, sp.batch * sp.heads * m_blocks, 1, [&](int64_t begin, int64_t end) {
    Tile tile(sp, op, blk);
    std::vector<float> dq_acc(BM * D);
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, h, kvh, m0, rows, sq] = sp.query_block(task, m_blocks, BM);
      if (rows == 0) continue;
      std::fill(dq_acc.begin(), dq_acc.end(), 0.0f);
      const auto [k_lo, k_hi] = sp.key_range(sq, m0, rows);
      for (int64_t n0 = k_lo / kCols * kCols; n0 < k_hi; n0 += BN) {  // whole packed blocks
        const int64_t cols = std::min(BN, k_hi - n0);
        tile.probabilities(sq, b, h, m0, rows, n0, cols);
        tile.score_grad(sq, b, h, m0, rows, cols);
        tile.query_grads(b, h, rows, n0, cols, dq_acc.data(), D);
      }
      for (int64_t r = 0; r < rows; ++r) {
        bf16* dq_row = dq.at(b, h, sq.q_start + m0 + r);
        for (int64_t d = 0; d < D; ++d) dq_row[d] = bf16(dq_acc[r * D + d] * float(sp.scale));
      }
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/true);
  });
}

}  // namespace
#endif

bool backward_bf16_tiles(const Call& c, const at::Tensor& dout, const at::Tensor& out, const at::Tensor& lse,
                         bool mask_grad, std::vector<at::Tensor>& grads) {
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  const Spec& sp = c.spec;
  if (!bf16_tiles_take(sp, c.q.scalar_type(), true)) return false;
  const bool vl = sp.varlen;
  at::Tensor delta = at::empty(lse.sizes(), lse.options());
  backward_delta<float>(sp, rows_of<const bf16>(out, vl), rows_of<const bf16>(dout, vl), stats_of<float>(delta, vl));
  const Rows<const bf16> q = rows_of<const bf16>(c.q, vl), k = rows_of<const bf16>(c.k, vl),
                         v = rows_of<const bf16>(c.v, vl), g = rows_of<const bf16>(dout, vl);
  const Operands op{q, g, pack_cols(sp, k, sp.dim), pack_cols(sp, v, sp.dim_v), pack_transposed(sp, q, sp.dim),
                    pack_transposed(sp, g, sp.dim_v), pack_rows(sp, k, sp.dim), stats_of<const float>(lse, vl),
                    stats_of<const float>(delta, vl)};
  at::Tensor dq = at::empty(c.q.sizes(), c.q.options()), dk = at::empty(c.k.sizes(), c.k.options()),
             dv = at::empty(c.v.sizes(), c.v.options());
  // Key blocks of 128 (64 at D > 128, as the float kernel): multiples of the packed 64-key blocks.
  const Blocks blk = backward_blocks(sp);
  at::Tensor d_mask = mask_grad ? at::empty({sp.batch, sp.heads, sp.max_q, sp.max_k}, lse.options()) : at::Tensor();
  const Rows<float> d_mask_rows{mask_grad ? d_mask.data_ptr<float>() : nullptr, sp.heads * sp.max_q * sp.max_k,
                                sp.max_q * sp.max_k, sp.max_k};
  const Rows<float>* dm = mask_grad ? &d_mask_rows : nullptr;
  // One task per (batch, KV head) when there are enough for the threads (as the float kernel).
  if (sp.batch * sp.heads_kv >= 4 * at::get_num_threads()) {
    at::Tensor dq_acc = at::zeros(c.q.sizes(), c.q.options().dtype(at::kFloat));
    Rows<float> dq_rows = rows_of<float>(dq_acc, vl);
    dkdv_kernel(sp, op, rows_of<bf16>(dk, vl), rows_of<bf16>(dv, vl), &dq_rows, dm, blk);
    dq.copy_(dq_acc.mul_(sp.scale));
  } else {
    dkdv_kernel(sp, op, rows_of<bf16>(dk, vl), rows_of<bf16>(dv, vl), nullptr, dm, blk);
    dq_kernel(sp, op, rows_of<bf16>(dq, vl), blk);
  }
  grads = {dq, dk, dv};
  if (mask_grad) grads.push_back(d_mask);
  return true;
#else
  (void)c, (void)dout, (void)out, (void)lse, (void)mask_grad, (void)grads;
  return false;
#endif
}

}  // namespace flash
}  // namespace cpu
}  // namespace attnkit
