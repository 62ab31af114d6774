// Rotary position embedding (RoPE) on the CPU (csrc/cpu/rotary.cpp), with the
// semantics of attnkit.reference.rotary (FlashAttention's apply_rotary_emb):
// x (B, N, H, D) any strides, or packed (total, H, D) with int32 cu_seqlens
// (B + 1,); cos/sin (S, R/2) or (B, S, R/2) in x's dtype or float32, R <= D;
// row n of sequence b sits at position n + offsets[b] (or n + offset), rows whose
// position falls outside [0, S) are copied unrotated; `conjugate` rotates by
// -angle. Arithmetic in float (double for double x).
//
// The fused-RoPE attention entry points (csrc/cpu/attention_rotary.cpp) take the
// arguments of attention_forward/backward plus cos/sin (positions, R/2) and
// int32 offsets (B,): q row i is rotated at i + diag + offset[b], k row j at
// j + offset[b] (diag = Nk - Nq when bottom_right, else 0).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace attnkit {
namespace cpu {

// Writes x rotated into `out` (x's shape and dtype; a fresh tensor or x itself).
void rotary_apply(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                  const c10::optional<at::Tensor>& offsets, int64_t offset, bool interleaved, bool conjugate,
                  const at::Tensor& out, const c10::optional<at::Tensor>& cu_seqlens);

// attention_forward with q and k rotated inside the kernels: k while scale * K^T
// is formed, each Q tile as its task loads it (csrc/cpu/attention_rope.h). Returns {out, lse}.
std::vector<at::Tensor> attention_rotary_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& cu_seqlens_q,
    const c10::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const c10::optional<at::Tensor>& attn_mask, const c10::optional<at::Tensor>& key_padding_mask,
    const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left, int64_t window_right, bool bottom_right,
    double softcap, double scale, double dropout_p, int64_t seed, const at::Tensor& rotary_cos,
    const at::Tensor& rotary_sin, const at::Tensor& rotary_offsets, bool rotary_interleaved);

// attention_backward with q and k rotated where their transposed operands are
// made (k per key block on the one-task-per-(batch, kv-head) schedule), dq and
// dk rotated back as they are written (the gradient of a rotation is the
// opposite rotation). Returns {dq, dk, dv} (and d_mask, as attention_backward).
std::vector<at::Tensor> attention_rotary_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, const c10::optional<at::Tensor>& attn_mask,
    const c10::optional<at::Tensor>& key_padding_mask, const c10::optional<at::Tensor>& alibi_slopes,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap, double scale, double dropout_p,
    int64_t seed, const at::Tensor& rotary_cos, const at::Tensor& rotary_sin, const at::Tensor& rotary_offsets,
    bool rotary_interleaved, bool mask_grad);

}  // namespace cpu
}  // namespace attnkit
