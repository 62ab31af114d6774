// The operand layouts the bfloat16 tiles of the CPU flash attention share
// (attention_forward_bf16.cpp, attention_backward_bf16.cpp): oneDNN's bfloat16 brgemm
// reads its B operand in VNNI pairs along its K dimension, N at most 64 columns wide.
// - ColPack (K = the head dim, N = 64 keys): x^T per block of 64 keys, element (d, j) at
//   (d / 2) * 128 + 2 j + d % 2: K^T for S = Q K^T, V^T for dP = dO V^T;
// - RowPack (K = keys, N = 64 of the head dim): element (i, d) of chunk c at
//   (i / 2) * 2 ldb(c) + 2 (d - 64 c) + i % 2: V for P V, K for dQ += dS K.
// Per (batch, KV head), keys from each sequence's start; past a sequence, zeros.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdint>

#include "attention_kernel.h"

namespace attnkit {
namespace cpu {
namespace flash {

#ifdef CPUBLAS_BRGEMM_BF16BF16F32
namespace bf16_pack {

using bf16 = at::BFloat16;
constexpr int64_t kCols = kBf16Cols;

struct ColPack {
  at::Tensor data;
  int64_t keys = 0, dim = 0;  // keys per head: a multiple of 64
  // The D x 64 block of keys [n0, n0 + 64) of head `head` (n0 a multiple of 64).
  const bf16* at(int64_t head, int64_t n0) const { return data.data_ptr<bf16>() + (head * keys + n0) * dim; }
};

struct RowPack {
  at::Tensor data;
  int64_t rows = 0, dim = 0;  // rows per head: even
  int64_t width(int64_t c) const { return std::min(kCols, dim - c * kCols); }
  int64_t ldb(int64_t c) const { return round_up(width(c), 16); }
  int64_t chunks() const { return (dim + kCols - 1) / kCols; }
  // Where chunk c of head `head` starts, in elements; the chunks before c are full (ldb 64).
  int64_t offset(int64_t head, int64_t c) const { return head * rows * round_up(dim, 16) + rows * c * kCols; }
  // Chunk c from row i0 on (i0 even).
  const bf16* at(int64_t head, int64_t c, int64_t i0) const {
    return data.data_ptr<bf16>() + offset(head, c) + i0 * ldb(c);
  }
};

// Keys of each (batch, KV head) of x (k or v) as ColPack.
inline ColPack pack_cols(const Spec& sp, Rows<const bf16> x, int64_t dim) {
  ColPack p{at::Tensor(), round_up(std::max<int64_t>(sp.max_k, 1), kCols), dim};
  const int64_t heads = sp.batch * sp.heads_kv;
  p.data = at::zeros({heads * p.keys * dim}, at::TensorOptions().dtype(at::kBFloat16));
  bf16* base = p.data.data_ptr<bf16>();
  const int64_t blocks = p.keys / kCols;
  at::parallel_for(0, heads * blocks, 1, [&](int64_t begin, int64_t end) {  // tasks of 64 keys: threads at B * H_kv = 1
    for (int64_t task = begin; task < end; ++task) {
      const int64_t head = task / blocks, n0 = task % blocks * kCols;
      const int64_t b = head / sp.heads_kv, kvh = head % sp.heads_kv;
      const Seq sq = sp.seq(b);
      for (int64_t j = n0; j < std::min(n0 + kCols, sq.k_len); ++j) {
        const bf16* row = x.at(b, kvh, sq.k_start + j);
        bf16* block = base + (head * p.keys + j / kCols * kCols) * dim;
        for (int64_t d = 0; d < dim; ++d) block[(d / 2) * 2 * kCols + 2 * (j % kCols) + d % 2] = row[d];
      }
    }
  });
  return p;
}

// Keys of each (batch, KV head) of x (k or v) as RowPack.
inline RowPack pack_rows(const Spec& sp, Rows<const bf16> x, int64_t dim) {
  RowPack p{at::Tensor(), round_up(std::max<int64_t>(sp.max_k, 1), 2), dim};
  const int64_t heads = sp.batch * sp.heads_kv;
  p.data = at::zeros({heads * p.rows * round_up(dim, 16)}, at::TensorOptions().dtype(at::kBFloat16));
  bf16* base = p.data.data_ptr<bf16>();
  const int64_t blocks = (p.rows + kCols - 1) / kCols;
  at::parallel_for(0, heads * blocks, 1, [&](int64_t begin, int64_t end) {  // tasks of 64 keys, as pack_cols
    for (int64_t task = begin; task < end; ++task) {
      const int64_t head = task / blocks, n0 = task % blocks * kCols;
      const int64_t b = head / sp.heads_kv, h = head % sp.heads_kv;
      const Seq sq = sp.seq(b);
      for (int64_t c = 0; c < p.chunks(); ++c) {
        bf16* chunk = base + p.offset(head, c);
        const int64_t width = p.width(c), ldb = p.ldb(c);
        for (int64_t i = n0; i < std::min(n0 + kCols, sq.k_len); ++i) {
          const bf16* row = x.at(b, h, sq.k_start + i) + c * kCols;
          bf16* dst = chunk + (i / 2) * 2 * ldb + i % 2;
          for (int64_t d = 0; d < width; ++d) dst[2 * d] = row[d];
        }
      }
    }
  });
  return p;
}

}  // namespace bf16_pack
#endif

}  // namespace flash
}  // namespace cpu
}  // namespace attnkit
