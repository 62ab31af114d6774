// The CPU flash attention's forward on bfloat16 tile GEMMs: S = Q K^T and acc += P V through
// oneDNN's bfloat16 brgemm (AMX, or AVX512-BF16), float accumulation; the scores, the online
// softmax and every score feature (masks, window, ALiBi, soft-cap, dropout) in float32 as in
// the float kernel (attention_forward.cpp), whose tiles these are. The float kernel converts
// bfloat16 inputs to float32 first: on the Sapphire Rapids of BENCHMARKS.md SDPA's bfloat16 CPU
// kernel ran 2.2-3.1x faster than it. As in FlashAttention and SDPA, P is rounded to bfloat16
// for P V; scale multiplies S in float32.
//
// K and V are packed once per call into the VNNI layout the brgemm reads (element (k, n) of a
// K x N operand at (k / 2) * 2 ldb + 2 n + k % 2; oneDNN's bfloat16 brgemm takes ldb of 16..64
// columns, so N comes in chunks of 64): K^T in blocks of 64 keys (D x 64 each), V per chunk of
// 64 of its columns over the whole (padded) sequence, so that any 64-aligned run of keys is one
// operand. Padding keys and columns are zeros. Tiles start at multiples of 64 keys; the keys a
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

using bf16 = at::BFloat16;
constexpr int64_t kCols = kBf16Cols;

// K and V of every (batch, KV head) in the brgemm's layout (see the top of this file).
struct Packed {
  at::Tensor k, v;
  int64_t keys;  // per (batch, KV head): max_k rounded up to 64
  int64_t dim, dim_v;
  int64_t k_head() const { return keys * dim; }
  int64_t v_head() const { return keys * round_up(dim_v, 16); }
  // Chunk c of V's columns: its width and row pitch (ldb), and where it starts in a head.
  int64_t v_width(int64_t c) const { return std::min(kCols, dim_v - c * kCols); }
  int64_t v_ldb(int64_t c) const { return round_up(v_width(c), 16); }
  int64_t v_chunk(int64_t c) const { return keys * c * kCols; }  // the chunks before c are full
};

Packed pack(const Spec& sp, Rows<const bf16> k, Rows<const bf16> v) {
  Packed p{at::Tensor(), at::Tensor(), round_up(std::max<int64_t>(sp.max_k, 1), kCols), sp.dim, sp.dim_v};
  const auto opts = at::TensorOptions().dtype(at::kBFloat16);
  const int64_t heads = sp.batch * sp.heads_kv, blocks = p.keys / kCols;
  p.k = at::zeros({heads * p.k_head()}, opts);
  p.v = at::zeros({heads * p.v_head()}, opts);
  bf16* kp = p.k.data_ptr<bf16>();
  bf16* vp = p.v.data_ptr<bf16>();
  const int64_t D = p.dim, DV = p.dim_v;
  at::parallel_for(0, heads * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t head = task / blocks, n0 = task % blocks * kCols;
      const int64_t b = head / sp.heads_kv, kvh = head % sp.heads_kv;
      const Seq sq = sp.seq(b);
      const int64_t cols = std::clamp<int64_t>(sq.k_len - n0, 0, kCols);
      bf16* kt = kp + head * p.k_head() + n0 * D;  // this block's D x 64 columns
      bf16* vh = vp + head * p.v_head();
      for (int64_t j = 0; j < cols; ++j) {
        const bf16* krow = k.at(b, kvh, sq.k_start + n0 + j);
        for (int64_t d = 0; d < D; ++d) kt[(d / 2) * 2 * kCols + 2 * j + d % 2] = krow[d];
        const bf16* vrow = v.at(b, kvh, sq.k_start + n0 + j);
        const int64_t key = n0 + j;
        for (int64_t c = 0; c * kCols < DV; ++c) {
          bf16* dst = vh + p.v_chunk(c) + (key / 2) * 2 * p.v_ldb(c) + key % 2;
          for (int64_t n = 0; n < p.v_width(c); ++n) dst[2 * n] = vrow[c * kCols + n];
        }
      }
    }
  });
  return p;
}

void forward_kernel(const Spec& sp, Rows<const bf16> q, const Packed& p, Rows<bf16> out, Rows<float> lse, Blocks blk) {
  const int64_t BM = blk.m, BN = blk.n, D = sp.dim, DV = sp.dim_v;
  const int64_t m_blocks = (sp.max_q + BM - 1) / BM;
  const float neg_inf = -std::numeric_limits<float>::infinity(), scale = float(sp.scale);
  // Where the scores are scale * S with at most -inf fills (no soft-cap, ALiBi or additive mask),
  // the softmax takes S and the scale inside its exp pass, one pass less over the tile.
  const bool scale_late = sp.scale > 0 && sp.softcap <= 0 && sp.alibi == nullptr && sp.add_mask == nullptr;
  const bf16* kp = p.k.data_ptr<bf16>();
  const bf16* vp = p.v.data_ptr<bf16>();
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
                                      kp + head * p.k_head() + (n0 + c0) * D, s.data() + c0);
        }
        if (!scale_late) {
          for (int64_t r = 0; r < rows; ++r) attn_rows::scale(s.data() + r * BN, cols, scale);
        }
        tile_scores(sp, sq, b, h, m0, rows, n0, cols, s.data(), static_cast<float*>(nullptr), BN);
        online_softmax_tile(sp, b, h, m0, rows, n0, cols, s.data(), BN, m.data(), l.data(), acc.data(), DV,
                            keep.data(), scale_late ? scale : 1.0f, reinterpret_cast<uint16_t*>(probs.data()));
        for (int64_t r = 0; r < rows && k_dim > cols; ++r) probs[r * BN + cols] = bf16(0.0f);
        for (int64_t c = 0; c * kCols < DV; ++c) {
          at::native::cpublas::brgemm(rows, p.v_width(c), k_dim, BN, p.v_ldb(c), DV, true, probs.data(),
                                      vp + head * p.v_head() + p.v_chunk(c) + n0 * p.v_ldb(c),
                                      acc.data() + c * kCols);
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
  const Packed p = pack(sp, rows_of<const bf16>(c.k, vl), rows_of<const bf16>(c.v, vl));
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
