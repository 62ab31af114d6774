// Flash attention on the CPU (csrc/cpu/attention.cpp): tiled, online softmax,
// O(N) memory. One code path for dense q (B, H, Nq, D), k/v (B, H_kv, Nk, D/Dv)
// and packed varlen (total, H, D) with int32 cu_seqlens (B + 1,); conventions
// as attnkit.reference.attention (causal/window via diag and (left, right), -1 =
// unbounded; masks and key padding dense only; fully masked rows -> 0).
//
// attn_mask: uint8/bool (nonzero = attend) or floating (added), (B, H, Nq, Nk),
// usually an expanded stride-0 view: it is read through its strides.
// key_padding_mask: bool/uint8 (B, Nk), nonzero = padding.
// alibi_slopes: float32 (B, H): score -= slope * |j - (i + diag)|.
// lse: float32 (float64 for float64 inputs), dense (B, H, Nq), varlen (H, total_q).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace attnkit {
namespace cpu {

// Returns {out, lse}.
std::vector<at::Tensor> attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& cu_seqlens_q,
    const c10::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    const c10::optional<at::Tensor>& attn_mask, const c10::optional<at::Tensor>& key_padding_mask,
    const c10::optional<at::Tensor>& alibi_slopes, int64_t window_left, int64_t window_right, bool bottom_right,
    double softcap, double scale, double dropout_p, int64_t seed);

// Returns {dq, dk, dv}; deterministic (no atomics, fixed summation order). With
// mask_grad (a floating attn_mask, dense calls only) also the gradient of the
// additive mask, dS = P * (dP - delta), as a (B, H, Nq, Nk) tensor in the
// accumulation type (float32, float64 for float64 inputs): {dq, dk, dv, d_mask}.
std::vector<at::Tensor> attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, const c10::optional<at::Tensor>& attn_mask,
    const c10::optional<at::Tensor>& key_padding_mask, const c10::optional<at::Tensor>& alibi_slopes,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap, double scale, double dropout_p,
    int64_t seed, bool mask_grad);

// The dropout keep mask (B, H, max_q, max_k) as bool, drawn by the kernels' Philox: for tests.
at::Tensor attention_dropout_keep_mask(int64_t batch, int64_t heads, int64_t max_q, int64_t max_k, double dropout_p,
                                       int64_t seed);

}  // namespace cpu
}  // namespace attnkit
