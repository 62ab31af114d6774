// Attention of a few new query tokens against a KV cache on the CPU
// (csrc/cpu/attention_decode.cpp), the semantics of attnkit.reference.attention.decode:
// q (B, H, Nq, D), k_cache/v_cache (B, H_kv, N_max, D/Dv), unit last stride, H a
// multiple of H_kv; cache_seqlens int32 (B,); query i of sequence b sits at position
// cache_seqlens[b] - Nq + i and sees keys j <= that position (and >= it - window_left
// when window_left >= 0); alibi_slopes float32 (B, H) or none: score -= slope * |j - pos|,
// after soft-capping. attn_mask (B, H, Nq, N_max), any strides (an expanded view): bool, False
// hides a key, or floating, added to the scores after ALiBi; key_padding_mask bool (B, N_max),
// True hides a key (flash_attention's few-query forward passes them; the op attention_decode
// none). Rows that see no key give 0 and lse = -inf.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace attnkit {
namespace cpu {

// Returns {out (B, H, Nq, Dv) in q's dtype, lse (B, H, Nq) float32 (float64 for float64)}.
std::vector<at::Tensor> attention_decode_forward(const at::Tensor& q, const at::Tensor& k_cache,
                                                 const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
                                                 double scale, double softcap, int64_t window_left,
                                                 const c10::optional<at::Tensor>& alibi_slopes,
                                                 const c10::optional<at::Tensor>& attn_mask,
                                                 const c10::optional<at::Tensor>& key_padding_mask);

// The same for packed variable-length sequences, each with the same number Nq of new queries
// (flash_attention_varlen's one-token decoding step): q (total_q = B Nq, H, D), k (total_k,
// H_kv, D), v (total_k, H_kv, Dv); cu_seqlens_q int32 (B + 1,) = 0, Nq, 2 Nq, ...; sequence b's
// keys are rows cu_seqlens_k[b] .. cu_seqlens_k[b + 1]. Returns {out (total_q, H, Dv), lse (H,
// total_q) float32}, flash_attention_varlen's layout.
std::vector<at::Tensor> attention_decode_varlen_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                                        double scale, double softcap, int64_t window_left,
                                                        const c10::optional<at::Tensor>& alibi_slopes);

}  // namespace cpu
}  // namespace attnkit
