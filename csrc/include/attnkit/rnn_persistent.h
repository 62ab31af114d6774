// The persistent small-batch LSTM / GRU forward on CUDA (csrc/cuda/rnn_persistent.cu):
// inference only, no projection, batch 1..8 (any batch on clusters), float32 / float16 / bfloat16.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace attnkit {
namespace cuda {

// Why the kernel cannot run (gates = 4 LSTM, 3 GRU) on `device`; empty when it can:
// W_hh must fit in the blocks' shared memory and the grid must be co-resident; or,
// with ATTNKIT_RNN_CLUSTER=1, the cluster kernel takes the call (float16 / bfloat16,
// any batch).
std::string rnn_persistent_unsupported(int64_t gates, int64_t batch, int64_t hidden, at::ScalarType dtype,
                                       at::Device device);

// The cluster kernel's choice for (gates, batch, hidden, dtype) on `device`: {cluster
// size, "", how many such clusters run at a time} where it runs (with ATTNKIT_RNN_CLUSTER=1),
// {"0", why, "0"} where not. One cluster serves 8 batch rows; more than run at a time
// run in waves.
std::vector<std::string> rnn_cluster_plan(int64_t gates, int64_t batch, int64_t hidden, at::ScalarType dtype,
                                          at::Device device);

// Arguments as attnkit::cuda::lstm_forward / gru_forward (no w_hr, no save). Return
// {output, h_n, c_n} (LSTM) or {output, h_n} (GRU), or an empty list when not taken
// (rnn_persistent_unsupported says why): the caller falls back to the per-step path.
std::vector<at::Tensor> lstm_forward_persistent(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                                const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                const c10::optional<at::Tensor>& b_ih,
                                                const c10::optional<at::Tensor>& b_hh,
                                                const c10::optional<at::Tensor>& lengths);
std::vector<at::Tensor> gru_forward_persistent(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                               const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                                               const c10::optional<at::Tensor>& b_hh,
                                               const c10::optional<at::Tensor>& lengths);

// Training's forward on the cluster kernel (ATTNKIT_RNN_CLUSTER=1, float16 / bfloat16,
// sm_90+): {output, h_n, c_n, gates, cs} (LSTM) or {output, h_n, gates} (GRU), saved as
// attnkit::cuda::lstm_forward / gru_forward save them for their backward; {} when not taken.
std::vector<at::Tensor> lstm_forward_cluster_save(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& c0,
                                                  const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                  const c10::optional<at::Tensor>& b_ih,
                                                  const c10::optional<at::Tensor>& b_hh,
                                                  const c10::optional<at::Tensor>& lengths);
std::vector<at::Tensor> gru_forward_cluster_save(const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                                 const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                                                 const c10::optional<at::Tensor>& b_hh,
                                                 const c10::optional<at::Tensor>& lengths);

// The backward on the same clusters (rnn_cluster_backward.cu), for any forward's saved
// tensors: {dx, dh0, dc0, dw_ih, dw_hh, db} (LSTM, no projection) or {dx, dh0, dw_ih,
// dw_hh, db_ih, db_hh} (GRU), as lstm_backward / gru_backward; {} when not taken
// (float32, T = 0, or W_hh and the backward's buffers fit no cluster here).
std::vector<at::Tensor> lstm_backward_cluster(const at::Tensor& grad_output, const at::Tensor& grad_hn,
                                              const at::Tensor& grad_cn, const at::Tensor& x, const at::Tensor& h0,
                                              const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
                                              const c10::optional<at::Tensor>& lengths, const at::Tensor& output,
                                              const at::Tensor& gates, const at::Tensor& cs);
std::vector<at::Tensor> gru_backward_cluster(const at::Tensor& grad_output, const at::Tensor& grad_hn,
                                             const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                                             const at::Tensor& w_hh, const c10::optional<at::Tensor>& lengths,
                                             const at::Tensor& output, const at::Tensor& gates);

}  // namespace cuda
}  // namespace attnkit
