#include "step_gemm.h"

#include <ATen/cuda/CUDAContext.h>
#include <cublas_v2.h>
#include <dlfcn.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

namespace attnkit {
namespace cuda {
namespace step_gemm {
namespace {

using GemmEx = cublasStatus_t (*)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int, const void*,
                                  const void*, cudaDataType_t, int, const void*, cudaDataType_t, int, const void*,
                                  void*, cudaDataType_t, int, cublasComputeType_t, cublasGemmAlgo_t);

// The cuBLAS torch loaded (libtorch_cuda needs it), found by its soname without loading
// another copy: the handle torch hands out belongs to that library. Not linked at build
// time because the pip CUDA wheels ship only libcublas.so.<major>, which `-lcublas` cannot find.
GemmEx gemm_ex() {
  static const GemmEx fn = [] {
    const std::string soname = "libcublas.so." + std::to_string(CUBLAS_VER_MAJOR);
    void* library = dlopen(soname.c_str(), RTLD_NOW | RTLD_NOLOAD);
    return library == nullptr ? nullptr : reinterpret_cast<GemmEx>(dlsym(library, "cublasGemmEx"));
  }();
  return fn;
}

cudaDataType_t data_type(at::ScalarType type) {
  TORCH_CHECK(type == at::kHalf || type == at::kBFloat16, "step_gemm: float16 or bfloat16 only");
  return type == at::kHalf ? CUDA_R_16F : CUDA_R_16BF;
}

int narrow_int(int64_t value) {
  TORCH_CHECK(value >= 0 && value <= INT32_MAX, "step_gemm: a GEMM dimension past 2^31");
  return static_cast<int>(value);
}

// cuBLAS is column-major: the row-major c[rows, n] is its n x rows matrix with leading
// dimension n, so c = a op(w) is computed as c^T = op(w)^T a^T.
void gemm(cublasOperation_t w_op, int64_t w_ld, const void* a, const void* w, void* c, int64_t rows, int64_t n,
          int64_t k, float beta, at::ScalarType type) {
  if (rows == 0 || n == 0) return;
  const cudaDataType_t dt = data_type(type);
  const float alpha = 1.0f;
  // Sets the current stream, torch's workspace and its math mode on the handle.
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const cublasStatus_t status =
      gemm_ex()(handle, w_op, CUBLAS_OP_N, narrow_int(n), narrow_int(rows), narrow_int(k), &alpha, w, dt,
                narrow_int(w_ld), a, dt, narrow_int(k), &beta, c, dt, narrow_int(n), CUBLAS_COMPUTE_32F,
                CUBLAS_GEMM_DEFAULT_TENSOR_OP);
  TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "step_gemm: cublasGemmEx failed");
}

}  // namespace

bool available() { return gemm_ex() != nullptr; }

bool enabled(at::ScalarType type, std::initializer_list<const at::Tensor*> tensors) {
  const char* value = std::getenv("ATTNKIT_RNN_CUDA_DIRECT_GEMM");
  if (value == nullptr || std::strcmp(value, "1") != 0) return false;
  if ((type != at::kHalf && type != at::kBFloat16) || !available()) return false;
  for (const at::Tensor* t : tensors) {
    if (!t->is_contiguous()) return false;
  }
  return true;
}

void a_wt(const void* a, const void* w, void* c, int64_t rows, int64_t n, int64_t k, float beta,
          at::ScalarType type) {
  // w [n, k] row-major is cuBLAS's k x n matrix (leading dimension k): transposed, it is w.
  gemm(CUBLAS_OP_T, k, a, w, c, rows, n, k, beta, type);
}

void a_w(const void* a, const void* w, void* c, int64_t rows, int64_t n, int64_t k, float beta,
         at::ScalarType type) {
  // w [k, n] row-major is cuBLAS's n x k matrix (leading dimension n): w^T as it stands.
  gemm(CUBLAS_OP_N, n, a, w, c, rows, n, k, beta, type);
}

}  // namespace step_gemm
}  // namespace cuda
}  // namespace attnkit
