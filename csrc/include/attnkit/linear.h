// y = x W^T + b for a few rows of x (csrc/cpu/linear.cpp): the matrix-vector
// products of one decoding step, where the weights are read once per token and
// the speed is memory bandwidth. x (M, K) fp32 contiguous, weight (N, K) fp32
// contiguous, bias (N,) or none; returns (M, N).
#pragma once

#include <ATen/ATen.h>

namespace attnkit {
namespace cpu {

at::Tensor linear_few_rows(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);

// oneDNN's linear (mkldnn::_linear_pointwise): x (M, K) fp32 contiguous, weight
// (N, K) plain or reordered by mkldnn::_reorder_linear_weight. Its JIT runs
// fp32 GEMMs about twice as fast as the MKL sgemm that at::addmm calls on the
// AMD CPUs of BENCHMARKS.md. Check onednn_linear_available() first: false also
// where OpenMP may grant a smaller team than asked for, which oneDNN miscomputes.
bool onednn_linear_available();
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);

// Whether float32 GEMMs on weights oneDNN has not packed (linear_rows, the
// RNN's input projections outside the fused loops, the weight gradients) go to
// at::mm / at::addmm rather than oneDNN or brgemm tiles: where at::mm is MKL's
// sgemm on an Intel CPU (MKL takes a generic path on other vendors' CPUs).
// ATTNKIT_CPU_GEMM=aten or =onednn sets the route instead (the tests run both).
bool gemms_on_aten();

// x W^T + b (bias may be absent) by the fastest route here: linear_few_rows up to
// kFewRows rows, oneDNN above (fp32, contiguous) unless gemms_on_aten(), at::addmm /
// at::mm otherwise.
constexpr int64_t kFewRows = 16;
at::Tensor linear_rows(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias);

}  // namespace cpu
}  // namespace attnkit
