// The forward of the CPU flash attention (the scheme: attention.cpp): the
// kernel and the entry points, plain and with fused RoPE.
#include "attnkit/attention.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_kernel.h"
#include "attention_rope.h"
#include "attention_rows.h"

namespace attnkit {
namespace cpu {

using namespace flash;  // attention_kernel.h

namespace {

// ------------------------------------------------------------------ forward

// In the accumulation type (fp16/bf16 inputs arrive converted to float). `kt`
// holds scale * K^T, keys as columns in panels, so that both tile products are
// plain A B GEMMs (gemm_nn). With `rope`, each task rotates its Q tile (q in its own
// dtype, q_t) into a BM x D buffer once, before its key loop; kt arrives rotated.
template <typename scalar_t, typename q_t = scalar_t>
void forward_kernel(const Spec& sp, Rows<const q_t> q, const rope::Rope<scalar_t>* rope, Panels<const scalar_t> kt,
                    Rows<const scalar_t> v, Rows<scalar_t> out, Rows<scalar_t> lse, Blocks blk) {
  using acc_t = scalar_t;
  TORCH_INTERNAL_ASSERT(rope != nullptr || (std::is_same_v<q_t, acc_t>), "attention: q must arrive in acc_t");
  const int64_t BM = blk.m, BN = blk.n, D = sp.dim, DV = sp.dim_v;
  const int64_t m_blocks = (sp.max_q + BM - 1) / BM;
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  at::parallel_for(0, sp.batch * sp.heads * m_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> s(BM * BN), acc(BM * DV), m(BM), l(BM), q_buf(rope != nullptr ? BM * D : 0);
    std::vector<uint8_t> keep(BN);
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, h, kvh, m0, rows, sq] = sp.query_block(task, m_blocks, BM);
      if (rows == 0) continue;
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
      std::fill(m.begin(), m.end(), neg_inf);
      std::fill(l.begin(), l.end(), acc_t(0));
      const auto [k_first, k_hi] = sp.key_range(sq, m0, rows);
      // Tiles start on kt's panels; the keys before the window's first get -inf (tile_scores).
      const int64_t k_lo = panel_start(k_first, k_hi);
      // The first tile's P V product writes acc (no zero fill, no rescale: see online_softmax_tile).
      for (int64_t n0 = k_lo; n0 < k_hi; n0 += BN) {
        const int64_t cols = std::min(BN, k_hi - n0);
        gemm_nn(rows, cols, D, qt, ld_q, kt.at(b, kvh, n0), kPanel, false, s.data(), BN, kFixedK, kt.stride);
        tile_scores(sp, sq, b, h, m0, rows, n0, cols, s.data(), static_cast<acc_t*>(nullptr), BN);  // no tanh kept
        online_softmax_tile(sp, b, h, m0, rows, n0, cols, s.data(), BN, m.data(), l.data(), acc.data(), DV,
                            keep.data());
        gemm_nn(rows, DV, cols, s.data(), BN, v.at(b, kvh, sq.k_start + n0), v.sm, n0 != k_lo, acc.data(), DV,
                kFixedN);
      }
      if (k_lo >= k_hi) std::fill(acc.begin(), acc.end(), acc_t(0));  // no visible key: the rows are 0
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
  if (rope_tables == nullptr && forward_bf16_tiles(c, out, lse)) return {out, lse};
  if (rope_tables != nullptr && bf16_tiles_take(sp, q.scalar_type(), false)) {  // q and k rotated once, then the tiles
    Call rotated = c;
    rotated.q = rotated_copy(c, *rope_tables, c.q, true, false);
    rotated.k = rotated_copy(c, *rope_tables, c.k, false, false);
    if (forward_bf16_tiles(rotated, out, lse)) return {out, lse};
  }
  const bool vl = sp.varlen;
  // fp16/bf16 run as float: converting q, v (and k, transposed anyway) once
  // beats BLAS's 16-bit GEMMs, which widen every tile to float themselves.
  const at::Tensor va = as_type(c.v, acc);
  at::Tensor outa = q.scalar_type() == acc ? out : at::empty(out.sizes(), out.options().dtype(acc));
  if (rope_tables == nullptr) {
    // scale * K^T lives only in this call: a scratch buffer of the calling thread (attention.cpp).
    const at::Tensor qa = as_type(c.q, acc);
    const Columns kt = transposed(sp, false, c.k, scale, acc, 3);
    AT_DISPATCH_FLOATING_TYPES(acc, "attention_forward_cpu", [&] {
      forward_kernel<scalar_t>(sp, rows_of<const scalar_t>(qa, vl), nullptr, panels_of<const scalar_t>(kt),
                               rows_of<const scalar_t>(va, vl), rows_of<scalar_t>(outa, vl),
                               stats_of<scalar_t>(lse, vl), forward_blocks(sp));
    });
  } else {
    // Fused RoPE: k rotated while scale * K^T is formed, q tile by tile in the
    // kernel, straight from q's dtype (no rotated or converted copy of q).
    const RopeIn rin(*rope_tables, acc);
    const Columns kt = columns_like(sp, false, c.k, acc, 3);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_rope_forward_cpu", [&] {
      using A = acc_of<scalar_t>;
      const rope::Rope<A> r = rin.view<A>();
      rotate_to_columns<A>(sp, false, rows_of<const scalar_t>(c.k, vl), sp.heads_kv, r, A(scale),
                           panels_of<A>(kt), nullptr);
      forward_kernel<A, scalar_t>(sp, rows_of<const scalar_t>(c.q, vl), &r, panels_of<const A>(kt),
                                  rows_of<const A>(va, vl), rows_of<A>(outa, vl), stats_of<A>(lse, vl),
                                  forward_blocks(sp));
    });
  }
  if (!outa.is_same(out)) out.copy_(outa);
  return {out, lse};
}

}  // namespace cpu
}  // namespace attnkit
