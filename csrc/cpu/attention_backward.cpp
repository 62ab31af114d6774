// The backward of the CPU flash attention (the scheme: attention.cpp): the
// dK/dV kernel (with dQ on the one-task-per-(batch, kv-head) schedule), the dQ
// kernel, and the entry points, plain and with fused RoPE.
#include "attnkit/attention.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "attention_kernel.h"
#include "attention_rope.h"
#include "attention_rows.h"

namespace attnkit {
namespace cpu {

using namespace flash;  // attention_kernel.h

namespace {

// ------------------------------------------------------------------ backward
// In the accumulation type throughout (fp16/bf16 arrive converted). Every tile
// product is a plain A B GEMM (gemm_nn) on operands transposed once per call
// (Operands, their columns in panels): dV and dK are accumulated transposed,
// dV^T += dO^T P and dK^T += Q^T dS, so no tile is ever transposed.

template <typename T>
struct Operands {
  Rows<const T> q, k, dout;           // rows, as given (k for dQ += dS K)
  Panels<const T> qT, kT, vT, doutT;  // the transposed copies (kT holds scale * K^T)
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

  // P (in s) and dP (in dp, dropout applied) of a (rows x cols) tile, n0 on a panel's
  // start, `kt` its scale * K^T columns (panels `kt_panel` apart); with `p_out`, also the
  // dropped-out P for the dV GEMM (returned).
  const T* probabilities(const Seq& sq, int64_t b, int64_t h, int64_t m0, int64_t rows, int64_t n0, int64_t cols,
                         const T* kt, int64_t kt_panel, const Rows<T>& lse, bool p_out) {
    const int64_t kvh = h / sp.group, i0 = sq.q_start + m0;
    gemm_nn(rows, cols, sp.dim, op.q.at(b, h, i0), op.q.sm, kt, kPanel, false, s.data(), BN, kFixedK, kt_panel);
    tile_scores(sp, sq, b, h, m0, rows, n0, cols, s.data(), t.data(), BN);
    gemm_nn(rows, cols, sp.dim_v, op.dout.at(b, h, i0), op.dout.sm, op.vT.at(b, kvh, n0), kPanel, false, dp.data(),
            BN, kFixedK, op.vT.stride);
    for (int64_t r = 0; r < rows; ++r) {
      T* row = s.data() + r * BN;
      T stat = *lse.at(b, h, i0 + r);
      stat = std::isinf(stat) ? T(0) : stat;  // an empty row's scores are all -inf: P = 0
      attn_rows::exp_shift_sum(row, cols, stat);
      if (sp.dropout) {
        T* out_row = ds.data() + r * BN;  // ds holds the dropped-out P until dS is formed
        attn_rows::dropout_keep(keep.data(), stream_of(sp, b, h), m0 + r, n0, cols, sp.threshold);
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

// dK, dV (and dQ when `dq_acc` is given, owning whole (batch, kv-head) pairs;
// the additive mask's gradient when `d_mask` is, every element written once:
// see zero_unvisited_rows).
// With `rope`, dK is rotated back as it is written (the gradient of a rotation
// is the opposite rotation), and with `k_raw` (k unrotated) each key block's
// rotated K rows and scale * K^T are built here, once per block, instead of
// read from op.k and op.kT.
template <typename T>
void backward_dkdv_kernel(const Spec& sp, const Operands<T>& op, Rows<T> lse, Rows<T> delta, Rows<T> dk, Rows<T> dv,
                          Rows<T>* dq_acc, const rope::Rope<T>* rope, const Rows<const T>* k_raw,
                          const Rows<T>* d_mask, Blocks blk) {
  const int64_t BM = blk.m, BN = blk.n, D = sp.dim, DV = sp.dim_v;
  const int64_t n_blocks = sp.key_block_count(BN, dq_acc != nullptr);
  at::parallel_for(0, sp.batch * sp.heads_kv * n_blocks, 1, [&](int64_t begin, int64_t end) {
    BackwardTile<T> tile(sp, op, blk);
    std::vector<T> dkT(D * BN), dvT(DV * BN), dk_tmp(D);  // (D x cols), leading dim BN
    std::vector<T> k_tile(k_raw != nullptr ? BN * D : 0), kt_tile(k_raw != nullptr ? D * BN : 0);  // kt_tile: panels
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, kvh, first, last, sq] = sp.key_blocks(task, n_blocks, BN, dq_acc != nullptr);
      for (int64_t n0 = first; n0 < last; n0 += BN) {
        const int64_t cols = std::min(BN, sq.k_len - n0);
        const T* k_rows = op.k.at(b, kvh, sq.k_start + n0);
        const T* kt = k_raw != nullptr ? nullptr : op.kT.at(b, kvh, n0);  // op.kT is empty with k_raw
        int64_t ld_k_rows = op.k.sm, kt_panel = op.kT.stride;
        if (k_raw != nullptr) {
          for (int64_t c0 = 0; c0 < cols; c0 += kPanel) {
            rotate_block(*rope, k_raw->at(b, kvh, sq.k_start + n0 + c0), k_raw->sm, rope->offsets[b] + n0 + c0,
                         std::min(kPanel, cols - c0), D, T(sp.scale), k_tile.data() + c0 * D, D,
                         kt_tile.data() + c0 * D, kPanel);
          }
          k_rows = k_tile.data(), kt = kt_tile.data(), ld_k_rows = D, kt_panel = D * kPanel;
        }
        std::fill(dkT.begin(), dkT.end(), T(0));
        std::fill(dvT.begin(), dvT.end(), T(0));
        const auto [q_first, q_hi] = sp.query_range(sq, n0, cols);
        // Query blocks start on Q^T's and dO^T's panels; the queries before q_first see none of
        // these keys (P = 0, tile_scores).
        const int64_t q_lo = panel_start(q_first, q_hi);
        for (int64_t h = kvh * sp.group; h < (kvh + 1) * sp.group; ++h) {
          if (d_mask != nullptr) zero_unvisited_rows(*d_mask, b, h, q_lo, q_hi, sq.q_len, n0, cols);
          for (int64_t m0 = q_lo; m0 < q_hi; m0 += BM) {
            const int64_t rows = std::min(BM, q_hi - m0), i0 = sq.q_start + m0;
            const T* p = tile.probabilities(sq, b, h, m0, rows, n0, cols, kt, kt_panel, lse, true);
            gemm_nn(DV, cols, rows, op.doutT.at(b, h, m0), kPanel, p, BN, true, dvT.data(), BN, kNoneFixed);
            const T* dst = tile.score_grad(sq, b, h, m0, rows, cols, delta);
            if (d_mask != nullptr) {
              mask_grad_tile<T>(tile.s.data(), tile.dp.data(), BN, {delta.data, delta.sb, delta.sh, delta.sm},
                                sq.q_start + m0, *d_mask, b, h, m0, rows, n0, cols);
            }
            gemm_nn(D, cols, rows, op.qT.at(b, h, m0), kPanel, dst, BN, true, dkT.data(), BN, kNoneFixed);
            if (dq_acc != nullptr) {
              gemm_nn(rows, D, cols, dst, BN, k_rows, ld_k_rows, true, dq_acc->at(b, h, i0), dq_acc->sm, kFixedN);
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
      const auto [b, h, kvh, m0, rows, sq] = sp.query_block(task, m_blocks, BM);
      if (rows == 0) continue;
      std::fill(dq_acc.begin(), dq_acc.end(), T(0));
      const auto [k_first, k_hi] = sp.key_range(sq, m0, rows);
      const int64_t k_lo = panel_start(k_first, k_hi);  // as the forward's tiles
      for (int64_t n0 = k_lo; n0 < k_hi; n0 += BN) {
        const int64_t cols = std::min(BN, k_hi - n0);
        tile.probabilities(sq, b, h, m0, rows, n0, cols, op.kT.at(b, kvh, n0), op.kT.stride, lse, false);
        const T* dst = tile.score_grad(sq, b, h, m0, rows, cols, delta);
        gemm_nn(rows, D, cols, dst, BN, op.k.at(b, kvh, sq.k_start + n0), op.k.sm, true, dq_acc.data(), D, kFixedN);
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

}  // namespace

std::vector<at::Tensor> attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, const c10::optional<at::Tensor>& attn_mask,
    const c10::optional<at::Tensor>& key_padding_mask, const c10::optional<at::Tensor>& alibi_slopes,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap, double scale, double dropout_p,
    int64_t seed, bool mask_grad) {
  return attention_backward_rope(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 attn_mask, key_padding_mask, alibi_slopes, window_left, window_right, bottom_right,
                                 softcap, scale, dropout_p, seed, mask_grad, nullptr);
}

std::vector<at::Tensor> attention_backward_rope(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, const c10::optional<at::Tensor>& attn_mask,
    const c10::optional<at::Tensor>& key_padding_mask, const c10::optional<at::Tensor>& alibi_slopes,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap, double scale, double dropout_p,
    int64_t seed, bool mask_grad, const RopeTables* rope_tables) {
  Call c = prepare(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask, key_padding_mask,
                   alibi_slopes, window_left, window_right, bottom_right, softcap, scale, dropout_p, seed);
  const Spec& sp = c.spec;
  TORCH_CHECK(!mask_grad || (c.add_mask.defined() && !sp.varlen),  // (an empty mask has no data pointer)
              "attention_backward: mask_grad needs a floating attn_mask and a dense (not varlen) call");
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
  if (bf16_tiles_take(sp, q.scalar_type(), true)) {  // bfloat16 inputs on bfloat16 tiles
    std::vector<at::Tensor> grads;
    if (rope_tables == nullptr) {
      if (backward_bf16_tiles(c, dout_r, out_r, lse_c, mask_grad, grads)) return grads;
    } else {  // fused RoPE: the gradients of the rotated q and k, rotated back
      Call rotated = c;
      rotated.q = rotated_copy(c, *rope_tables, c.q, true, false);
      rotated.k = rotated_copy(c, *rope_tables, c.k, false, false);
      if (backward_bf16_tiles(rotated, dout_r, out_r, lse_c, mask_grad, grads)) {
        grads[0] = rotated_copy(c, *rope_tables, grads[0], true, true);
        grads[1] = rotated_copy(c, *rope_tables, grads[1], false, true);
        return grads;
      }
    }
  }
  at::Tensor delta = at::empty(stat_shape(sp, q), q.options().dtype(acc));
  const bool vl = sp.varlen, same = q.scalar_type() == acc;
  // fp16/bf16 run as float (see attention_forward); the gradients are computed in acc and converted at the end.
  const at::Tensor doa = as_type(dout_r, acc), oa = as_type(out_r, acc);
  // The four transposed operands live only in this call: the calling thread's scratch buffers.
  const Columns vT = transposed(sp, false, c.v, 1.0, acc, 0), doT = transposed(sp, true, doa, 1.0, acc, 1);
  const auto acc_opts = q.options().dtype(acc);
  // One task per (batch, kv-head) when there are enough of them for the threads.
  const bool fused = sp.batch * sp.heads_kv >= 4 * at::get_num_threads();
  // Fused RoPE on that schedule: the dK/dV kernel rotates each key block itself
  // (k_raw), so rotated K and K^T are never materialized.
  const bool k_tiles = rope_tables != nullptr && fused;
  at::Tensor qa, ka, k_raw;
  Columns qT, kT;  // kT stays empty where the dK/dV kernel rotates each key block itself
  c10::optional<RopeIn> rin;
  if (rope_tables == nullptr) {
    qa = as_type(c.q, acc), ka = as_type(c.k, acc), qT = transposed(sp, true, qa, 1.0, acc, 2);
    kT = transposed(sp, false, ka, scale, acc, 3);
  } else {
    // Fused RoPE: one pass over q (and one over k) writes the rotated rows and
    // their transposes, where the plain backward converts and transposes.
    rin.emplace(*rope_tables, acc);
    qa = at::empty(c.q.sizes(), acc_opts), qT = columns_like(sp, true, c.q, acc, 2);
    if (k_tiles) {
      ka = k_raw = as_type(c.k, acc);  // op.k: a placeholder, unread with k_raw
    } else {
      ka = at::empty(c.k.sizes(), acc_opts), kT = columns_like(sp, false, c.k, acc, 3);
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_rope_operands_cpu", [&] {
      using A = acc_of<scalar_t>;
      const rope::Rope<A> r = rin->view<A>();
      const Rows<A> q_rows = rows_of<A>(qa, vl), k_rows = rows_of<A>(ka, vl);
      rotate_to_columns<A>(sp, true, rows_of<const scalar_t>(c.q, vl), sp.heads, r, A(1), panels_of<A>(qT), &q_rows);
      if (!k_tiles) {
        rotate_to_columns<A>(sp, false, rows_of<const scalar_t>(c.k, vl), sp.heads_kv, r, A(scale),
                             panels_of<A>(kT), &k_rows);
      }
    });
  }
  at::Tensor dq = at::empty(q.sizes(), acc_opts), dk = at::empty(k.sizes(), acc_opts),
             dv = at::empty(v.sizes(), acc_opts);
  if (fused) dq.zero_();
  // Every element written by the dK/dV kernel (the unvisited ones with 0).
  at::Tensor d_mask = mask_grad ? at::empty({sp.batch, sp.heads, sp.max_q, sp.max_k}, acc_opts) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(acc, "attention_backward_cpu", [&] {
    using T = scalar_t;
    const Operands<T> op{rows_of<const T>(qa, vl),    rows_of<const T>(ka, vl),
                         rows_of<const T>(doa, vl),   panels_of<const T>(qT),
                         kT.data.defined() ? panels_of<const T>(kT) : Panels<const T>{},
                         panels_of<const T>(vT),      panels_of<const T>(doT)};
    const Rows<const T> k_raw_rows = k_tiles ? rows_of<const T>(k_raw, vl) : Rows<const T>{};
    const auto lse_r = stats_of<T>(lse_c, vl), delta_r = stats_of<T>(delta, vl);
    backward_delta<T>(sp, rows_of<const T>(oa, vl), op.dout, delta_r);
    auto dq_rows = rows_of<T>(dq, vl);
    const rope::Rope<T> r = rin.has_value() ? rin->view<T>() : rope::Rope<T>{};
    const rope::Rope<T>* rp = rin.has_value() ? &r : nullptr;
    const Rows<T> d_mask_rows{mask_grad ? d_mask.data_ptr<T>() : nullptr, sp.heads * sp.max_q * sp.max_k,
                              sp.max_q * sp.max_k, sp.max_k};
    backward_dkdv_kernel<T>(sp, op, lse_r, delta_r, rows_of<T>(dk, vl), rows_of<T>(dv, vl),
                            fused ? &dq_rows : nullptr, rp, k_tiles ? &k_raw_rows : nullptr,
                            mask_grad ? &d_mask_rows : nullptr, backward_blocks(sp));
    if (!fused) backward_dq_kernel<T>(sp, op, lse_r, delta_r, dq_rows, rp, backward_blocks(sp));
    if (fused && rp != nullptr) finish_dq_rope<T>(sp, dq_rows, *rp);
  });
  if (fused && !rin.has_value()) dq.mul_(scale);
  std::vector<at::Tensor> grads{dq, dk, dv};
  if (!same) grads = {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
  if (mask_grad) grads.push_back(d_mask);
  return grads;
}

}  // namespace cpu
}  // namespace attnkit
