// Additive (Bahdanau) attention on the CPU (csrc/cpu/additive_attention.cpp),
// with the semantics of attnkit.reference.additive_attention.attend, on the
// projections qp = query W_q^T (B, Tq, A) and kp = keys W_k^T (B, Tk, A):
// score[b, i, j] = v_a . tanh(qp[b, i] + kp[b, j]), softmax over the keys with
// mask (B, Tk) bool (true = real key), context = weights @ values (B, Tk, Dv).
// All float tensors contiguous and of one dtype, float or double (the op
// upcasts half inputs); the (B, Tq, Tk, A) tanh tensor is never built.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace attnkit {
namespace cpu {

// Returns {context (B, Tq, Dv), weights (B, Tq, Tk), lse (B, Tq)}; a row with no
// real key gets weights 0, context 0 and lse -inf.
std::vector<at::Tensor> additive_attention_forward(const at::Tensor& qp, const at::Tensor& kp, const at::Tensor& values,
                                                   const at::Tensor& v_a, const c10::optional<at::Tensor>& mask);

// delta (B, Tq) = rowsum(grad_context * context) + rowsum(weights * grad_weights).
// Returns {d_qp, d_kp, d_values, d_v_a}; the tanh terms are recomputed.
std::vector<at::Tensor> additive_attention_backward(const at::Tensor& grad_context,
                                                    const c10::optional<at::Tensor>& grad_weights,
                                                    const at::Tensor& delta, const at::Tensor& qp, const at::Tensor& kp,
                                                    const at::Tensor& values, const at::Tensor& v_a,
                                                    const c10::optional<at::Tensor>& mask, const at::Tensor& lse);

}  // namespace cpu
}  // namespace attnkit
