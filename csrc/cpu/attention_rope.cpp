// The float kernels of the fused RoPE attention (attention_rope.h) and the float
// transposes that lay out the attention's K^T, V^T, Q^T and dO^T, compiled for
// AVX-512, AVX2 and baseline x86-64 and picked at load time.
#include "attention_rope.h"

#include "simd.h"

namespace attnkit {
namespace cpu {
namespace rope {

ATTNKIT_SIMD_CLONES void row_f32(const Rope<float>& r, int64_t pos, bool inverse, const float* x, float* out,
                                 int64_t dim, float scale) {
  row_generic(r, pos, inverse, x, out, dim, scale);
}

namespace {

typedef float vf8 __attribute__((vector_size(32)));

ATTNKIT_INLINE vf8 load8(const float* p) {
  vf8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

ATTNKIT_INLINE void store8(float* p, vf8 v) { std::memcpy(p, &v, sizeof(v)); }

// Rows r[0..8) of an 8 x 8 block become its columns (AVX's unpack, shuffle, permute2f128 sequence).
ATTNKIT_INLINE void transpose8(vf8 r[8]) {
  typedef int vi8 __attribute__((vector_size(32)));
  const vi8 lo{0, 8, 1, 9, 4, 12, 5, 13}, hi{2, 10, 3, 11, 6, 14, 7, 15};
  const vi8 even{0, 1, 8, 9, 4, 5, 12, 13}, odd{2, 3, 10, 11, 6, 7, 14, 15};
  const vi8 first{0, 1, 2, 3, 8, 9, 10, 11}, second{4, 5, 6, 7, 12, 13, 14, 15};
  vf8 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shuffle(r[i], r[i + 1], lo);
    t[i + 1] = __builtin_shuffle(r[i], r[i + 1], hi);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = __builtin_shuffle(t[i], t[i + 2], even);
    u[i + 1] = __builtin_shuffle(t[i], t[i + 2], odd);
    u[i + 2] = __builtin_shuffle(t[i + 1], t[i + 3], even);
    u[i + 3] = __builtin_shuffle(t[i + 1], t[i + 3], odd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = __builtin_shuffle(u[i], u[i + 4], first);
    r[i + 4] = __builtin_shuffle(u[i], u[i + 4], second);
  }
}

}  // namespace

ATTNKIT_SIMD_CLONES void transpose_scaled_f32(const float* rows, int64_t rows_ld, int64_t n, int64_t dim, float* col,
                                             int64_t ld, float factor) {
  int64_t j0 = 0;
  for (; j0 + 8 <= n; j0 += 8) {
    int64_t d0 = 0;
    for (; d0 + 8 <= dim; d0 += 8) {
      vf8 r[8];
      for (int i = 0; i < 8; ++i) r[i] = load8(rows + (j0 + i) * rows_ld + d0) * factor;
      transpose8(r);
      for (int i = 0; i < 8; ++i) store8(col + (d0 + i) * ld + j0, r[i]);
    }
    for (; d0 < dim; ++d0) {
      for (int64_t j = j0; j < j0 + 8; ++j) col[d0 * ld + j] = rows[j * rows_ld + d0] * factor;
    }
  }
  for (; j0 < n; ++j0) {
    for (int64_t d = 0; d < dim; ++d) col[d * ld + j0] = rows[j0 * rows_ld + d] * factor;
  }
}

}  // namespace rope
}  // namespace cpu
}  // namespace attnkit
