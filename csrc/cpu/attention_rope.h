// Fused RoPE inside the CPU flash attention (attention.cpp): q and k rows are
// rotated where the kernels already copy them (the Q tile of a forward task,
// scale * K^T and the backward's transposed operands), and dQ, dK are rotated
// back where their final values are written. No rotated copy of q or k is made
// in a pass of its own. attention_rotary.cpp validates the tables and calls in.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <type_traits>
#include <vector>

namespace attnkit {
namespace cpu {

// The tables as given by the caller: cos/sin (positions, R/2), int64 offsets (B,).
struct RopeTables {
  at::Tensor cos, sin, offsets;
  bool interleaved = false;
};

// attention_forward / attention_backward with q and k rotated by `rope`
// (nullptr: none). q row i of sequence b sits at i + diag + offsets[b], k row j at j + offsets[b].
std::vector<at::Tensor> attention_forward_rope(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& cu_seqlens_q,
    const c10::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const c10::optional<at::Tensor>& attn_mask, const c10::optional<at::Tensor>& key_padding_mask,
    const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left, int64_t window_right, bool bottom_right,
    double softcap, double scale, double dropout_p, int64_t seed, const RopeTables* rope);

std::vector<at::Tensor> attention_backward_rope(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, const c10::optional<at::Tensor>& attn_mask,
    const c10::optional<at::Tensor>& key_padding_mask, const c10::optional<at::Tensor>& alibi_slopes,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap, double scale, double dropout_p,
    int64_t seed, bool mask_grad, const RopeTables* rope);

namespace rope {

// The tables in the accumulation type, as the kernels read them.
template <typename acc_t>
struct Rope {
  const acc_t* cos = nullptr;  // (positions, half) contiguous
  const acc_t* sin = nullptr;
  int64_t half = 0, positions = 0;
  bool interleaved = false;
  const int64_t* offsets = nullptr;  // (B,)
};

void row_f32(const Rope<float>& r, int64_t pos, bool inverse, const float* x, float* out, int64_t dim, float scale);

// out[0, dim) = scale * (x rotated to position `pos`, by the opposite angle when
// `inverse`): the first 2 * half dims as halves (or even/odd pairs when
// interleaved), the rest copied; a position outside the table is copied
// unrotated (as rotary_apply). Both members of a pair are read before either
// is written, so out may be x itself.
template <typename acc_t, typename T>
inline __attribute__((always_inline)) void row_generic(const Rope<acc_t>& r, int64_t pos, bool inverse, const T* x,
                                                       acc_t* out, int64_t dim, acc_t scale) {
  int64_t done = 0;
  if (pos >= 0 && pos < r.positions) {
    const acc_t* c = r.cos + pos * r.half;
    const acc_t* s = r.sin + pos * r.half;
    const acc_t sign = inverse ? acc_t(-1) : acc_t(1);
    const int64_t half = r.half;
    if (r.interleaved) {
      for (int64_t i = 0; i < half; ++i) {
        const acc_t a = static_cast<acc_t>(x[2 * i]), b = static_cast<acc_t>(x[2 * i + 1]), si = sign * s[i];
        out[2 * i] = (a * c[i] - b * si) * scale;
        out[2 * i + 1] = (a * si + b * c[i]) * scale;
      }
    } else {
      for (int64_t i = 0; i < half; ++i) {
        const acc_t a = static_cast<acc_t>(x[i]), b = static_cast<acc_t>(x[i + half]), si = sign * s[i];
        out[i] = (a * c[i] - b * si) * scale;
        out[i + half] = (a * si + b * c[i]) * scale;
      }
    }
    done = 2 * half;
  }
  for (int64_t d = done; d < dim; ++d) out[d] = static_cast<acc_t>(x[d]) * scale;
}

// row_generic; float rows go through row_f32, compiled for AVX-512/AVX2/baseline
// (attention_rope.cpp: the extension has no -march flags).
template <typename acc_t, typename T>
inline void row(const Rope<acc_t>& r, int64_t pos, bool inverse, const T* x, acc_t* out, int64_t dim, acc_t scale) {
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<T, float>) {
    row_f32(r, pos, inverse, x, out, dim, scale);
  } else {
    row_generic(r, pos, inverse, x, out, dim, scale);
  }
}

// col[d * ld + j] = factor * rows[j * rows_ld + d] for j < n, d < dim: the n x dim
// float rows stored as dim columns, 8 x 8 register transposes (edges one by one).
void transpose_scaled_f32(const float* rows, int64_t rows_ld, int64_t n, int64_t dim, float* col, int64_t ld,
                          float factor);

// The same for any type: float by transpose_scaled_f32, others element by element.
template <typename T>
inline void transpose_scaled(const T* rows, int64_t rows_ld, int64_t n, int64_t dim, T* col, int64_t ld, T factor) {
  if constexpr (std::is_same_v<T, float>) {
    transpose_scaled_f32(rows, rows_ld, n, dim, col, ld, factor);
  } else {
    for (int64_t d = 0; d < dim; ++d) {
      for (int64_t j = 0; j < n; ++j) col[d * ld + j] = rows[j * rows_ld + d] * factor;
    }
  }
}

}  // namespace rope
}  // namespace cpu
}  // namespace attnkit
