// Layer-normalized LSTM / GRU with zoneout, one layer and one direction over a
// time-major sequence (declared for attnkit::cpu, csrc/cpu/rnn_layernorm.cpp, and attnkit::cuda,
// csrc/cuda/rnn_layernorm.cu; their shared time loops: attnkit/rnn_layernorm_sequence.h). The math is
// attnkit.reference.rnn_layernorm's: LN on the input projection (all steps at
// once), on the recurrent projection (per step, fused into the gate pass) and,
// for the LSTM, on the cell state before tanh; eps 1e-5. zoneout (optional,
// (T, B, H), values in [0, 1]) mixes h_t = m * h_{t-1} + (1 - m) * h_new.
// lengths (optional, int64 CPU (B,)): rows past their length keep their state
// and output zeros. Biases are optional; `save` = false skips the saved tensors
// (returned empty).
#pragma once

#include <ATen/ATen.h>

#include <vector>

#define ATTNKIT_DECLARE_LN_RNN(device) \
namespace attnkit { \
namespace device { \
 \
/* Returns {output (T,B,H), h_n, c_n, xhat (T,B,4H), hhat (T,B,4H), gates (T,B,4H) activated i,f,g,o, */ \
/* cs (T,B,H) cell states, chat (T,B,H) normalized cell states, rstd (T,B,3) of the three LNs}. */ \
std::vector<at::Tensor> ln_lstm_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0, \
                                        const at::Tensor& w_ih, const at::Tensor& w_hh, \
                                        const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh, \
                                        const at::Tensor& g_ih, const at::Tensor& be_ih, const at::Tensor& g_hh, \
                                        const at::Tensor& be_hh, const at::Tensor& g_c, const at::Tensor& be_c, \
                                        const c10::optional<at::Tensor>& lengths, \
                                        const c10::optional<at::Tensor>& zoneout, bool save); \
 \
/* Returns {dx, dh0, dc0, dw_ih, dw_hh, db (the gradient of each bias and of be_ih and be_hh: all enter */ \
/* the pre-activations as a sum), dg_ih, dg_hh, dg_c, dbe_c}. */ \
std::vector<at::Tensor> ln_lstm_backward(const at::Tensor& grad_output, const at::Tensor& grad_hn, \
                                         const at::Tensor& grad_cn, const at::Tensor& x, const at::Tensor& h0, \
                                         const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh, \
                                         const at::Tensor& g_ih, const at::Tensor& g_hh, const at::Tensor& g_c, \
                                         const at::Tensor& be_c, const c10::optional<at::Tensor>& lengths, \
                                         const c10::optional<at::Tensor>& zoneout, const at::Tensor& output, \
                                         const at::Tensor& xhat, const at::Tensor& hhat, const at::Tensor& gates, \
                                         const at::Tensor& cs, const at::Tensor& chat, const at::Tensor& rstd); \
 \
/* Returns {output (T,B,H), h_n, xhat (T,B,3H), hhat (T,B,3H), gates (T,B,4H) r, z, n, hn */ \
/* (hn = LN_hh(W_hn h) + b_hn), rstd (T,B,2)}. */ \
std::vector<at::Tensor> ln_gru_forward(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih, \
                                       const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih, \
                                       const c10::optional<at::Tensor>& b_hh, const at::Tensor& g_ih, \
                                       const at::Tensor& be_ih, const at::Tensor& g_hh, const at::Tensor& be_hh, \
                                       const c10::optional<at::Tensor>& lengths, \
                                       const c10::optional<at::Tensor>& zoneout, bool save); \
 \
/* Returns {dx, dh0, dw_ih, dw_hh, db_ih (= d be_ih), db_hh (= d be_hh), dg_ih, dg_hh}. */ \
std::vector<at::Tensor> ln_gru_backward(const at::Tensor& grad_output, const at::Tensor& grad_hn, \
                                        const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih, \
                                        const at::Tensor& w_hh, const at::Tensor& g_ih, const at::Tensor& g_hh, \
                                        const c10::optional<at::Tensor>& lengths, \
                                        const c10::optional<at::Tensor>& zoneout, const at::Tensor& output, \
                                        const at::Tensor& xhat, const at::Tensor& hhat, const at::Tensor& gates, \
                                        const at::Tensor& rstd); \
 \
}  /* namespace device */ \
}  /* namespace attnkit */

ATTNKIT_DECLARE_LN_RNN(cpu)
ATTNKIT_DECLARE_LN_RNN(cuda)
