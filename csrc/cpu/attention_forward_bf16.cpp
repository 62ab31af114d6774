// The CPU flash attention's forward on bfloat16 tile GEMMs: S = Q K^T and acc += P V through
// oneDNN's bfloat16 brgemm (AMX, or AVX512-BF16), float accumulation; the scores, the online
// softmax and every score feature (masks, window, ALiBi, soft-cap, dropout) in float32 as in
// the float kernel (attention_forward.cpp), whose tiles these are. The float kernel converts
// bfloat16 inputs to float32 first: on the Sapphire Rapids of BENCHMARKS.md SDPA's bfloat16 CPU
// kernel ran 2.2-3.1x faster than it. As in FlashAttention and SDPA, P is rounded to bfloat16
// for P V; scale multiplies S in float32.
//
// K and V are packed once per call into the VNNI layouts the brgemm reads
// (attention_bf16_pack.h): K^T in blocks of 64 keys (D x 64 each, ColPack), V per chunk of 64
// of its columns over the whole (padded) sequence (RowPack), so that any 64-aligned run of keys
// is one operand. Padding keys and columns are zeros. Tiles start at multiples of 64 keys; the keys a
// window leaves out of the first one are masked like any other.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdlib>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "attention_bf16_pack.h"
#include "attention_kernel.h"

namespace attnkit {
namespace cpu {
namespace flash {

bool bf16_tiles_available() {
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  static const bool available = at::native::cpublas::could_pack(at::kBFloat16) && __builtin_cpu_supports("avx512f");
  return available;
#else
  return false;
#endif
}

// ATTNKIT_CPU_BF16_TILES=0 keeps bfloat16 inputs on the float tiles (their P is not rounded):
// for comparing the two, and for a user who wants the float kernel's results.
bool bf16_tiles_wanted() {
  const char* value = std::getenv("ATTNKIT_CPU_BF16_TILES");
  return value == nullptr || std::string(value) != "0";
}

#ifdef CPUBLAS_BRGEMM_BF16BF16F32
namespace {

using bf16_pack::bf16;
using bf16_pack::ColPack;
using bf16_pack::kCols;
using bf16_pack::RowPack;

// K^T and V of every (batch, KV head) in the brgemm's layouts (attention_bf16_pack.h).
struct Packed {
  ColPack k;
  RowPack v;
};

void forward_kernel(const Spec& sp, Rows<const bf16> q, const Packed& p, Rows<bf16> out, Rows<float> lse, Blocks blk) {
  const int64_t BM = blk.m, BN = blk.n, D = sp.dim, DV = sp.dim_v;
  const int64_t m_blocks = (sp.max_q + BM - 1) / BM;
  const float neg_inf = -std::numeric_limits<float>::infinity(), scale = float(sp.scale);
  // Where the scores are scale * S with at most -inf fills (no soft-cap, ALiBi or additive mask),
  // the softmax takes S and the scale inside its exp pass, one pass less over the tile.
  const bool scale_late = sp.scale > 0 && sp.softcap <= 0 && sp.alibi == nullptr && sp.add_mask == nullptr;
  at::parallel_for(0, sp.batch * sp.heads * m_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(BM * BN), acc(BM * DV), m(BM), l(BM);
    std::vector<bf16> probs(BM * BN);
    std::vector<uint8_t> keep(BN);
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, h, kvh, m0, rows, sq] = sp.query_block(task, m_blocks, BM);
      if (rows == 0) continue;
      const bf16* qt = q.at(b, h, sq.q_start + m0);
      const int64_t head = b * sp.heads_kv + kvh;
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(m.begin(), m.end(), neg_inf);
      std::fill(l.begin(), l.end(), 0.0f);
      const auto [k_lo, k_hi] = sp.key_range(sq, m0, rows);
      for (int64_t n0 = k_lo / kCols * kCols; n0 < k_hi; n0 += BN) {
        const int64_t cols = std::min(BN, k_hi - n0), k_dim = round_up(cols, 2);
        for (int64_t c0 = 0; c0 < cols; c0 += kCols) {  // all 64 columns: the packed padding is zeros
          at::native::cpublas::brgemm(rows, kCols, D, q.sm, kCols, BN, false, qt,
                                      p.k.at(head, n0 + c0), s.data() + c0);
        }
        if (!scale_late) {
          for (int64_t r = 0; r < rows; ++r) attn_rows::scale(s.data() + r * BN, cols, scale);
        }
        tile_scores(sp, sq, b, h, m0, rows, n0, cols, s.data(), static_cast<float*>(nullptr), BN);
        online_softmax_tile(sp, b, h, m0, rows, n0, cols, s.data(), BN, m.data(), l.data(), acc.data(), DV,
                            keep.data(), scale_late ? scale : 1.0f, reinterpret_cast<uint16_t*>(probs.data()));
        for (int64_t r = 0; r < rows && k_dim > cols; ++r) probs[r * BN + cols] = bf16(0.0f);
        for (int64_t c = 0; c < p.v.chunks(); ++c) {
          at::native::cpublas::brgemm(rows, p.v.width(c), k_dim, BN, p.v.ldb(c), DV, true, probs.data(),
                                      p.v.at(head, c, n0), acc.data() + c * kCols);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const bool empty = l[r] == 0.0f;
        const float inv = empty ? 0.0f : 1.0f / l[r];
        bf16* o = out.at(b, h, sq.q_start + m0 + r);
        for (int64_t d = 0; d < DV; ++d) o[d] = bf16(acc[r * DV + d] * inv);
        *lse.at(b, h, sq.q_start + m0 + r) = empty ? neg_inf : m[r] + std::log(l[r]);
      }
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/true);
  });
}

}  // namespace
#endif

bool forward_bf16_tiles(const Call& c, const at::Tensor& out, const at::Tensor& lse) {
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  const Spec& sp = c.spec;
  if (!bf16_tiles_take(sp, c.q.scalar_type(), false)) return false;
  const bool vl = sp.varlen;
  const Packed p{bf16_pack::pack_cols(sp, rows_of<const bf16>(c.k, vl), sp.dim),
                 bf16_pack::pack_rows(sp, rows_of<const bf16>(c.v, vl), sp.dim_v)};
  // Key tiles of whole 64-key blocks: the float kernel's 512 (256 at D > 128).
  const Blocks blk = forward_blocks(sp);
  forward_kernel(sp, rows_of<const bf16>(c.q, vl), p, rows_of<bf16>(out, vl), stats_of<float>(lse, vl), blk);
  return true;
#else
  (void)c, (void)out, (void)lse;
  return false;
#endif
}

}  // namespace flash
}  // namespace cpu
}  // namespace attnkit
