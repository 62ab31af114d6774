// Fused RoPE for the CPU flash attention (see attnkit/rotary.h).
//
// q and k are rotated once into per-call buffers (one pass each, O(N) memory)
// and the attention runs on those. Rotating inside the tile loops instead would
// repeat K's rotation for every query block; the win over "apply_rotary, then
// attend" is that no rotated copy goes through Python and autograd, nor is kept
// for the backward: the backward rotates q, k again and rotates dq, dk back in place.
#include <utility>

#include "attnkit/attention.h"
#include "attnkit/rotary.h"

namespace attnkit {
namespace cpu {

namespace {

// rotary_apply takes (B, N, H, D); dense attention tensors are (B, H, N, D).
at::Tensor as_bnhd(const at::Tensor& t, bool varlen) { return varlen ? t : t.transpose(1, 2); }

struct Rope {
  at::Tensor cos, sin, offsets_q, offsets_k;  // tables in q's dtype or float32; int64 (B,) shifts
  bool interleaved;
};

Rope rope_of(const at::Tensor& q, const at::Tensor& k, const c10::optional<at::Tensor>& cu_q,
             const c10::optional<at::Tensor>& cu_k, bool bottom_right, const at::Tensor& cos, const at::Tensor& sin,
             const at::Tensor& offsets, bool interleaved) {
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.scalar_type() == sin.scalar_type(),
              "attention: rotary_cos and rotary_sin must both be (positions, rotary_dim / 2)");
  const bool keep = cos.scalar_type() == q.scalar_type() || cos.scalar_type() == at::kFloat;
  Rope r{keep ? cos : cos.to(at::kFloat), keep ? sin : sin.to(at::kFloat), {}, offsets.to(at::kLong), interleaved};
  r.offsets_q = r.offsets_k;
  if (bottom_right) {  // query i sits at key position i + Nk - Nq, per sequence
    if (cu_q.has_value()) {
      const at::Tensor lengths_q = cu_q->slice(0, 1) - cu_q->slice(0, 0, -1);
      const at::Tensor lengths_k = cu_k->slice(0, 1) - cu_k->slice(0, 0, -1);
      r.offsets_q = r.offsets_k + (lengths_k - lengths_q).to(at::kLong);
    } else {
      r.offsets_q = r.offsets_k + (k.size(2) - q.size(2));
    }
  }
  return r;
}

// x (q or k, or their gradients) rotated by its positions into `out` (x itself for in place).
void spin(const Rope& r, const at::Tensor& x, const at::Tensor& shifts, const c10::optional<at::Tensor>& cu,
          bool conjugate, const at::Tensor& out) {
  const bool varlen = cu.has_value();
  rotary_apply(as_bnhd(x, varlen), r.cos, r.sin, shifts, 0, r.interleaved, conjugate, as_bnhd(out, varlen), cu);
}

using OptTensor = c10::optional<at::Tensor>;

std::pair<at::Tensor, at::Tensor> rotated(const Rope& r, const at::Tensor& q, const at::Tensor& k,
                                          const OptTensor& cu_q, const OptTensor& cu_k) {
  at::Tensor q_rot = at::empty(q.sizes(), q.options()), k_rot = at::empty(k.sizes(), k.options());
  spin(r, q, r.offsets_q, cu_q, false, q_rot);
  spin(r, k, r.offsets_k, cu_k, false, k_rot);
  return {q_rot, k_rot};
}

}  // namespace

std::vector<at::Tensor> attention_rotary_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& cu_seqlens_q,
    const c10::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const c10::optional<at::Tensor>& attn_mask, const c10::optional<at::Tensor>& key_padding_mask,
    const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left, int64_t window_right, bool bottom_right,
    double softcap, double scale, double dropout_p, int64_t seed, const at::Tensor& rotary_cos,
    const at::Tensor& rotary_sin, const at::Tensor& rotary_offsets, bool rotary_interleaved) {
  TORCH_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(),
              "attention: give both cu_seqlens_q and cu_seqlens_k or neither");
  const Rope r = rope_of(q, k, cu_seqlens_q, cu_seqlens_k, bottom_right, rotary_cos, rotary_sin, rotary_offsets,
                         rotary_interleaved);
  const auto [q_rot, k_rot] = rotated(r, q, k, cu_seqlens_q, cu_seqlens_k);
  return attention_forward(q_rot, k_rot, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask,
                           key_padding_mask, alibi_slopes, window_left, window_right, bottom_right, softcap, scale,
                           dropout_p, seed);
}

std::vector<at::Tensor> attention_rotary_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, const c10::optional<at::Tensor>& attn_mask,
    const c10::optional<at::Tensor>& key_padding_mask, const c10::optional<at::Tensor>& alibi_slopes,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap, double scale, double dropout_p,
    int64_t seed, const at::Tensor& rotary_cos, const at::Tensor& rotary_sin, const at::Tensor& rotary_offsets,
    bool rotary_interleaved) {
  TORCH_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(),
              "attention: give both cu_seqlens_q and cu_seqlens_k or neither");
  const Rope r = rope_of(q, k, cu_seqlens_q, cu_seqlens_k, bottom_right, rotary_cos, rotary_sin, rotary_offsets,
                         rotary_interleaved);
  const auto [q_rot, k_rot] = rotated(r, q, k, cu_seqlens_q, cu_seqlens_k);
  std::vector<at::Tensor> grads = attention_backward(
      grad_out, q_rot, k_rot, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask,
      key_padding_mask, alibi_slopes, window_left, window_right, bottom_right, softcap, scale, dropout_p, seed);
  // d/dq of attention(R q) is R^T dq_rot: the rotation by the opposite angle.
  spin(r, grads[0], r.offsets_q, cu_seqlens_q, true, grads[0]);
  spin(r, grads[1], r.offsets_k, cu_seqlens_k, true, grads[1]);
  return grads;
}

}  // namespace cpu
}  // namespace attnkit
