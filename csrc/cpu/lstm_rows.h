// The LSTM row kernels of csrc/cpu/rnn.cpp (vectorized, compiled for the
// CPU's ISA), for the cell step of csrc/cpu/lstm_cell.cpp. float and double,
// contiguous tensors.
#pragma once

#include <ATen/ATen.h>

namespace attnkit {
namespace cpu {

// pre (B, 4H): x W_ih^T + biases in, activated gates (i, f, g, o) out; gh
// (B, 4H): h W_hh^T, added here; c (B, H): c in, the new c out; h (B, H): out.
void lstm_rows_forward(at::Tensor& pre, const at::Tensor& gh, at::Tensor& c, at::Tensor& h);

// gpre (B, 4H) gets d(pre-activations); dc (B, H): dL/dc in, dL/dc_prev out.
void lstm_rows_backward(const at::Tensor& gates, const at::Tensor& c_prev, const at::Tensor& c_new,
                        const at::Tensor& dh, at::Tensor& dc, at::Tensor& gpre);

}  // namespace cpu
}  // namespace attnkit
