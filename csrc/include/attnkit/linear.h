// y = x W^T + b for a few rows of x (csrc/cpu/linear.cpp): the matrix-vector
// products of one decoding step, where the weights are read once per token and
// the speed is memory bandwidth. x (M, K) fp32 contiguous, weight (N, K) fp32
// contiguous, bias (N,) or none; returns (M, N).
#pragma once

#include <ATen/ATen.h>

namespace attnkit {
namespace cpu {

at::Tensor linear_few_rows(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);

}  // namespace cpu
}  // namespace attnkit
