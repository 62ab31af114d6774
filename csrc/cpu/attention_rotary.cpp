// Fused RoPE for the CPU flash attention (see attnkit/rotary.h): the entry
// points check the tables and hand them to the attention kernels
// (attention.cpp, attention_rope.h), which rotate q and k where they already
// copy them and rotate dq, dk back where they write them.
#include "attention_kernel.h"
#include "attention_rope.h"
#include "attnkit/attention.h"
#include "attnkit/rotary.h"

namespace attnkit {
namespace cpu {

namespace {

RopeTables tables_of(const at::Tensor& q, const c10::optional<at::Tensor>& cu_q,
                     const c10::optional<at::Tensor>& cu_k, const at::Tensor& cos, const at::Tensor& sin,
                     const at::Tensor& offsets, bool interleaved) {
  TORCH_CHECK(cu_q.has_value() == cu_k.has_value(), "attention: give both cu_seqlens_q and cu_seqlens_k or neither");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.scalar_type() == sin.scalar_type(),
              "attention: rotary_cos and rotary_sin must both be (positions, rotary_dim / 2)");
  TORCH_CHECK(at::isFloatingType(cos.scalar_type()), "attention: rotary_cos and rotary_sin must be floating point");
  TORCH_CHECK(offsets.scalar_type() == at::kLong || offsets.scalar_type() == at::kInt,
              "attention: rotary offsets must be int64 or int32");
  TORCH_CHECK(cos.device().is_cpu() && sin.device().is_cpu() && offsets.device().is_cpu(),
              "attention: rotary tables and offsets must be on the CPU");
  TORCH_CHECK(cos.size(1) >= 1 && 2 * cos.size(1) <= q.size(-1),
              "attention: rotary_dim = 2 * rotary_cos.size(1) must be in [2, head dim]");
  const int64_t batch = cu_q.has_value() ? cu_q->numel() - 1 : q.size(0);
  TORCH_CHECK(offsets.dim() == 1 && offsets.numel() == batch, "attention: rotary offsets must be (B,) with B = ",
              batch);
  return {cos, sin, offsets, interleaved};
}

}  // namespace

namespace flash {

at::Tensor rotated_copy(const Call& c, const RopeTables& rope, const at::Tensor& x, bool queries, bool conjugate) {
  const Spec& sp = c.spec;
  at::Tensor offsets = rope.offsets.to(at::kLong).clone();  // (B,): key j of sequence b at j + offsets[b]
  if (queries) {  // query i at i + diag + offsets[b]
    int64_t* o = offsets.data_ptr<int64_t>();
    for (int64_t b = 0; b < sp.batch; ++b) o[b] += sp.seq(b).diag;
  }
  const bool usable = rope.cos.scalar_type() == x.scalar_type() || rope.cos.scalar_type() == at::kFloat;
  const at::Tensor cos = usable ? rope.cos : rope.cos.to(at::kFloat), sin = usable ? rope.sin : rope.sin.to(at::kFloat);
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (sp.varlen) {
    rotary_apply(x, cos, sin, offsets, 0, rope.interleaved, conjugate, out, queries ? c.cu_q : c.cu_k);
  } else {  // rotary_apply takes (B, N, H, D)
    rotary_apply(x.transpose(1, 2), cos, sin, offsets, 0, rope.interleaved, conjugate, out.transpose(1, 2),
                 c10::nullopt);
  }
  return out;
}

}  // namespace flash

std::vector<at::Tensor> attention_rotary_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& cu_seqlens_q,
    const c10::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const c10::optional<at::Tensor>& attn_mask, const c10::optional<at::Tensor>& key_padding_mask,
    const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left, int64_t window_right, bool bottom_right,
    double softcap, double scale, double dropout_p, int64_t seed, const at::Tensor& rotary_cos,
    const at::Tensor& rotary_sin, const at::Tensor& rotary_offsets, bool rotary_interleaved) {
  const RopeTables r =
      tables_of(q, cu_seqlens_q, cu_seqlens_k, rotary_cos, rotary_sin, rotary_offsets, rotary_interleaved);
  return attention_forward_rope(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, attn_mask,
                                key_padding_mask, alibi_slopes, window_left, window_right, bottom_right, softcap, scale,
                                dropout_p, seed, &r);
}

std::vector<at::Tensor> attention_rotary_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, const c10::optional<at::Tensor>& attn_mask,
    const c10::optional<at::Tensor>& key_padding_mask, const c10::optional<at::Tensor>& alibi_slopes,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap, double scale, double dropout_p,
    int64_t seed, const at::Tensor& rotary_cos, const at::Tensor& rotary_sin, const at::Tensor& rotary_offsets,
    bool rotary_interleaved, bool mask_grad) {
  const RopeTables r =
      tables_of(q, cu_seqlens_q, cu_seqlens_k, rotary_cos, rotary_sin, rotary_offsets, rotary_interleaved);
  return attention_backward_rope(grad_out, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 attn_mask, key_padding_mask, alibi_slopes, window_left, window_right, bottom_right,
                                 softcap, scale, dropout_p, seed, mask_grad, &r);
}

}  // namespace cpu
}  // namespace attnkit
