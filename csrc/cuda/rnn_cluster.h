// The persistent LSTM / GRU forward on thread-block clusters (rnn_cluster.cu), called
// by rnn_persistent.cu for float16 / bfloat16 when ATTNKIT_RNN_CLUSTER=1.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace attnkit {
namespace cuda {
namespace cluster_rnn {

struct Plan {
  int cluster = 0, units = 0, row_tiles = 0, k_tiles = 0, k_split = 0;
  int clusters_at_once = 0;  // how many such clusters the device holds at a time
  size_t smem = 0;
  std::string reason;  // empty when the kernel runs
};

// The work split for (gates = 4 LSTM / 3 GRU, batch, hidden, dtype) on `device` (a
// CUDA device), or why it does not run there; dtype and batch are checked first,
// without touching the device.
Plan plan(int64_t gates, int64_t batch, int64_t hidden, at::ScalarType dtype, at::Device device);

// ATTNKIT_RNN_CLUSTER=1: opt-in until timed on a GPU.
bool enabled();

// As rnn_persistent.cu's grid kernel: pre (T, B, G H) the input projections, h (2, B, H)
// with h0 in buffer 0 (h_T ends in buffer T & 1), c (B, H) float32 (LSTM; c_T ends
// there), output (T, B, H), len (B,) int64 on the device or undefined. For training,
// saved_gates (T, B, 4 H) and, LSTM, saved_cs (T, B, H) receive what rnn.cu's backward
// reads (undefined for inference).
void launch(int64_t gates, const Plan& plan, const at::Tensor& w_hh, const at::Tensor& pre,
            const c10::optional<at::Tensor>& b_hh, at::Tensor& h, at::Tensor& c, at::Tensor& output,
            const at::Tensor& len, at::Tensor& saved_gates, at::Tensor& saved_cs, int64_t T, int64_t B, int64_t H);

}  // namespace cluster_rnn
}  // namespace cuda
}  // namespace attnkit
