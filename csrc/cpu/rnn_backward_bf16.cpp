// The bfloat16 training backward of the LSTM / GRU at batch 5+ without projection: the time
// loop (rnn_fused.cpp's fused backward, on float32 copies of what it reads) with its gate math in
// float32 and its per-step products dh = grad_pre[t] W_hh in bfloat16, then the whole-sequence
// GEMMs (dx and the weight gradients, ~3/4 of the backward's FLOPs) on bfloat16 operands through
// at::mm, which runs oneDNN's AMX / AVX512-BF16 kernels: 3-4x the float32 GEMMs' speed on the
// Sapphire Rapids of BENCHMARKS.md. As in torch's own bfloat16 backward, the gradients of the
// pre-activations are rounded to bfloat16 for those GEMMs (float accumulation inside them); the
// bias gradients are summed in float32.
#include <ATen/ATen.h>

#include <vector>

#include "attnkit/rnn_sequence.h"
#include "rnn_fused.h"

namespace attnkit {
namespace cpu {
namespace {

at::Tensor wide(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// [dx, dw_ih, dw_hh] from the float32 gradients of the input projections (gi, (T B, G H)) and
// of the recurrent ones (gh; the LSTM's are gi itself): bfloat16 GEMMs. h_{t-1} is h0 at t = 0
// and output[t - 1] after (equal while a row runs; a stopped row's gradients are 0).
std::vector<at::Tensor> input_and_weight_grads(const at::Tensor& gi, const at::Tensor& gh, const at::Tensor& x,
                                               const at::Tensor& h0, const at::Tensor& output,
                                               const at::Tensor& w_ih) {
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), H = h0.size(1);
  const at::Tensor gi_low = gi.to(at::kBFloat16);
  const at::Tensor gh_low = gh.is_same(gi) ? gi_low : gh.to(at::kBFloat16);
  const at::Tensor h_prev = at::cat({h0, output.narrow(0, 0, T - 1).reshape({(T - 1) * B, H})});
  // gi^T x rather than (x^T gi)^T: at::mm takes the transposed view of gi at full speed, while
  // a transposed x (its rows are the GEMM's K) took twice the time here.
  return {at::mm(gi_low, w_ih).view({T, B, I}), at::mm(gi_low.t(), x.view({T * B, I})), at::mm(gh_low.t(), h_prev)};
}

}  // namespace

std::vector<at::Tensor> rnn_backward_bf16(int64_t gates, const at::Tensor& grad_output, const at::Tensor& grad_hn,
                                          const c10::optional<at::Tensor>& grad_cn, const at::Tensor& x,
                                          const at::Tensor& h0, const c10::optional<at::Tensor>& c0,
                                          const at::Tensor& w_ih, const at::Tensor& w_hh,
                                          const c10::optional<at::Tensor>& lengths, const at::Tensor& output,
                                          const at::Tensor& saved_gates, const c10::optional<at::Tensor>& cs) {
  TORCH_CHECK(gates == 3 || gates == 4, "rnn_backward_bf16: gates must be 4 (LSTM) or 3 (GRU), got ", gates);
  const bool lstm = gates == 4;
  TORCH_CHECK(lstm == rnn::present(c0) && lstm == rnn::present(grad_cn) && lstm == rnn::present(cs),
              "rnn_backward_bf16: c0, grad_cn and cs are given for the LSTM (gates 4) and only for it");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "rnn_backward_bf16: x must be bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.device().is_cpu(), "rnn_backward_bf16: x must be a CPU tensor, got one on ", x.device());
  rnn::check_forward(x, h0, lstm ? &*c0 : nullptr, w_ih, w_hh, c10::nullopt, c10::nullopt, c10::nullopt, lengths,
                     gates);
  const int64_t T = x.size(0), B = x.size(1), H = w_hh.size(1);
  rnn::check_grad(grad_output, "grad_output", x, {T, B, H});
  rnn::check_grad(grad_hn, "grad_hn", x, {B, H});
  rnn::check_grad(output, "output", x, {T, B, H});
  rnn::check_grad(saved_gates, "gates", x, {T, B, 4 * H});  // the GRU's: r, z, n and W_hn h + b_hn
  if (lstm) {
    rnn::check_grad(*grad_cn, "grad_cn", x, {B, H});
    rnn::check_grad(*cs, "cs", x, {T, B, H});
  }
  // The fused loops serve batch 5+ with an input (its forward takes no I = 0); the caller runs the float32 kernels.
  if (B <= 4 || x.size(2) == 0) return {};
  const std::vector<int64_t> rows = rnn::active_rows(lengths, T, B);
  const at::Tensor len = rnn::present(lengths) ? *lengths : at::Tensor();
  at::Tensor dh = wide(grad_hn);  // a copy: the loop writes it
  if (lstm) {
    // The float32 copies go to the reused workspace: fresh 50 MB buffers cost a page fault per
    // 4 KB (bf16 -> float32 of the gates at (T, B, H) = (100, 64, 512): 20 ms fresh, 3.5 ms
    // into a buffer here). The loop turns the gates into their gradients in place.
    at::Tensor dc = wide(*grad_cn);
    at::Tensor grad_pre = workspace(0, {T, B, 4 * H}, dh.options());
    grad_pre.copy_(saved_gates);
    at::Tensor cs_and_grad = workspace(1, {2, T, B, H}, dh.options());
    cs_and_grad[0].copy_(*cs);
    cs_and_grad[1].copy_(grad_output);
    if (!lstm_backward_fused(grad_pre, cs_and_grad[0], wide(*c0), cs_and_grad[1], wide(w_hh), dh, dc, grad_pre, len,
                             rows, /*low=*/true)) {
      return {};
    }
    const at::Tensor gp = grad_pre.view({T * B, 4 * H});
    std::vector<at::Tensor> grads = input_and_weight_grads(gp, gp, x, h0, output, w_ih);
    return {grads[0], dh.to(at::kBFloat16), dc.to(at::kBFloat16), grads[1], grads[2], gp.sum(0).to(at::kBFloat16)};
  }
  at::Tensor dgi = workspace(0, {T, B, 3 * H}, dh.options()), dgh = workspace(1, {T, B, 3 * H}, dh.options());
  if (!gru_backward_fused(wide(saved_gates), wide(h0), wide(output), wide(grad_output), wide(w_hh), dh, dgi, dgh,
                          len, rows, /*low=*/true)) {
    return {};
  }
  const at::Tensor gi = dgi.view({T * B, 3 * H}), gh = dgh.view({T * B, 3 * H});
  std::vector<at::Tensor> grads = input_and_weight_grads(gi, gh, x, h0, output, w_ih);
  return {grads[0], dh.to(at::kBFloat16), grads[1], grads[2], gi.sum(0).to(at::kBFloat16),
          gh.sum(0).to(at::kBFloat16)};
}

}  // namespace cpu
}  // namespace attnkit
