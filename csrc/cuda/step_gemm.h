// The per-step recurrent GEMMs of csrc/cuda/rnn.cu's fused time loops, called on
// cuBLAS directly (cublasGemmEx on raw pointers) instead of through ATen's addmm_,
// whose dispatch, output checks and view tensors are host work in every step.
// Opt-in (ATTNKIT_RNN_CUDA_DIRECT_GEMM=1) until timed and tested on a GPU: the
// rnn benchmark's "direct cuBLAS vs ATen" rows and test_rnn's cuda loop tests.
#pragma once

#include <ATen/ATen.h>

namespace attnkit {
namespace cuda {
namespace step_gemm {

// Whether cublasGemmEx was found in the cuBLAS that torch loaded (looked up once).
bool available();

// Whether the fused loops of this call use it: opted in, float16 / bfloat16, and each tensor
// contiguous. (float32 and float64 keep ATen's path, whose TF32 settings this does not mirror;
// the halves take float32 accumulation, as ATen's GEMMs do.)
bool enabled(at::ScalarType type, std::initializer_list<const at::Tensor*> tensors);

// Row-major, on the current stream: c[rows, n] = a[rows, k] w^T + beta c, w [n, k].
void a_wt(const void* a, const void* w, void* c, int64_t rows, int64_t n, int64_t k, float beta, at::ScalarType type);

// Row-major, on the current stream: c[rows, n] = a[rows, k] w + beta c, w [k, n].
void a_w(const void* a, const void* w, void* c, int64_t rows, int64_t n, int64_t k, float beta, at::ScalarType type);

}  // namespace step_gemm
}  // namespace cuda
}  // namespace attnkit
